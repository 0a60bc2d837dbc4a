"""Live restore in QEMU: a served backup put under a VM's empty disk image, then streamed in.

The VM was started paused (``-S``) with each target disk an empty qcow2 image of the right
size. For each device (:meth:`LiveStream.attach`, then :meth:`LiveStream.start`)::

    before                          after attach                      after the stream
    device vda                      device vda                        device vda
       │                               │                                 │
    vda-fmt (qcow2, empty)          vda-fmt (qcow2) ── backing ──▶    vda-fmt (qcow2, whole)
       │ file                          │ file          ba-T-vda-src      │ file
    vda-file                        vda-file         (NBD client of   vda-file
                                                      the served backup)

1. ``object-add`` the marker ``ba-T-live`` (a ``secret``): its data is the JSON record of
   the nbdkit that serves the backup (:class:`agent.serve.detached.ServerRecord`);
2. ``blockdev-add`` the NBD client node ``ba-T-<dev>-src`` (read-only, Unix socket), and,
   when the caller made one (:func:`agent.restore_live.zero_map`), over it the zero map
   ``ba-T-<dev>-z-src``: a read-only qcow2 image whose raw external data file is the NBD
   node, its clusters zero clusters where the backup reads as zeros and data (at the same
   offset in the data file) elsewhere. QEMU's stream asks the block status of every chunk
   of the chain under the image, twice (the job, then its copy-on-read filter): the zero
   map answers from its own tables, where the NBD node asked the server each time, and it
   reads the backup's zeros as zeros, where the NBD node had the server send them (the
   stream of a 1 GiB half-data disk took 38 % less time, docs/PERFORMANCE.md "Live
   restore");
3. ``blockdev-reopen`` the device's qcow2 node with ``backing`` set to the zero map (else
   the NBD node). QEMU 7.2 and 10
   both do this (``blockdev-snapshot`` cannot: its overlay must not be in use by a device,
   and ``x-blockdev-change`` only changes quorum children). Reopening resets every option not
   given to its default, so the node's options are given again as far as QMP tells them:
   driver, ``file`` child, read-only, detect-zeroes (and ``discard=unmap``, which
   ``detect-zeroes=unmap`` requires), cache (:func:`reopen_options`);
4. ``block-stream`` (job ``ba-T-<dev>-stream``, optionally ``speed``): QEMU copies every
   cluster the image does not have yet from the backing; guest writes win, and what the guest
   reads is copied on the way (a guest that reads its whole disk finishes the stream). The
   job dismisses itself when it ends: a stream job left concluded and not dismissed makes
   ``query-named-block-nodes`` crash QEMU (SIGSEGV in ``bdrv_refresh_filename``, seen on 7.2
   and 10.0 here), and libvirt and others send that command. Whether a stream succeeded is
   read from the graph instead: the image has no backing any more;
5. ``cont``: the guest runs, reading what it has not written from the backup.

When the job ends without error, QEMU has already dropped the backing (block-stream does
that itself); :meth:`LiveStream.finish` deletes the zero maps, the NBD nodes and the
marker (the caller stops the server in between). Nothing here sends
``query-named-block-nodes`` while a stream may run or end: the graph comes from
``x-debug-query-block-graph``. A stream that
fails leaves the backing in place: the VM still needs the server, so nothing that serves it
is removed.

A killed agent leaves this behind while the stream goes on in QEMU; :func:`finish_leftovers`
(``backup-agent cleanup``) waits for each stream, starts it again if it failed or never
started, then removes nodes, jobs, the server (by its recorded pid) and the marker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import interrupts
from agent.errors import AgentError, InvalidArgument
from agent.qemu import names
from agent.qemu.block import BlockDevice
from agent.qemu.qmp import Monitor, QmpError
from agent.serve.detached import ServerRecord, stop_recorded

log = logging.getLogger(__name__)

#: Seconds between two looks at the jobs while waiting for them, at most.
POLL = 0.25
#: ... and at least, once the jobs are about to end (see :func:`next_look`).
MIN_POLL = 0.01
#: Job states after which nothing runs any more.
DONE = frozenset({"concluded", "null"})


#: Name suffix of a zero-map node, in place of the source's :data:`names.SOURCE_SUFFIX`
#: (that fits wherever ``-stream`` does). It ends as a source's does: ``graph.cleanup``
#: (live backups) leaves such nodes to :func:`finish_leftovers`.
ZEROS_SUFFIX = "-z" + names.SOURCE_SUFFIX


def zeros_name(source: str) -> str:
    """The zero map's node name that goes with the NBD node ``source``."""
    return source.removesuffix(names.SOURCE_SUFFIX) + ZEROS_SUFFIX


