"""Fixtures shared by every test suite (unit and integration)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh, short temporary directory (``/tmp/ba-XXXXXXXX``), removed at teardown.

    Unix socket paths are limited to 108 bytes and pytest's ``tmp_path`` is usually longer
    than that, so anything that creates a socket (qemu-nbd, nbdkit, QMP monitors) should put
    it here rather than under ``tmp_path``.
    """
    path = Path(tempfile.mkdtemp(prefix="ba-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
