"""Where supraopt may write: checks that keep a typed path from destroying a campaign's data.

Every function raises :class:`InputError` with one line naming the path, and never writes itself.
Nothing here follows a symlink to decide: a link is refused, not its target replaced.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from supraopt.errors import InputError

NAME_MAX = 255
"""Longest folder or file name most file systems accept (bytes)."""

LEDGER_SIDE_FILES = ("", "-wal", "-shm", "-journal", ".lock")
"""Suffixes of the files SQLite and supraopt keep beside a ledger database."""

SQLITE_MAGIC = b"SQLite format 3\x00"


def _kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def _lstat(path: Path, what: str) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise InputError(f"{what} {str(path)!r} cannot be used ({error.strerror}).") from None


def check_name(path: str | Path, what: str) -> Path:
    """Refuse an empty path and any folder or file name longer than the file system allows."""
    if not str(path).strip():
        raise InputError(f"{what} is empty; give a path.")
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InputError(f"{what}: the name {part[:40]!r}... is {len(part)} characters; at most {NAME_MAX}.")
    return path


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _parent_folder(path: Path, what: str) -> Path:
    parent = path.parent
    info = _lstat(parent, what)
    if info is None:
        raise InputError(f"{what} {str(path)!r}: the folder {str(parent)!r} does not exist.")
    if not stat.S_ISDIR(os.stat(parent).st_mode):
        raise InputError(f"{what} {str(path)!r}: {str(parent)!r} is not a folder.")
    return parent


def check_new_file(path: str | Path, what: str, *, protected: Iterable[Path] = (), force: bool = False) -> Path:
    """Check that ``path`` may receive a new file: a new name, or (with ``force``) an existing regular file.

    Refused: an empty path, a folder, a symbolic link, a FIFO, a device, a socket, a file among
    ``protected`` (existing or not; compared as resolved paths and as files, so another spelling or a
    hard link is caught too), an SQLite
    database, and an existing file without ``force``.
    """
    path = check_name(path, what)
    if str(path) in ("/", ".", "..") or path.name in ("", ".", ".."):
        raise InputError(f"{what} {str(path)!r} is a folder; give a file name, e.g. results.csv.")
    info = _lstat(path, what)
    _parent_folder(path, what)
    for owned in protected:
        if os.path.realpath(path) == os.path.realpath(owned) or _same(path, owned):
            raise InputError(f"{what} {str(path)!r} is the campaign's own {owned.name}; it is never overwritten.")
    if info is None:
        return path
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what} {str(path)!r} is {_kind(info.st_mode)}; give a new file name.")
    try:
        with open(path, "rb") as handle:
            if handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                raise InputError(f"{what} {str(path)!r} is an SQLite database (a ledger?); it is never overwritten.")
    except OSError as error:
        raise InputError(f"{what} {str(path)!r} cannot be read ({error.strerror}).") from None
    if not force:
        raise InputError(f"{what} {str(path)!r} exists; add --force to replace it, or give a new file name.")
    return path


def check_output_folder(path: str | Path, what: str) -> Path:
    """A folder to write files into: an existing folder, or a new path whose parents are folders."""
    path = check_name(path, what)
    info = _lstat(path, what)
    if info is not None and not stat.S_ISDIR(os.stat(path).st_mode if stat.S_ISLNK(info.st_mode) else info.st_mode):
        raise InputError(f"{what} {str(path)!r} is {_kind(info.st_mode)}, not a folder; give a folder.")
    _check_parents(path, what)
    return path


def check_new_folder(path: str | Path, what: str) -> Path:
    """A folder for a new campaign: a new path or an existing folder, whose parents are folders."""
    path = check_name(path, what)
    info = _lstat(path, what)
    if info is not None and not path.is_dir():
        raise InputError(f"{what} {str(path)!r} is {_kind(info.st_mode)}, not a folder; pick a new folder name.")
    _check_parents(path, what)
    return path


def _check_parents(path: Path, what: str) -> None:
    for parent in path.absolute().parents:
        info = _lstat(parent, what)
        if info is None:
            continue
        if not parent.is_dir():
            raise InputError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder.")
        if str(parent).startswith(("/proc", "/sys", "/dev")) and parent != Path("/"):
            raise InputError(f"{what} {str(path)!r} is inside {str(parent)!r}, a system folder; pick another one.")
        return


def check_input_file(path: str | Path, what: str) -> Path:
    """A file to read: it exists and is a regular file (or a link to one), not a folder or a pipe."""
    path = check_name(path, what)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} {str(path)!r} does not exist.") from None
    except OSError as error:
        raise InputError(f"{what} {str(path)!r} cannot be read ({error.strerror}).") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what} {str(path)!r} is {_kind(info.st_mode)}; give a file.")
    return path


def ledger_files(database: Path) -> list[Path]:
    """An SQLite ledger and the files beside it that belong to it."""
    return [database.with_name(database.name + suffix) for suffix in LEDGER_SIDE_FILES]
