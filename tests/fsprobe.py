"""What the file system under a test's directory allows."""

from __future__ import annotations

import os
from pathlib import Path


def takes_file_of(directory: Path, size: int) -> bool:
    """Whether a file of ``size`` bytes can be made under ``directory`` (tmpfs takes
    2^63-1 bytes, ext4 stops at 16 TiB)."""
    probe = directory / ".size-probe"
    try:
        with open(probe, "wb") as f:
            os.ftruncate(f.fileno(), size)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def plant(at: Path, kind: str, victim: Path, content: bytes) -> None:
    """Put someone else's file at ``at``: a symbolic link to ``victim`` (``kind``
    "symlink") or a file holding ``content``. Made beside it, then renamed over it, so that
    it is a new inode, never the one it replaces reused."""
    other = at.with_name(at.name + ".planted")
    if kind == "symlink":
        other.symlink_to(victim)
    else:
        other.write_bytes(content)
    other.replace(at)