class StreamError(QmpError):
    """Setting up, watching or finishing a live restore failed; the message says which step."""


@dataclass(frozen=True)
class StreamSpec:
    """One device to restore live and the export of the served backup that goes under it."""

    device: BlockDevice
    export: str
    zeros: str | None = None
    """The zero map (:func:`agent.restore_live.zero_map`), a qcow2 image QEMU opens
    read-only with the NBD node as its data file; it may be deleted once
    :meth:`LiveStream.attach` returned. None: the NBD node goes right under the image."""


@dataclass(frozen=True)
class JobState:
    """A block-stream job as QEMU reports it (``query-jobs``)."""

    id: str
    status: str
    done: int
    total: int
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status in DONE


def reopen_options(node: Mapping[str, Any], file_child: str, backing: str | None
                   ) -> dict[str, Any]:
    """``blockdev-reopen`` options that keep what QMP says of ``node`` (a
    ``query-named-block-nodes`` entry) and set its ``backing`` (None: detach it)."""
    opts: dict[str, Any] = {"driver": node["drv"], "node-name": node["node-name"],
                            "file": file_child, "backing": backing,
                            "read-only": bool(node.get("ro", False))}
    zeroes = node.get("detect_zeroes")
    if isinstance(zeroes, str) and zeroes != "off":
        opts["detect-zeroes"] = zeroes
        if zeroes == "unmap":  # QEMU refuses detect-zeroes=unmap without discard=unmap
            opts["discard"] = "unmap"
    cache = node.get("cache")
    if isinstance(cache, Mapping) and (cache.get("direct") or cache.get("no-flush")):
        opts["cache"] = {"direct": bool(cache.get("direct")),
                         "no-flush": bool(cache.get("no-flush"))}
    return opts


def jobs(mon: Monitor) -> dict[str, JobState]:
    """Every job of QEMU by id."""
    out = {}
    for j in mon.execute("query-jobs"):
        out[j["id"]] = JobState(j["id"], j.get("status", ""), int(j.get("current-progress", 0)),
                                int(j.get("total-progress", 0)), j.get("error"))
    return out


def _node(mon: Monitor, name: str) -> Mapping[str, Any] | None:
    for n in mon.execute("query-named-block-nodes", {"flat": True}):
        if n.get("node-name") == name:
            return dict(n)
    return None


def _children(mon: Monitor, graph: Any = None) -> dict[str, dict[str, str]]:
    """``{node: {child role: child node}}`` from ``x-debug-query-block-graph`` (QEMU 7.2
    names a node's children nowhere else)."""
    if graph is None:
        graph = mon.execute("x-debug-query-block-graph")
    by_id = {n["id"]: n for n in graph["nodes"]}
    out: dict[str, dict[str, str]] = {}
    for e in graph["edges"]:
        parent, child = by_id[e["parent"]], by_id[e["child"]]
        if parent.get("type") == "block-driver":
            out.setdefault(str(parent["name"]), {})[str(e["name"])] = str(child["name"])
    return out


def _start_stream(mon: Monitor, job: str, node: str, speed: int) -> None:
    args: dict[str, Any] = {"job-id": job, "device": node}
    if speed:
        args["speed"] = speed
    try:
        mon.execute("block-stream", args)
    except QmpError as e:
        raise _wrap(f"cannot start copying the backup into node '{node}'", e) from e


def _wrap(what: str, e: QmpError) -> StreamError:
    return StreamError(f"{what}: {e}", command=e.command, error_class=e.error_class,
                       desc=e.desc)


