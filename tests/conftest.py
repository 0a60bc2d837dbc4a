"""Fixtures shared by every test suite (unit and integration)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh, short temporary directory (``$TMPDIR/ba-XXXXXXXX``), removed at teardown.

    Unix socket paths are limited to 108 bytes and pytest's ``tmp_path`` is usually longer
    than that, so anything that creates a socket (qemu-nbd, nbdkit, QMP monitors) should put
    it here rather than under ``tmp_path``.
    """
    path = Path(tempfile.mkdtemp(prefix="ba-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir() -> Iterator[Path]:
    """TMPDIR for the whole run (``/tmp/ba-run-XXXXXX``), removed at the end.

    Every process the tests start inherits it, the agent's private socket directories
    included: an agent a test kills with SIGKILL cannot remove them itself, and without this
    they would pile up in /tmp run after run.
    """
    path = Path(tempfile.mkdtemp(prefix="ba-run-"))
    saved_env, saved_cache = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    try:
        yield path
    finally:
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        tempfile.tempdir = saved_cache
        shutil.rmtree(path, ignore_errors=True)
