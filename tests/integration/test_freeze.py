"""Application-consistent live backups (backup --fs-freeze): a real qemu-ga in the real test
guest (scripts/build-guest.sh, ba.qga=1) freezes an ext4 file system on a virtio disk.

The guest mounts the ext4 disk and writes and fsyncs numbered files, one after the other,
saying ``BA-GUEST: synced N`` after each. qemu-ga runs the fsfreeze hook
/etc/ba-fsfreeze-hook, which runs the test's /run/ba-hook: it logs every call to
/run/hook.log and the console, writes a marker file on the ext4 disk before a freeze, and
sleeps first while /run/slow exists (the test writes guest files through qemu-ga's
guest-file-* commands). ext4 clears ``needs_recovery`` in its superblock while it is frozen
(its journal is flushed) and sets it again at the thaw, so a backup taken while frozen
restores to an ext4 with no journal to replay; a crash-consistent one almost always needs
recovery.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.qemu.qga import GuestAgent
from tests.integration.cli_util import AGENT, ERROR_PREFIX, agent, running
from tests.integration.vm import Disk, Guest, Vm, VmFactory

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.slow,
              pytest.mark.timeout(900)]

MiB = 1024 * 1024
DISK_SIZE = 64 * MiB
#: Files the guest must have fsynced before a backup starts.
LEAD = 5
#: Generous bounds for a TCG guest on a loaded 2-core machine (never asserted as times).
BOOT = 180.0
THAW_PROMISE = 150.0  # the watchdog's GRACE (120 s) and its attempts

HOOK = r"""#!/bin/sh
echo "$1" >>/run/hook.log
echo "BA-GUEST: hook $1" >/dev/console  # (qemu-ga keeps the hook's own output)
if [ "$1" = freeze ]; then
    [ -e /run/slow ] && sleep "$(cat /run/slow)"
    echo "written by the fsfreeze hook" >/mnt/hook-marker
fi
exit 0
"""

GUEST = r"""
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || { echo "BA-GUEST: error: mount failed"; exit 1; }
cat >/run/ba-hook <<'EOF'
%(hook)sEOF
chmod 755 /run/ba-hook
echo "BA-GUEST: mounted"
i=0
while :; do
    echo "BA-FILE $i" >/tmp/c
    dd if=/tmp/c of=/mnt/f$i conv=fsync 2>/dev/null || { echo "BA-GUEST: error: f$i"; exit 1; }
    echo "$i" >>/mnt/log
    echo "BA-GUEST: synced $i"
    sleep 0.1
    i=$((i + 1))
done
"""


def ext4_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    return path


def qga_args(sock: Path) -> list[str]:
    """The guest-agent channel as QEMU users configure it (docs/LIVE.md)."""
    return ["-chardev", f"socket,path={sock},server=on,wait=off,id=qga0",
            "-device", "virtio-serial",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]


def last_synced(console: str) -> int:
    found = re.findall(r"BA-GUEST: synced (\d+)\n", console)
    return int(found[-1]) if found else -1


class FreezeVm:
    def __init__(self, vm: Vm, qga: Path, disk: Path) -> None:
        self.vm, self.qga, self.disk = vm, qga, disk

    def ga(self) -> contextlib.AbstractContextManager[GuestAgent]:
        return GuestAgent(str(self.qga), timeout=30)

    def status(self) -> str:
        with self.ga() as ga:
            return ga.fsfreeze_status()

    def write_file(self, path: str, data: bytes) -> None:
        with self.ga() as ga:
            h = ga.execute("guest-file-open", {"path": path, "mode": "w"})
            ga.execute("guest-file-write", {"handle": h,
                                            "buf-b64": base64.b64encode(data).decode()})
            ga.execute("guest-file-close", {"handle": h})

    def read_file(self, path: str) -> bytes:
        with self.ga() as ga:
            h = ga.execute("guest-file-open", {"path": path, "mode": "r"})
            got = ga.execute("guest-file-read", {"handle": h, "count": 65536})
            ga.execute("guest-file-close", {"handle": h})
            return base64.b64decode(got["buf-b64"])

    def wait_thawed(self, timeout: float = THAW_PROMISE) -> None:
        """Poll guest-fsfreeze-status until "thawed" (the watchdog may hold the channel)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if last == "thawed":
                    return
            except Exception as e:  # busy while the watchdog works, or qemu-ga in a hook
                last = e
            time.sleep(1)
        raise AssertionError(f"the guest is not thawed after {timeout:g} s: {last}")


