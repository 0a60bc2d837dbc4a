"""A job of the job file becomes a LiveJob (agent/jobs/runner.py): what the job says reaches
the option groups, what it leaves out keeps LiveJob's defaults."""

from __future__ import annotations

from agent.jobs.config import Job, Tls
from agent.jobs.runner import _live_job
from agent.live.job import CbwOptions, LiveJob, NetworkOptions
from agent.modes import Mode

MiB = 1024 * 1024


def test_what_a_job_leaves_out_keeps_the_defaults() -> None:
    live = _live_job(Job(name="vm1", qmp="/run/vm1.qmp", dir="/srv"), "out", Mode.FULL)
    assert live == LiveJob(qmp="/run/vm1.qmp", output="out", engine=live.engine)
    assert (live.cbw, live.network) == (CbwOptions(), NetworkOptions())


def test_what_a_job_says_reaches_the_option_groups() -> None:
    job = Job(name="vm1", qmp="hv:4444", dir="/srv", drives=("vda",), mode="incremental",
              tls=Tls("/tls", "/tls/keys.psk", "backup"), cbw_memory=64 * MiB,
              spool_dir="/spool", spool_limit=2 * MiB, cbw_timeout=9,
              qemu_nbd_addr="hv:10810", cbw_listen=":10900", configs=(("vm.xml", "/x"),))
    live = _live_job(job, "out", Mode.INCREMENTAL)
    assert (live.qmp, live.drives, live.configs, live.mode) == \
        ("hv:4444", ["vda"], [("vm.xml", "/x")], Mode.INCREMENTAL)
    assert live.cbw == CbwOptions(timeout=9, memory=64 * MiB, spool_dir="/spool",
                                  spool_limit=2 * MiB)
    assert live.network == NetworkOptions(tls_creds="/tls", tls_psk="/tls/keys.psk",
                                          tls_username="backup", qemu_nbd_addr="hv:10810",
                                          cbw_listen=":10900")


def test_the_guest_agent_keys_reach_the_freeze_options() -> None:
    from agent.live.freeze import FreezeOptions
    job = Job(name="vm1", qmp="/run/vm1.qmp", dir="/srv", fs_freeze="required",
              freeze_timeout=4, qga="/run/vm1/qga.sock", freeze_mountpoints=("/", "/data"))
    assert _live_job(job, "out", Mode.FULL).freeze == FreezeOptions(
        mode="required", qga="/run/vm1/qga.sock", mountpoints=["/", "/data"], timeout=4)
    hooks = Job(name="vm1", qmp="/run/vm1.qmp", dir="/srv", freeze_command="virsh domfsfreeze x",
                thaw_command="virsh domfsthaw x")
    assert _live_job(hooks, "out", Mode.FULL).freeze == FreezeOptions(
        freeze_command="virsh domfsfreeze x", thaw_command="virsh domfsthaw x")
    assert _live_job(Job(name="vm1", qmp="/q", dir="/srv"), "out", Mode.FULL).freeze == \
        FreezeOptions()
