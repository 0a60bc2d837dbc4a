"""``restore --live``: a paused VM with empty target images runs from a served backup while
QEMU's block-stream copies it in (real QEMU, TCG; real nbdkit).

After every live restore, nothing of the agent is left: no ``ba-`` node, job or object in
QEMU, no nbdkit, no ``ba-live-*`` directory or socket (the agent runs with ``TMPDIR`` in the
test's own short directory), and each target image has no backing file and holds the backup
plus exactly what the guest wrote.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import AgentError
from agent.restore_live import TARGET_CLUSTER, ZERO_CLUSTER, zero_map, zero_ranges
from agent.serve.server import ArchiveServer
from tests.integration.cli_util import (
    AGENT,
    DATA,
    alive,
    assert_error,
    assert_ok,
    first,
    processes_mentioning,
    running,
    wait_for,
)
from tests.integration.conftest import make_image
from tests.integration.vm import Disk, Guest, Vm, VmFactory

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.slow]

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB
#: The backed-up disk: data, a hole, data, a hole to the end.
SOURCE_OPS = [("write", 0x11, 0, 8 * MiB), ("write", 0x22, 16 * MiB, 4 * MiB)]
#: What the guest writes while the stream runs (offset, length, byte): a block the stream may
#: have copied already, a 4 KiB write inside a cluster of backup data (the rest of the
#: cluster must still come from the backup), and a block in a hole not yet streamed.
GUEST_WRITES = [(0, 64 * KiB, 0x71), (17 * MiB + 4 * KiB, 4 * KiB, 0x72),
                (28 * MiB, 64 * KiB, 0x73)]


def run_agent(tmp: Path, *args: str | os.PathLike[str], timeout: float = 300
              ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([AGENT, *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, check=False,
                          env={**os.environ, "TMPDIR": str(tmp)})


def backup(tmp_path: Path, short_tmp: Path, *images: tuple[str, Path],
           extra: tuple[str, ...] = ()) -> Path:
    arc = tmp_path / "vm.arc"
    args: list[str] = []
    for name, path in images:
        args += ["--image", f"{name}={path}"]
    assert_ok(run_agent(short_tmp, "backup", *args, *extra, "-o", arc))
    return arc


def empty_target(path: Path, size: int = SIZE, cluster: str | None = TARGET_CLUSTER) -> Path:
    """A new image as docs/SERVE.md makes it (``cluster``: None for qemu-img's default)."""
    opts = ["-o", f"cluster_size={cluster}"] if cluster else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), str(size)],
                   check=True)
    return path


def ours_in_qemu(vm: Vm) -> list[str]:
    """Every node, job and object of the agent QEMU still has."""
    q = vm.qmp
    found = [n["node-name"] for n in q.execute("query-named-block-nodes", {"flat": True})
             if n["node-name"].startswith("ba-")]
    found += [f"job {j['id']} ({j['status']})" for j in q.execute("query-jobs")]
    found += [o["name"] for o in q.execute("qom-list", {"path": "/objects"})
              if o["name"].startswith("ba-")]
    return found


def assert_nothing_left(vm: Vm, short_tmp: Path) -> None:
    assert ours_in_qemu(vm) == []
    assert list(short_tmp.glob("ba-live-*")) == []
    assert list(short_tmp.glob("ba-zeros-*")) == []  # QEMU had the zero maps open, unlinked
    assert processes_mentioning(str(short_tmp / "ba-live-")) == []


def backing(vm: Vm, node: str, role: str = "backing") -> str | None:
    """The node under ``node`` as its backing (or other ``role``; QEMU's block graph), or
    None."""
    graph = vm.qmp.execute("x-debug-query-block-graph")
    by_id = {n["id"]: n["name"] for n in graph["nodes"]}
    if node not in by_id.values():
        raise AssertionError(f"no node {node}")
    for e in graph["edges"]:
        if by_id[e["parent"]] == node and e["name"] == role:
            return str(by_id[e["child"]])
    return None


def image_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def same(a: Path, fmt_a: str, b: Path, fmt_b: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, str(a),
                           str(b)], capture_output=True, timeout=120, check=False)


@pytest.fixture(autouse=True)
def servers_stopped(short_tmp: Path) -> Iterator[None]:
    """At teardown, stop (by pid) any nbdkit this test's agent left serving in ``short_tmp``:
    one killed on purpose, or one whose test failed before its stream completed."""
    yield
    for pid in processes_mentioning(str(short_tmp / "ba-live-")):
        os.kill(pid, signal.SIGTERM)


