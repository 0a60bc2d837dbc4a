"""Running one job of the job file: a live backup of one VM to its destination.

::

    s3://    as dir, without lock, hidden name or rename: the upload appears only when
             complete, under JOB-STAMP-KIND.arc (agent/s3/bucket.py)
    dir      lock the directory ─▶ name archives a killed run left hidden
             ─▶ the kind: what the VM's checkpoints allow (agent/qemu/checkpoints.py), but
                full if the archive it would build on is not in the directory, or if the
                newest full there is older than full_every
             ─▶ live backup into .JOB-STAMP.RANDOM.arc ─▶ rename to JOB-STAMP-KIND.arc ─▶ prune
    command  the kind, as above ─▶ start the command ({name} = JOB-STAMP-KIND.arc)
             ─▶ live backup into its stdin ─▶ wait for it ─▶ commit_command

The kind is settled before the backup starts (``auto`` resolved to what it would become),
so an archive's name never claims what its header does not say, and a directory never gets
an incremental whose parent is not there to restore it from.

Nothing here prints: the outcome is a :class:`JobResult`, failures are AgentErrors whose
message the CLI prefixes with the job's name.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from agent.archive.format import Kind
from agent.engine import EngineOptions
from agent.errors import AgentError, OutputError
from agent.jobs import catalog
from agent.jobs.command import CommandOutput, run_shell
from agent.jobs.config import Job
from agent.jobs.retention import ArchiveDesc, find_chains
from agent.live.freeze import FreezeOptions
from agent.live.job import CbwOptions, LiveJob, NetworkOptions
from agent.live.network import plan as plan_network
from agent.live.run import run_live_backup, select_devices
from agent.modes import Mode
from agent.pace import PaceSpec
from agent.pipeline import ProgressFn
from agent.qemu import checkpoints
from agent.qemu.block import query_block_devices
from agent.qemu.qmp import Monitor
from agent.writing import BackupSummary

log = logging.getLogger("backup-agent")


@dataclass(frozen=True)
class JobResult:
    job: str
    archive: str  # the file written (dir), or the name the command was given
    summary: BackupSummary  # .kind: what the archive is
    adopted: list[str] = field(default_factory=list)  # archives a killed run left unnamed
    pruned: list[ArchiveDesc] = field(default_factory=list)
    output: str = ""  # what the command and commit_command printed


def run_job(job: Job, progress: ProgressFn | None = None) -> JobResult:
    started = time.time()
    if job.dir is not None and job.dir.startswith("s3://"):
        return _to_bucket(job, job.dir, started, progress)
    if job.dir is not None:
        return _to_dir(job, job.dir, started, progress)
    if job.command is None:  # the config module guarantees one of them
        raise AgentError("the job has no destination")
    return _to_command(job, job.command, started, progress)


def preflight(job: Job) -> list[str]:
    """What would make the job fail if it ran now, found without running it (for
    ``job check``, as warnings: the VM may just not be running at the moment)."""
    found = []
    if job.network:
        try:
            plan_network(job.qmp, _network(job))  # reads and checks the key files
        except AgentError as e:
            found.append(str(e))
    elif not os.path.exists(job.qmp):
        found.append(f"no monitor socket at {job.qmp} (is the VM running, with that -qmp?)")
    for what, path in (("dir", job.dir), ("spool_dir", job.spool_dir)):
        if path is not None and path.startswith("s3://"):
            continue  # the backup finds out (bucket, credentials) and says so at once
        if path is not None and not os.path.isdir(path):
            found.append(f"{what} {path} does not exist")
        elif path is not None and not os.access(path, os.W_OK | os.X_OK):
            found.append(f"{what} {path} is not writable by this user")
    for name, path in job.configs:
        if not os.access(path, os.R_OK):
            found.append(f"config {name!r}: cannot read {path}")
    return found


def _to_dir(job: Job, directory: str, started: float,
            progress: ProgressFn | None) -> JobResult:
    if not os.path.isdir(directory):
        raise AgentError(f"{directory} is not a directory: create it first, writable by the "
                         "user the agent runs as")
    with catalog.locked(directory):
        adopted = catalog.adopt_leftovers(directory, job.name)
        mode = _mode_for_dir(job, directory, started)
        tmp = catalog.hidden_path(directory, job.name, started)
        summary = run_live_backup(_live_job(job, tmp, mode), progress)
        path, _ = catalog.publish(tmp, directory, job.name, started)
        pruned: list[ArchiveDesc] = []
        if job.keep_chains is not None:
            try:
                pruned = catalog.prune(directory, job.keep_chains).deleted
            except AgentError as e:
                raise AgentError(f"the backup succeeded ({path}), but pruning failed: {e}"
                                 ) from e
    return JobResult(job.name, path, summary, adopted, pruned)


def _to_bucket(job: Job, prefix: str, started: float,
               progress: ProgressFn | None) -> JobResult:
    """Into ``s3://BUCKET/PREFIX/JOB-STAMP-KIND.arc``: the kind is settled first, so the
    object gets its final name at once (it appears only when complete: no hidden name, no
    rename, no lock; agent/s3/bucket.py). Another agent's object of the same name is never
    replaced: the backup fails instead."""
    from agent.s3 import bucket

    mode = _mode_for_dir(job, prefix, started)
    kind = None if mode is Mode.AUTO else mode.value
    path = prefix + catalog.archive_name(job.name, started, kind)
    summary = run_live_backup(_live_job(job, path, mode), progress)
    pruned: list[ArchiveDesc] = []
    if job.keep_chains is not None:
        try:
            pruned = bucket.prune(prefix, job.keep_chains).result.deleted
        except AgentError as e:
            raise AgentError(f"the backup succeeded ({path}), but pruning failed: {e}") from e
    return JobResult(job.name, path, summary, pruned=pruned)


def _to_command(job: Job, command: str, started: float,
                progress: ProgressFn | None) -> JobResult:
    mode = Mode(job.mode)
    if mode is not Mode.FULL:
        plan = _plan(job, mode)
        if plan is not None:
            mode = _resolved(plan)
    kind = None if mode is Mode.AUTO else mode.value  # AUTO: the VM could not be asked
    name = catalog.archive_name(job.name, started, kind)
    with CommandOutput(command.replace("{name}", name)) as sink:
        try:
            summary = run_live_backup(_live_job(job, sink.path, mode), progress)
        except OutputError as e:
            failed = sink.failure()  # the command's own message says more than the pipe's
            if failed is not None:
                raise failed from e
            raise
        printed = sink.finish()
    if job.commit_command is not None:
        try:
            printed += "\n" + run_shell(job.commit_command.replace("{name}", name),
                                        "commit_command")
        except AgentError as e:
            raise AgentError(f"the archive {name} went through the command, but {e}") from e
    return JobResult(job.name, name, summary, output=printed.strip())


def _mode_for_dir(job: Job, directory: str, now: float) -> Mode:
    """The mode for a backup into ``directory``: the job's, resolved against the VM's
    checkpoints and the archives already there."""
    if job.mode == "full":
        return Mode.FULL
    plan = _plan(job, Mode(job.mode))
    if plan is None:
        return Mode(job.mode)  # the backup meets the same trouble and says what it is
    if directory.startswith("s3://"):
        from agent.s3 import bucket

        found = bucket.scan(directory)
    else:
        found = catalog.scan(directory)
    # Archives a restore from this directory can start from: those in a chain whose full
    # archive is here and complete.
    chains, _ = find_chains(found.archives)
    here = {a.uuid for c in chains if c.full.complete for a in c.archives}
    newest = catalog.newest_full(found)
    why = ""
    if plan.parent is not None and plan.parent not in here:
        why = (f"the archive an {plan.kind.name.lower()} backup would build on "
               f"({plan.parent}) is not in {directory}")
    elif (plan.parent is not None and newest is not None and job.full_every is not None
          and now - newest.created_ns / 1e9 >= job.full_every):
        days = (now - newest.created_ns / 1e9) / 86400
        why = (f"the newest full archive, {os.path.basename(newest.path)}, is {days:.1f} "
               "days old (full_every)")
    if why:
        log.info("job %s: taking a full backup: %s", job.name, why)
        return Mode.FULL
    return _resolved(plan)


def _plan(job: Job, mode: Mode) -> checkpoints.Plan | None:
    """What the agent will make of ``mode`` for this VM, found the way the backup finds it
    (queries only: nothing changes in the VM). None if the VM cannot be asked now."""
    try:
        net = plan_network(job.qmp, _network(job))
        with Monitor(job.qmp, tls=net.qmp_tls) as mon:
            devices = select_devices(query_block_devices(mon), list(job.drives))
            return checkpoints.choose(mode, checkpoints.read(mon, devices))
    except AgentError:
        return None


def _resolved(plan: checkpoints.Plan) -> Mode:
    """The mode that makes exactly ``plan``: an ``auto`` that would fall back to a full
    backup becomes a full one, so the archive's name can say so before it is written."""
    if plan.note and plan.kind is Kind.FULL:
        log.warning("%s", plan.note)
    return {Kind.FULL: Mode.FULL, Kind.INCREMENTAL: Mode.INCREMENTAL,
            Kind.DIFFERENTIAL: Mode.DIFFERENTIAL}[plan.kind]


