"""What a live backup cost the guest, from the copy-before-write targets and the trackers:
the numbers the command line reports after a live backup."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.cbw.server import CbwTargetServer
from agent.live.freeze import FreezeResult
from agent.tracker import DeviceTracker

log = logging.getLogger("backup-agent")


@dataclass(frozen=True)
class LiveStats:
    clusters_copied: int  # copied by QEMU before a guest write, all disks
    pushed_bytes: int  # of those, the bytes the archive took from the targets' feeds
    copies_read_back: int  # bytes the targets served to reads through QEMU's snapshot view
    released_bytes: int  # trimmed on the snapshot view once in the archive
    bytes_spilled: int  # to the targets' spool files
    peak_plugin_memory: int  # the most any one target held in memory
    longest_copy_store_us: int  # the longest any target took to store one copy
    # application- or crash-consistent, and how long the guest was frozen
    freeze: FreezeResult = field(default_factory=FreezeResult)


def collect(servers: Mapping[str, CbwTargetServer],
            trackers: Mapping[str, DeviceTracker]) -> LiveStats:
    """The numbers of every disk (by device id), summed; warns of a target that refused
    writes."""
    stats = {name: s.stats() for name, s in servers.items()}
    for name, st in stats.items():
        if st.get("writes_refused"):  # the store kept what QEMU copied: see agent.cbw.store
            log.warning("disk %r: the copy-before-write target refused %d write(s) over "
                        "clusters it had already stored: a client other than QEMU reached it "
                        "(the archive holds what QEMU copied)", name, st["writes_refused"])
    return LiveStats(
        clusters_copied=sum(s.get("clusters_copied", 0) for s in stats.values()),
        pushed_bytes=sum(t.pushed_bytes for t in trackers.values()),
        copies_read_back=sum(s.get("bytes_read", 0) for s in stats.values()),
        released_bytes=sum(t.released_bytes for t in trackers.values()),
        bytes_spilled=sum(s.get("bytes_spilled", 0) for s in stats.values()),
        peak_plugin_memory=max((s.get("peak_memory", 0) for s in stats.values()), default=0),
        longest_copy_store_us=max((s.get("longest_write_us", 0) for s in stats.values()),
                                  default=0),
    )