# -- without a guest OS ------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_two_disks_are_filled_and_stand_alone(vms: VmFactory, tmp_path: Path,
                                              short_tmp: Path, encrypted: bool) -> None:
    from agent import keys

    vda_src = make_image(tmp_path / "vda-src.qcow2", "qcow2", SIZE, SOURCE_OPS)
    vdb_src = make_image(tmp_path / "vdb-src.raw", "raw", 3 * MiB + 512,
                         [("write", 0x33, 0, 3 * MiB + 512)])
    key_args: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    if encrypted:  # the served nbdkit gets the key through its pipe (docs/SERVE.md)
        pair = keys.generate()
        keys.write_private(str(tmp_path / "k.key"), keys.encode_private(pair))
        key_args = ("--key", str(tmp_path / "k.key"))
        extra = ("--encrypt-to", keys.format_public(pair.public))
    arc = backup(tmp_path, short_tmp, ("vda", vda_src), ("vdb", vdb_src), extra=extra)
    vda = empty_target(tmp_path / "vda.qcow2")
    vdb = empty_target(tmp_path / "vdb.qcow2", 3 * MiB + 512, cluster=None)  # 64 KiB
    vm = vms.start([Disk(vda, "qcow2", "vda"), Disk(vdb, "qcow2", "vdb")])  # paused (-S)
    if encrypted:  # without the key: refused before anything is added to the VM
        refused = run_agent(short_tmp, "restore", arc, "--live", "--qmp", vm.agent_qmp,
                            "--drive", f"vda={vda}", "--drive", f"vdb={vdb}")
        assert refused.returncode == 1 and b"give --key" in refused.stderr, refused.stderr
        assert ours_in_qemu(vm) == []
    proc = run_agent(short_tmp, "restore", arc, "--live", "--qmp", vm.agent_qmp,
                     "--drive", f"vda={vda}", "--drive", f"vdb={vdb}", "--progress", "json",
                     *key_args)
    assert_ok(proc)
    assert b"the VM runs from the backup" in proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith(b"{")]
    assert events and events[-1]["done"] == events[-1]["total"] == SIZE + 3 * MiB + 512
    assert vm.qmp.execute("query-status")["running"]
    assert backing(vm, "vda-fmt") is None and backing(vm, "vdb-fmt") is None
    assert_nothing_left(vm, short_tmp)
    vm.stop()
    for target, src, fmt in ((vda, vda_src, "qcow2"), (vdb, vdb_src, "raw")):
        assert "backing-filename" not in image_info(target)
        assert same(target, "qcow2", src, fmt).returncode == 0


#: Plays an agent that dies with its detached server running: starts it, says its pid and
#: socket, and exits (without stopping it) when told to.
_DYING_AGENT = """
import json, os, sys
from agent.serve.detached import DetachedServer
server = DetachedServer([sys.argv[1]], ["vda"], cache=16 << 20)
print(json.dumps([server.pid, server.socket]), flush=True)
sys.stdin.readline()
os._exit(0)
"""


