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
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from agent import __version__
from agent.archive.format import Header, check_name, new_archive_uuid
from agent.archive.output import open_output
from agent.archive.writer import ArchiveWriter
from agent.backup import BackupSummary, read_configs
from agent.cbw.feed import CopyFeed
from agent.cbw.server import CbwTargetServer
from agent.engine import BackupEngine, EngineOptions
from agent.errors import AgentError, ArchiveError, InvalidArgument, SourceError
from agent.nbd.source import NbdSource
from agent.network import Network, explain_setup_error
from agent.network import plan as plan_network
from agent.pipeline import ProgressFn
from agent.qemu import checkpoints, names
from agent.qemu.block import BlockDevice, query_block_devices
from agent.qemu.checkpoints import Mode
from agent.qemu.graph import LiveSnapshot, SnapshotError, SnapshotSpec
from agent.qemu.qmp import Monitor, MonitorGone, QmpError
from agent.releaser import Releaser
from agent.safedir import check_work_dirs
from agent.tls import QEMU_TLS_CLIENT, QEMU_TLS_SERVER
from agent.tracker import DeviceTracker

log = logging.getLogger("backup-agent")
MiB = 1024 * 1024


@dataclass(frozen=True)
class LiveJob:
    qmp: str  # the agent's own QMP monitor: a Unix socket path or HOST:PORT
    output: str
    drives: list[str] = field(default_factory=list)  # device ids or node names; [] = all
    configs: list[tuple[str, str]] = field(default_factory=list)
    engine: EngineOptions = field(default_factory=EngineOptions)
    cbw_timeout: int = 5  # seconds a guest write may wait for its copy
    cbw_memory: int = 256 * MiB  # per disk, old clusters kept in memory
    cbw_cluster: int | None = None  # copy granularity (QEMU 9.2+); None: QEMU's (64 KiB)
    spool_dir: str | None = None
    spool_limit: int = 1024 * MiB  # per disk, old clusters spilled to a file
    # Where QEMU's NBD server listens when something else started it already (QEMU 7.2
    # cannot tell); None: the agent starts one on a private socket.
    nbd_socket: str | None = None
    mode: Mode = Mode.FULL  # see agent.qemu.checkpoints
    # A VM on another host (qmp = HOST:PORT; see agent.network and agent.tls).
    tls_creds: str | None = None  # x509 directory: ca-cert.pem, client-cert.pem, ...
    tls_psk: str | None = None  # PSK file (USER:HEXKEY lines) for the NBD connections
    tls_username: str | None = None  # identity in tls_psk; None: its first
    insecure_plaintext: bool = False  # allow TCP without TLS
    qemu_nbd_addr: str | None = None  # HOST[:PORT] of QEMU's NBD server on TCP
    cbw_listen: str | None = None  # [HOST][:PORT] the copy-before-write target listens on
    qemu_tls_server: str = QEMU_TLS_SERVER  # QEMU's endpoint=server credentials object
    qemu_tls_client: str = QEMU_TLS_CLIENT  # QEMU's endpoint=client credentials object
    qemu_tls_authz: str | None = None  # QEMU's authz object for x509 NBD clients


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


def run_live_backup(job: LiveJob, progress: ProgressFn | None = None) -> BackupSummary:
    net = plan_network(job)
    check_work_dirs(job.spool_dir)  # no other user may swap our sockets or spool
    configs = read_configs(job.configs)
    with contextlib.ExitStack() as stack:
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
                d.virtual_size, memory=job.cbw_memory, spool_dir=job.spool_dir,
                spool_limit=job.spool_limit, label=d.id, listen=net.cbw_address(mon, i),
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
                            tag=tag, nbd_socket=job.nbd_socket or f"{work}/qemu-nbd.sock",
                            cbw_timeout=job.cbw_timeout, min_cluster=job.cbw_cluster,
                            transaction=checkpoints.transaction(plan, archive, tag, devices),
                            changes=names.changes_bitmap(tag) if plan.base else None,
                            nbd_tcp=net.nbd_tcp, nbd_tls=net.nbd_tls)
        try:
            stack.enter_context(snap)
        except SnapshotError as e:
            where = ", ".join(s.address for s in servers.values())
            raise explain_setup_error(e, net, where) from e
        _check_nbd_server(snap, job, net)
        started = time.monotonic()

        try:
            return _stream(job, stack, snap, devices, servers, configs, progress, started,
                           plan, archive)
        except AgentError as e:
            raise _explain(e, job, mon, servers) from e
    raise AssertionError("unreachable")  # for mypy: the with block returns or raises


