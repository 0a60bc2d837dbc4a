"""``backup-agent backup``: NBD exports and disk images into one archive stream."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

from agent.archive.codec import CompressionSpec
from agent.archive.format import MAX_DATA_LENGTH
from agent.cli import common
from agent.cli.common import UsageError
from agent.cli.render import ProgressRenderer, size, summary_line
from agent.errors import InvalidArgument
from agent.modes import MODES
from agent.options import CbwOptions, EngineOptions
from agent.pace import FLOOR, PaceSpec
from agent.tls import QEMU_TLS_CLIENT, QEMU_TLS_SERVER, check_nbd_uri
from agent.units import KiB, MiB

if TYPE_CHECKING:
    from agent.writing import BackupSummary


#: Options of a live backup only (their dests); --qemu-tls-server/-client have defaults.
LIVE_ONLY = ("tls_creds", "tls_psk", "tls_username", "qemu_nbd_addr", "cbw_listen",
             "qemu_tls_authz", "cbw_cluster_size", "fs_freeze", "qga", "freeze_timeout",
             "freeze_command", "thaw_command")

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backup", parents=[parent], help="back up disks into an archive",
                       description="Back up NBD exports and disk images into one archive, "
                       "written strictly sequentially (a pipe, ssh, a tape or a file).")
    p.add_argument("--source", metavar="NAME=NBD_URI", type=common.name_value, action="append",
                   default=[], help="an NBD export (nbd://, nbd+unix://, nbds://...)")
    p.add_argument("--image", metavar="NAME=FILE", type=common.name_value, action="append",
                   default=[], help="a disk image file (raw, qcow2, anything qemu-img reads)")
    p.add_argument("--config", metavar="NAME=FILE", type=common.name_value, action="append",
                   default=[], help="a file to store in the archive (VM configuration...)")
    p.add_argument("--compress", metavar="zstd[:LEVEL]|none", type=common.compression,
                   help="per-record compression (default zstd:1)")
    p.add_argument("--format", dest="archive_format", choices=["native", "vma"],
                   default="native", help="archive format: native (ours, the default) or vma "
                   "(Proxmox's, for qmrestore: full backups only, uncompressed, docs/VMA.md)")
    p.add_argument("--encrypt-to", metavar="PUBLIC", action="append", default=[],
                   help="encrypt the archive to this public key (bapub1:..., or a file "
                   "holding one; repeatable: any one of the private keys reads it)")
    p.add_argument("-o", "--output", metavar="PATH", required=True,
                   help="where the archive goes; - for standard output, s3://BUCKET/KEY for an "
                   "object in a bucket (docs/S3.md)")
    p.add_argument("--connections", type=common.positive,
                   help="NBD connections per source when the server allows multi-conn "
                   "(default: the number of cores, at most 4; 1 for an incremental or "
                   "differential backup)")
    p.add_argument("--memory", type=common.byte_size, default=EngineOptions.memory,
                   metavar="SIZE", help="cap on read buffers between read and write "
                   f"({EngineOptions.memory // MiB}M)")
    p.add_argument("--request-size", type=common.byte_size, default=EngineOptions.request_size,
                   metavar="SIZE", help="bytes per read and at most per record "
                   f"({EngineOptions.request_size // MiB}M, max 32M; sent as NBD requests of "
                   "at most 512K)")
    p.add_argument("--max-rate", type=_rate, default=PaceSpec(), metavar="RATE|auto",
                   help="cap on the background sweep's reads, bytes per second (e.g. 50M); "
                   "auto (live backups): full speed, but down to "
                   f"{FLOOR // 2**20}M/s while the guest writes clusters not yet backed "
                   "up; auto:RATE: that, capped. Clusters copied before guest writes are "
                   "never held back (default: unlimited)")
    live = p.add_argument_group("live backup of a running QEMU VM")
    live.add_argument("--qmp", metavar="SOCKET|HOST:PORT",
                      help="the VM's QMP monitor for the agent (a Unix socket or HOST:PORT); "
                      "backs up its disks at one point in time while it runs")
    live.add_argument("--mode", choices=MODES, default="full",
                      help="full (default; starts a checkpoint on qcow2 disks), incremental "
                      "(what changed since the last backup), differential (since the last "
                      "full), or auto (incremental when possible, else full, saying why)")
    live.add_argument("--drive", metavar="ID", action="append", default=[],
                      help="back up only this disk (device id or node name; repeatable)")
    live.add_argument("--cbw-timeout", type=common.positive, default=CbwOptions.timeout,
                      metavar="SECONDS", help="longest a guest write waits for its copy "
                      "before the backup (not the guest) fails (%(default)s)")
    live.add_argument("--cbw-cluster-size", type=_cluster_size, metavar="SIZE",
                      help="QEMU 9.2 and later: copy old data in clusters of SIZE (a power of "
                      "two, 64K or more; QEMU's choice: 64K): fewer copies for long runs of "
                      "writes, larger ones for random writes (docs/QEMU.md)")
    live.add_argument("--cbw-memory", type=common.byte_size, default=CbwOptions.memory,
                      metavar="SIZE", help="per disk, old clusters kept in memory "
                      f"({CbwOptions.memory // MiB}M)")
    live.add_argument("--spool-dir", metavar="DIR",
                      help="where old clusters spill when memory is full ($TMPDIR)")
    live.add_argument("--spool-limit", type=common.byte_size, default=CbwOptions.spool_limit,
                      metavar="SIZE", help="per disk, old clusters spilled to the spool "
                      f"({CbwOptions.spool_limit // MiB}M)")
    live.add_argument("--qemu-nbd-socket", metavar="PATH",
                      help="if QEMU already runs an NBD server (started by a management "
                      "tool), the Unix socket it listens on; otherwise the agent starts one")
    fz = p.add_argument_group(
        "application-consistent live backups: the guest's file systems frozen through the "
        "QEMU guest agent around the snapshot's start (docs/LIVE.md)")
    fz.add_argument("--fs-freeze", choices=("auto", "required", "off"),
                    help="auto (default): freeze when a guest agent answers on --qga, "
                    "else back up crash-consistent and say so; required: fail, before "
                    "changing anything on the VM, when the guest cannot be frozen; off")
    fz.add_argument("--qga", metavar="SOCKET",
                    help="the host end of the VM's guest-agent channel (a Unix socket that "
                    "serves one client: not one libvirt holds)")
    fz.add_argument("--freeze-mountpoint", metavar="PATH", action="append", default=[],
                    help="freeze only this guest mount point (repeatable; default: all)")
    fz.add_argument("--freeze-timeout", type=common.positive, metavar="SECONDS",
                    help="longest wait for the guest to freeze or thaw (10, as Windows VSS "
                    "allows); past it the guest is thawed")
    fz.add_argument("--freeze-command", metavar="CMD",
                    help="run CMD to freeze the guest instead of --qga (e.g. virsh "
                    "domfsfreeze VM, for a channel libvirt holds); needs --thaw-command")
    fz.add_argument("--thaw-command", metavar="CMD",
                    help="run CMD to thaw the guest (e.g. virsh domfsthaw VM); it also runs "
                    "if the agent is killed while the guest is frozen")
    net = p.add_argument_group(
        "a VM on another host (--qmp HOST:PORT; every TCP connection under TLS, see "
        "docs/NETWORK.md)")
    net.add_argument("--tls-creds", metavar="DIR",
                     help="x509 credentials: ca-cert.pem, client-cert.pem, client-key.pem "
                     "(QMP, and NBD unless --tls-psk) and server-cert.pem, server-key.pem "
                     "(QEMU's connections to the copy-before-write target)")
    net.add_argument("--tls-psk", metavar="FILE",
                     help="a TLS-PSK key file (USER:HEXKEY lines) for the NBD connections")
    net.add_argument("--tls-username", metavar="NAME",
                     help="the identity to use from --tls-psk (default: its first)")
    net.add_argument("--insecure-plaintext", action="store_true",
                     help="allow QMP and NBD over TCP without TLS (also nbd:// sources on "
                     "other hosts): anyone on the network can then read the disks and "
                     "control the VM")
    net.add_argument("--qemu-nbd-addr", metavar="HOST[:PORT]",
                     help="QEMU's NBD server on TCP, on the VM's host (default: the --qmp "
                     "host, port 10809); also names a server something else started")
    net.add_argument("--cbw-listen", metavar="[HOST][:PORT]",
                     help="where QEMU reaches the copy-before-write target on this host "
                     "(default: this host's address on the QMP connection, any free port; "
                     "disk N listens on PORT+N)")
    net.add_argument("--qemu-tls-server", metavar="ID", default=QEMU_TLS_SERVER,
                     help="QEMU's TLS credentials object (endpoint=server) for its NBD "
                     "server (%(default)s)")
    net.add_argument("--qemu-tls-client", metavar="ID", default=QEMU_TLS_CLIENT,
                     help="QEMU's TLS credentials object (endpoint=client) for reaching the "
                     "copy-before-write target (%(default)s)")
    net.add_argument("--qemu-tls-authz", metavar="ID",
                     help="QEMU's authz object that lists the x509 clients its NBD server "
                     "accepts (optional)")
    common.add_progress(p)
    p.set_defaults(run=run)


def _cluster_size(text: str) -> int:
    n = common.byte_size(text)
    if n < 64 * KiB or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{text!r} is no power of two of at least 64K")
    return n


def _rate(text: str) -> PaceSpec:
    try:
        return PaceSpec.parse(text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_usage(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot refuse, before anything is opened."""
    if args.request_size > MAX_DATA_LENGTH:
        raise UsageError(f"--request-size is at most {MAX_DATA_LENGTH // 2**20}M")
    if args.qmp:
        if args.source or args.image:
            raise UsageError("--qmp backs up a VM's disks: do not add --source or --image")
        return
    if args.drive or args.freeze_mountpoint:
        raise UsageError(f"--{'drive' if args.drive else 'freeze-mountpoint'} is for a VM: it "
                         "needs --qmp")
    for flag in LIVE_ONLY:
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} is for a live backup: it needs --qmp")
    if args.max_rate.adaptive:
        raise UsageError("--max-rate auto follows the copy-before-write copies of a live "
                         "backup: it needs --qmp (give a rate such as 50M instead)")
    if args.mode != "full":
        raise UsageError("--mode incremental, differential and auto need the VM's dirty "
                         "bitmaps: use them with --qmp")
    if not args.source and not args.image:
        raise UsageError("nothing to back up: give at least one --source NAME=NBD_URI or "
                         "--image NAME=FILE (or --qmp for a running VM)")


