"""The copy-before-write target plugin in a real nbdkit, driven by libnbd, qemu-io and QEMU."""

from __future__ import annotations

import errno
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

import nbd
import pytest

from agent.cbw.control import ControlClient
from agent.cbw.feed import FeedClient
from tests.integration.cli_util import running
from tests.integration.conftest import NbdServerFactory, Server

pytestmark = pytest.mark.integration

K = 64 * 1024
MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
PLUGIN = str(REPO / "nbd-plugins" / "cbw_target.py")


def plugin_env() -> dict[str, str]:
    """PYTHONPATH for nbdkit's embedded interpreter: the repo and the venv's site-packages."""
    return {"PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}"}


def start_plugin(nbd_server: NbdServerFactory, tmp: Path, *params: str) -> tuple[Server, str]:
    control = str(tmp / "ctl")
    spool = tmp / "spool"
    spool.mkdir(exist_ok=True)
    server = nbd_server.nbdkit(
        ["python", PLUGIN, *params, f"spool-dir={spool}", f"control={control}"],
        env=plugin_env(),
    )
    return server, control


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def block_status(h: nbd.NBD, offset: int, length: int) -> list[tuple[int, int]]:
    """(length, flags) runs of base:allocation for the range."""
    runs: list[tuple[int, int]] = []

    def cb(metacontext: str, off: int, entries: list[int], err: int) -> int:
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            runs.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, cb)
    return runs


def test_write_read_trim_status_feed(nbd_server: NbdServerFactory, short_tmp: Path) -> None:
    server, control = start_plugin(
        nbd_server, short_tmp, "size=64M", "memory=1M", "spool-limit=2M"
    )
    h = connect(server.uri)
    try:
        h.pwrite(b"\x11" * K, 0)
        h.pwrite(b"\x22" * MiB, 4 * MiB)  # a 1 MiB piece, as QEMU splits larger copies
        h.zero(MiB, 8 * MiB)
        assert h.pread(K, 0) == b"\x11" * K
        assert h.pread(MiB, 4 * MiB) == b"\x22" * MiB
        assert h.pread(K, 8 * MiB) == bytes(K)
        with pytest.raises(nbd.Error) as e:
            h.pread(K, K)  # never copied
        assert e.value.errnum == errno.EIO
        assert block_status(h, 0, 2 * K) == [(K, 0), (K, nbd.STATE_HOLE)]
        assert block_status(h, 8 * MiB, K) == [(K, nbd.STATE_ZERO)]

        feed = FeedClient(control)  # what the agent receives: each stored range, with data
        try:
            got = [_receive(feed) for _ in range(3)]
            assert sorted(got) == [(b"D", 0, b"\x11" * K), (b"D", 4 * MiB, b"\x22" * MiB),
                                   (b"Z", 8 * MiB, MiB)]

            h.trim(MiB - 1, 4 * MiB + 1)  # rounded inward: frees 15 of the 16 clusters
            with pytest.raises(nbd.Error):
                h.pread(K, 4 * MiB + K)
            assert h.pread(K, 4 * MiB) == b"\x22" * K
            h.pwrite(b"\x33" * K, 20 * MiB)
            assert _receive(feed) == (b"D", 20 * MiB, b"\x33" * K)
        finally:
            feed.shutdown()
            feed.close()
        with ControlClient(control) as client:
            stats = client.stats()
        assert stats["clusters_copied"] == 1 + 16 + 16 + 1
        assert stats["clusters_trimmed"] == 15
        assert stats["memory_used"] == 3 * K
    finally:
        h.shutdown()


def test_full_store_answers_enospc(nbd_server: NbdServerFactory, short_tmp: Path) -> None:
    server, control = start_plugin(
        nbd_server, short_tmp, "size=64M", "memory=1M", "spool-limit=2M"
    )
    h = connect(server.uri)
    try:
        for i in range(3):
            h.pwrite(bytes([i + 1]) * MiB, i * MiB)
        assert list((short_tmp / "spool").iterdir()) == []  # spool file already unlinked
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"\x44" * K, 10 * MiB)
        assert e.value.errnum == errno.ENOSPC
        assert h.pread(MiB, 2 * MiB) == b"\x03" * MiB  # spilled data reads back
        h.trim(2 * MiB, MiB)  # release the spool (libnbd: count, then offset)
        h.pwrite(b"\x44" * K, 10 * MiB)
        stats = ControlClient(control).stats()
        assert stats["bytes_spilled"] == 2 * MiB + K  # memory is still full
        assert stats["peak_memory"] == MiB and stats["spool_used"] == K
        assert stats["full_errors"] == 1
    finally:
        h.shutdown()
    assert server.running()