def _check_nbd_server(snap: LiveSnapshot, job: LiveJob, net: Network) -> None:
    """A server the agent did not start listens where QEMU 7.2 cannot tell: the user must
    have said where."""
    if snap.nbd_server_owned or job.nbd_socket is not None or net.nbd_explicit:
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


def _stream(job: LiveJob, stack: contextlib.ExitStack, snap: LiveSnapshot,
            devices: list[BlockDevice], servers: dict[str, CbwTargetServer],
            configs: list[tuple[str, bytes]], progress: ProgressFn | None,
            started: float, plan: checkpoints.Plan, archive: uuid.UUID) -> BackupSummary:
    conns = job.engine.connections_for(changes=snap.changes is not None)
    sources = {
        d.id: stack.enter_context(contextlib.closing(NbdSource(
            snap.export_uri(d.id), conns, archive_name(d), changes=snap.changes,
            tls=snap.nbd_tls.client if snap.nbd_tls else None)))
        for d in devices
    }
    total = None
    if snap.changes is not None:  # progress counts the changed bytes only
        total = sum(b.count for disk in checkpoints.read(snap.monitor, devices)
                    for b in disk.bitmaps if b.name == snap.changes)
    out = open_output(job.output)
    stack.callback(out.close)
    try:
        new = checkpoints.new_checkpoints(plan, archive)
        header = Header(uuid=archive, created_ns=time.time_ns(), tool_version=__version__,
                        kind=plan.kind, parent_uuid=plan.parent,
                        checkpoint=new[0] if new else "")
        writer = ArchiveWriter(out, header)
        pairs = []
        # Releases start only once the engine writes, so the engine exists by then.
        releaser = Releaser(snap.release, lambda e: engine.control.fail(e))
        stack.callback(releaser.close)  # before the snapshot's teardown
        trackers: dict[int, DeviceTracker] = {}
        by_name: dict[str, DeviceTracker] = {}
        feeds: dict[int, str] = {}  # device id -> its target's control socket
        for d in devices:
            props = {"source-format": d.format, "source": "qemu-live"}
            dev = writer.add_device(archive_name(d), sources[d.id].size, props)
            by_name[d.id] = trackers[dev.id] = DeviceTracker(
                dev.size, snap.cluster_size(d.id), releaser.for_device(d.id),
                partial_tail=snap.releases_partial_tail)
            feeds[dev.id] = servers[d.id].control_path
            pairs.append((dev, sources[d.id]))
        for name, data in configs:
            writer.add_config(name, data, job.engine.compression)

        engine = BackupEngine(writer, pairs, job.engine, progress, trackers, total)
        feed = CopyFeed(engine, feeds, job.engine.request_size, engine.control.fail)
        try:
            result = engine.run()
        finally:
            feed.close()
        writer.finish()
        out.commit()
    except BaseException:
        out.abort()
        raise
    # The archive is complete: its checkpoints stay, the ones it supersedes go.
    snap.commit()
    checkpoints.retire(snap.monitor, plan, archive, devices)
    stats = {name: s.stats() for name, s in servers.items()}
    for name, st in stats.items():
        if st.get("writes_refused"):  # the store kept what QEMU copied: see agent.cbw.store
            log.warning("disk %r: the copy-before-write target refused %d write(s) over "
                        "clusters it had already stored: a client other than QEMU reached it "
                        "(the archive holds what QEMU copied)", name, st["writes_refused"])
    extra = {
        "clusters_copied": sum(s.get("clusters_copied", 0) for s in stats.values()),
        "copied_read_first": sum(t.copied_first for t in by_name.values()),
        "bytes_spilled": sum(s.get("bytes_spilled", 0) for s in stats.values()),
        "peak_plugin_memory": max((s.get("peak_memory", 0) for s in stats.values()),
                                  default=0),
        "released_bytes": sum(t.released_bytes for t in by_name.values()),
        "pushed_bytes": sum(t.pushed_bytes for t in by_name.values()),
        "copies_read_back": sum(s.get("bytes_read", 0) for s in stats.values()),
        "longest_copy_store_us": max((s.get("longest_write_us", 0) for s in stats.values()),
                                     default=0),
        "snapshot_seconds": round(time.monotonic() - started, 3),
    }
    return BackupSummary(header.uuid, writer.devices, result.progress, out.position,
                         result.peak_buffer, extra, plan.kind, plan.parent, plan.note)


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
            f"--cbw-timeout ({job.cbw_timeout} s), to keep the guest writing; the guest was "
            f"not affected ({e})"
        )
    return e
