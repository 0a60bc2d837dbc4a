"""Creating and renaming files in directories others may also write to.

What the agent writes goes first into a temporary file that only it could have made:
created exclusively (``O_EXCL``: never a file or symbolic link that was there before),
without following a symbolic link, readable by its owner only, under a random name no one
can plant something at in advance. The finished file then gets its name by a rename that
either replaces the old one on purpose (a new backup over the previous archive) or never
replaces anything (``renameat2(RENAME_NOREPLACE)``, or ``link`` where a file system lacks it).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
from pathlib import Path

#: The longest name of one directory entry on Linux file systems (ext4, xfs, btrfs, tmpfs).
NAME_MAX = 255
_RANDOM = 8  # characters of random name: 36^8 names, retried on a collision
_TRIES = 100
_TEMP_SUFFIX = ".partial"
_PRIVATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28 and later
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]


def fit_name(name: str, room: int = NAME_MAX) -> str:
    """``name`` cut to at most ``room`` bytes (file names are bytes: a character cut in two
    still round-trips through os.fsencode)."""
    raw = os.fsencode(name)
    return name if len(raw) <= room else os.fsdecode(raw[:room])


def short_name(stem: str, suffix: str) -> str:
    """``STEM + SUFFIX`` if that fits in one directory entry, else ``STEM`` cut short with
    ``~`` and 8 hex digits of its hash: distinct stems keep distinct names, and the same stem
    always gets the same one (``~`` cannot occur in the archive's device names)."""
    if len(os.fsencode(stem + suffix)) <= NAME_MAX:
        return stem + suffix
    tag = "~" + hashlib.sha256(os.fsencode(stem)).hexdigest()[:8]
    return fit_name(stem, NAME_MAX - len(os.fsencode(tag + suffix))) + tag + suffix


def temp_name(label: str) -> str:
    """A fresh hidden name that says what it is for: ``.LABEL.RANDOM.partial`` (LABEL cut
    short if the whole would not fit in one directory entry)."""
    tail = "." + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                         for _ in range(_RANDOM)) + _TEMP_SUFFIX
    return "." + fit_name(label, NAME_MAX - 1 - len(tail)) + tail


def create_private(directory: Path, label: str, flags: int = os.O_WRONLY) -> tuple[int, Path]:
    """A new empty file in ``directory``, mode 0600, made by this call and by no one else:
    its descriptor (opened with ``flags``) and its path (see :func:`temp_name`).
    Raises OSError."""
    for _ in range(_TRIES):
        path = directory / temp_name(label)
        try:
            return os.open(path, flags | _PRIVATE, 0o600), path
        except FileExistsError:
            continue  # a name taken (by chance, or planted): draw another
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {directory}")


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` (not followed if a symbolic link) is still the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (as anything: a dangling symbolic link
    too). Raises FileExistsError if it does, other OSErrors as rename(2) does."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    # A file system without RENAME_NOREPLACE: link(2) never replaces either.
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


def sync_dir(directory: Path) -> None:
    """Make the directory's entries (a new name) durable. Raises OSError."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_dirs(directory: Path) -> list[Path]:
    """``mkdir -p``: the directories this call created, outermost first. Raises OSError."""
    missing: list[Path] = []
    d = directory
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    made: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o777)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made meanwhile by someone else: not ours to remove
        made.append(d)
    if not directory.is_dir():  # there, but not a directory (or a link to one)
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    return made


def remove_made_dirs(made: list[Path]) -> None:
    """Remove the directories :func:`make_dirs` created, innermost first, as far as they
    are empty: never a directory it did not make, never anything in one."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            return  # not empty (another restore's file, say) or gone: leave it
