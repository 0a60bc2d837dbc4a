"""Creating and renaming files in directories others may also write to.

What the agent writes goes first into a temporary file that only it could have made:
created exclusively (``O_EXCL``: never a file or symbolic link that was there before),
without following a symbolic link, readable by its owner only, under a random name no one
can plant something at in advance. The finished file then gets its name by a rename that
either replaces the old one on purpose (a new backup over the previous archive) or never
replaces anything (``renameat2(RENAME_NOREPLACE)``, or ``link`` where a file system lacks it).

A run that is killed leaves its temporary file behind, under a name no later run would
reuse. The next run for the same output removes such leftovers: files of the same label,
regular, its user's, not locked (every run holds an exclusive ``flock`` on its temporary
file while it lives, so a run still writing is never touched) and unchanged for a minute
(so that one just created, not yet locked, is not either).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import stat
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: The longest name of one directory entry on Linux file systems (ext4, xfs, btrfs, tmpfs).
NAME_MAX = 255
_RANDOM = 8  # characters of random name: 36^8 names, retried on a collision
_TRIES = 100
_TEMP_SUFFIX = ".partial"
_TAIL = 1 + _RANDOM + len(_TEMP_SUFFIX)  # ".RANDOM.partial"
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
#: A temporary file unchanged for this long, and not locked, belongs to a run that is gone.
STALE_AFTER = 60.0
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


def token() -> str:
    """8 random characters from a-z and 0-9, for names no one can guess."""
    return "".join(secrets.choice(_LETTERS) for _ in range(_RANDOM))


def temp_name(label: str) -> str:
    """A fresh hidden name that says what it is for: ``.LABEL.RANDOM.partial`` (LABEL cut
    short if the whole would not fit in one directory entry)."""
    return f"{_temp_stem(label)}.{token()}{_TEMP_SUFFIX}"


def _temp_stem(label: str) -> str:
    return "." + fit_name(label, NAME_MAX - 1 - _TAIL)


def create_private(directory: Path, label: str, flags: int = os.O_WRONLY,
                   leftovers: Leftovers | None = None) -> tuple[int, Path]:
    """A new empty file in ``directory``, mode 0600, made by this call and by no one else:
    its descriptor (opened with ``flags``) and its path (see :func:`temp_name`). What killed
    runs left of ``label`` there goes first (``leftovers``: the directory, read once for
    many files). Raises OSError."""
    (leftovers or Leftovers(directory)).remove(label)
    for _ in range(_TRIES):
        path = directory / temp_name(label)
        try:
            fd = os.open(path, flags | _PRIVATE, 0o600)
        except FileExistsError:
            continue  # a name taken (by chance, or planted): draw another
        # "In use", for remove_stale. Where locks do not work, the file's age still
        # protects it for a while.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, path
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {directory}")


_TEMP = re.compile(rf"(\..*)\.[a-z0-9]{{{_RANDOM}}}{re.escape(_TEMP_SUFFIX)}")


class Leftovers:
    """The temporary files in one directory (read once: a restore of many devices asks
    for each), and the removal of those killed runs left (see the module's docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._by_stem: dict[str, list[str]] = {}
        try:
            with os.scandir(directory) as entries:
                for e in entries:
                    m = _TEMP.fullmatch(e.name)
                    if m is not None:
                        self._by_stem.setdefault(m.group(1), []).append(e.name)
        except OSError:
            pass  # the caller's own open says what is wrong with the directory

    def remove(self, label: str) -> list[Path]:
        """Remove what killed runs left of ``label``'s temporary files; the paths removed.
        Anything it is not sure of stays."""
        removed = []
        for name in self._by_stem.pop(_temp_stem(label), []):
            path = self.directory / name
            if _stale(path):
                removed.append(path)
                log.info("removed %s, left by a run that was killed", path)
        return removed


def _stale(path: Path) -> bool:
    """Unlink ``path`` if it is a regular file of this user, unchanged for STALE_AFTER
    seconds and locked by no one; whether it was."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # gone, a symbolic link, not ours to read
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                or time.time() - st.st_mtime < STALE_AFTER):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live run holds it (or locks do not work here: leave it)
        if not same_file(fd, path):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` (not followed if a symbolic link) is still the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def is_ours(path: Path, ident: tuple[int, int]) -> bool:
    """Whether ``path`` (not followed if a symbolic link) is still the regular file this
    process made: ``ident`` its (device, inode), owned by us (an inode number may be reused
    once a file is gone: what someone else put there is told apart by its owner)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == ident
            and st.st_uid == os.geteuid())


def remove_if_ours(path: Path, ident: tuple[int, int]) -> bool:
    """Unlink ``path`` if it is still the file of :func:`is_ours`; whether it did. What
    someone put at its name meanwhile is left as it is."""
    if not is_ours(path, ident):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


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
