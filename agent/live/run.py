"""A live backup of a running QEMU VM: one point in time across its disks.

Order of the set-up (and, reversed, of the teardown on every way out)::

    QMP monitor ─▶ nbdkit + our plugin per disk (the copy-before-write targets)
                ─▶ LiveSnapshot: filters inserted under all disks at one instant,
                   snapshot-access nodes exported over QEMU's NBD server
                ─▶ NBD sources on those exports ─▶ the archive output

While the engine sweeps the point-in-time view, a feed thread per disk receives from the
plugin the clusters QEMU copied before a guest write, with their data, and hands them to the
engine (agent/cbw/feed.py): they are never read back through QEMU, and the plugin frees them
on the agent's word. Once a range the sweep read is in the archive, it is trimmed on the
snapshot view so QEMU stops copying it (and the plugin frees it, if it holds it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from typing import NamedTuple
from uuid import UUID

from agent.archive.format import check_name, new_archive_uuid
from agent.cbw.feed import CopyFeed
from agent.cbw.server import CbwTargetServer
from agent.errors import AgentError, ArchiveError, InvalidArgument, SourceError
from agent.live import stats
from agent.live.freeze import Freezer
from agent.live.job import LiveJob
from agent.live.network import Network, explain_setup_error
from agent.live.network import plan as plan_network
from agent.modes import Mode
from agent.nbd.source import NbdSource
from agent.pipeline import ProgressFn
from agent.qemu import checkpoints, names
from agent.qemu.block import BlockDevice, query_block_devices
from agent.qemu.graph import LiveSnapshot, SnapshotError, SnapshotSpec
from agent.qemu.qmp import Monitor, MonitorGone, QmpError
from agent.releaser import Releaser
from agent.safedir import check_work_dirs
from agent.tracker import DeviceTracker
from agent.writing import BackupSummary, read_configs, write_archive

log = logging.getLogger("backup-agent")


def select_devices(found: list[BlockDevice], wanted: list[str]) -> list[BlockDevice]:
    """The disks to back up: all, or those named by device id or node name, once each."""
    if not found:
        raise AgentError("the VM has no disks to back up")
    if not wanted:
        return found
    chosen: list[BlockDevice] = []
    for name in wanted:
        match = [d for d in found if name in (d.id, d.node_name)]
        if not match:
            have = ", ".join(d.id or d.node_name for d in found)
            raise InvalidArgument(f"no disk {name!r} in the VM (it has: {have})")
        if match[0] in chosen:
            raise InvalidArgument(f"disk {name!r} is given twice")
        chosen.append(match[0])
    return chosen


def archive_name(d: BlockDevice) -> str:
    """A disk's name in the archive: the guest device's id (``vda``), or its node name when
    the device has no id (QEMU then reports a QOM path, no good as a file name)."""
    try:
        check_name(d.id, "device")
        return d.id
    except ArchiveError:
        return d.node_name


class _Live(NamedTuple):  # (not a dataclass: one costs ~0.4 ms of start-up, this 0.07)
    """What the set-up made, for the stream: the monitor, the disks and their targets, the
    archive's plan and identity, the snapshot."""

    monitor: Monitor
    devices: list[BlockDevice]
    servers: dict[str, CbwTargetServer]  # by device id
    plan: checkpoints.Plan  # the archive's kind, and its checkpoints
    archive: UUID
    snap: LiveSnapshot
    freezer: Freezer


