"""A live backup across a network: QEMU on one "host", the agent on another.

Two network namespaces joined by a veth pair (tests/integration/netns.py): QEMU runs in the
hypervisor's, with a QMP monitor over TLS on 10.203.0.1; the agent runs in the backup
server's (10.203.0.2) and reaches QMP and QEMU's NBD server over TLS, while QEMU's
copy-before-write filter sends old clusters to the agent's nbdkit over TLS. Every refusal
(wrong PSK, a CA that did not sign QEMU's certificate, clear text) is one clear line, and
leaves QEMU as it was: same block nodes, no export, no object of ours, no NBD server.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_util import (
    AGENT,
    agent,
    agent_from_file,
    assert_error,
    describe,
    finish_streaming,
    running,
)
from tests.integration.conftest import TwoDisks, TwoDiskVms, qemu_img_compare
from tests.integration.netns import (
    HV_ADDR,
    Pki,
    TwoHosts,
    make_pki,
    qemu_tls_args,
    two_hosts,
)
from tests.integration.vm import Vm

pytestmark = [pytest.mark.integration, pytest.mark.qemu,  # qemu: run on QEMU 10 too
              pytest.mark.root("network namespaces"), pytest.mark.network]

KiB = 1024
MiB = 1024 * KiB
QMP_PORT = 4444
PLAIN_QMP_PORT = 4445
TIMEOUT = 180


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    with two_hosts() as h:
        yield h


@pytest.fixture
def remote_vm(two_disk_vm: TwoDiskVms, hosts: TwoHosts, pki: Pki) -> TwoDisks:
    """A VM in the hypervisor namespace with a 32 MiB qcow2 and a 4 MiB + 4608 byte raw disk,
    QMP over TLS on HV_ADDR:4444 (and in clear text on :4445), and copies of its disks as
    they were."""
    return two_disk_vm.start(32 * MiB, [("write", 0x11, 0, 12 * MiB),
                                        ("write", 0x22, 16 * MiB, 12 * MiB),
                                        ("zero", 30 * MiB, MiB)], 4 * MiB + 4608,
                             netns=hosts.hv, extra_args=qemu_tls_args(pki, QMP_PORT,
                                                                      PLAIN_QMP_PORT))


def _state(vm: Vm) -> tuple[list[str], list[object], list[str]]:
    """What a backup may change in QEMU: block nodes, exports, objects."""
    nodes = sorted(n["node-name"] for n in vm.qmp.execute("query-named-block-nodes"))
    objects = sorted(o["name"] for o in vm.qmp.execute("qom-list", {"path": "/objects"}))
    return nodes, vm.qmp.execute("query-block-exports"), objects


def _assert_untouched(vm: Vm, before: tuple[list[str], list[object], list[str]]) -> None:
    assert _state(vm) == before
    assert not [o for o in before[2] if o.startswith("ba-")]
    # No NBD server of ours is left running: stopping one fails.
    with pytest.raises(Exception, match="not running"):
        vm.qmp.execute("nbd-server-stop")


def remote_agent(hosts: TwoHosts, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """``backup-agent ARGS`` on the backup server (its namespace)."""
    return subprocess.run(hosts.run_in(hosts.bk, [AGENT, *map(str, args)]),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
                          check=False)


def _restore_and_compare(arcs: list[Path], expected: dict[str, Path], out: Path) -> None:
    done = agent("restore", *arcs, "--to-dir", out)
    assert done.returncode == 0, describe(done)
    for dev, image in expected.items():
        fmt = "qcow2" if image.suffix == ".qcow2" else "raw"
        assert qemu_img_compare(image, fmt, out / f"{dev}.raw", "raw"), dev


@pytest.mark.slow
def test_x509_backup_across_hosts_while_the_guest_writes(
    remote_vm: tuple[Vm, dict[str, Path]], hosts: TwoHosts, pki: Pki, tmp_path: Path
) -> None:
    """x509 on all three connections (with tls-authz on QEMU's NBD server): the archive
    holds the disks as they were when the backup started, the running disks every write
    the guest made meanwhile, and QEMU is left as it was."""
    vm, before = remote_vm
    state = _state(vm)
    with running(
        hosts.run_in(hosts.bk, [
            AGENT, "backup", "--qmp", f"{HV_ADDR}:{QMP_PORT}", "--tls-creds", str(pki.agent),
            "--qemu-tls-authz", "backup-authz", "--compress", "none", "--connections", "1",
            "--memory", "4M", "--request-size", "1M", "-o", "-"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        # The first bytes come after the snapshot exists; the backup then stalls on the
        # pipe we do not read, so the writes below race it and must be copied first.
        head = proc.stdout.read(4096)
        assert head.startswith(b"\x89BAGENT\n"), proc.stderr.read().decode()
        writes = [("vda", 0xA1, 0, 64 * KiB), ("vda", 0xA2, 20 * MiB + 4 * KiB, 4 * KiB),
                  ("vda", 0xA3, 30 * MiB, MiB), ("vdb", 0xB1, 4 * MiB, 4608)]
        for dev, pattern, off, length in writes:
            vm.guest_write(dev, pattern, off, length)
        rest, err, status = finish_streaming(proc, TIMEOUT)
        assert status == 0, err.decode()
    arc = tmp_path / "remote.arc"
    arc.write_bytes(head + rest)
    done = agent_from_file(arc, "verify", "-")
    assert done.returncode == 0, describe(done)
    _restore_and_compare([arc], before, tmp_path / "r")
    for dev, pattern, off, length in writes:
        vm.guest_verify(dev, pattern, off, length)
    copied = int(err.split(b"guest writes: ")[1].split(b" ")[0])
    assert copied > 0, err.decode()  # old clusters really crossed to the agent's host
    _assert_untouched(vm, state)


@pytest.mark.slow
def test_psk_full_then_incremental_across_hosts(
    remote_vm: tuple[Vm, dict[str, Path]], hosts: TwoHosts, pki: Pki, tmp_path: Path
) -> None:
    """PSK on both NBD connections (x509 on QMP): a full backup, guest writes, then an
    incremental, restored as a chain to the disk as it was at the incremental."""
    vm, before = remote_vm
    tls = ["--tls-creds", pki.agent, "--tls-psk", pki.psk, "--qemu-tls-server", "backup-psk",
           "--qemu-tls-client", "backup-psk-client"]
    qmp = f"{HV_ADDR}:{QMP_PORT}"
    full, inc = tmp_path / "full.arc", tmp_path / "inc.arc"
    made = remote_agent(hosts, "backup", "--qmp", qmp, *tls, "--drive", "vda", "--mode",
                        "full", "-o", full)
    assert made.returncode == 0, describe(made)
    state = _state(vm)  # the checkpoint bitmap stays; nothing else may change below
    expected = tmp_path / "expected-vda.qcow2"  # the disk as the incremental must see it
    shutil.copy(before["vda"], expected)
    writes = [(0xC1, 0, 64 * KiB), (0xC2, 17 * MiB, 3 * MiB), (0xC3, 31 * MiB, 4 * KiB)]
    for pattern, off, length in writes:
        vm.guest_write("vda", pattern, off, length)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {off} {length}",
                        str(expected)], check=True, capture_output=True)
    made = remote_agent(hosts, "backup", "--qmp", qmp, *tls, "--drive", "vda", "--mode",
                        "incremental", "-o", inc)
    assert made.returncode == 0, describe(made)
    info = agent("info", inc)
    assert b"incremental" in info.stdout, describe(info)
    _restore_and_compare([full, inc], {"vda": expected}, tmp_path / "r")
    nodes, exports, objects = _state(vm)
    assert (nodes, exports) == state[:2]
    assert not [o for o in objects if o.startswith("ba-")]


def test_wrong_psk_is_refused(
    remote_vm: tuple[Vm, dict[str, Path]], hosts: TwoHosts, pki: Pki, tmp_path: Path
) -> None:
    vm, _ = remote_vm
    state = _state(vm)
    out = tmp_path / "x.arc"
    bad = remote_agent(hosts, "backup", "--qmp", f"{HV_ADDR}:{QMP_PORT}", "--tls-creds",
                       pki.agent, "--tls-psk", pki.wrong_psk, "--qemu-tls-server", "backup-psk",
                       "--qemu-tls-client", "backup-psk-client", "-o", out)
    msg = assert_error(bad, "TLS", "same PSK")
    assert "copy-before-write target" in msg
    assert not out.exists()
    _assert_untouched(vm, state)


def test_certificate_from_another_ca_is_refused(
    remote_vm: tuple[Vm, dict[str, Path]], hosts: TwoHosts, pki: Pki, tmp_path: Path
) -> None:
    """The agent's ca-cert.pem did not sign QEMU's certificate: QMP is refused at the
    handshake, before the agent sends a single command."""
    vm, _ = remote_vm
    state = _state(vm)
    bad = remote_agent(hosts, "backup", "--qmp", f"{HV_ADDR}:{QMP_PORT}", "--tls-creds",
                       pki.wrong_ca, "-o", tmp_path / "x.arc")
    assert_error(bad, "does not trust", "ca-cert.pem")
    _assert_untouched(vm, state)


@pytest.mark.slow
def test_plain_tcp_is_refused_unless_asked_for(
    remote_vm: tuple[Vm, dict[str, Path]], hosts: TwoHosts, pki: Pki, tmp_path: Path
) -> None:
    vm, before = remote_vm
    state = _state(vm)
    out = tmp_path / "x.arc"
    # No credentials: refused before connecting, saying how to set up TLS.
    bad = remote_agent(hosts, "backup", "--qmp", f"{HV_ADDR}:{QMP_PORT}", "-o", out)
    assert_error(bad, "clear text", "--tls-creds", "--insecure-plaintext", "NETWORK.md")
    # A monitor without TLS, reached with credentials: refused at the handshake.
    bad = remote_agent(hosts, "backup", "--qmp", f"{HV_ADDR}:{PLAIN_QMP_PORT}",
                       "--tls-creds", pki.agent, "-o", out)
    assert_error(bad, "does not speak TLS")
    # nbd:// to another host is clear text too.
    bad = remote_agent(hosts, "backup", "--source", f"vda=nbd://{HV_ADDR}/vda", "-o", out)
    assert_error(bad, "clear text", "nbds://", "--insecure-plaintext")
    assert not out.exists()
    _assert_untouched(vm, state)
    # Asked for in so many words, clear text works: QMP, NBD and copy-before-write.
    arc = tmp_path / "plain.arc"
    made = remote_agent(hosts, "backup", "--qmp", f"{HV_ADDR}:{PLAIN_QMP_PORT}",
                        "--insecure-plaintext", "--drive", "vdb", "-o", arc)
    assert made.returncode == 0, describe(made)
    _restore_and_compare([arc], {"vdb": before["vdb"]}, tmp_path / "r")
    _assert_untouched(vm, state)


@pytest.mark.slow
def test_cleanup_over_tls_after_a_killed_remote_agent(
    remote_vm: tuple[Vm, dict[str, Path]], hosts: TwoHosts, pki: Pki
) -> None:
    """A killed agent leaves its nodes, exports and TCP NBD server in QEMU; its nbdkit dies
    with it (the guest goes on writing: break-snapshot); ``cleanup`` over TLS removes all."""
    vm, _ = remote_vm
    state = _state(vm)
    qmp = f"{HV_ADDR}:{QMP_PORT}"
    with running(
        hosts.run_in(hosts.bk, [AGENT, "backup", "--qmp", qmp, "--tls-creds", str(pki.agent),
                                "--compress", "none", "-o", "-"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        assert proc.stdout.read(1000).startswith(b"\x89BAGENT\n")  # the snapshot exists
        proc.kill()  # `ip netns exec` exec'd the agent: this pid is the agent's
    assert _state(vm) != state
    vm.guest_write("vda", 0x6D, 8 * MiB, 64 * KiB)
    vm.guest_verify("vda", 0x6D, 8 * MiB, 64 * KiB)
    bad = remote_agent(hosts, "cleanup", "--qmp", qmp)
    assert_error(bad, "clear text", "--tls-creds")
    done = remote_agent(hosts, "cleanup", "--qmp", qmp, "--tls-creds", pki.agent)
    assert done.returncode == 0, describe(done)
    _assert_untouched(vm, state)


@pytest.mark.slow
def test_a_scheduled_job_backs_up_a_vm_on_another_host(
    remote_vm: tuple[Vm, dict[str, Path]], hosts: TwoHosts, pki: Pki, tmp_path: Path
) -> None:
    """``job run`` with a HOST:PORT monitor and a tls table: the transport of
    ``backup --qmp HOST:PORT --tls-creds``, driven from jobs.toml on the backup server."""
    vm, before = remote_vm
    state = _state(vm)
    dest = tmp_path / "backups"
    dest.mkdir()
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f"""
[jobs.far]
qmp = "{HV_ADDR}:{QMP_PORT}"
dir = "{dest}"
mode = "full"
[jobs.far.tls]
creds_dir = "{pki.agent}"
""")
    done = remote_agent(hosts, "job", "run", "--config", jobs, "far")
    assert done.returncode == 0, describe(done)
    (arc,) = sorted(dest.glob("far-*-full.arc"))
    _restore_and_compare([arc], before, tmp_path / "r")
    _assert_untouched(vm, state)  # the checkpoint bitmaps are no nodes, exports or objects
