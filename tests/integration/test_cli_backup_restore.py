"""End to end through the command line: back up real NBD exports, image files and configs
into one archive written to a pipe, then restore, verify, inspect and extract it.

Every command is the installed ``backup-agent`` console script run as its own process; the
sources are served by real ``qemu-nbd`` and ``nbdkit`` processes; results are checked with
``qemu-img compare`` and libnbd. One archive is built per module (through a real pipe) and
shared by the read-only checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd
import pytest

from agent.archive.reader import ArchiveReader
from tests.integration.cli_util import (
    AGENT,
    MiB,
    agent,
    agent_from_file,
    assert_ok,
    image_size,
    info_json,
    leftovers,
    partial_size,
    partials_of,
    pause_control,
    running,
    wait_for,
    write_random,
)
from tests.integration.conftest import (
    ImageOp,
    NbdServerFactory,
    Server,
    make_image,
    qemu_img_compare,
)

pytestmark = pytest.mark.integration

KiB = 1024
RAW_SIZE = 5 * MiB + 12345  # not a multiple of 512, let alone 64 KiB
RAW_OPS: list[ImageOp] = [
    ("write", 0xAB, 0, 256 * KiB),
    ("write", 0xCD, 1 * MiB + 4096, 100000),
    ("write", 0x5A, 2 * MiB, 512 * KiB),
    ("zero", 2 * MiB + 64 * KiB, 128 * KiB),  # write-zeroes inside data
    ("write", 0xEF, RAW_SIZE - 3000, 3000),  # up to the very last byte
]
QCOW2_SIZE = 64 * MiB  # mostly a hole
QCOW2_OPS: list[ImageOp] = [
    ("write", 0x11, 0, 64 * KiB),
    ("write", 0x22, 10 * MiB, 1 * MiB),
    ("zero", 10 * MiB + 128 * KiB, 128 * KiB),
    ("discard", 10 * MiB + 512 * KiB, 64 * KiB),
    ("write", 0x44, 40 * MiB + 512, 1536),
    ("write", 0x33, 63 * MiB, 512 * KiB),
]
KIT_SIZE = 7 * MiB  # served by nbdkit's file plugin
KIT_OPS: list[ImageOp] = [
    ("write", 0x66, 512 * KiB, 700 * KiB),
    ("zero", 1 * MiB, 64 * KiB),  # write-zeroes inside data
    ("write", 0x99, 5 * MiB + 512, 4096),
    ("write", 0x7E, KIT_SIZE - 64 * KiB, 64 * KiB),  # up to the very last byte
]
IMG_SIZE = 6 * MiB
BIG_CONFIG = 17 * MiB  # more than 16 MiB: several CONFIG_DATA records


@dataclass
class Disk:
    path: Path
    fmt: str


@dataclass
class Built:
    """The module's sources and the archive made from them through a pipe."""

    work: Path
    disks: dict[str, Disk]
    configs: dict[str, bytes]
    uris: dict[str, str]  # the --source devices
    archive: Path  # the bytes that went through the pipe, saved by tee
    piped_dir: Path  # what `restore -` made from the same pipe
    started: float
    finished: float
    stderr: dict[str, str] = field(default_factory=dict)


