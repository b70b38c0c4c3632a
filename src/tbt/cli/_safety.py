"""Never destroy what a command did not write: output folders, ``--overwrite`` and run locks.

Every subcommand that writes a folder goes through this module, so the rule is the same
everywhere (README "Command line", docs/training.md):

* ``--output-dir`` must be a folder (or not exist yet) that can be written; it may never be
  one of the command's inputs (``--model``, ``--teacher``, ``--tokenizer``, a data file's
  folder), with or without ``--overwrite``.
* A folder that already holds something is refused with one line (exit code 2) unless the
  command recognises it as its own resumable output (``tbt train --resume``, a previous
  ``tbt demo`` run) or ``--overwrite`` is given.
* Commands that write their result at the end (``export``, ``ptq``, ``tokenizer train``,
  ``evaluate``) write into a temporary sibling folder and rename it into place, so an
  interrupted run leaves the old folder untouched (:func:`staged_output`).
  Commands that write as they go (``train``, ``demo``, ``ablate``) empty the folder when they
  start, under the run lock, if ``--overwrite`` is given (:func:`clear_dir`).
* A run that writes as it goes holds ``DIR/.tbt.lock`` (created with ``O_EXCL``, holding the
  pid and host name) while it runs, so a second run into the same folder refuses instead of
  interleaving its log and losing one result; a lock left by a dead process (``kill -9``) is
  taken over (:func:`run_lock`).

Typical use in a subcommand (``add_overwrite_flag`` in ``register``)::

    out = check_output_dir(args.output_dir, overwrite=args.overwrite,
                           inputs={"--model": args.model})
    with staged_output(out, overwrite=args.overwrite) as tmp:
        ...write everything into tmp...
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping

from tbt._lock import RunLock, holder_alive, read_lock
from tbt._paths import check_local_dir, is_path_like  # noqa: F401  (re-exported for commands)
from tbt.cli import CliError

LOCK_NAME = ".tbt.lock"
OVERWRITE_HELP = ("replace the content of a non-empty --output-dir (never one of the inputs); "
                  "without it tbt refuses to delete or replace anything it did not write")


def add_overwrite_flag(parser: argparse.ArgumentParser, help: str = OVERWRITE_HELP) -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def _same_or_inside(inner: str, outer: str) -> bool:
    inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def entries(path: str) -> list[str]:
    """The folder's entries, the run lock left out; ``[]`` when it does not exist."""
    if not os.path.isdir(path):
        return []
    return sorted(e for e in os.listdir(path) if e != LOCK_NAME)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _makedirs(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; returns the folders it created, deepest first."""
    created, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return created


def _remove_if_empty(folders: list[str]) -> None:
    """Remove folders this process created, deepest first, as long as they are empty."""
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:
            return


def _check_writable(path: str, flag: str) -> None:
    """``path`` (or the folder it would be created in) must accept new files."""
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise CliError(f"{flag} {path}: {base} is a file, not a folder: choose a folder path")
    try:  # a real probe: os.access says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".tbt-probe-", dir=base)
    except OSError as e:
        reason = "read-only file system" if e.errno == errno.EROFS else "not writable"
        raise CliError(f"{flag} {path}: {base} is {reason}: choose a folder you can write to"
                       ) from None
    os.close(fd)
    os.remove(probe)


def check_output_dir(path: str, *, overwrite: bool = False, flag: str = "--output-dir",
                     inputs: Mapping[str, str | None] | Iterable[tuple[str, str | None]] = (),
                     allow_occupied: bool = False,
                     what: str = "") -> str:
    """Validate an output folder before any work; return it.

    Raises :class:`~tbt.cli.CliError` (one line, exit code 2) when ``path`` is a file, cannot
    be written, is (or contains) one of ``inputs`` (``{flag: path}`` or pairs; an input inside the
    output counts only where ``overwrite`` would delete it), or is not empty and neither
    ``overwrite`` nor ``allow_occupied`` is given. ``what`` names what the command would
    replace, for the message.
    """
    if not path:
        raise CliError(f"{flag} is empty: give a folder path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{flag} {path} is a file, not a folder: choose a folder path (new or "
                       f"empty)")
    _check_writable(path, flag)
    pairs = inputs.items() if isinstance(inputs, Mapping) else inputs
    for in_flag, in_path in pairs:
        if not in_path or not os.path.exists(in_path):
            continue
        if os.path.isdir(in_path) and os.path.realpath(in_path) == os.path.realpath(path):
            raise CliError(f"{flag} {path} is the {in_flag} folder: writing there would replace "
                           f"the input; choose another {flag}")
        if overwrite and _same_or_inside(in_path, path) and entries(path):
            raise CliError(f"{flag} {path} contains {in_flag} {in_path}: --overwrite would "
                           f"delete it; choose another {flag}")
    holder = lock_holder(path)
    if holder is not None:
        raise CliError(f"{flag} {path} is in use by another tbt run ({holder}): wait for it "
                       f"to finish or choose another {flag}")
    found = entries(path)
    if found and not (overwrite or allow_occupied):
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise CliError(f"{flag} {path} is not empty ({what or 'it holds'} {shown}): choose a "
                       f"new folder, or pass --overwrite to replace its content")
    return path


def check_output_file(path: str, *, overwrite: bool = False, flag: str = "--json") -> str:
    """Validate an output file before any work; return it.

    Raises :class:`~tbt.cli.CliError` (one line, exit code 2) when ``path`` is a folder, its
    folder cannot be written, or it exists and ``overwrite`` is not given.
    """
    if not path:
        raise CliError(f"{flag} is empty: give a file path")
    if os.path.isdir(path):
        raise CliError(f"{flag} {path} is a folder, not a file: choose a file path")
    _check_writable(os.path.dirname(os.path.abspath(path)), flag)
    if os.path.exists(path) and not overwrite:
        raise CliError(f"{flag} {path} already exists: choose a new file, or pass --overwrite "
                       f"to replace it")
    return path


@contextlib.contextmanager
def staged_output(path: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty temporary sibling of ``path``; on success it replaces ``path``.

    The new content appears under ``path`` in one rename when ``path`` is absent or empty;
    when it replaces an occupied folder (``overwrite``) the old folder is renamed aside first
    and removed afterwards. On an exception the temporary folder is removed and ``path`` is
    left as it was. If another process filled ``path`` meanwhile (without ``overwrite``),
    nothing is replaced and a :class:`CliError` says so.
    """
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    parents = _makedirs(parent)
    name = os.path.basename(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{name}.tbt-new-", dir=parent)
    done = False
    try:
        yield tmp
        old = None
        if overwrite and os.path.isdir(path) and os.listdir(path):
            old = tempfile.mkdtemp(prefix=f".{name}.tbt-old-", dir=parent)
            os.replace(path, old)  # onto the empty temp folder: one rename
        try:
            os.replace(tmp, path)  # POSIX: succeeds onto a missing or empty folder only
        except OSError as e:
            if old is not None:  # put the old folder back where it was
                with contextlib.suppress(OSError):
                    os.rename(old, path)
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise CliError(f"{path} was filled by another process while this one ran; "
                           "nothing was replaced (pass --overwrite to replace it)") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        done = True
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _remove_if_empty(parents)


def clear_dir(path: str) -> None:
    """Remove everything in ``path`` except the run lock (``--overwrite`` of a run that
    writes as it goes; call it while holding :func:`run_lock`)."""
    for e in entries(path):
        p = os.path.join(path, e)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


# ---- run lock (tbt._lock) -------------------------------------------------------------------

def lock_holder(directory: str) -> str | None:
    """``"pid N"`` when a live run of another process holds ``directory``'s lock, else ``None``."""
    path = os.path.join(directory, LOCK_NAME)
    if not os.path.isfile(path):
        return None
    pid, host = read_lock(path)
    if not holder_alive(path, pid, host) or pid == os.getpid():
        return None
    return f"pid {pid}" if pid is not None else "another process"


@contextlib.contextmanager
def run_lock(directory: str, flag: str = "--output-dir") -> Iterator[str]:
    """Hold ``directory/.tbt.lock`` (a :class:`tbt._lock.RunLock`) for the duration; the folder
    is created if needed.

    Raises :class:`CliError` when a live process (this one included) holds it. A lock left by
    a dead process is taken over. The lock file is removed on exit, and the folders this call
    created too if they are still empty.
    """
    created = _makedirs(directory)
    lock = RunLock(os.path.join(directory, LOCK_NAME))
    if not lock.acquire():
        _remove_if_empty(created)
        raise CliError(f"{flag} {directory} is in use by another tbt run ({lock.owner()}; lock "
                       f"file {lock.path}): wait for it to finish or choose another {flag} "
                       f"(delete the lock file only if no run is active)")
    try:
        yield lock.path
    finally:
        lock.release()
        _remove_if_empty(created)  # the folders made for the lock, if nothing was written


# ---- commands that own their folder (demo, ablate) ----------------------------------------

@contextlib.contextmanager
def owned_run_dir(path: str, marker: str, *, overwrite: bool = False,
                  inputs: Mapping[str, str | None] | Iterable[tuple[str, str | None]] = (),
                  flag: str = "--output-dir") -> Iterator[str]:
    """A folder a command writes as it goes and may reuse on its next run.

    The command leaves ``path/marker`` (e.g. ``.tbt-demo``) in the folder. A folder that holds
    the marker is the command's own earlier output and is reused (its files are rewritten);
    any other non-empty folder is refused unless ``overwrite``, which empties it first. The run
    lock is held for the duration.
    """
    def mine() -> bool:
        return os.path.isfile(os.path.join(path, marker))

    check_output_dir(path, overwrite=overwrite, inputs=inputs, allow_occupied=mine(),
                     what="it holds files not written by this command:")
    created = not os.path.isdir(path)
    with run_lock(path, flag):
        check_output_dir(path, overwrite=overwrite, inputs=inputs, allow_occupied=mine(),
                         what="it holds files not written by this command:")
        if overwrite and not mine():
            clear_dir(path)
        with open(os.path.join(path, marker), "w", encoding="utf-8") as f:
            f.write(f"written by tbt (pid {os.getpid()}); this folder may be rewritten by the "
                    f"same command\n")
        try:
            yield path
        finally:
            if created and entries(path) == [marker]:  # failed before writing anything
                os.remove(os.path.join(path, marker))
