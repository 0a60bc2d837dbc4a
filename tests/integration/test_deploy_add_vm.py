"""deploy/add-vm.sh, in a scratch root: each VM gets a directory of its own and an AppArmor
rule for it in its own profile, never in the abstraction all VMs share.

AppArmor cannot confine anything here; where ``apparmor_parser`` is installed, the edited
profile is compiled (parse only) and its rules are shown to cover this VM's directory and
not another's. test_hostile_neighbours.py shows the same separation with Unix users.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRIPT = DEPLOY / "add-vm.sh"
UUID = "0f0e0d0c-1111-2222-3333-444455556666"
#: What libvirt 9.0 (Debian 12) writes from its TEMPLATE.qemu at a VM's first start.
PROFILE = f"""#
# This profile is for the domain whose UUID matches this file.
#

#include <tunables/global>

profile libvirt-{UUID} flags=(attach_disconnected) {{
  #include <abstractions/libvirt-qemu>
  #include <libvirt/libvirt-{UUID}.files>
}}
"""
OLD_SHARED_RULE = "/run/backup-agent/** rwk,\n"


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    aa = root / "etc/apparmor.d"
    (aa / "libvirt").mkdir(parents=True)
    (aa / "libvirt" / f"libvirt-{UUID}").write_text(PROFILE)
    (aa / "local/abstractions").mkdir(parents=True)
    (aa / "local/abstractions/libvirt-qemu").write_text("# site rules\n" + OLD_SHARED_RULE)
    return root


def _add(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "--root", str(root), *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.root("systemd-tmpfiles --create makes files owned by the service user")
def test_a_vm_gets_its_own_directory_and_rule(tmp_path: Path) -> None:
    root = _root(tmp_path)
    done = _add(root, "--user", "root", "--uuid", UUID, "vm1")
    assert done.returncode == 0, done.stderr
    conf = root / "etc/tmpfiles.d/backup-agent-vm1.conf"
    assert "d /run/backup-agent/vm1 0700 root - -\n" in conf.read_text()
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(conf)], check=True,
                   capture_output=True)
    assert (root / "run/backup-agent/vm1").stat().st_mode & 0o777 == 0o700
    profile = root / f"etc/apparmor.d/libvirt/libvirt-{UUID}"
    text = profile.read_text()
    assert '  "/run/backup-agent/vm1/" r,\n  "/run/backup-agent/vm1/**" rw,\n}\n' in text
    # The rule every VM shared is gone; the site's own lines stay.
    shared = root / "etc/apparmor.d/local/abstractions/libvirt-qemu"
    assert shared.read_text() == "# site rules\n"
    assert "/run/backup-agent" not in shared.read_text()
    # Idempotent: a second run changes nothing.
    assert _add(root, "--user", "root", "--uuid", UUID, "vm1").returncode == 0
    assert profile.read_text() == text


@pytest.mark.skipif(shutil.which("apparmor_parser") is None, reason="no apparmor_parser")
def test_the_rule_compiles_and_covers_only_this_vm(tmp_path: Path) -> None:
    root = _root(tmp_path)
    assert _add(root, "--user", "root", "--uuid", UUID, "vm1").returncode == 0
    aa = root / "etc/apparmor.d"
    # Stand-ins for what the profile includes (the real ones come with apparmor and libvirt).
    (aa / "tunables").mkdir()
    (aa / "tunables/global").write_text("")
    (aa / "abstractions").mkdir()
    (aa / "abstractions/libvirt-qemu").write_text("")
    (aa / "libvirt" / f"libvirt-{UUID}.files").write_text('  "/var/lib/vm1.qcow2" rwk,\n')
    done = subprocess.run(["apparmor_parser", "-Q", "-I", str(aa), "-D", "rule-exprs",
                           str(aa / "libvirt" / f"libvirt-{UUID}")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rules = [line for line in done.stdout.splitlines() + done.stderr.splitlines()
             if line.startswith("rule:") and "backup-agent" in line]
    assert rules and all("/run/backup-agent/vm1/" in r for r in rules), rules


@pytest.mark.parametrize(("args", "words"), [
    (["--uuid", UUID, "../etc"], "bad VM name"),
    (["--uuid", UUID, "vm 1"], "bad VM name"),
    (["--uuid", "x;y", "vm1"], "bad UUID"),
    (["--uuid", "9" * 8 + "-0000-0000-0000-" + "0" * 12, "vm1"], "start the VM once"),
])
def test_bad_input_is_refused(tmp_path: Path, args: list[str], words: str) -> None:
    done = _add(_root(tmp_path), "--user", "root", *args)
    assert done.returncode != 0 and words in done.stderr, done.stderr
