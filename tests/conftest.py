"""Fixtures and markers shared by every test suite (unit and integration).

Markers (registered in pyproject.toml, ``--strict-markers``): ``slow`` (1 s or more here:
``pytest -m "not slow"`` is the quick loop, ``make test-quick``), ``root("why")`` (skipped
with that reason unless run as root, as CI does), ``network`` (network namespaces or TCP
listeners on the loopback), ``integration`` and ``qemu`` (run again on QEMU 10).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Give Ctrl-C back its KeyboardInterrupt when pytest was started with SIGINT ignored.

    A shell without job control starts ``cmd &`` with SIGINT ignored; Python then leaves it
    ignored, and so does every program the tests start (SIG_IGN survives exec): the tests
    of Ctrl-C handling would fail for the way the suite was started, not for the code.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``root("why")`` when not running as root, with the reason shown."""
    if os.geteuid() == 0:
        return
    for item in items:
        mark = item.get_closest_marker("root")
        if mark is not None:
            why = f": {mark.args[0]}" if mark.args else ""
            item.add_marker(pytest.mark.skip(reason=f"needs root{why}"))


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
