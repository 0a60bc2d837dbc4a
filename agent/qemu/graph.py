"""Copy-before-write snapshots of running disks: build the block graph, export it, tear it down.

For each device, at one point in time for all of them (:meth:`LiveSnapshot.setup`)::

    before                        after
    device vda                    device vda
       │                             │ (qom-set drive)
    vda-fmt (disk root)           ba-T-vda-cbw  copy-before-write ── target ──▶ ba-T-vda-tgt
                                     │ file              ▲
                                  vda-fmt                │ file
                                                  ba-T-vda-snap  snapshot-access (discard=unmap)
                                                         │
                                            NBD export "vda" (writable: trims release clusters)

Steps, each undone in reverse order by :meth:`LiveSnapshot.teardown`:

1. ``blockdev-add`` every target node (the caller's options plus our node name);
2. ``stop`` (only if the VM runs; it drains every request in flight), then, while no guest
   code runs, so that all of it is one point in time for all disks:
   a. the caller's ``transaction``, if any: dirty bitmaps of incremental backups
      (:mod:`agent.qemu.checkpoints`);
   b. ``blockdev-add`` every filter (``on-cbw-error: break-snapshot``: a failing target breaks
      the backup, never a guest write; for an incremental, ``bitmap``: copy only the changed
      clusters — the filter copies the bitmap when it is created, hence after a.);
   c. ``qom-set drive`` of every device to its filter;
   then ``cont``. All of step 2 runs inside the caller's ``around`` context, if any: the
   guest's file systems are frozen before the ``stop`` and thawed after the ``cont``
   (agent/live/freeze.py). (One ``transaction`` cannot do all this: ``qom-set`` is no transaction
   action, and the ``blockdev-backup`` action that inserts a filter takes neither
   ``on-cbw-error`` nor ``cbw-timeout`` in QEMU 7.2, so a slow target would fail guest
   writes.)
3. ``blockdev-add`` every snapshot-access node;
4. ``nbd-server-start`` on ``nbd_socket`` (or, for a client on another host, on TCP
   ``nbd_tcp`` with TLS: QEMU's credentials object ``nbd_tls.creds`` and, for x509, an optional
   ``tls-authz``) unless QEMU already has an NBD server (then it is reused and left running;
   the caller's address should then be that server's);
5. ``block-export-add`` every snapshot node, writable, named after the device (offering the
   changes bitmap as meta context ``qemu:dirty-bitmap:<name>`` for an incremental).

A killed agent leaves all this behind; :func:`cleanup` finds it by name (see
:mod:`agent.qemu.names`): exports, snapshot nodes, filters (each device put back on the filter's
``file`` child, read from ``x-debug-query-block-graph``: 7.2 names no children elsewhere),
targets, the changes bitmaps, and the NBD server when a ``ba-<tag>-nbd-server`` marker
object says we started it.

Trims on the snapshot view (:meth:`LiveSnapshot.release`) must be aligned to the copy cluster:
an unaligned one aborts QEMU 7.2 (an assertion in ``hbitmap_reset``), so :func:`round_inward`.
Later QEMUs round trims inward themselves and so never release a disk's partial last cluster;
what the running QEMU does is read from its QMP schema (:mod:`agent.qemu.caps`), as is whether
the filter takes ``min-cluster-size`` (QEMU 9.2 and later).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import nbd

from agent.address import format_address
from agent.errors import InvalidArgument
from agent.qemu import caps, names
from agent.qemu.block import BlockDevice
from agent.qemu.qmp import Monitor, MonitorGone, QmpError
from agent.tls import TlsCreds

log = logging.getLogger(__name__)

#: Smallest copy granularity of the copy-before-write filter (QEMU 7.2).
MIN_CLUSTER = 64 * 1024
#: Largest single NBD trim we send (the protocol's length is 32 bits); cluster-aligned.
MAX_TRIM = 1 << 30
#: Seconds to wait for QEMU to finish deleting a block export.
EXPORT_DEL_TIMEOUT = 10.0


class SnapshotError(QmpError):
    """Building, using or removing the snapshot graph failed; the message names the step."""


@dataclass(frozen=True)
class SnapshotSpec:
    """One device to snapshot and the ``blockdev-add`` options of its copy-before-write target
    (without ``node-name``: the snapshot names it), e.g. ``{"driver": "qcow2", "file":
    {"driver": "file", "filename": "/var/tmp/scratch.qcow2"}}`` or an NBD client node."""

    device: BlockDevice
    target: Mapping[str, Any]


@dataclass(frozen=True)
class NbdTls:
    """TLS on QEMU's NBD server: the id of QEMU's credentials object (``endpoint=server``,
    created by the VM's administrator), an optional ``authz`` object id (x509: which client
    certificates may connect), and the agent's credentials as the client."""

    creds: str
    client: TlsCreds
    authz: str | None = None