def run_live_backup(job: LiveJob, progress: ProgressFn | None = None) -> BackupSummary:
    net = plan_network(job.qmp, job.network)
    check_work_dirs(job.cbw.spool_dir)  # no other user may swap our sockets or spool
    configs = read_configs(job.configs)
    cbw = job.cbw
    with contextlib.ExitStack() as stack:
        # The guest agent first: --fs-freeze required fails before anything else is done.
        freezer = stack.enter_context(Freezer(job.freeze))
        freezer.prepare()
        mon = stack.enter_context(Monitor(job.qmp, tls=net.qmp_tls))
        devices = select_devices(query_block_devices(mon), job.drives)
        net.check_qemu(mon)
        work = tempfile.mkdtemp(prefix="ba-live-")
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        # Each disk's target starts now, all at once, and gets ready (nbdkit's Python
        # takes ~35 ms) while the agent reads the checkpoints. Nothing is added to the VM
        # before the plan is decided: a refused incremental changes nothing.
        servers: dict[str, CbwTargetServer] = {}
        for i, d in enumerate(devices):
            servers[d.id] = stack.enter_context(CbwTargetServer(
                d.virtual_size, memory=cbw.memory, spool_dir=cbw.spool_dir,
                spool_limit=cbw.spool_limit, label=d.id, listen=net.cbw_address(mon, i),
                tls=net.cbw_tls, qemu_tls_creds=net.qemu_tls_client, insecure=net.insecure))
        plan = checkpoints.choose(job.mode, checkpoints.read(mon, devices))
        if plan.note:
            # Asked for a full backup, the user needs no warning that it starts no
            # checkpoint; whoever relies on checkpoints (auto) does.
            log.log(logging.DEBUG if job.mode is Mode.FULL else logging.WARNING, "%s",
                    plan.note)
        archive = new_archive_uuid()
        tag = os.urandom(4).hex()  # (not secrets: its import costs 6 ms of start-up)
        for server in servers.values():
            server.wait_ready()
        snap = LiveSnapshot(mon, [SnapshotSpec(d, servers[d.id].blockdev()) for d in devices],
                            tag=tag, nbd_socket=job.network.nbd_socket or f"{work}/qemu-nbd.sock",
                            cbw_timeout=cbw.timeout, min_cluster=cbw.cluster,
                            transaction=checkpoints.transaction(plan, archive, tag, devices),
                            around=freezer.frozen,
                            changes=names.changes_bitmap(tag) if plan.base else None,
                            nbd_tcp=net.nbd_tcp, nbd_tls=net.nbd_tls)
        try:
            stack.enter_context(snap)
        except SnapshotError as e:
            where = ", ".join(s.address for s in servers.values())
            raise explain_setup_error(e, net, where) from e
        _check_nbd_server(snap, job, net)

        try:
            return _stream(job, _Live(mon, devices, servers, plan, archive, snap, freezer), stack,
                           configs, progress)
        except AgentError as e:
            raise _explain(e, job, mon, servers) from e
    raise AssertionError("unreachable")  # for mypy: the with block returns or raises


def _check_nbd_server(snap: LiveSnapshot, job: LiveJob, net: Network) -> None:
    """A server the agent did not start listens where QEMU 7.2 cannot tell: the user must
    have said where."""
    if snap.nbd_server_owned or job.network.nbd_socket is not None or net.nbd_explicit:
        return
    if net.nbd_tcp is not None:
        raise AgentError(
            "QEMU already runs an NBD server that the agent did not start, and QEMU 7.2 "
            "cannot tell where it listens: give its TCP address with --qemu-nbd-addr "
            "HOST:PORT")
    raise AgentError(
        "QEMU already runs an NBD server that the agent did not start, and QEMU 7.2 "
        "cannot tell where it listens: give its Unix socket with --qemu-nbd-socket PATH"
    )


