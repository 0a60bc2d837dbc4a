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