@pytest.fixture
def freeze_vm(vms: VmFactory, guest: Guest, tmp_path: Path,
              short_tmp: Path) -> Callable[..., FreezeVm]:
    def start(qga_in_guest: bool = True) -> FreezeVm:
        disk = ext4_image(tmp_path / "vda.raw")
        sock = short_tmp / "qga.sock"
        script = GUEST % {"hook": HOOK}
        b64 = base64.b64encode(script.encode()).decode()
        append = ("ba.qga=1 " if qga_in_guest else "") + f"ba.cmd64={b64}"
        vm = vms.start([Disk(disk, "raw", "vda")], guest=Guest(guest.kernel, guest.initrd,
                                                               append),
                       extra_args=qga_args(sock))
        vm.wait_serial("BA-GUEST: mounted", timeout=BOOT)
        vm.wait_serial(f"BA-GUEST: synced {LEAD}\n", timeout=BOOT)
        return FreezeVm(vm, sock, disk)
    return start


def backup(fv: FreezeVm, out: Path, *extra: str,
           timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return agent("backup", "--qmp", fv.vm.agent_qmp, "-o", out, "--progress", "none",
                 "--connections", "1", *extra, timeout=timeout)


def restore(arc: Path, tmp: Path) -> Path:
    out = tmp / f"restored-{arc.stem}"
    done = agent("restore", arc, "--to-dir", out, "--progress", "none")
    assert done.returncode == 0, done.stderr.decode()
    return out / "vda.raw"


def fs_state(img: Path) -> tuple[bool, bool, str]:
    """(needs_recovery, e2fsck -n clean, e2fsck's output) of an ext4 image."""
    head = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True,
                          check=False)
    features = next((ln for ln in head.stdout.splitlines()
                     if ln.startswith("Filesystem features:")), "")
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True,
                          check=False)
    return "needs_recovery" in features, fsck.returncode == 0, fsck.stdout + fsck.stderr


def guest_file(img: Path, name: str) -> bytes:
    done = subprocess.run(["debugfs", "-R", f"cat /{name}", str(img)], capture_output=True,
                          check=False)
    return done.stdout


def node_names(vm: Vm) -> list[str]:
    return sorted(n["node-name"] for n in vm.qmp.execute("query-named-block-nodes"))


def info(arc: Path) -> dict[str, object]:
    done = agent("info", arc, "--json")
    assert done.returncode == 0, done.stderr.decode()
    got: dict[str, object] = json.loads(done.stdout)
    return got


def test_frozen_backup_restores_a_clean_ext4_with_every_fsynced_file(
        freeze_vm: Callable[..., FreezeVm], tmp_path: Path) -> None:
    fv = freeze_vm()
    synced = last_synced(fv.vm.serial_text())  # fsynced before the backup began
    arc = tmp_path / "frozen.arc"
    done = backup(fv, arc, "--fs-freeze", "required", "--qga", str(fv.qga))
    err = done.stderr.decode()
    assert done.returncode == 0, err
    frozen_for = re.search(r"application-consistent: the guest's file systems \((/mnt)\) "
                           r"were frozen for ([0-9.]+) s", err)
    assert frozen_for, err
    print(f"guest frozen for {frozen_for.group(2)} s")
    assert fv.status() == "thawed"
    assert fv.read_file("/run/hook.log") == b"freeze\nthaw\n"

    props = info(arc)["properties"]
    assert props == {"consistency": "application", "frozen-mountpoints": "/mnt"}
    shown = agent("info", arc).stdout.decode()
    assert "consistency: application (frozen: /mnt)" in shown

    img = restore(arc, tmp_path)
    needs_recovery, clean, fsck = fs_state(img)
    assert not needs_recovery
    assert clean, fsck
    for i in range(synced + 1):
        assert guest_file(img, f"f{i}") == f"BA-FILE {i}\n".encode(), i
    assert guest_file(img, "hook-marker") == b"written by the fsfreeze hook\n"

    # The same load without the freeze: report how the file system looks, assert nothing
    # on luck (ext4 marks itself needs_recovery whenever it is mounted and not frozen).
    arc_off = tmp_path / "off.arc"
    done = backup(fv, arc_off, "--fs-freeze", "off", "--qga", str(fv.qga))
    assert done.returncode == 0, done.stderr.decode()
    assert "crash-consistent (--fs-freeze off)" in done.stderr.decode()
    assert info(arc_off)["properties"] == {"consistency": "crash"}
    needs_recovery, clean, _ = fs_state(restore(arc_off, tmp_path))
    print(f"--fs-freeze off: needs_recovery={needs_recovery}, e2fsck -n clean={clean}")


