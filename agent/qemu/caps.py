"""What the running QEMU's copy-before-write can do, read from its QMP schema.

The agent supports QEMU 7.2 (Debian 12) through 10.x (Debian 13, Proxmox VE 9). Where they
differ, the difference is read from ``query-qmp-schema`` (what ``blockdev-add`` accepts for a
``copy-before-write`` node), never from a version number, which backports make unreliable:

- ``min-cluster-size`` (QEMU 9.2 and later): the filter's copy granularity can be raised above
  the 64 KiB it picks for an NBD target.
- How QEMU treats a trim on the snapshot view that is not aligned to the copy cluster. The
  agent sends whole clusters only (an unaligned trim aborts QEMU 7.2), which for a disk that
  ends mid-cluster means a trim that ends at the disk's end::

      cluster  |-------|-------|---|   (the disk ends mid-cluster)
      trim             [===========]
      QEMU 7.2         [===========]   released, the partial last cluster too
      QEMU 10.0        [=======]       rounded inward by QEMU: the partial cluster stays in
                                       the snapshot, and a guest write there is copied

  Nothing in the schema names this change; it came shortly before ``min-cluster-size``, so a
  QEMU that has that option rounds its snapshot trims (:attr:`QemuCaps.trims_rounded`). Either
  way the agent sends whole clusters only, so a QEMU between the two (a trim of the partial
  last cluster ignored, at most one partial cluster copied in vain) is safe too.

Probing costs one QMP command (``query-qmp-schema``, a reply of 1,200 entries: 50-300 ms
here), so the snapshot probes only when the answer matters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.qemu.qmp import Monitor, QmpError

#: The option QEMU 9.2 added to copy-before-write's ``blockdev-add`` arguments.
MIN_CLUSTER_SIZE = "min-cluster-size"


@dataclass(frozen=True)
class QemuCaps:
    """Copy-before-write features of one QEMU (see the module docstring)."""

    cbw_options: frozenset[str]
    """Every argument ``blockdev-add`` takes for a ``copy-before-write`` node."""

    @property
    def min_cluster_size(self) -> bool:
        """The filter takes ``min-cluster-size`` (a copy granularity above 64 KiB)."""
        return MIN_CLUSTER_SIZE in self.cbw_options

    @property
    def trims_rounded(self) -> bool:
        """QEMU rounds snapshot trims inward to whole clusters itself (so it never aborts on
        an unaligned one) and so cannot release a disk's partial last cluster."""
        return self.min_cluster_size


#: What QEMU 7.2 offers: the assumption when the schema cannot be read.
QEMU_7_2 = QemuCaps(frozenset({"file", "target", "bitmap", "on-cbw-error", "cbw-timeout"}))


def probe(mon: Monitor) -> QemuCaps:
    """Read the running QEMU's copy-before-write options from its QMP schema."""
    try:
        schema = mon.execute("query-qmp-schema")
    except QmpError as e:
        # Every QEMU since 2.5 has the command; a monitor that refuses it (a filtering proxy)
        # gets the oldest behaviour, which is the safe one. No answer at all is an error.
        if e.error_class is None:
            raise
        return QEMU_7_2
    options = cbw_options(schema)
    return QemuCaps(options) if options else QEMU_7_2


def cbw_options(schema: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The names of ``blockdev-add``'s members for driver ``copy-before-write`` in a
    ``query-qmp-schema`` reply; empty if it has no such driver.

    Type names in the reply are opaque numbers: the way there is by reference, from the
    command to its argument type, to the variant whose case is the driver's name.
    """
    by_name = {e.get("name"): e for e in schema}
    command = by_name.get("blockdev-add")
    if command is None:
        return frozenset()
    args = by_name.get(command.get("arg-type"))
    for variant in (args or {}).get("variants") or ():
        if variant.get("case") == "copy-before-write":
            members = by_name.get(variant.get("type"), {}).get("members") or ()
            return frozenset(m["name"] for m in members if "name" in m)
    return frozenset()