def _pipeline(built_dir: Path, backup_args: list[str], arc: Path, out_dir: Path,
              ) -> dict[str, str]:
    """backup -o - | tee ARC | restore - --to-dir OUT, all real processes and pipes."""
    errs = {k: built_dir / f"{k}.err" for k in ("backup", "tee", "restore")}
    with contextlib.ExitStack() as stack:
        e1, e2, e3 = (stack.enter_context(open(errs[k], "wb"))
                      for k in ("backup", "tee", "restore"))
        backup = stack.enter_context(running(
            [AGENT, "backup", *backup_args, "-o", "-"], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=e1))
        tee = stack.enter_context(running(
            ["tee", str(arc)], stdin=backup.stdout, stdout=subprocess.PIPE, stderr=e2))
        assert backup.stdout is not None and tee.stdout is not None
        backup.stdout.close()  # only tee holds the read end now
        rst = stack.enter_context(running(
            [AGENT, "restore", "-", "--to-dir", str(out_dir)], stdin=tee.stdout,
            stdout=subprocess.DEVNULL, stderr=e3))
        tee.stdout.close()
        codes = {"restore": rst.wait(timeout=120), "tee": tee.wait(timeout=120),
                 "backup": backup.wait(timeout=120)}
    text = {k: p.read_text(errors="replace") for k, p in errs.items()}
    assert codes == {"backup": 0, "tee": 0, "restore": 0}, (codes, text)
    return text


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    work = Path(tempfile.mkdtemp(prefix="ba-cli-"))
    servers = NbdServerFactory(work)
    try:
        raw = make_image(work / "raw0.raw", "raw", RAW_SIZE, RAW_OPS)
        os.truncate(raw, RAW_SIZE)  # qemu-img rounds the size up to 512: cut it back
        q0 = make_image(work / "q0.qcow2", "qcow2", QCOW2_SIZE, QCOW2_OPS)
        kit = make_image(work / "k0.raw", "raw", KIT_SIZE, KIT_OPS)
        rnd = write_random(work / "img0-src.raw", IMG_SIZE, [(0, 1 * MiB), (3 * MiB, 512 * KiB)])
        img0 = work / "img0.qcow2"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(rnd),
                        str(img0)], check=True)
        configs = {
            "vm.xml": "<domain type='kvm'><name>vm-ü</name></domain>\n".encode(),
            "big.bin": os.urandom(BIG_CONFIG),
        }
        for name, data in configs.items():
            (work / name).write_bytes(data)
        s_raw = servers.qemu_nbd(raw, "raw")
        s_q0 = servers.qemu_nbd(q0, "qcow2")
        s_kit = servers.nbdkit(["file", str(kit)], readonly=True)
        uris = {"raw0": s_raw.uri, "q0": s_q0.uri, "k0": s_kit.uri}
        args = [a for name, uri in uris.items() for a in ("--source", f"{name}={uri}")]
        args += ["--image", f"img0={img0}"]
        args += [a for name in configs for a in ("--config", f"{name}={work / name}")]
        archive, piped = work / "full.arc", work / "piped"
        started = time.time()
        stderr = _pipeline(work, args, archive, piped)
        finished = time.time()
        yield Built(
            work=work,
            disks={"raw0": Disk(raw, "raw"), "q0": Disk(q0, "qcow2"), "k0": Disk(kit, "raw"),
                   "img0": Disk(img0, "qcow2")},
            configs=configs, uris=uris, archive=archive, piped_dir=piped,
            started=started, finished=finished, stderr=stderr,
        )
    finally:
        servers.close()
        shutil.rmtree(work, ignore_errors=True)


def _same(disk: Disk, restored: Path, fmt: str = "raw") -> None:
    assert qemu_img_compare(disk.path, disk.fmt, restored, fmt), f"{restored} != {disk.path}"


def _device_sizes(built: Built) -> dict[str, int]:
    return {name: image_size(d.path, d.fmt) for name, d in built.disks.items()}


# -- the piped backup and restore ---------------------------------------------------------

def test_pipe_restore_equals_every_source(built: Built) -> None:
    files = sorted(p.name for p in built.piped_dir.iterdir())
    assert files == sorted(f"{n}.raw" for n in built.disks), files
    for name, disk in built.disks.items():
        _same(disk, built.piped_dir / f"{name}.raw")
    assert f"restored {len(built.disks)} device(s)" in built.stderr["restore"]


def test_restored_sizes_match_devices(built: Built) -> None:
    for name, size in _device_sizes(built).items():
        assert (built.piped_dir / f"{name}.raw").stat().st_size == size


def test_holes_stay_holes(built: Built) -> None:
    restored = built.piped_dir / "q0.raw"
    st = restored.stat()
    assert st.st_size == QCOW2_SIZE
    # about 1.6 MiB of data in 64 MiB: the rest must not be allocated
    assert st.st_blocks * 512 < 8 * MiB, st.st_blocks * 512


def test_config_from_file_and_pipe(built: Built) -> None:
    for name, data in built.configs.items():
        proc = agent("config", built.archive, name)
        assert_ok(proc)
        assert proc.stdout == data, name
        proc = agent_from_file(built.archive, "config", "-", name)
        assert_ok(proc)
        assert proc.stdout == data, name


def test_verify_file_and_pipe(built: Built) -> None:
    assert_ok(agent("verify", built.archive))
    assert_ok(agent_from_file(built.archive, "verify", "-"))


def test_info_json(built: Built) -> None:
    info = info_json(built.archive)
    assert isinstance(info["uuid"], str) and len(info["uuid"]) == 36
    assert built.started - 1 <= info["created"] <= built.finished + 1
    assert info["kind"] == "full"
    version = agent("--version").stdout.decode().split()[-1]
    assert info["tool_version"] == version
    sizes = _device_sizes(built)
    assert {d["name"]: d["size"] for d in info["devices"]} == sizes
    assert [d["name"] for d in info["devices"]] == ["raw0", "q0", "k0", "img0"]
    assert {c["name"]: c["size"] for c in info["configs"]} == {
        n: len(d) for n, d in built.configs.items()}
    t = info["totals"]
    assert t["data_bytes"] + t["zero_bytes"] == sum(sizes.values())
    assert 0 < t["data_bytes"] < sum(sizes.values())
    assert 0 < t["stored_bytes"] < built.archive.stat().st_size
    assert t["config_bytes"] == sum(len(d) for d in built.configs.values())
    assert t["archive_bytes"] == built.archive.stat().st_size
    with open(built.archive, "rb") as f:  # the seal is END's chain, read the long way
        reader = ArchiveReader(f, keep_configs=False)
        for _ in reader.records():
            pass
    assert reader.end is not None and info["seal"] == reader.end.chain.hex()