def test_auto_without_an_answer_backs_up_crash_consistent_and_says_so(
        vms: VmFactory, tmp_path: Path, short_tmp: Path) -> None:
    # No guest code runs (-S): QEMU serves the channel, nobody answers on it.
    sock = short_tmp / "qga.sock"
    disk = ext4_image(tmp_path / "vda.raw")
    vm = vms.start([Disk(disk, "raw", "vda")], extra_args=qga_args(sock))
    nodes = node_names(vm)
    arc = tmp_path / "req.arc"
    done = agent("backup", "--qmp", vm.agent_qmp, "-o", arc, "--fs-freeze", "required",
                 "--qga", sock, "--freeze-timeout", "2", "--progress", "none")
    err = done.stderr.decode()
    assert done.returncode == 1
    assert err.startswith(ERROR_PREFIX + "cannot freeze the guest (--fs-freeze required): "
                          f"no guest agent answered on {sock} within 2 s"), err
    assert "nothing was changed on the VM" in err and len(err.splitlines()) == 1, err
    assert not arc.exists()
    assert node_names(vm) == nodes

    done = agent("backup", "--qmp", vm.agent_qmp, "-o", arc, "--qga", sock,
                 "--freeze-timeout", "2", "--progress", "none")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "the backup will be crash-consistent: no guest agent answered" in err
    assert info(arc)["properties"] == {"consistency": "crash"}

    # The channel held by another client: said at once, not after a timeout.
    with socket.socket(socket.AF_UNIX) as other:
        other.connect(str(sock))
        time.sleep(0.5)
        done = agent("backup", "--qmp", vm.agent_qmp, "-o", arc, "--fs-freeze", "required",
                     "--qga", sock, "--freeze-timeout", "60", "--progress", "none",
                     timeout=50)
    err = done.stderr.decode()
    assert done.returncode == 1 and "is in use by another client" in err, err


def test_a_freeze_that_times_out_is_thawed(freeze_vm: Callable[..., FreezeVm],
                                           tmp_path: Path) -> None:
    fv = freeze_vm()
    fv.write_file("/run/slow", b"6\n")  # the hook sleeps 6 s before the freeze
    nodes = node_names(fv.vm)
    done = backup(fv, tmp_path / "t.arc", "--fs-freeze", "required", "--qga", str(fv.qga),
                  "--freeze-timeout", "4")
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "cannot freeze the guest (--fs-freeze required)" in err
    assert "the guest was thawed" in err, err
    assert fv.status() == "thawed"
    assert fv.read_file("/run/hook.log") == b"freeze\nthaw\n"
    assert node_names(fv.vm) == nodes


def test_a_failing_transaction_after_the_freeze_thaws(freeze_vm: Callable[..., FreezeVm],
                                                       tmp_path: Path) -> None:
    fv = freeze_vm()
    nodes = node_names(fv.vm)
    # QEMU refuses a copy-before-write timeout beyond 32 bits: the filter's blockdev-add,
    # inside the frozen, paused window, fails.
    done = backup(fv, tmp_path / "x.arc", "--fs-freeze", "required", "--qga", str(fv.qga),
                  "--cbw-timeout", str(2**33))
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "cannot add the copy-before-write filter" in err, err
    assert fv.status() == "thawed"
    assert fv.read_file("/run/hook.log") == b"freeze\nthaw\n"
    assert node_names(fv.vm) == nodes
    assert fv.vm.qmp.execute("query-status")["status"] == "running"


