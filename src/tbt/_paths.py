"""Is a model/tokenizer name a local path or a Hugging Face hub id?

A name that looks like a path must never be sent to the hub: a typo in a folder name would
otherwise turn into "Repo id must be in the form ..." after a minute of offline retries.
"""

from __future__ import annotations

import os
import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_path_like(name: str | os.PathLike) -> bool:
    """Whether ``name`` means a local file or folder (and so must not go to the hub).

    Local: it exists; it starts with ``.``, ``~`` or a path separator; it is not of the hub
    form ``name`` / ``org/name`` (e.g. it has two ``/`` or a backslash); or its folder part
    exists on disk (``out/tok`` when ``out`` is a local folder).
    """
    name = os.fspath(name)
    if os.path.exists(os.path.expanduser(name)):
        return True
    if name.startswith((".", "~", os.sep)) or (os.altsep and name.startswith(os.altsep)):
        return True
    if not _HUB_ID.match(name):
        return True
    head = os.path.dirname(name)
    return bool(head) and os.path.isdir(head)


def check_local_dir(name: str | os.PathLike, flag: str, fix: str = "") -> None:
    """Raise ``FileNotFoundError`` naming ``flag`` when ``name`` is path-like but no folder.

    Hub ids (``org/name`` with no local meaning) pass through untouched.
    """
    name = os.fspath(name)
    if not is_path_like(name):
        return
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return
    what = "is a file, not a folder" if os.path.exists(path) else "no such folder"
    raise FileNotFoundError(f"{flag} {name}: {what}" + (f"; {fix}" if fix else ""))