def test_info_json_from_pipe_is_the_same(built: Built) -> None:
    proc = agent_from_file(built.archive, "info", "-", "--json")
    assert_ok(proc)
    assert json.loads(proc.stdout) == info_json(built.archive)


def test_info_human(built: Built) -> None:
    proc = agent("info", built.archive)
    assert_ok(proc)
    out = proc.stdout.decode()
    for name in [*built.disks, *built.configs]:
        assert name in out, name
    assert info_json(built.archive)["uuid"] in out
    assert "archive " in out and "configs " in out  # the totals' last line


# -- restore variants ---------------------------------------------------------------------

def test_restore_qcow2(built: Built, short_tmp: Path) -> None:
    out = short_tmp / "q"
    assert_ok(agent("restore", built.archive, "--to-dir", out, "--format", "qcow2"))
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.qcow2" for n in built.disks)
    for name, disk in built.disks.items():
        restored = out / f"{name}.qcow2"
        assert json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(restored)], capture_output=True,
            check=True).stdout)["format"] == "qcow2"
        _same(disk, restored, "qcow2")


def test_restore_one_device(built: Built, short_tmp: Path) -> None:
    out = short_tmp / "one"
    assert_ok(agent("restore", built.archive, "--to-dir", out, "--device", "q0"))
    assert [p.name for p in out.iterdir()] == ["q0.raw"]
    _same(built.disks["q0"], out / "q0.raw")


def test_restore_one_device_from_pipe(built: Built, short_tmp: Path) -> None:
    out = short_tmp / "one"
    assert_ok(agent_from_file(built.archive, "restore", "-", "--to-dir", out,
                              "--device", "raw0"))
    assert [p.name for p in out.iterdir()] == ["raw0.raw"]
    _same(built.disks["raw0"], out / "raw0.raw")


@pytest.mark.parametrize("name", ["raw0", "q0"])
def test_restore_into_garbage_file(built: Built, short_tmp: Path, name: str) -> None:
    size = _device_sizes(built)[name]
    target = short_tmp / "target.img"
    target.write_bytes(b"\xff" * size)
    assert_ok(agent("restore", built.archive, "--device", name, "--to", target))
    assert target.stat().st_size == size
    _same(built.disks[name], target)
    if name == "q0":  # the zero ranges were punched out, not written
        assert target.stat().st_blocks * 512 < 8 * MiB


@pytest.mark.parametrize("garbage", [False, True], ids=["fresh", "garbage"])
def test_restore_to_nbd(built: Built, short_tmp: Path, nbd_server: NbdServerFactory,
                        garbage: bool) -> None:
    name = "raw0"
    size = _device_sizes(built)[name]
    ops = [("write", 0xFF, 0, size)] if garbage else []
    image = make_image(short_tmp / "t.raw", "raw", size, ops)
    server = nbd_server.qemu_nbd(image, "raw", readonly=False)
    assert_ok(agent("restore", built.archive, "--device", name, "--to", server.uri))
    server.stop()
    _same(built.disks[name], image)


def test_restore_nbd_from_pipe(built: Built, short_tmp: Path,
                               nbd_server: NbdServerFactory) -> None:
    size = _device_sizes(built)["q0"]
    image = make_image(short_tmp / "t.qcow2", "qcow2", size)
    server = nbd_server.qemu_nbd(image, "qcow2", readonly=False)
    assert_ok(agent_from_file(built.archive, "restore", "-", "--device", "q0",
                              "--to", server.uri))
    server.stop()
    _same(built.disks["q0"], image, "qcow2")


# -- backup options -----------------------------------------------------------------------