class LiveStream:
    """The QEMU side of one live restore (see the module docstring)."""

    def __init__(self, mon: Monitor, specs: Sequence[StreamSpec], *, tag: str,
                 server: ServerRecord, speed: int = 0) -> None:
        ids = [s.device.id for s in specs]
        if not specs or len(set(ids)) != len(ids):
            raise InvalidArgument(f"live restore devices must be given once each, got {ids!r}")
        self.mon = mon
        self.tag = names.check_tag(tag)
        self.server = server
        self.speed = speed
        self.specs = list(specs)
        self.names = {s.device.id: names.stream_names(tag, s.device.id, i)
                      for i, s in enumerate(specs)}
        self.marker = names.live_marker(tag)
        self._attached: list[StreamSpec] = []
        self._zeros: set[str] = set()  # devices whose zero map QEMU has
        self._marked = False
        self._file_child: dict[str, str] = {}

    def check(self) -> None:
        """Refuse a VM that runs or a device that cannot take a backing image."""
        status = self.mon.execute("query-status")
        if status.get("running"):
            raise InvalidArgument("the VM is running: a live restore starts a VM that is "
                                  "paused before its first instruction (-S), with an empty "
                                  "target image (docs/SERVE.md)")
        children = _children(self.mon)
        for s in self.specs:
            dev = s.device
            if dev.format != "qcow2":
                raise InvalidArgument(f"device '{dev.id}' is on a {dev.format} node: a live "
                                      "restore needs a qcow2 image, which can have a backing "
                                      "file (create it with qemu-img create -f qcow2)")
            node = _node(self.mon, dev.node_name) or {}
            if node.get("backing_file_depth") or "backing" in children.get(dev.node_name, {}):
                raise InvalidArgument(f"device '{dev.id}': its image has a backing file "
                                      "already; give it a new, empty qcow2 image")
            file_child = children.get(dev.node_name, {}).get("file")
            if file_child is None:
                raise InvalidArgument(f"device '{dev.id}': its node '{dev.node_name}' has no "
                                      "file child")
            self._file_child[dev.id] = file_child

    def attach(self) -> None:
        """Steps 1-3: the marker, and each device's backing (undone on failure)."""
        if not self._file_child:
            self.check()
        try:
            self._step("cannot record the live restore in QEMU", "object-add",
                       {"qom-type": "secret", "id": self.marker,
                        "data": self.server.to_json()})
            self._marked = True
            for s in self.specs:
                n = self.names[s.device.id]
                self._step(f"cannot connect QEMU to the served backup of '{s.device.id}' "
                           f"(export {s.export!r} on {self.server.socket})", "blockdev-add",
                           {"driver": "nbd", "node-name": n.source, "read-only": True,
                            "export": s.export,
                            "server": {"type": "unix", "path": self.server.socket}})
                self._attached.append(s)
                backing = n.source
                if s.zeros is not None:
                    backing = zeros_name(n.source)
                    self._step(f"cannot open the zero map of '{s.device.id}' ({s.zeros})",
                               "blockdev-add",
                               {"driver": "qcow2", "node-name": backing, "read-only": True,
                                "file": {"driver": "file", "filename": s.zeros},
                                "data-file": n.source})
                    self._zeros.add(s.device.id)
                node = _node(self.mon, s.device.node_name)
                if node is None:
                    raise StreamError(f"device '{s.device.id}': node "
                                      f"'{s.device.node_name}' is gone")
                self._step(f"cannot put the served backup under device '{s.device.id}'",
                           "blockdev-reopen",
                           {"options": [reopen_options(node, self._file_child[s.device.id],
                                                       backing)]})
        except BaseException:
            self.detach()
            raise

    def start(self) -> None:
        """Steps 4-5: a stream per device, then ``cont``. If a stream cannot start, the
        others are cancelled and everything is detached: the VM stays paused."""
        started: list[str] = []
        try:
            for s in self.specs:
                job = self.names[s.device.id].job
                _start_stream(self.mon, job, s.device.node_name, self.speed)
                started.append(job)
        except BaseException:
            self._cancel(started)
            self.detach()
            raise
        try:
            self.mon.execute("cont")
        except QmpError as e:
            raise _wrap("cannot resume the VM", e) from e

    def _cancel(self, started: Iterable[str]) -> None:
        for job in started:
            try:
                self.mon.execute("block-job-cancel", {"device": job, "force": True})
                while job in jobs(self.mon):  # it dismisses itself
                    time.sleep(0.05)
            except QmpError as e:
                log.error("cannot cancel job %s: %s", job, e)

    def detach(self) -> None:
        """Undo :meth:`attach` (only before any guest code ran: the image has nothing of its
        own yet). Every step is tried; failures are logged."""
        while self._attached:
            s = self._attached.pop()
            n = self.names[s.device.id]
            node = _node(self.mon, s.device.node_name)
            try:
                if node is not None and "backing" in _children(self.mon).get(
                        s.device.node_name, {}):
                    self.mon.execute("blockdev-reopen", {"options": [reopen_options(
                        node, self._file_child[s.device.id], None)]})
                if s.device.id in self._zeros:
                    self.mon.execute("blockdev-del", {"node-name": zeros_name(n.source)})
                    self._zeros.discard(s.device.id)
                self.mon.execute("blockdev-del", {"node-name": n.source})
            except QmpError as e:
                log.error("cannot remove the served backup from device '%s': %s",
                          s.device.id, e)
        if self._marked:
            self._marked = False
            try:
                self.mon.execute("object-del", {"id": self.marker})
            except QmpError as e:
                log.error("cannot delete object %s: %s", self.marker, e)

    def failed(self) -> list[str]:
        """Devices whose image still has the backup as its backing (their stream ended
        without finishing: it failed or was cancelled)."""
        children = _children(self.mon)
        return [s.device.id for s in self.specs
                if "backing" in children.get(s.device.node_name, {})]

    def finish(self) -> None:
        """Every stream ended and no image has a backing any more: delete the NBD nodes.
        The caller then stops the server and calls :meth:`forget`."""
        left = self.failed()
        if left:
            raise StreamError(f"device(s) {', '.join(left)} still read from the backup")
        for s in self.specs:
            n = self.names[s.device.id]
            if s.device.id in self._zeros:  # first: the NBD node is its data file
                z = zeros_name(n.source)
                self._step(f"cannot delete node {z}", "blockdev-del", {"node-name": z})
                self._zeros.discard(s.device.id)
            self._step(f"cannot delete node {n.source}", "blockdev-del",
                       {"node-name": n.source})
        self._attached = []

    def forget(self) -> None:
        """Delete the marker (the server it records is stopped)."""
        self._step(f"cannot delete object {self.marker}", "object-del", {"id": self.marker})
        self._marked = False

    def _step(self, what: str, cmd: str, args: Mapping[str, Any]) -> None:
        try:
            self.mon.execute(cmd, args)
        except QmpError as e:
            raise _wrap(what, e) from e


