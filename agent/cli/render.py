"""Turning progress events and results into what a person or a program reads.

All output goes to stderr: stdout may be the archive itself.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from agent.pipeline import Progress, ProgressFn

if TYPE_CHECKING:
    from agent.archive.format import Device, Header


def size(n: float) -> str:
    """Bytes in binary units, e.g. 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


class ProgressRenderer:
    """``bar``: a tqdm bar with rate and ETA; ``json``: one object per line; ``none``."""

    def __init__(self, mode: str, stream: TextIO = sys.stderr) -> None:
        self.mode = mode
        self.stream = stream
        self._bar: Any = None  # a tqdm bar, imported only when one is drawn

    def callback(self) -> ProgressFn | None:
        return None if self.mode == "none" else self.update

    def update(self, p: Progress) -> None:
        if self.mode == "json":
            self.stream.write(json.dumps({"event": "progress", **progress_dict(p)}) + "\n")
            self.stream.flush()
            return
        if self._bar is not None and self._bar.desc != p.phase:
            self.close()  # the next archive of a chain: a bar of its own
        if self._bar is None:
            from tqdm import tqdm

            # total 0: not known ahead (an incremental's changes): rate without ETA
            self._bar = tqdm(total=p.total or None, unit="B", unit_scale=True,
                             unit_divisor=1024, desc=p.phase, file=self.stream,
                             dynamic_ncols=True, leave=False)
        self._bar.update(p.done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_dict(p: Progress) -> dict[str, Any]:
    return {
        "phase": p.phase, "done": p.done, "total": p.total, "data_bytes": p.data_bytes,
        "zero_bytes": p.zero_bytes, "stored_bytes": p.stored_bytes,
        "elapsed": round(p.elapsed, 3),
    }


def summary_line(p: Progress, what: str) -> str:
    secs = max(p.elapsed, 1e-9)
    ratio = p.data_bytes / p.stored_bytes if p.stored_bytes else 0.0
    return (
        f"{what}: {size(p.done)} in {p.elapsed:.2f} s ({size(p.done / secs)}/s): "
        f"{size(p.data_bytes)} data, {size(p.zero_bytes)} zero, "
        f"{size(p.stored_bytes)} stored (compression {ratio:.2f}x)"
    )


def header_text(h: Header) -> str:
    """An archive's header on one line, for ``--debug``."""
    created = datetime.datetime.fromtimestamp(h.created_ns / 1e9, datetime.UTC)
    parent = f" of {h.parent_uuid}" if h.parent_uuid else ""
    checkpoint = f", starts checkpoint {h.checkpoint}" if h.checkpoint else ""
    return (f"archive {h.uuid}: kind {h.kind.name.lower()}{parent}{checkpoint}, "
            f"created {created:%Y-%m-%d %H:%M:%S} UTC, tool backup-agent {h.tool_version}")


def device_text(d: Device) -> str:
    """A device of an archive on one line, for ``--debug``."""
    props = ", ".join(f"{k}={v}" for k, v in d.props.items())
    return f"device {d.name!r}: {d.size} bytes" + (f" ({props})" if props else "")
