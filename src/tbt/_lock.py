"""One run lock: an exclusive lock file that a killed process never leaves blocking.

A :class:`RunLock` is a file created with ``O_EXCL`` that holds its owner's pid and host name
(``"PID\\nHOST\\n"``). Whoever finds it decides whether the owner still runs:

* a pid of this host that no longer exists (a ``kill -9``): stale, taken over;
* this process's own pid: held only if this process holds that lock now (a second
  acquisition in the same process refuses); otherwise it was left by an earlier process that
  had the same pid (containers restart with the same small pids) and is stale;
* another host (a shared file system): cannot be checked, assumed alive;
* no readable pid (being written this instant, or garbage): alive for 10 s after its last
  change, stale after.

A stale lock is renamed aside before it is removed, so two processes that both find it stale
cannot both take it: the one that moved a fresh lock puts it back and counts it as held.
Release removes the file only if it still holds this acquisition's content.

Users: ``tbt.cli._safety.run_lock`` (one run per output folder) and ``tbt.demo.replicate``
(one process per run of the protocol, and one preparing the data and teacher). Standard
library only (docs/architecture.md: core layer).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

__all__ = ["RunLock", "read_lock", "holder_alive"]

_HELD: set[str] = set()  # real paths of the locks this process holds now


def read_lock(path: str) -> tuple[int | None, str | None]:
    """``(pid, host)`` written in a lock file; ``(None, None)`` if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split()
        return int(lines[0]), (lines[1] if len(lines) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def holder_alive(path: str, pid: int | None, host: str | None) -> bool:
    """Whether the owner ``(pid, host)`` read from lock file ``path`` still holds it."""
    if pid is None:  # being written this instant, or garbage: trust it only while fresh
        try:
            return time.time() - os.path.getmtime(path) < 10
        except OSError:
            return False
    if host is not None and host != socket.gethostname():
        return True  # another machine on a shared file system: cannot tell, assume alive
    if pid == os.getpid():
        return os.path.realpath(path) in _HELD
    return _pid_alive(pid)


def _take_over_stale(path: str, pid: int | None) -> bool:
    """Remove a stale lock; ``False`` if it turned out to be a fresh lock of another run."""
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: try again
    if read_lock(aside)[0] != pid:  # we moved a lock that was created meanwhile: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        os.remove(aside)
        return False
    os.remove(aside)
    return True


class RunLock:
    """The lock file ``path`` (its folder must exist). ``acquire()`` never waits.

    After a refused :meth:`acquire`, ``pid`` and ``host`` name the owner (``pid`` None: the
    lock was being written, or was created just as a stale one was taken over).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.held = False
        self.pid: int | None = None
        self.host: str | None = None
        self._me = f"{os.getpid()}\n{socket.gethostname()}\n"

    def acquire(self) -> bool:
        """Take the lock (True), or find it held by a live owner (False)."""
        if self.held:
            return True
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.pid, self.host = read_lock(self.path)
                if holder_alive(self.path, self.pid, self.host):
                    return False
                if not _take_over_stale(self.path, self.pid):
                    self.pid = self.host = None
                    return False
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._me)
            self.held = True
            self.pid, self.host = os.getpid(), socket.gethostname()
            _HELD.add(os.path.realpath(self.path))
            return True
        self.pid = self.host = None  # five races in a row: count it as held
        return False

    def release(self) -> None:
        """Remove the lock file if this object holds it (and it still holds our content)."""
        if not self.held:
            return
        self.held = False
        _HELD.discard(os.path.realpath(self.path))
        with contextlib.suppress(OSError):
            with open(self.path, encoding="utf-8") as f:
                mine = f.read() == self._me
            if mine:
                os.remove(self.path)

    def owner(self) -> str:
        """``"pid N"``, ``"pid N on HOST"`` (another machine) or ``"another process"``."""
        if self.pid is None:
            return "another process"
        other_host = self.host is not None and self.host != socket.gethostname()
        return f"pid {self.pid}" + (f" on {self.host}" if other_host else "")