# -- after a killed agent ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Leftover:
    tag: str
    source: str
    job: str
    parent: str | None
    """The image the source is still under (None: no longer under any image)."""
    zeros: str | None
    """The source's zero map node, if there is one (under the image; the source is its
    data file)."""


def _tag_of(name: str) -> str:
    return name[len(names.PREFIX):].split("-", 1)[0]


def _leftovers(mon: Monitor, tag: str | None) -> list[_Leftover]:
    graph = mon.execute("x-debug-query-block-graph")
    children = _children(mon, graph)
    backing_of = {kids["backing"]: parent for parent, kids in children.items()
                  if "backing" in kids}
    data_file_of = {kids["data-file"]: parent for parent, kids in children.items()
                    if "data-file" in kids}
    out = []
    for n in graph["nodes"]:
        name = str(n.get("name", ""))
        if (n.get("type") == "block-driver" and names.is_ours(name, tag)
                and name.endswith(names.SOURCE_SUFFIX) and not name.endswith(ZEROS_SUFFIX)):
            job = name.removesuffix(names.SOURCE_SUFFIX) + names.STREAM_SUFFIX
            parent, zeros = backing_of.get(name), None
            if data_file_of.get(name) == zeros_name(name):
                zeros = zeros_name(name)
                parent = backing_of.get(zeros)
            out.append(_Leftover(_tag_of(name), name, job, parent, zeros))
    return out


def _markers(mon: Monitor, tag: str | None) -> dict[str, str]:
    """``{tag: marker object id}`` of the live restores QEMU holds."""
    out = {}
    for obj in mon.execute("qom-list", {"path": "/objects"}):
        name = str(obj.get("name", ""))
        if names.is_ours(name, tag) and name.endswith(names.LIVE_MARKER_SUFFIX):
            out[_tag_of(name)] = name
    return out