@pytest.mark.parametrize("reader", [False, True], ids=["alone", "with-a-reader"])
def test_a_detached_server_lives_only_while_someone_reads_it(tmp_path: Path, short_tmp: Path,
                                                             reader: bool) -> None:
    """An agent killed before QEMU opened the served backup leaves no server serving
    nobody; one killed later leaves it to its reader (QEMU) until that one lets go."""
    import nbd

    from agent.serve.server import uri

    src = make_image(tmp_path / "src.qcow2", "qcow2", SIZE, SOURCE_OPS)
    arc = backup(tmp_path, short_tmp, ("vda", src))
    env = {**os.environ, "TMPDIR": str(short_tmp),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with running([sys.executable, "-c", _DYING_AGENT, arc], stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, env=env) as agent:
        assert agent.stdin is not None and agent.stdout is not None
        pid, socket = json.loads(agent.stdout.readline())
        assert alive(pid)
        h = None
        if reader:  # QEMU's part: connected before the agent dies
            h = nbd.NBD()
            h.connect_uri(uri("vda", socket))
        agent.stdin.write(b"\n")
        agent.stdin.flush()
        assert agent.wait(30) == 0
        if h is not None:
            assert h.pread(4096, 0) == bytes([0x11]) * 4096  # still served
            assert alive(pid)
            h.shutdown()
            del h
        wait_for(lambda: not alive(pid), "nbdkit to exit once nobody reads it", limit=30)


def test_the_zero_map_covers_the_whole_clusters_that_read_as_zeros(tmp_path: Path,
                                                                    short_tmp: Path) -> None:
    # Data at 0-8 MiB and 16-20 MiB (SOURCE_OPS); zeros at 8-16 MiB, 20 MiB-32 MiB, and
    # 1 MiB of zeros written at 2.5 MiB, inside the data: too small for a 2 MiB cluster.
    ops = [*SOURCE_OPS, ("write", 0x00, 2 * MiB + 512 * KiB, MiB)]
    src = make_image(tmp_path / "src.raw", "raw", SIZE + 1 * MiB, ops)
    arc = backup(tmp_path, short_tmp, ("vda", src))
    server = ArchiveServer([str(arc)], ["vda"], str(short_tmp / "s"), cache=16 * MiB)
    try:
        zeros = zero_ranges(str(short_tmp / "s"), "vda", SIZE + 1 * MiB)
    finally:
        server.close()
    # The disk's last MiB is zeros too, but not a whole cluster of the map.
    assert zeros == [(8 * MiB, 8 * MiB), (20 * MiB, 12 * MiB)]
    zm = tmp_path / "zeros.qcow2"
    zero_map(str(zm), SIZE + 1 * MiB, zeros)
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(zm)],
                         capture_output=True, text=True, check=True).stdout
    runs = json.loads(out)
    assert all(e["present"] for e in runs)  # nothing left to any backing
    assert [(e["start"], e["length"]) for e in runs if e["zero"]] == zeros
    data = [e for e in runs if not e["zero"]]
    assert data and all(e["data"] and e["offset"] == e["start"] for e in data)
    assert sum(e["length"] for e in runs) == SIZE + 1 * MiB
    info = image_info(zm)
    assert info["format-specific"]["data"]["data-file-raw"] is True
    # The data file is a placeholder: nothing written but qemu-img's padding of the partial
    # last cluster (the map's clusters are 2 MiB, the disk 33 MiB).
    assert (tmp_path / "zeros.qcow2.raw").stat().st_blocks * 512 <= ZERO_CLUSTER


def test_a_zero_map_that_cannot_be_made_says_why(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match=r"cannot make the zero map .*qemu-img"):
        zero_map(str(tmp_path / "no-such-dir" / "z.qcow2"), SIZE, [])


@pytest.mark.parametrize("case", ["running", "not-empty", "wrong-size", "wrong-file",
                                  "raw", "no-device", "damaged-index"])
def test_bad_targets_are_refused_and_nothing_is_added(vms: VmFactory, tmp_path: Path,
                                                      short_tmp: Path, case: str) -> None:
    src = make_image(tmp_path / "src.qcow2", "qcow2", SIZE, SOURCE_OPS)
    arc = backup(tmp_path, short_tmp, ("vda", src))
    if case == "damaged-index":  # found by the server's walk of it, before QEMU is touched
        from agent.archive.format import FRAME
        from agent.archive.indexed import read_seal

        with open(arc, "rb") as f:
            at = read_seal(f).footer.index_pos + FRAME.size + 10
        data = bytearray(arc.read_bytes())
        data[at] ^= 0x40
        arc.write_bytes(bytes(data))
    target = empty_target(tmp_path / "vda.qcow2", SIZE // 2 if case == "wrong-size" else SIZE)
    if case == "not-empty":
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 4k", str(target)],
                       check=True, capture_output=True)
    disk = Disk(target, "qcow2", "vda")
    if case == "raw":
        target = make_image(tmp_path / "vda.raw", "raw", SIZE)
        disk = Disk(target, "raw", "vda")
    vm = vms.start([disk])
    if case == "running":
        vm.qmp.execute("cont")
    drive = {"wrong-file": f"vda={src}", "no-device": f"vdz={target}"}.get(case,
                                                                             f"vda={target}")
    proc = run_agent(short_tmp, "restore", arc, "--live", "--qmp", vm.agent_qmp,
                     "--drive", drive)
    words = {"running": "is running", "not-empty": "not empty", "wrong-size": "qemu-img create",
             "wrong-file": "not that file", "raw": "qcow2", "no-device": "no device",
             "damaged-index": "could not serve: "}[case]
    assert_error(proc, words)
    assert_nothing_left(vm, short_tmp)
    if case != "running":
        assert vm.qmp.execute("query-status")["status"] == "prelaunch"


# -- with the test guest -----------------------------------------------------------------------

