"""``restore --live``: a paused VM runs at once from a served backup while QEMU copies it in.

1. The archives (or chain) are checked as ``serve`` checks them; each ``--drive ID=TARGET``
   names a device of the VM and of the archive, and TARGET is the qcow2 image the VM has
   open for it: empty (``qemu-img map -U`` finds no data in it) and of the device's size.
2. A :class:`agent.serve.detached.DetachedServer` serves the devices (an nbdkit that
   outlives the agent). For each device a zero map is made from the server's block status
   (:func:`zero_map`), a small qcow2 file QEMU opens and the agent deletes at once.
   (The server loads records ahead of each stream by itself: agent/serve/readahead.py.)
3. QEMU puts the served backup under each target image and streams it in, and the VM is
   resumed (:class:`agent.qemu.stream.LiveStream`).
4. The agent follows the streams (progress, the plugin's messages) until they conclude, then
   removes the nodes, stops the server and removes the marker.

If the agent is stopped while the streams run (Ctrl-C, SIGTERM, kill), QEMU and the server
go on; ``backup-agent cleanup --qmp`` finishes what is left. A stream that fails leaves
everything serving (the VM reads from it) and says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import interrupts
from agent.errors import AgentError, Interrupted, InvalidArgument
from agent.pipeline import Progress, ProgressFn
from agent.qemu.block import BlockDevice, query_block_devices
from agent.qemu.qmp import Monitor
from agent.qemu.stream import JobState, LiveStream, StreamSpec, wait_for

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

log = logging.getLogger("backup-agent")

#: The cluster size docs/SERVE.md gives a live restore's target images. QEMU's stream copies
#: 512 KiB at a time; into 256 KiB clusters a 1 GiB half-data restore took 0.84x the time it
#: took into qemu-img's default 64 KiB ones on QEMU 7.2, 0.69x on QEMU 10.0
#: (docs/PERFORMANCE.md, "Live restore"). The agent takes any cluster size.
TARGET_CLUSTER = "256K"


#: The zero map's cluster size, the largest qcow2 has: a 1 TiB disk's map is a few MiB.
#: Only whole clusters that read as zeros are marked; the rest goes through the server.
ZERO_CLUSTER = 2 << 20
#: Longest ``write -z`` qemu-io takes (without -n): 1 GiB, a multiple of ZERO_CLUSTER.
_ZERO_WRITE_MAX = 1 << 30
#: Longest NBD block status asked at once (the length is 32 bits).
_STATUS_MAX = 1 << 30


def create_command(target: str, size: int) -> str:
    """The command that makes an empty target image for a disk of ``size`` bytes."""
    return f"qemu-img create -f qcow2 -o cluster_size={TARGET_CLUSTER} {target} {size}"


@dataclass(frozen=True)
class LiveDrive:
    """``--drive ID=TARGET``: the VM's device ``id`` (also the archive's device) and the
    image file the VM opened for it."""

    id: str
    target: str


@dataclass(frozen=True)
class LiveResult:
    devices: list[str]
    bytes: int
    """Device bytes the streams went over."""
    running_after: float
    """Seconds from the start until the VM ran."""
    elapsed: float


def parse_drive(text: str) -> LiveDrive:
    dev, sep, target = text.partition("=")
    if not sep or not dev or not target:
        raise InvalidArgument(f"--drive {text!r}: expected ID=TARGET.qcow2 (the VM's device "
                              "id and the image file the VM opened for it)")
    return LiveDrive(dev, target)


def _check_target(drive: LiveDrive, dev: BlockDevice, size: int) -> None:
    """TARGET is the device's image, of the archive device's size, and empty."""
    if not os.path.isfile(drive.target):
        raise InvalidArgument(f"--drive {drive.id}={drive.target}: no such file")
    if os.path.realpath(dev.filename) != os.path.realpath(drive.target):
        raise InvalidArgument(f"--drive {drive.id}={drive.target}: device '{dev.id}' of the VM "
                              f"uses {dev.filename}, not that file")
    if dev.virtual_size != size:
        raise InvalidArgument(f"device '{dev.id}': its image has {dev.virtual_size} bytes, the "
                              f"backup's disk {size}: create the target with "
                              f"`{create_command(drive.target, size)}`")
    proc = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2",
                           drive.target], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AgentError(f"cannot read the allocation of {drive.target}: "
                         f"{proc.stderr.strip() or proc.returncode}")
    if any(e.get("data") for e in json.loads(proc.stdout or "[]")):
        raise InvalidArgument(f"{drive.target} is not empty: a live restore copies the backup "
                              "under what the image holds; give it a new, empty qcow2 image")


def zero_ranges(socket: str, export: str, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the whole :data:`ZERO_CLUSTER` clusters of ``export``
    (served on Unix socket ``socket``) that read as zeros, by NBD block status."""
    import nbd

    from agent.serve.server import uri

    zeros: list[tuple[int, int]] = []
    h = nbd.NBD()
    try:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri(export, socket))
        offset = 0
        while offset < size:
            pos = offset

            def extent(meta: str, at: int, entries: list[int], err: Any) -> int:
                nonlocal pos
                if meta != nbd.CONTEXT_BASE_ALLOCATION:
                    return 0
                for length, flags in zip(entries[::2], entries[1::2], strict=True):
                    if flags & nbd.STATE_ZERO:
                        lo = -(-pos // ZERO_CLUSTER) * ZERO_CLUSTER
                        hi = (pos + length) // ZERO_CLUSTER * ZERO_CLUSTER
                        if hi > lo:
                            if zeros and zeros[-1][0] + zeros[-1][1] == lo:
                                lo = zeros.pop()[0]
                            zeros.append((lo, hi - lo))
                    pos += length
                return 0

            h.block_status(min(size - offset, _STATUS_MAX), offset, extent)
            if pos <= offset:
                raise AgentError(f"the server's block status of {export!r} at {offset} "
                                 "covers nothing")
            offset = pos
        h.shutdown()
    except nbd.Error as e:
        raise AgentError(f"cannot read the block status of {export!r}: {e.string}") from e
    return zeros  # (the handle's last reference goes: libnbd closes the socket)


def start_zero_map(path: str, size: int) -> subprocess.Popen[str]:
    """Start creating the zero map ``path`` (see :func:`zero_map`) of a ``size``-byte disk:
    it needs nothing from the server, so it runs while nbdkit starts."""
    return subprocess.Popen(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size={ZERO_CLUSTER},data_file={path}.raw,data_file_raw=on,"
         "preallocation=metadata", path, str(size)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def mark_zeros(created: subprocess.Popen[str], path: str,
               zeros: Sequence[tuple[int, int]]) -> None:
    """Wait for ``created`` (:func:`start_zero_map`), then make the clusters in ``zeros``
    zero clusters of the map ``path``."""
    out, err = created.communicate()
    _check_run(path, "qemu-img", created.returncode, out, err)
    cmds = []
    for offset, length in zeros:
        for o in range(offset, offset + length, _ZERO_WRITE_MAX):
            cmds.append(f"write -z -u {o} {min(_ZERO_WRITE_MAX, offset + length - o)}\n")
    if cmds:
        # writeback: qemu-io's default (writethrough) writes the 2 MiB L2 table back
        # after each command, 1.2 s instead of 0.05 s for a 1 TiB disk's map
        proc = subprocess.run(["qemu-io", "-f", "qcow2", "-t", "writeback", path],
                              input="".join(cmds), capture_output=True, text=True,
                              check=False)
        _check_run(path, "qemu-io", proc.returncode, proc.stdout, proc.stderr)


def _check_run(path: str, prog: str, status: int, out: str, err: str) -> None:
    if status != 0:  # (qemu-io says what failed on stdout)
        why = (err.strip() or out.strip()).splitlines()
        raise AgentError(f"cannot make the zero map {path}: {prog}: "
                         f"{why[-1] if why else status}")


def zero_map(path: str, size: int, zeros: Sequence[tuple[int, int]]) -> None:
    """A qcow2 image ``path`` of ``size`` bytes over a raw external data file
    (``data_file_raw``: every cluster at its own offset there): clusters in ``zeros`` are
    zero clusters, every other cluster is allocated, its data in the data file.

    QEMU opens it with the NBD node of the served backup as its data file: it then knows,
    from this image alone, where the backup has data and where zeros, and asks the server
    for neither. The data file given to ``qemu-img create`` (``path`` + ``.raw``) is a
    placeholder, sparse, never written (``write -z -u`` unmaps there)."""
    mark_zeros(start_zero_map(path, size), path, zeros)


def _with_zero_map(spec: StreamSpec, created: subprocess.Popen[str], path: str, socket: str,
                   size: int) -> StreamSpec:
    """``spec`` with its zero map ``path`` (being created by ``created``) made; without one
    if it cannot be made (the stream then asks the server for every range, as it would
    anyway)."""
    try:
        mark_zeros(created, path, zero_ranges(socket, spec.export, size))
    except AgentError as e:
        log.warning("device '%s': %s; the stream asks the server for every range",
                    spec.device.id, e)
        return spec
    return dataclasses.replace(spec, zeros=path)


def _drop_zero_maps(created: Sequence[tuple[subprocess.Popen[str], str]], maps: str) -> None:
    """Remove the zero maps' directory once no qemu-img writes in it any more."""
    for proc, _ in created:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    shutil.rmtree(maps, ignore_errors=True)


def _progress(states: list[JobState], start: float) -> Progress:
    done = sum(s.done for s in states)
    return Progress(phase="restore", done=done, total=sum(s.total for s in states),
                    data_bytes=done, zero_bytes=0, stored_bytes=0,
                    elapsed=time.monotonic() - start)


def live_restore(paths: Sequence[str], drives: Sequence[LiveDrive], qmp: str, *,
                 cache: int, speed: int = 0, progress: ProgressFn | None = None,
                 keys: Sequence[X25519PrivateKey] = (),
                 start: float | None = None) -> LiveResult:
    """See the module docstring. ``start``: the command's start (``time.monotonic()``)."""
    from agent.serve.archives import ServedArchives
    from agent.serve.detached import DetachedServer

    start = time.monotonic() if start is None else start
    ids = [d.id for d in drives]
    if not drives or len(set(ids)) != len(ids):
        raise InvalidArgument(f"give each --drive once, got {ids!r}")
    checked = ServedArchives(paths, ids, cache, tables=False, verb="restore", keys=keys)
    sizes = {d.name: d.size for d in checked.links[0].devices}
    checked.close()
    with Monitor(qmp) as mon:
        devices = {d.id: d for d in query_block_devices(mon)}
        specs = []
        for drive in drives:
            dev = devices.get(drive.id)
            if dev is None:
                raise InvalidArgument(f"the VM has no disk '{drive.id}' (it has "
                                      f"{', '.join(devices) or 'none'})")
            _check_target(drive, dev, sizes[drive.id])
            specs.append(StreamSpec(dev, drive.id))
        tag = os.urandom(4).hex()
        maps = tempfile.mkdtemp(prefix="ba-zeros-")
        created = [(start_zero_map(p, sizes[s.export]), p)
                   for s, p in ((s, os.path.join(maps, f"{i}.qcow2"))
                                for i, s in enumerate(specs))]
        try:
            server = DetachedServer(paths, ids, cache=cache, keys=keys)
        except BaseException:
            _drop_zero_maps(created, maps)
            raise
        leave = (f"the streams go on in QEMU and nbdkit (pid {server.pid}) keeps serving the "
                 f"backup: `backup-agent cleanup --qmp {qmp}` waits for them and removes "
                 "what is left")
        running = False
        try:
            if server.record is None:
                raise AgentError("nbdkit stopped as it started")
            try:
                specs = [_with_zero_map(s, c, p, server.socket, sizes[s.export])
                         for s, (c, p) in zip(specs, created, strict=True)]
                stream = LiveStream(mon, specs, tag=tag, server=server.record, speed=speed)
                # Signals wait until the VM runs: a stop half-way through would leave
                # streams running on a server stopped by the way out below.
                with interrupts.held():
                    stream.check()
                    try:
                        stream.attach()
                    finally:  # at once (a kill -9 later leaves nothing): QEMU has them open
                        shutil.rmtree(maps, ignore_errors=True)
                    stream.start()
                    running = True
            finally:
                _drop_zero_maps(created, maps)
        except BaseException as e:
            if not running:
                server.stop()
                raise
            raise Interrupted(f"{e or 'interrupted'}: {leave}") from None  # held above
        running_after = time.monotonic() - start
        log.info("the VM runs from the backup (%.2f s after start); copying it into %s",
                 running_after, ", ".join(d.target for d in drives))

        def follow(states: list[JobState]) -> None:
            for line in server.messages():
                log.warning("%s", line)
            if not server.running():
                raise AgentError("nbdkit serving the backup exited: the VM reads errors "
                                 "where it has not written yet")
            if progress is not None:
                progress(_progress(states, start))

        try:
            states = wait_for(mon, [stream.names[i].job for i in ids], follow)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {leave}") from None
        except Interrupted as e:
            raise Interrupted(f"{e}: {leave}") from None
        failed = stream.failed()
        if failed:
            why = "; ".join(f"{s.id}: {s.error}" for s in states if s.error)
            raise AgentError(f"the stream of {', '.join(failed)} ended before the end"
                             f"{f' ({why})' if why else ''}; the VM still reads from the "
                             f"backup where it has not written: {leave}")
        stream.finish()
        server.stop()
        stream.forget()
        total = sum(s.total for s in states)
    return LiveResult(ids, total, running_after, time.monotonic() - start)