def _live_job(job: Job, output: str, mode: Mode) -> LiveJob:
    # Options the job leaves out (None) keep the agent's defaults: one place to change them.
    cbw = CbwOptions()
    return LiveJob(
        qmp=job.qmp, output=output, drives=list(job.drives), configs=list(job.configs),
        mode=mode,
        engine=EngineOptions(compression=job.compression, pace=job.max_rate or PaceSpec(),
                             encrypt_to=job.encrypt_to),
        cbw=CbwOptions(
            timeout=cbw.timeout if job.cbw_timeout is None else job.cbw_timeout,
            memory=cbw.memory if job.cbw_memory is None else job.cbw_memory,
            spool_dir=job.spool_dir,
            spool_limit=cbw.spool_limit if job.spool_limit is None else job.spool_limit),
        network=_network(job),
        freeze=FreezeOptions(
            mode=job.fs_freeze or "auto", qga=job.qga, mountpoints=list(job.freeze_mountpoints),
            freeze_command=job.freeze_command, thaw_command=job.thaw_command,
            **({"timeout": job.freeze_timeout} if job.freeze_timeout else {})))


def _network(job: Job) -> NetworkOptions:
    tls = job.tls
    return NetworkOptions(
        nbd_socket=job.qemu_nbd_socket, qemu_nbd_addr=job.qemu_nbd_addr,
        cbw_listen=job.cbw_listen,
        tls_creds=tls.creds_dir if tls else None, tls_psk=tls.psk_file if tls else None,
        tls_username=tls.psk_user if tls else None)