# Run by the guest's /init (ba.cmd64): checksum the whole disk (most of it read through the
# backup), write its own blocks, check the kernel saw no I/O error, then stay up.
GUEST_CMD = """
sum=$(md5sum /dev/vda | cut -d' ' -f1)
echo "BA-GUEST: sum $sum"
%(writes)s
if dmesg | grep -i 'i/o error'; then echo "BA-GUEST: error: I/O error in the kernel log"; fi
echo "BA-GUEST: writes done"
sleep 3600
"""


def guest_for_live_restore(guest: Guest) -> Guest:
    writes = "\n".join(
        f"dd if=/dev/zero bs={length} count=1 2>/dev/null | tr '\\000' '\\{byte:03o}' | "
        f"dd of=/dev/vda bs=4096 seek={offset // 4096} conv=notrunc,fsync 2>/dev/null "
        f"|| echo 'BA-GUEST: error: write at {offset} failed'"
        for offset, length, byte in GUEST_WRITES)
    cmd = GUEST_CMD % {"writes": writes}
    return Guest(guest.kernel, guest.initrd,
                 append=f"ba.cmd64={base64.b64encode(cmd.encode()).decode()}")


def expected_disk(src: Path, tmp_path: Path) -> Path:
    """The backed-up disk plus the guest's writes, as a raw file."""
    want = tmp_path / "want.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(want)], check=True)
    with open(want, "r+b") as f:
        for offset, length, byte in GUEST_WRITES:
            f.seek(offset)
            f.write(bytes([byte]) * length)
    return want


