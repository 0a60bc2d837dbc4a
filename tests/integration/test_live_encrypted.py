"""Live backups encrypted (issue 17): a full and an incremental of a running VM, each
encrypted to a key, restored as a chain from a pipe; the chain's links read without it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.cli_util import AGENT, KiB, MiB, agent, assert_ok
from tests.integration.test_incremental import Guest, guest  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.qemu]  # qemu: run on QEMU 10 too


@pytest.mark.slow
def test_encrypted_full_and_incremental_of_a_running_vm(guest: Guest,  # noqa: F811
                                                        tmp_path: Path) -> None:
    gen = agent("key", "generate", "-o", tmp_path / "k")
    assert_ok(gen)
    pub = gen.stdout.decode().strip()
    full, inc = tmp_path / "0-full.arc", tmp_path / "1-inc.arc"
    assert_ok(guest.backup(full, "full", "--encrypt-to", pub))
    at_full = bytes(guest.model)
    guest.write(0x51, 2 * MiB, 64 * KiB)
    guest.zero(10 * MiB, 1 * MiB)
    assert_ok(guest.backup(inc, "incremental", "--encrypt-to", pub))
    # Without the key: the links of the chain, nothing else.
    i0 = json.loads(agent("info", full, "--json").stdout)
    i1 = json.loads(agent("info", inc, "--json").stdout)
    assert (i1["kind"], i1["parent_uuid"], i1["locked"]) == ("incremental", i0["uuid"], True)
    # With it: the checkpoint the incremental started, which only DETAILS holds.
    i1k = json.loads(agent("info", inc, "--json", "--key", tmp_path / "k").stdout)
    assert i1k["checkpoint"] == f"ba-inc-{i1['uuid']}"
    out0, out1 = tmp_path / "r0", tmp_path / "r1"
    assert_ok(agent("restore", full, "--to-dir", out0, "--key", tmp_path / "k"))
    assert (out0 / "vda.raw").read_bytes() == at_full
    with open(inc, "rb") as f:
        proc = subprocess.run([AGENT, "restore", str(full), "-", "--to-dir", str(out1),
                               "--key", str(tmp_path / "k")], stdin=f, capture_output=True,
                              timeout=120, check=False)
    assert_ok(proc)
    assert (out1 / "vda.raw").read_bytes() == guest.model