def test_sigkill_of_the_agent_while_it_freezes_is_thawed_by_the_watchdog(
        freeze_vm: Callable[..., FreezeVm], tmp_path: Path) -> None:
    fv = freeze_vm()
    fv.write_file("/run/slow", b"8\n")  # a window to kill the agent in: the hook sleeps
    with running([AGENT, "backup", "--qmp", str(fv.vm.agent_qmp), "-o", str(tmp_path / "k.arc"),
                  "--fs-freeze", "required", "--qga", str(fv.qga), "--freeze-timeout", "60",
                  "--progress", "none"], stdin=subprocess.DEVNULL,
                 stderr=subprocess.PIPE) as proc:
        fv.vm.wait_serial("BA-GUEST: hook freeze", timeout=120)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(30)
    # The guest freezes after the agent died (the hook ends, qemu-ga freezes); no one but
    # the watchdog asks for the thaw.
    fv.vm.wait_serial("BA-GUEST: hook thaw", timeout=THAW_PROMISE)
    fv.wait_thawed()
    # (reported, not asserted: the hook's 8 s are in it)
    print(f"thawed by the watchdog {time.monotonic() - killed:.1f} s after the SIGKILL")
    assert fv.read_file("/run/hook.log") == b"freeze\nthaw\n"
    # The guest kept writing afterwards: its file system works.
    now = last_synced(fv.vm.serial_text())
    fv.vm.wait_serial(f"BA-GUEST: synced {now + 2}\n", timeout=120)
    # cleanup removes what the killed agent left in the graph (and finds the guest thawed).
    done = agent("cleanup", "--qmp", fv.vm.agent_qmp, "--qga", fv.qga)
    assert done.returncode == 0, done.stderr.decode()
    assert "freeze" not in done.stderr.decode()



def test_sigterm_while_the_guest_freezes_thaws_it_and_cleans_up(
        freeze_vm: Callable[..., FreezeVm], tmp_path: Path) -> None:
    fv = freeze_vm()
    fv.write_file("/run/slow", b"5\n")
    nodes = node_names(fv.vm)
    arc = tmp_path / "t.arc"
    with running([AGENT, "backup", "--qmp", str(fv.vm.agent_qmp), "-o", str(arc),
                  "--fs-freeze", "required", "--qga", str(fv.qga), "--freeze-timeout", "60",
                  "--progress", "none"], stdin=subprocess.DEVNULL,
                 stderr=subprocess.PIPE) as proc:
        fv.vm.wait_serial("BA-GUEST: hook freeze", timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 1
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
    assert "stopped by SIGTERM" in err, err
    # The agent itself thawed (no watchdog needed): by the time it exited.
    assert fv.status() == "thawed"
    assert fv.read_file("/run/hook.log") == b"freeze\nthaw\n"
    assert node_names(fv.vm) == nodes
    assert not arc.exists()


#: A --freeze-command / --thaw-command that reaches qemu-ga itself, as `virsh domfsfreeze`
#: would through libvirt.
HOOK_COMMAND = """
import sys
from agent.qemu.qga import GuestAgent
with GuestAgent(sys.argv[2], timeout=30) as ga:
    if sys.argv[1] == "freeze":
        ga.fsfreeze_freeze()
    else:
        ga.fsfreeze_thaw()
"""


def test_freeze_and_thaw_commands_for_a_channel_the_manager_holds(
        freeze_vm: Callable[..., FreezeVm], tmp_path: Path) -> None:
    fv = freeze_vm()
    script = tmp_path / "hook.py"
    script.write_text(HOOK_COMMAND)
    py = f"{sys.executable} {script}"
    arc = tmp_path / "h.arc"
    done = backup(fv, arc, "--fs-freeze", "required",
                  "--freeze-command", f"{py} freeze {fv.qga}",
                  "--thaw-command", f"{py} thaw {fv.qga}")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "application-consistent: the guest's file systems were frozen for" in err, err
    assert fv.status() == "thawed"
    assert fv.read_file("/run/hook.log") == b"freeze\nthaw\n"
    assert info(arc)["properties"] == {"consistency": "application"}
    needs_recovery, clean, fsck = fs_state(restore(arc, tmp_path))
    assert not needs_recovery and clean, fsck


def test_cleanup_thaws_a_guest_left_frozen(freeze_vm: Callable[..., FreezeVm]) -> None:
    fv = freeze_vm()
    with fv.ga() as ga:  # as if a backup and its watchdog had both died
        assert ga.fsfreeze_freeze() == 1
    assert fv.status() == "frozen"
    done = agent("cleanup", "--qmp", fv.vm.agent_qmp, "--qga", fv.qga)
    assert done.returncode == 0, done.stderr.decode()
    assert "removed the guest's freeze (thawed 1 file system(s))" in done.stderr.decode()
    assert fv.status() == "thawed"