@pytest.mark.parametrize("compress", ["none", "zstd:1", "zstd:19"])
def test_compression_round_trips(built: Built, short_tmp: Path, compress: str) -> None:
    arc = short_tmp / "c.arc"
    proc = agent("backup", "--source", f"raw0={built.uris['raw0']}",
                 "--image", f"img0={built.disks['img0'].path}",
                 "--config", f"vm.xml={built.work / 'vm.xml'}",
                 "--compress", compress, "-o", arc)
    assert_ok(proc)
    assert arc.is_file() and leftovers(short_tmp) == []
    t = info_json(arc)["totals"]
    if compress == "none":
        assert t["stored_bytes"] == t["data_bytes"]
    else:  # raw0 is patterns: it compresses
        assert t["stored_bytes"] < t["data_bytes"]
    assert_ok(agent("verify", arc))
    out = short_tmp / "r"
    assert_ok(agent("restore", arc, "--to-dir", out))
    _same(built.disks["raw0"], out / "raw0.raw")
    _same(built.disks["img0"], out / "img0.raw")
    assert agent("config", arc, "vm.xml").stdout == built.configs["vm.xml"]


def test_named_output_appears_only_when_complete(short_tmp: Path,
                                                 nbd_server: NbdServerFactory) -> None:
    ctl = str(short_tmp / "pause.ctl")
    server = nbd_server.nbdkit(["pattern", "size=4M", f"pause-control={ctl}"],
                               filters=["pause"], readonly=True)
    assert pause_control(ctl, b"p") == b"P"  # every NBD request now waits
    arc = short_tmp / "named.arc"
    with running([AGENT, "backup", "--source", f"p={server.uri}", "-o", str(arc)],
                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE) as proc:
        wait_for(lambda: partial_size(arc) > 0,
                 "the archive header is written", proc)
        assert not arc.exists()
        assert pause_control(ctl, b"r") == b"R"
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode(errors="replace")
    assert arc.is_file()
    assert partials_of(arc) == []
    assert leftovers(short_tmp) == []
    assert_ok(agent("verify", arc))


def _nbd_read_all(server: Server) -> bytes:
    h = nbd.NBD()
    h.connect_uri(server.uri)
    try:
        size = h.get_size()
        return b"".join(h.pread(min(4 * MiB, size - off), off)
                        for off in range(0, size, 4 * MiB))
    finally:
        h.shutdown()
        del h


@pytest.mark.parametrize("plugin", [
    ["pattern", "size=3M"],
    # odd size; data, holes and data up to the last byte
    ["data", "data=( 0x55 0xAA )*2048 @1048576 ( 1 2 3 4 5 6 7 )*1000 @2999990 0xff*11",
     "size=3000001"],
], ids=["pattern", "data"])
def test_nbdkit_source(short_tmp: Path, nbd_server: NbdServerFactory, plugin: list[str]) -> None:
    server = nbd_server.nbdkit(plugin, readonly=True)
    expected = _nbd_read_all(server)
    arc = short_tmp / "k.arc"
    assert_ok(agent("backup", "--source", f"k={server.uri}", "-o", arc))
    out = short_tmp / "out"
    assert_ok(agent("restore", arc, "--to-dir", out))
    assert (out / "k.raw").read_bytes() == expected
    assert info_json(arc)["devices"][0]["size"] == len(expected)


# -- what the commands print --------------------------------------------------------------

def test_quiet_prints_nothing(built: Built, short_tmp: Path) -> None:
    arc = short_tmp / "q.arc"
    proc = agent("backup", "--quiet", "--source", f"q0={built.uris['q0']}", "-o", arc)
    assert_ok(proc)
    assert proc.stderr == b""
    commands: list[list[str | Path]] = [["verify", arc],
                                        ["restore", arc, "--to-dir", short_tmp / "r"]]
    for cmd in commands:
        proc = agent(*cmd, "--quiet")
        assert_ok(proc)
        assert proc.stderr == b"", cmd
        assert proc.stdout == b"", cmd


def _progress_events(stderr: bytes) -> list[dict[str, Any]]:
    """The progress objects; the one object after them must be the summary."""
    lines = [ln for ln in stderr.decode().splitlines() if ln.startswith("{")]
    events = [json.loads(ln) for ln in lines]
    assert events, stderr
    assert events[-1]["event"] == "summary", events[-1]
    for e in events[:-1]:
        assert e["event"] == "progress"
        assert 0 <= e["done"] <= e["total"]
    return events[:-1]


def test_progress_json(built: Built, short_tmp: Path) -> None:
    arc = short_tmp / "p.arc"
    proc = agent("backup", "--progress", "json", "--source", f"q0={built.uris['q0']}",
                 "--image", f"img0={built.disks['img0'].path}", "-o", arc)
    assert_ok(proc)
    events = _progress_events(proc.stderr)
    total = QCOW2_SIZE + IMG_SIZE
    assert events[-1]["done"] == events[-1]["total"] == total
    dones = [e["done"] for e in events]
    assert dones == sorted(dones)

    proc = agent("restore", arc, "--to-dir", short_tmp / "r", "--progress", "json")
    assert_ok(proc)
    events = _progress_events(proc.stderr)
    assert events[-1]["done"] == events[-1]["total"] == total