def test_qemu_io_and_unaligned_write(nbd_server: NbdServerFactory, short_tmp: Path) -> None:
    server, _ = start_plugin(nbd_server, short_tmp, "size=1M", "memory=1M")
    uri = f"nbd+unix:///?socket={server.socket}"
    out = subprocess.run(
        ["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 64k 64k", "-c",
         "read -P 0x5a 64k 64k", "-c", "write -P 1 0 4k"],
        capture_output=True, text=True, check=False,
    )
    assert "read 65536/65536" in out.stdout, out.stdout + out.stderr
    assert "Invalid argument" in out.stdout + out.stderr  # a 4 KiB write is not a cluster


def test_bad_parameters_stop_nbdkit(short_tmp: Path) -> None:
    for params, message in [
        ([], "size=SIZE is required"),
        (["size=1M", "memory=lots"], "memory='lots' is not a size"),
        (["size=1M", "spool-limit=1M", f"spool-dir={short_tmp}/nope"], "spool directory"),
    ]:
        proc = subprocess.run(
            ["nbdkit", "--foreground", "-U", str(short_tmp / "s"), "python", PLUGIN, *params],
            capture_output=True, text=True, timeout=30, check=False,
            env={"PATH": "/usr/bin:/bin", **plugin_env()},
        )
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr


@pytest.mark.qemu  # run on QEMU 10 too (make test)
def test_qemu_copy_before_write_into_plugin(
    nbd_server: NbdServerFactory, short_tmp: Path
) -> None:
    """QEMU's filter copies old clusters into the plugin; a full store breaks the snapshot only."""
    disk = short_tmp / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 4M", str(disk)],
                   check=True, capture_output=True)
    target, control = start_plugin(nbd_server, short_tmp, "size=4M", "memory=1M")
    qsd_sock = str(short_tmp / "qsd.sock")
    with open(short_tmp / "qsd.log", "wb") as log, running(
        ["qemu-storage-daemon",
         "--blockdev", f"file,node-name=disk0,filename={disk}",
         "--blockdev", f'{{"driver":"nbd","node-name":"tgt","server":'
                       f'{{"type":"unix","path":"{target.socket}"}}}}',
         "--blockdev", '{"driver":"copy-before-write","node-name":"cbw","file":"disk0",'
                       '"target":"tgt","on-cbw-error":"break-snapshot","cbw-timeout":5}',
         "--blockdev", '{"driver":"snapshot-access","node-name":"snap","file":"cbw",'
                       '"discard":"unmap"}',
         "--nbd-server", f"addr.type=unix,addr.path={qsd_sock}",
         "--export", "nbd,id=e1,node-name=cbw,name=disk,writable=on",
         "--export", "nbd,id=e2,node-name=snap,name=snap,writable=on"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    ):
        guest = connect(f"nbd+unix:///disk?socket={qsd_sock}") if _wait(qsd_sock) else None
        assert guest is not None, (short_tmp / "qsd.log").read_text()
        snap = connect(f"nbd+unix:///snap?socket={qsd_sock}")
        feed = FeedClient(control)
        with ControlClient(control) as client:
            guest.pwrite(b"\x55" * 4096, 4096)  # one 4 KiB guest write copies one cluster
            assert _receive(feed) == (b"D", 0, b"\xaa" * K)  # QEMU copied the old cluster
            feed.shutdown()
            feed.close()
            assert snap.pread(K, 0) == b"\xaa" * K  # the old data, read from the plugin
            assert guest.pread(4096, 4096) == b"\x55" * 4096

            guest.pwrite(b"\x66" * (2 * MiB), MiB)  # more than the store holds
            assert guest.pread(2 * MiB, MiB) == b"\x66" * (2 * MiB)  # the guest is unharmed
            with pytest.raises(nbd.Error):
                snap.pread(K, 2 * MiB)  # the snapshot is broken instead
            assert client.stats()["full_errors"] >= 1
        guest.shutdown()
        snap.shutdown()


def _receive(feed: FeedClient) -> tuple[bytes, int, bytes | int]:
    """The next range of the feed: ``(b"D", offset, data)`` or ``(b"Z", offset, length)``."""
    header = feed.next()
    assert header is not None, "the feed ended"
    kind, offset, length = header
    if kind == b"Z":
        return kind, offset, length
    data = bytearray(length)
    feed.read_into(memoryview(data))
    return kind, offset, bytes(data)


def _wait(sock: str, timeout: float = 10.0) -> bool:
    """True once ``sock`` accepts a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(sock)
                return True
            except OSError:
                time.sleep(0.05)
    return False
