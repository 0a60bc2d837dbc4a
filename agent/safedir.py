"""Directories where the agent puts what other users must not touch: its sockets (the
copy-before-write targets', their control sockets, QEMU's NBD server for the agent) and the
spool of old clusters.

The agent makes its own directory for each helper inside ``$TMPDIR`` (``mkdtemp``: mode 0700,
a random name), so no other user can connect to a socket in it or read a file. That holds only
if no one else can rename entries of the directory it is made in: in a directory every user
may write to without the sticky bit (``chmod +t``, as /tmp has), or one that another user
owns, that user can move the agent's directory aside and put one of their own in its place,
with sockets the agent and QEMU then talk to. Such directories are refused before anything
starts, with the command that fixes them.
"""

from __future__ import annotations

import os
import pwd
import stat

from agent.errors import InvalidArgument


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_shared_dir(path: str, what: str) -> None:
    """Refuse directory ``path`` (described as ``what``, e.g. ``--spool-dir /x``) if a user
    other than this one (or root) owns it, or every user may write to it without the sticky
    bit."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidArgument(f"{what}: no such directory") from None
    except OSError as e:
        raise InvalidArgument(f"{what}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{what}: not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise InvalidArgument(
            f"{what} belongs to {_owner(st.st_uid)}, who could replace what the agent puts "
            f"there: use a directory of {_owner(os.geteuid())}'s or root's")
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise InvalidArgument(
            f"{what} may be written by every user and has no sticky bit (mode {mode:04o}), "
            f"so anyone could replace what the agent puts there: run chmod +t {path} (or "
            f"chmod o-w {path})")


def check_work_dirs(spool_dir: str | None) -> None:
    """Check where a live backup puts its sockets (``$TMPDIR``) and its spool."""
    import tempfile  # here: only a live backup needs it

    tmp = tempfile.gettempdir()
    check_shared_dir(tmp, f"TMPDIR {tmp} (where the agent's sockets go)")
    if spool_dir is not None and os.path.realpath(spool_dir) != os.path.realpath(tmp):
        check_shared_dir(spool_dir, f"--spool-dir {spool_dir}")