def _stream(job: LiveJob, live: _Live, stack: contextlib.ExitStack,
            configs: list[tuple[str, bytes]], progress: ProgressFn | None) -> BackupSummary:
    """Read the snapshot into the archive, then keep the checkpoints it started."""
    snap, devices, plan = live.snap, live.devices, live.plan
    sources = _open_sources(job, stack, snap, devices)
    total = _changed_bytes(snap, devices)
    releaser = Releaser(snap.release)
    stack.callback(releaser.close)  # before the snapshot's teardown
    by_name = {  # by device id
        d.id: DeviceTracker(sources[d.id].size, snap.cluster_size(d.id),
                            releaser.for_device(d.id), partial_tail=snap.releases_partial_tail)
        for d in devices
    }
    new = checkpoints.new_checkpoints(plan, live.archive)
    frozen = live.freezer.result
    with write_archive(job.output, job.engine, progress, uuid=live.archive, kind=plan.kind,
                       parent=plan.parent, checkpoint=new[0] if new else "",
                       props=frozen.header_props()) as arc:
        trackers: dict[int, DeviceTracker] = {}  # the engine's: by the archive's device id
        feeds: dict[int, str] = {}  # archive's device id -> its target's control socket
        for d in devices:
            props = {"source-format": d.format, "source": "qemu-live"}
            dev = arc.add_device(archive_name(d), sources[d.id], props)
            trackers[dev.id] = by_name[d.id]
            feeds[dev.id] = live.servers[d.id].control_path
        for name, data in configs:
            arc.add_config(name, data)
        engine = arc.engine(trackers, total)
        # Releases start only once the engine writes; errors of either helper stop it.
        releaser.start(engine.control.fail)
        feed = CopyFeed(engine, feeds, job.engine.request_size, engine.control.fail)
        try:
            summary = arc.run(engine)
        finally:
            feed.close()
    # The archive is complete: its checkpoints stay, the ones it supersedes go.
    snap.commit()
    checkpoints.retire(snap.monitor, plan, live.archive, devices)
    return summary._replace(
        live=dataclasses.replace(stats.collect(live.servers, by_name), freeze=frozen),
        note=plan.note)


def _open_sources(job: LiveJob, stack: contextlib.ExitStack, snap: LiveSnapshot,
                  devices: list[BlockDevice]) -> dict[str, NbdSource]:
    """An NBD source on each disk's snapshot export, by device id."""
    conns = job.engine.connections_for(changes=snap.changes is not None)
    sources = {
        d.id: stack.enter_context(contextlib.closing(NbdSource(
            snap.export_uri(d.id), conns, archive_name(d), changes=snap.changes,
            tls=snap.nbd_tls.client if snap.nbd_tls else None)))
        for d in devices
    }
    return sources


def _changed_bytes(snap: LiveSnapshot, devices: list[BlockDevice]) -> int | None:
    """The bytes the backup covers, for progress (None: all of every disk)."""
    total = None
    if snap.changes is not None:  # progress counts the changed bytes only
        total = sum(b.count for disk in checkpoints.read(snap.monitor, devices)
                    for b in disk.bitmaps if b.name == snap.changes)
    return total


def _explain(e: AgentError, job: LiveJob, mon: Monitor,
             servers: dict[str, CbwTargetServer]) -> AgentError:
    """Failures of a live backup show up as failed reads or trims: say what really
    happened when it can be found out."""
    try:
        mon.execute("query-status", timeout=2)
    except MonitorGone:
        return AgentError(f"QEMU exited during the backup (its monitor at {job.qmp} closed); "
                          "no archive was written")
    except QmpError:
        pass  # QEMU is there but slow to answer: keep the original error
    for name, server in servers.items():
        try:
            full = server.stats().get("full_errors", 0)
        except AgentError:
            continue
        if full:
            return AgentError(
                f"disk {name!r}: the guest wrote faster than the backup could keep up and the "
                "copy-before-write target ran out of room (raise --cbw-memory or "
                f"--spool-limit, or use a faster output); the guest was not affected ({e})"
            )
    if isinstance(e, SourceError) and "Invalid argument" in str(e):
        # QEMU answers reads of a broken snapshot with EACCES, which NBD carries as EINVAL.
        return AgentError(
            f"the snapshot broke: QEMU stopped serving the point-in-time view, which it does "
            f"when a copy to the copy-before-write target fails or takes longer than "
            f"--cbw-timeout ({job.cbw.timeout} s), to keep the guest writing; the guest was "
            f"not affected ({e})"
        )
    return e