@dataclass
class _Device:
    spec: SnapshotSpec
    names: names.DeviceNames
    cluster: int = MIN_CLUSTER
    handle: Any = field(default=None, repr=False)  # nbd.NBD for release(), opened lazily


def round_inward(offset: int, length: int, cluster: int, size: int | None = None
                 ) -> tuple[int, int] | None:
    """The largest cluster-aligned ``(offset, length)`` inside ``[offset, offset+length)``, or
    None when no whole cluster fits::

        cluster   |-------|-------|-------|-------|
        asked         [=====================]
        returned          [===============]

    A range that ends at the end of the disk (``size``) keeps its end: QEMU's bitmaps accept
    a last, partial cluster there (the assertion allows ``start + count == size``), so the
    tail of a disk whose size is no multiple of the cluster can be released too.
    """
    if cluster <= 0 or offset < 0 or length < 0:
        raise ValueError(f"bad range: offset={offset} length={length} cluster={cluster}")
    start = -(-offset // cluster) * cluster
    end = offset + length
    if end != size:
        end = end // cluster * cluster
    return (start, end - start) if end > start else None


class LiveSnapshot:
    """A point-in-time, NBD-exported view of running disks (see the module docstring).

    ``with LiveSnapshot(mon, specs, tag="t1", nbd_socket="/run/ba/nbd.sock") as snap:`` reads
    go to ``nbd+unix:///<device id>?socket=<nbd_socket>``; :meth:`release` frees backed-up
    ranges. :meth:`teardown` (or leaving the ``with``) removes everything again.
    """

    def __init__(
        self, monitor: Monitor, specs: Sequence[SnapshotSpec], *, tag: str, nbd_socket: str,
        cbw_timeout: int = 5, transaction: Sequence[Mapping[str, Any]] = (),
        around: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
        changes: str | None = None, nbd_tcp: tuple[str, int] | None = None,
        nbd_tls: NbdTls | None = None, min_cluster: int | None = None,
    ) -> None:
        names.check_tag(tag)
        if min_cluster is not None and (min_cluster < MIN_CLUSTER
                                        or min_cluster & (min_cluster - 1)):
            raise InvalidArgument(f"the copy-before-write cluster size must be a power of two "
                                  f"of at least {MIN_CLUSTER // 1024} KiB, got {min_cluster}")
        ids = [s.device.id for s in specs]
        if not specs or len(set(ids)) != len(ids):
            raise InvalidArgument(f"snapshot devices must be given once each, got {ids!r}")
        if nbd_tls is not None and nbd_tcp is None:
            raise InvalidArgument("TLS on QEMU's NBD server needs a TCP address")
        self.monitor = monitor
        self.tag = tag
        self.nbd_socket = nbd_socket
        self.nbd_tcp = nbd_tcp
        """``(host, port)`` of QEMU's NBD server on TCP, for a client on another host;
        None: the Unix socket ``nbd_socket``."""
        self.nbd_tls = nbd_tls
        # On TCP, every holder of a certificate from the CA (or of the PSK) passes TLS: the
        # export names carry 128 random bits, so only the agent, which asked for the
        # exports over QMP, knows where to read the snapshot.
        self._secret = os.urandom(16).hex() if nbd_tcp is not None else ""
        self.cbw_timeout = cbw_timeout
        self.min_cluster = min_cluster
        """Copy granularity to ask the filter for (``min-cluster-size``; QEMU 9.2 and later);
        None: QEMU's choice (64 KiB, or the target's cluster size if larger)."""
        self.caps = caps.QEMU_7_2
        """What the running QEMU's copy-before-write can do; read by :meth:`setup` when it
        matters (``min_cluster`` given, or a disk whose size is no multiple of its cluster),
        else what every supported QEMU does alike."""
        self._probed = False
        self.nbd_server_owned = False
        """True when this snapshot started QEMU's NBD server (and so stops it)."""
        self.around = around
        """Entered around the point in time only (the pause, the transaction, the filters'
        insertion): the guest's file systems frozen (agent/live/freeze.py)."""
        self.transaction = list(transaction)
        """QMP ``transaction`` actions run at the point in time (dirty bitmaps: see
        :mod:`agent.qemu.checkpoints`); every bitmap they add is removed at teardown, the
        persistent ones only if :meth:`commit` was not called."""
        self.changes = changes
        """A bitmap on every device's root node: the filter copies, and the export offers
        (meta context ``qemu:dirty-bitmap:<name>``), only the clusters it marks."""
        self._committed = False
        self._devices = {
            s.device.id: _Device(s, names.device_names(tag, s.device.id, i))
            for i, s in enumerate(specs)
        }
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._set_up = False

    # -- public API ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Build the graph and the exports (see the module docstring). On failure everything
        added so far is removed and a :class:`SnapshotError` names the step."""
        if self._set_up or self._undo:
            raise SnapshotError(f"snapshot {self.tag!r} is already set up")
        try:
            self._setup()
        except BaseException as e:
            self._unwind(first=e)
            raise
        self._set_up = True

    def teardown(self) -> None:
        """Remove exports, nodes and filters in reverse order; idempotent. Every step is tried;
        failures are logged and the first one is raised."""
        self._set_up = False
        self._unwind(first=None)

    def commit(self) -> None:
        """The backup is complete: keep the persistent bitmaps the transaction added."""
        self._committed = True

    def export_name(self, device_id: str) -> str:
        """NBD export name of a device's snapshot: its id (on TCP, then a secret)."""
        name = self._device(device_id).spec.device.id
        return f"{name}-{self._secret}" if self._secret else name

    @property
    def nbd_address(self) -> str:
        """Where QEMU's NBD server listens, for messages."""
        if self.nbd_tcp is None:
            return self.nbd_socket
        return format_address(*self.nbd_tcp)

    def export_uri(self, device_id: str) -> str:
        """libnbd URI of a device's snapshot export (``nbds://`` under TLS)."""
        name = quote(self.export_name(device_id), safe="")
        if self.nbd_tcp is None:
            return f"nbd+unix:///{name}?socket={self.nbd_socket}"
        return f"{'nbds' if self.nbd_tls else 'nbd'}://{self.nbd_address}/{name}"

    def connect_export(self, device_id: str) -> nbd.NBD:
        """A libnbd connection to a device's snapshot export (TLS set up as needed)."""
        h = nbd.NBD()
        if self.nbd_tls is not None:
            self.nbd_tls.client.nbd_client(h)
        h.connect_uri(self.export_uri(device_id))
        return h

    def cluster_size(self, device_id: str) -> int:
        """Copy granularity of a device's filter: trims are rounded to it."""
        return self._device(device_id).cluster

    @property
    def releases_partial_tail(self) -> bool:
        """Whether a trim can release a disk's last cluster when it is partial (the disk's
        size is no multiple of the cluster): QEMU 7.2 can, later QEMUs cannot."""
        return not self.caps.trims_rounded

    def release(self, device_id: str, offset: int, length: int) -> None:
        """Tell QEMU that ``[offset, offset+length)`` of the device is backed up: trim it on the
        snapshot export (QEMU stops copying it, the target frees it; reading it fails from now
        on). Rounded inward to whole clusters; a range without one whole cluster is a no-op."""
        dev = self._device(device_id)
        if not self._set_up:
            raise SnapshotError(f"cannot release a range of device '{device_id}': the snapshot "
                                "is not set up")
        size = dev.spec.device.virtual_size
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidArgument(f"device '{device_id}': range {offset}+{length} is outside "
                                  f"the disk ({size} bytes)")
        span = round_inward(offset, length, dev.cluster,
                            size if self.releases_partial_tail else None)
        if span is None:
            return
        start, count = span
        try:
            if dev.handle is None:
                dev.handle = self.connect_export(device_id)
            while count:
                step = min(count, MAX_TRIM)
                dev.handle.trim(step, start)
                start, count = start + step, count - step
        except nbd.Error as e:
            raise SnapshotError(
                f"cannot release {span[1]} bytes at {span[0]} of device '{device_id}' on the "
                f"snapshot export at {self.nbd_address}: {e}"
            ) from e

    def __enter__(self) -> LiveSnapshot:
        self.setup()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._set_up = False
        self._unwind(first=v)

    # -- building -----------------------------------------------------------------------------

    def _setup(self) -> None:
        mon = self.monitor
        devs = list(self._devices.values())
        if self.min_cluster is not None:
            self._probe()
            if not self.caps.min_cluster_size:
                raise SnapshotError("this QEMU cannot copy in larger clusters: its "
                                    "copy-before-write filter has no min-cluster-size (QEMU "
                                    "9.2 and later have it)")
        for d in devs:
            dev = d.spec.device
            if dev.qom_path is None:
                raise SnapshotError(f"cannot snapshot device '{dev.id}': it has no QOM path "
                                    "(a drive without a device)")
            opts = {**d.spec.target, "node-name": d.names.target}
            self._step(f"cannot add the copy-before-write target for device '{dev.id}'",
                       "blockdev-add", opts)
            self._push(f"delete node {d.names.target}", _blockdev_del(mon, d.names.target))
            d.cluster = max(MIN_CLUSTER, _cluster_size(mon, d.names.target),
                            self.min_cluster or 0)
        if any(d.spec.device.virtual_size % d.cluster for d in devs):
            self._probe()  # whether the partial last cluster can be released
        self._insert_filters(devs)
        for d in devs:
            self._step(f"cannot add the snapshot view of device '{d.spec.device.id}'",
                       "blockdev-add", {"driver": "snapshot-access", "node-name": d.names.snap,
                                        "file": d.names.cbw, "discard": "unmap"})
            self._push(f"delete node {d.names.snap}", _blockdev_del(mon, d.names.snap))
        self._start_nbd_server()
        for d in devs:
            self._step(f"cannot export the snapshot of device '{d.spec.device.id}'",
                       "block-export-add",
                       {"type": "nbd", "id": d.names.export_id, "node-name": d.names.snap,
                        "name": self.export_name(d.spec.device.id), "writable": True,
                        **({"bitmaps": [{"node": d.spec.device.node_name,
                                         "name": self.changes}]} if self.changes else {})})
            self._push(f"delete export {d.names.export_id}", self._export_del(d))

    def _probe(self) -> None:
        """Read what this QEMU can do (once: it costs 50-300 ms here)."""
        if not self._probed:
            self.caps = caps.probe(self.monitor)
            self._probed = True
            log.debug("QEMU's copy-before-write takes %s", sorted(self.caps.cbw_options))

    def _insert_filters(self, devs: list[_Device]) -> None:
        """While the VM is paused (one point in time for all disks, no write in flight):
        run the transaction, add the filters (a filter copies its bitmap when it is
        created, so after the transaction), switch every device to its filter."""
        mon = self.monitor
        switched: list[tuple[str, str]] = []  # (qom path, original root node)
        with self.around() if self.around else contextlib.nullcontext(), _Paused(mon):
            if self.transaction:
                self._step("cannot start the backup's dirty bitmaps", "transaction",
                           {"actions": self.transaction})
                for act in self.transaction:
                    if act["type"] == "block-dirty-bitmap-add":
                        self._push(f"remove bitmap {act['data']['name']}",
                                   self._undo_bitmap_add(act["data"]))
            for d in devs:
                self._step(
                    f"cannot add the copy-before-write filter for device '{d.spec.device.id}'",
                    "blockdev-add",
                    {"driver": "copy-before-write", "node-name": d.names.cbw,
                     "file": d.spec.device.node_name, "target": d.names.target,
                     "on-cbw-error": "break-snapshot", "cbw-timeout": self.cbw_timeout,
                     **({caps.MIN_CLUSTER_SIZE: self.min_cluster} if self.min_cluster else {}),
                     **({"bitmap": {"node": d.spec.device.node_name, "name": self.changes}}
                        if self.changes else {})},
                )
                self._push(f"delete node {d.names.cbw}", _blockdev_del(mon, d.names.cbw))
            self._push("put the devices back on their disks",
                       lambda: _switch_drives(mon, list(reversed(switched))))
            for d in devs:
                dev = d.spec.device
                qom = dev.qom_path
                if qom is None:  # checked in _setup
                    raise SnapshotError(f"device '{dev.id}' has no QOM path")
                self._step(f"cannot insert the copy-before-write filter under device "
                           f"'{dev.id}'", "qom-set",
                           {"path": qom, "property": "drive", "value": d.names.cbw})
                switched.append((qom, dev.node_name))

    def _start_nbd_server(self) -> None:
        mon = self.monitor
        marker = names.nbd_marker(self.tag)
        # Marker first: a crash between the two leaves a marker without a server (harmless to
        # cleanup), never a server of ours without a marker.
        self._step("cannot record the NBD server's owner", "object-add",
                   {"qom-type": "secret", "id": marker, "data": ""})
        self._push(f"delete object {marker}", lambda: _object_del(mon, marker))
        # QEMU 7.2 takes only the old, "data"-wrapped address form here.
        args: dict[str, Any] = {"addr": {"type": "unix", "data": {"path": self.nbd_socket}}}
        if self.nbd_tcp is not None:
            host, port = self.nbd_tcp
            args = {"addr": {"type": "inet", "data": {"host": host, "port": str(port)}}}
        if self.nbd_tls is not None:
            args["tls-creds"] = self.nbd_tls.creds
            if self.nbd_tls.authz is not None:
                args["tls-authz"] = self.nbd_tls.authz
        try:
            mon.execute("nbd-server-start", args)
        except QmpError as e:
            if e.desc is not None and "already running" in e.desc:
                log.info("QEMU's NBD server already runs: reusing it (%s)", e.desc)
                self._undo.pop()[1]()  # not ours: drop the marker now
                return
            raise _wrap(f"cannot start QEMU's NBD server on {self.nbd_address}", e) from e
        self.nbd_server_owned = True
        self._push("stop the NBD server", lambda: _stop_nbd_server(mon))

    def _undo_bitmap_add(self, add: Mapping[str, Any]) -> Callable[[], None]:
        def undo() -> None:
            if add.get("persistent") and self._committed:
                return  # a checkpoint of the complete backup: it stays
            _bitmap_remove(self.monitor, add["node"], add["name"])
        return undo

    def _export_del(self, d: _Device) -> Callable[[], None]:
        def undo() -> None:
            handle, d.handle = d.handle, None
            if handle is not None:
                try:
                    handle.shutdown()
                except nbd.Error as e:
                    log.debug("NBD shutdown of %s: %s", d.names.export_id, e)
            _export_del(self.monitor, d.names.export_id)
        return undo

    # -- helpers ------------------------------------------------------------------------------

    def _device(self, device_id: str) -> _Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise InvalidArgument(f"device '{device_id}' is not in snapshot {self.tag!r} "
                                  f"(it has {', '.join(self._devices)})") from None

    def _step(self, what: str, cmd: str, args: Mapping[str, Any]) -> None:
        try:
            self.monitor.execute(cmd, args)
        except QmpError as e:
            raise _wrap(what, e) from e

    def _push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def _unwind(self, first: BaseException | None) -> None:
        """Run every undo step (last first). Raise the first failure unless ``first`` (an error
        already on its way to the caller) is given: then failures are only logged."""
        errors: list[Exception] = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # keep undoing the rest
                errors.append(e)
                if _monitor_gone(e):
                    # QEMU exited (or its monitor went away): nothing left to undo here;
                    # what a live QEMU still holds, `backup-agent cleanup` removes.
                    log.debug("snapshot %s: monitor gone while undoing: %s", self.tag, e)
                    self._undo.clear()
                else:
                    log.error("snapshot %s: cannot %s: %s", self.tag, what, e)
        if errors and first is None:
            raise errors[0]


def _monitor_gone(e: BaseException | None) -> bool:
    """Whether ``e``, or an error it wraps, says the monitor connection is closed."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # context chains can loop
        if isinstance(e, MonitorGone):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class _Paused:
    """``stop`` the VM for the block if it runs, ``cont`` after (always, once stopped)."""

    def __init__(self, mon: Monitor) -> None:
        self.mon = mon
        self.stopped = False

    def __enter__(self) -> None:
        try:
            if self.mon.execute("query-status").get("running"):
                self.mon.execute("stop")
                self.stopped = True
        except QmpError as e:
            raise _wrap("cannot pause the VM to switch its disks", e) from e

    def __exit__(self, t: object, v: BaseException | None, tb: object) -> None:
        if self.stopped:
            try:
                self.mon.execute("cont")
            except QmpError as e:
                if v is None:
                    raise _wrap("cannot resume the VM after switching its disks", e) from e
                log.error("cannot resume the VM after switching its disks: %s", e)


def _wrap(what: str, e: QmpError) -> SnapshotError:
    return SnapshotError(f"{what}: {e}", command=e.command, error_class=e.error_class,
                         desc=e.desc)


def _cluster_size(mon: Monitor, node: str) -> int:
    for n in mon.execute("query-named-block-nodes", {"flat": True}):
        if n.get("node-name") == node:
            size = n.get("image", {}).get("cluster-size")
            return size if isinstance(size, int) else 0
    return 0


def _switch_drives(mon: Monitor, moves: Iterable[tuple[str, str]]) -> None:
    """``qom-set drive`` for each ``(qom path, node)``, the VM paused; first error raised."""
    moves = list(moves)
    if not moves:
        return
    errors: list[SnapshotError] = []
    with _Paused(mon):
        for qom, node in moves:
            try:
                mon.execute("qom-set", {"path": qom, "property": "drive", "value": node})
            except QmpError as e:
                errors.append(_wrap(f"cannot put device {qom} back on node '{node}'", e))
    if errors:
        raise errors[0]


def _blockdev_del(mon: Monitor, node: str) -> Callable[[], None]:
    def undo() -> None:
        try:
            mon.execute("blockdev-del", {"node-name": node})
        except QmpError as e:
            raise _wrap(f"cannot delete node '{node}'", e) from e
    return undo


def _bitmap_remove(mon: Monitor, node: str, name: str) -> None:
    try:
        mon.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    except QmpError as e:
        raise _wrap(f"cannot remove bitmap '{name}' from node '{node}'", e) from e


def _object_del(mon: Monitor, obj: str) -> None:
    try:
        mon.execute("object-del", {"id": obj})
    except QmpError as e:
        raise _wrap(f"cannot delete object '{obj}'", e) from e


def _export_del(mon: Monitor, export_id: str) -> None:
    """Delete an export, dropping its clients, and wait until QEMU has let go of it."""
    try:
        mon.execute("block-export-del", {"id": export_id, "mode": "hard"})
    except QmpError as e:
        raise _wrap(f"cannot delete export '{export_id}'", e) from e
    deadline = time.monotonic() + EXPORT_DEL_TIMEOUT
    while any(x.get("id") == export_id for x in mon.execute("query-block-exports")):
        if time.monotonic() > deadline:
            raise SnapshotError(f"export '{export_id}' still exists {EXPORT_DEL_TIMEOUT:g} s "
                                "after its deletion")
        time.sleep(0.05)


def _stop_nbd_server(mon: Monitor) -> None:
    """Stop the NBD server we started, unless someone else exports through it by now."""
    others = [x.get("id") for x in mon.execute("query-block-exports")]
    if others:
        log.warning("leaving QEMU's NBD server running: it still has exports %s", others)
        return
    try:
        mon.execute("nbd-server-stop")
    except QmpError as e:
        if e.desc is not None and "not running" in e.desc:
            return
        raise _wrap("cannot stop QEMU's NBD server", e) from e


# -- crash recovery -------------------------------------------------------------------------


def cleanup(mon: Monitor, tag: str | None = None) -> list[str]:
    """Remove what a killed agent left in QEMU: everything named ``ba-<tag>-...`` (any tag if
    None). Returns what was removed; every step is tried, the first failure is raised."""
    done: list[str] = []
    errors: list[Exception] = []

    def attempt(what: str, action: Callable[[], None]) -> None:
        try:
            action()
            done.append(what)
        except Exception as e:  # keep cleaning
            log.error("cleanup: cannot %s: %s", what, e)
            errors.append(e)

    for x in mon.execute("query-block-exports"):
        export_id = x.get("id", "")
        if names.is_ours(export_id, tag):
            attempt(f"delete export {export_id}", functools.partial(_export_del, mon, export_id))

    # A live restore's nodes (-src) are agent.qemu.stream's to remove, once streamed.
    nodes = {n["node-name"]: n.get("drv", "") for n in
             mon.execute("query-named-block-nodes", {"flat": True})
             if names.is_ours(n.get("node-name", ""), tag)
             and not n["node-name"].endswith(names.SOURCE_SUFFIX)}
    # Snapshot views first: while one hangs on a filter, QEMU 7.2 refuses to put the device
    # back on the disk ("Permission conflict ... unshared by node 'ba-...-cbw'").
    order = {"snapshot-access": 0, "copy-before-write": 1}
    ordered = sorted(nodes, key=lambda n: order.get(nodes[n], 2))
    for node in (n for n in ordered if nodes[n] == "snapshot-access"):
        attempt(f"delete node {node}", _blockdev_del(mon, node))
    moves = _filters_to_remove(mon, {n for n, drv in nodes.items() if drv == "copy-before-write"})
    if moves:
        attempt(f"put devices back: {moves}", functools.partial(_switch_drives, mon, moves))
    for node in (n for n in ordered if nodes[n] != "snapshot-access"):
        attempt(f"delete node {node}", _blockdev_del(mon, node))

    # The frozen changes of an incremental: free once its filter and export are gone.
    for n in mon.execute("query-named-block-nodes", {"flat": True}):
        for b in n.get("dirty-bitmaps") or ():
            name = b.get("name") or ""
            if (names.is_ours(name, tag) and name.endswith(names.CHANGES_SUFFIX)
                    and not b.get("persistent")):
                attempt(f"remove bitmap {name} from node {n['node-name']}",
                        functools.partial(_bitmap_remove, mon, n["node-name"], name))

    for obj in mon.execute("qom-list", {"path": "/objects"}):
        name = obj.get("name", "")
        if names.is_ours(name, tag) and name.endswith(names.NBD_MARKER_SUFFIX):
            attempt("stop the NBD server", lambda: _stop_nbd_server(mon))
            attempt(f"delete object {name}", functools.partial(_object_del, mon, name))
    if errors:
        raise errors[0]
    return done


def _filters_to_remove(mon: Monitor, filters: set[str]) -> list[tuple[str, str]]:
    """``(device QOM path, original node)`` for every device whose drive is one of
    ``filters``; the original node is the filter's ``file`` child."""
    if not filters:
        return []
    graph = mon.execute("x-debug-query-block-graph")
    by_id = {n["id"]: n for n in graph["nodes"]}
    moves = []
    for edge in graph["edges"]:
        parent, child = by_id[edge["parent"]], by_id[edge["child"]]
        if parent["type"] != "block-backend" or child["name"] not in filters:
            continue
        files = [by_id[e["child"]]["name"] for e in graph["edges"]
                 if e["parent"] == child["id"] and e["name"] == "file"]
        device = str(parent["name"]).removesuffix("/virtio-backend")
        if files and device.startswith("/"):
            moves.append((device, files[0]))
    return moves