def _check_vma(args: argparse.Namespace) -> None:
    """What VMA cannot hold, refused before anything starts."""
    if args.archive_format != "vma":
        return
    if args.compress is not None:
        raise UsageError("--compress does not apply to --format vma (VMA stores data as it "
                         "is): compress the whole stream instead, e.g. -o - | zstd > "
                         "vzdump-qemu-100.vma.zst")
    if args.mode != "full":
        raise UsageError("--format vma holds only full backups: use --mode full, or the "
                         "native format for incrementals")
    if args.encrypt_to:
        raise UsageError("--encrypt-to does not apply to --format vma (VMA has no "
                         "encryption): use the native format, or encrypt the whole stream")


def _recipients(given: list[str]) -> tuple[bytes, ...]:
    if not given:
        return ()
    from agent.keys import public_from_arg

    return tuple(public_from_arg(g) for g in given)


def run(args: argparse.Namespace) -> int:
    _check_usage(args)
    _check_vma(args)
    opts = EngineOptions(compression=args.compress or CompressionSpec(),
                         connections=args.connections,
                         memory=args.memory, request_size=args.request_size,
                         workers=max(2, os.cpu_count() or 2), pace=args.max_rate,
                         archive_format=args.archive_format,
                         encrypt_to=_recipients(args.encrypt_to))
    conns = args.connections or f"{opts.connections_for(changes=False)} (1 for changes only)"
    log.debug("options: compression %s, connections per source %s, memory %s, request size "
              "%s, %d worker(s), sweep rate %s", opts.compression, conns, size(args.memory),
              size(args.request_size), opts.workers, args.max_rate)
    renderer = ProgressRenderer(common.progress_mode(args.progress, args.quiet))
    result: BackupSummary
    try:
        if args.qmp:
            from agent.live.freeze import FreezeOptions
            from agent.live.job import LiveJob, NetworkOptions
            from agent.live.run import run_live_backup
            from agent.modes import Mode

            result = run_live_backup(LiveJob(
                qmp=args.qmp, output=args.output, drives=args.drive, configs=args.config,
                mode=Mode(args.mode), engine=opts,
                cbw=CbwOptions(
                    timeout=args.cbw_timeout, memory=args.cbw_memory,
                    cluster=args.cbw_cluster_size, spool_dir=args.spool_dir,
                    spool_limit=args.spool_limit),
                network=NetworkOptions(
                    nbd_socket=args.qemu_nbd_socket, tls_creds=args.tls_creds,
                    tls_psk=args.tls_psk, tls_username=args.tls_username,
                    insecure_plaintext=args.insecure_plaintext,
                    qemu_nbd_addr=args.qemu_nbd_addr, cbw_listen=args.cbw_listen,
                    qemu_tls_server=args.qemu_tls_server,
                    qemu_tls_client=args.qemu_tls_client,
                    qemu_tls_authz=args.qemu_tls_authz),
                freeze=FreezeOptions(
                    mode=args.fs_freeze or "auto", qga=args.qga,
                    mountpoints=args.freeze_mountpoint,
                    **({"timeout": args.freeze_timeout} if args.freeze_timeout else {}),
                    freeze_command=args.freeze_command, thaw_command=args.thaw_command),
            ), renderer.callback())
        else:
            for name, uri in args.source:
                check_nbd_uri(uri, args.insecure_plaintext, device=name)
            from agent.backup import BackupJob, run_backup

            result = run_backup(BackupJob(output=args.output, sources=args.source,
                                          images=args.image, configs=args.config,
                                          engine=opts), renderer.callback())
    finally:
        renderer.close()
    what = f"backed up {len(result.devices)} device(s)"
    log.info("%s", summary_line(result.progress, what, result.archive_bytes))
    renderer.summary(result.progress, what, result.archive_bytes)
    parent = f" of {result.parent}" if result.parent else ""
    log.info("archive %s (%s%s), %s of buffer at peak", result.uuid,
             result.kind.name.lower(), parent, size(result.peak_buffer))
    if result.live is not None:
        x = result.live
        log.info("guest writes: %d cluster(s) copied before write (%s of them straight "
                 "into the archive), %s spilled, %s peak in the copy-before-write target, "
                 "longest store of a copy %.1f ms", x.clusters_copied, size(x.pushed_bytes),
                 size(x.bytes_spilled), size(x.peak_plugin_memory),
                 x.longest_copy_store_us / 1000)
        f = x.freeze
        if f.consistency == "application":
            where = f" ({', '.join(f.mountpoints)})" if f.mountpoints else ""
            log.info("application-consistent: the guest's file systems%s were frozen for "
                     "%.3f s", where, f.frozen_seconds or 0.0)
        else:
            log.info("crash-consistent (%s)", f.note or "no freeze")
    return 0