def next_look(states: Sequence[JobState], first: Mapping[str, tuple[float, int]],
              now: float) -> float:
    """Seconds until the next look at jobs in ``states``: half the time the slowest still
    needs at the rate it has gone since ``first`` (``{job: (time, done)}`` when first seen),
    between :data:`MIN_POLL` and :data:`POLL`.

    A job dismisses itself when it ends and QMP tells nothing more (this client takes no
    events): only a look at the jobs sees the end. Looking every :data:`POLL` seconds lost
    an eighth of a second on average at the end of every live restore; looking often all
    along would cost a QMP round trip for nothing most of the time. Halving the estimate
    each time finds the end within a few looks even when the rate changes."""
    left = 0.0
    for s in states:
        if s.finished:
            continue
        t0, d0 = first.get(s.id, (now, s.done))
        if now <= t0 or s.done <= d0 or s.total <= s.done:
            return POLL  # no rate yet (or no end known): look again in a while
        left = max(left, (s.total - s.done) * (now - t0) / (s.done - d0))
    return min(POLL, max(MIN_POLL, left / 2))


def wait_for(mon: Monitor, job_ids: Sequence[str],
             progress: Callable[[list[JobState]], None] | None = None) -> list[JobState]:
    """Wait until no job of ``job_ids`` runs any more (each dismisses itself when it ends);
    their last states as seen, with status ``null`` once gone (and the error, if QEMU
    showed one before the job went)."""
    last: dict[str, JobState] = {}
    first: dict[str, tuple[float, int]] = {}
    while True:
        now = jobs(mon)
        t = time.monotonic()
        for j in job_ids:
            seen = now.get(j)
            if seen is not None:
                last[j] = seen
                first.setdefault(j, (t, seen.done))
            else:
                before = last.get(j) or JobState(j, "null", 0, 0, None)
                # Its last steps are not seen: shown as done unless it said why not.
                done = before.done if before.error else before.total
                last[j] = JobState(j, "null", done, before.total, before.error)
        states = [last[j] for j in job_ids]
        if progress is not None:
            progress(states)
        if all(s.finished for s in states):
            return states
        time.sleep(min(next_look(states, first, t), interrupts.STEP))


def finish_leftovers(mon: Monitor, tag: str | None = None,
                     progress: Callable[[list[JobState]], None] | None = None) -> list[str]:
    """Finish the live restores a killed agent left (all tags, or ``tag``): wait for every
    stream (started again if it failed or never started), then remove nodes, servers and
    markers. Returns what was done; raises the first failure after trying the rest."""
    done: list[str] = []
    errors: list[Exception] = []
    running = jobs(mon)
    waiting = []
    for lo in _leftovers(mon, tag):
        if lo.parent is None:
            continue
        if lo.job not in running:
            try:
                _start_stream(mon, lo.job, lo.parent, 0)
                done.append(f"started the stream {lo.job} into {lo.parent} (it had ended "
                            "without finishing, or never started)")
            except StreamError as e:
                errors.append(e)
                continue
        waiting.append(lo.job)
    last = {s.id: s for s in wait_for(mon, waiting, progress)} if waiting else {}
    in_use = set()
    for lo in _leftovers(mon, tag):
        if lo.parent is not None:
            in_use.add(lo.tag)
            why = last[lo.job].error if lo.job in last else None
            errors.append(StreamError(
                f"the stream {lo.job} ended before the end{f' ({why})' if why else ''}: "
                f"node {lo.parent} still reads from the served backup, which is left "
                "running (run cleanup again to retry)"))
            continue
        if lo.job in last:
            done.append(f"waited for the stream {lo.job}")
        # The zero map first: the source is its data file.
        for node in ([lo.zeros] if lo.zeros is not None else []) + [lo.source]:
            try:
                mon.execute("blockdev-del", {"node-name": node})
                done.append(f"deleted node {node}")
            except QmpError as e:
                errors.append(_wrap(f"cannot delete node {node}", e))
                in_use.add(lo.tag)
                break
    for t, marker in _markers(mon, tag).items():
        if t in in_use:
            continue
        try:
            rec = ServerRecord.from_json(str(mon.execute(
                "qom-get", {"path": f"/objects/{marker}", "property": "data"})))
            if stop_recorded(rec):
                done.append(f"stopped the server of live restore {t} (nbdkit pid {rec.pid})")
            mon.execute("object-del", {"id": marker})
            done.append(f"deleted object {marker}")
        except (QmpError, AgentError, OSError) as e:
            errors.append(e)
    if errors:
        for other in errors[1:]:
            log.error("cleanup: %s", other)
        raise errors[0]
    return done
