"""The one registry type behind every ``method=`` name of tbt (weights, activations, PTQ).

A :class:`Registry` maps a name to an entry. Entries are added with :meth:`Registry.add`
(normally from a ``register_*`` decorator) and read like a dict. The built-in entries are
loaded by one explicit step, the ``load_builtins`` function given to the registry: it imports
the modules that hold them, on the first read, so importing a registry module alone is enough
to see every built-in method (and importing it stays cheap).

Torch-free: this module is in the lowest layer (``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

__all__ = ["Registry"]

E = TypeVar("E")


class Registry(MutableMapping[str, E], Generic[E]):
    """Name -> entry, with the built-ins loaded on first read.

    Args:
        what: what an entry is, for messages (``"weight method"``).
        load_builtins: imports the modules that register the built-in entries.
        reserved: names that may not be registered (``"auto"`` of the activation methods).
    """

    def __init__(self, what: str, load_builtins: Callable[[], None] | None = None,
                 reserved: tuple[str, ...] = ()) -> None:
        self.what, self.reserved = what, reserved
        self._entries: dict[str, E] = {}
        self._load_builtins = load_builtins
        self._loaded = load_builtins is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: the modules being imported register into this registry
            assert self._load_builtins is not None
            self._load_builtins()

    def check_free(self, name: str) -> None:
        """``ValueError`` if ``name`` is taken or reserved.

        Does not load the built-ins (a built-in module calls this while it is being imported);
        a name taken before they load makes the colliding built-in fail to register.
        """
        if name in self._entries or name in self.reserved:
            raise ValueError(f"{self.what} {name!r} is already registered; pick another name")

    def add(self, name: str, entry: E) -> None:
        """Register ``entry`` as ``name``; an error if the name is taken."""
        self.check_free(name)
        self._entries[name] = entry

    def get_entry(self, name: str, field: str = "method") -> E:
        """The entry ``name``; ``ValueError`` naming the choices when there is none."""
        self._load()
        entry = self._entries.get(name)
        if entry is None:
            raise ValueError(f"{field}={name!r} is unknown; choose one of "
                             f"{[*self.reserved, *sorted(self._entries)]}")
        return entry

    # ---- the dict interface (reads load the built-ins) ------------------------------------
    def __getitem__(self, name: str) -> E:
        self._load()
        return self._entries[name]

    def __setitem__(self, name: str, entry: E) -> None:
        self.add(name, entry)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {sorted(self)})"
