"""The qemu-nbd the agent runs for --image: served, tuned, stopped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbd
import pytest

from agent.nbd.qemu_nbd import MALLOC_ENV, QemuNbd


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_the_agents_qemu_nbd_keeps_request_buffers_in_its_heap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its malloc threshold is set (the rest of the environment passed on), and the image is
    served and readable; the process is gone after close."""
    img = tmp_path / "d.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "1M"], check=True)
    monkeypatch.setenv("BA_TEST_MARK", "kept")
    server = QemuNbd(str(img), "raw")
    try:
        proc = server._proc.proc
        assert proc is not None
        env = _environ(proc.pid)
        assert env["MALLOC_MMAP_THRESHOLD_"] == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
        assert env["BA_TEST_MARK"] == "kept"
        h = nbd.NBD()
        h.connect_uri(server.uri)
        assert h.get_size() == 1 << 20
        assert h.pread(4096, 0) == bytes(4096)
        h.shutdown()
    finally:
        server.close()
    assert proc.poll() is not None
    assert not os.path.exists(server.socket)