def source_sum(src: Path) -> str:
    raw = src.with_suffix(".sum.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(raw)], check=True)
    return hashlib.md5(raw.read_bytes()).hexdigest()


def start_guest_vm(vms: VmFactory, guest: Guest, target: Path) -> Vm:
    return vms.start([Disk(target, "qcow2", "vda")], guest=guest_for_live_restore(guest),
                     paused=True)


def stream_job(vm: Vm) -> dict[str, Any] | None:
    jobs = [j for j in vm.qmp.execute("query-jobs") if j["id"].endswith("-stream")]
    return jobs[0] if jobs else None


def test_the_guest_runs_from_the_backup_while_it_streams(vms: VmFactory, guest: Guest,
                                                         tmp_path: Path,
                                                         short_tmp: Path) -> None:
    src = make_image(tmp_path / "src.qcow2", "qcow2", SIZE, SOURCE_OPS)
    arc = backup(tmp_path, short_tmp, ("vda", src))
    target = empty_target(tmp_path / "vda.qcow2")
    vm = start_guest_vm(vms, guest, target)
    argv = [AGENT, "restore", arc, "--live", "--qmp", vm.agent_qmp, "--drive",
            f"vda={target}", "--max-rate", "4M"]
    with running(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(short_tmp)}) as proc:
        # Hold the stream (through the test's own monitor) while the guest reads and writes,
        # so that all of the guest's I/O happens while the disk is still backed by the backup.
        wait_for(lambda: stream_job(vm) is not None, "the stream", proc)
        vm.qmp.execute("block-job-pause", {"device": stream_job(vm)["id"]})  # type: ignore
        text = vm.wait_serial("BA-GUEST: writes done", timeout=300)
        job = stream_job(vm)
        assert job is not None and job["status"] == "paused"
        assert job["current-progress"] < job["total-progress"]
        # Under the image: its zero map, the served backup as the map's data file.
        tag = job["id"].split("-")[1]
        assert backing(vm, "vda-fmt") == f"ba-{tag}-vda-z-src"
        assert backing(vm, f"ba-{tag}-vda-z-src", "data-file") == f"ba-{tag}-vda-src"
        vm.qmp.execute("block-job-resume", {"device": job["id"]})
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert "BA-GUEST: error" not in text, text
    assert f"BA-GUEST: sum {source_sum(src)}" in text
    assert backing(vm, "vda-fmt") is None
    assert_nothing_left(vm, short_tmp)
    vm.stop()
    assert "backing-filename" not in image_info(target)
    compare = same(target, "qcow2", expected_disk(src, tmp_path), "raw")
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_a_killed_agent_leaves_the_stream_going_and_cleanup_finishes_it(
        vms: VmFactory, guest: Guest, tmp_path: Path, short_tmp: Path) -> None:
    src = make_image(tmp_path / "src.qcow2", "qcow2", SIZE, SOURCE_OPS)
    arc = backup(tmp_path, short_tmp, ("vda", src))
    target = empty_target(tmp_path / "vda.qcow2")
    vm = start_guest_vm(vms, guest, target)
    argv = [AGENT, "restore", arc, "--live", "--qmp", vm.agent_qmp, "--drive",
            f"vda={target}", "--max-rate", "2M"]
    with running(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(short_tmp)}) as proc:
        wait_for(lambda: vm.qmp.execute("query-status")["running"], "the VM to run", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        booted = "BA-GUEST: ready" in vm.serial_text()
    assert not booted, "the guest booted before the agent was killed: the test proves nothing"
    servers = processes_mentioning(str(short_tmp / "ba-live-"))
    assert len(servers) == 1  # the nbdkit, in a session of its own, serving on
    text = vm.wait_serial("BA-GUEST: writes done", timeout=300)
    assert "BA-GUEST: error" not in text, text
    assert f"BA-GUEST: sum {source_sum(src)}" in text
    clean = run_agent(short_tmp, "cleanup", "--qmp", vm.agent_qmp, timeout=600)
    assert_ok(clean)
    assert b"stopped the server" in clean.stderr
    assert vm.running()
    assert backing(vm, "vda-fmt") is None
    assert_nothing_left(vm, short_tmp)
    vm.stop()
    assert "backing-filename" not in image_info(target)
    compare = same(target, "qcow2", expected_disk(src, tmp_path), "raw")
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_sigterm_leaves_the_stream_to_cleanup(vms: VmFactory, tmp_path: Path,
                                              short_tmp: Path) -> None:
    src = make_image(tmp_path / "src.qcow2", "qcow2", SIZE, SOURCE_OPS)
    arc = backup(tmp_path, short_tmp, ("vda", src))
    target = empty_target(tmp_path / "vda.qcow2")
    vm = vms.start([Disk(target, "qcow2", "vda")])
    argv = [AGENT, "restore", arc, "--live", "--qmp", vm.agent_qmp, "--drive",
            f"vda={target}", "--max-rate", "4M"]
    with running(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(short_tmp)}) as proc:
        wait_for(lambda: stream_job(vm) is not None, "the stream", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    message = assert_error((proc.returncode, err.splitlines()[-1]), "SIGTERM",
                           "cleanup --qmp")
    assert "keeps serving" in message
    assert stream_job(vm) is not None
    assert len(processes_mentioning(str(short_tmp / "ba-live-"))) == 1
    assert_ok(run_agent(short_tmp, "cleanup", "--qmp", vm.agent_qmp))
    assert backing(vm, "vda-fmt") is None
    assert_nothing_left(vm, short_tmp)
    vm.stop()
    assert same(target, "qcow2", src, "qcow2").returncode == 0


def test_a_damaged_record_fails_the_stream_and_keeps_the_vm_served(
        vms: VmFactory, tmp_path: Path, short_tmp: Path) -> None:
    src = make_image(tmp_path / "src.qcow2", "qcow2", SIZE, SOURCE_OPS)
    arc = backup(tmp_path, short_tmp, ("vda", src))
    data = bytearray(arc.read_bytes())
    rec = first(bytes(data), DATA)
    data[rec.body + rec.body_len // 2] ^= 0xFF  # the body no longer matches its digest
    arc.write_bytes(data)
    target = empty_target(tmp_path / "vda.qcow2")
    vm = vms.start([Disk(target, "qcow2", "vda")])
    proc = run_agent(short_tmp, "restore", arc, "--live", "--qmp", vm.agent_qmp,
                     "--drive", f"vda={target}")
    message = assert_error((proc.returncode, proc.stderr.splitlines()[-1]),
                           "ended before the end", "still reads from the backup",
                           "cleanup --qmp")
    assert "data record at byte" in proc.stderr.decode()  # the plugin named the record
    # The VM runs on, still backed by the served archive, which is left serving.
    assert vm.qmp.execute("query-status")["running"]
    assert backing(vm, "vda-fmt") is not None
    assert len(processes_mentioning(str(short_tmp / "ba-live-"))) == 1, message
    # cleanup tries the stream again, fails the same way, and removes nothing the VM needs
    again = run_agent(short_tmp, "cleanup", "--qmp", vm.agent_qmp)
    assert_error((again.returncode, again.stderr.splitlines()[-1]), "ended before the end",
                 "left running")
    assert backing(vm, "vda-fmt") is not None
    assert len(processes_mentioning(str(short_tmp / "ba-live-"))) == 1
