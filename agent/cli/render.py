"""Turning progress events and results into what a person or a program reads.

All output goes to stderr: stdout may be the archive itself.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, TextIO

from agent.pipeline import Progress, ProgressFn

if TYPE_CHECKING:
    from agent.archive.format import Device, Header


_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(text: str, backslash: bool = False) -> str:
    """``text`` made safe to show on a terminal or in a log line, on the line it is on.

    Archives are untrusted: a tool version, a property or a checkpoint name could carry a
    newline that forges a line of ``info`` (a ``seal`` line), or escape sequences that
    clear or rewrite the screen. Every character Python's ``repr`` would escape (controls,
    ESC, line and paragraph separators, bidi overrides and other invisible format
    characters, unassigned code points) is shown as its escape: ``\\n``, ``\\x1b``,
    ``\\u202e``. With ``backslash``, backslashes are doubled too, so that no two texts
    look alike (for fields shown as they are, not for messages that quote ``repr``)."""
    if text.isprintable() and not (backslash and "\\" in text):
        return text
    out = []
    for ch in text:
        if ch == "\\" and backslash:
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            n = ord(ch)
            out.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000
                       else f"\\U{n:08x}")
    return "".join(out)


class PrintableFormatter(logging.Formatter):
    """Log lines with :func:`printable` messages: a message may quote what an archive, a
    directory or a helper said, and must stay one harmless line. Tracebacks (``--debug``)
    keep their line breaks; their lines are escaped the same way."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.msg, record.args, record.exc_text
        # exc_text None: another handler may have cached the traceback unescaped
        record.msg, record.args, record.exc_text = printable(record.getMessage()), None, None
        try:
            return super().format(record)
        finally:
            record.msg, record.args, record.exc_text = saved

    def formatException(self, ei: Any) -> str:
        return "\n".join(printable(line) for line in super().formatException(ei).split("\n"))


def size(n: float) -> str:
    """Bytes in binary units, e.g. 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _json_line(obj: dict[str, Any]) -> str:
    import json  # only for --progress json: every start of the agent would pay for it

    return json.dumps(obj) + "\n"


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
            self.stream.write(_json_line({"event": "progress", **progress_dict(p)}))
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

    def summary(self, p: Progress, what: str, archive_bytes: int | None = None,
                writes: bool = True) -> None:
        """The final numbers: with ``json``, one last object ``{"event": "summary", ...}``
        (the fields of :func:`summary_fields`, and ``what``); nothing otherwise (the
        command logs :func:`summary_line`)."""
        if self.mode != "json":
            return
        fields = {"event": "summary", "what": what, **summary_fields(p, archive_bytes, writes)}
        self.stream.write(_json_line(fields))
        self.stream.flush()


def progress_dict(p: Progress) -> dict[str, Any]:
    return {
        "phase": p.phase, "done": p.done, "total": p.total, "data_bytes": p.data_bytes,
        "zero_bytes": p.zero_bytes, "stored_bytes": p.stored_bytes,
        "elapsed": round(p.elapsed, 6),  # to the microsecond: a tiny job's rate must match it
    }


def summary_fields(p: Progress, archive_bytes: int | None = None,
                   writes: bool = True) -> dict[str, Any]:
    """The final numbers of a backup or restore (``p``'s phase tells which), by name.

    ``read_bytes``: a backup's device bytes read as data; a restore's archive bytes read
    (``archive_bytes``), or when that is not known the records' payload bytes (then
    ``read_what`` is ``"payload"``). ``zero_bytes``: device bytes skipped as zero (not
    read, or read and found all zeros; restored as holes). ``written_bytes``: a backup's
    archive bytes (``archive_bytes``; else the records' payload, ``written_what`` then
    ``"payload"``), a restore's device bytes written as data (None when ``writes`` is
    false: ``verify`` writes nothing). ``compression_ratio``: data bytes per stored payload
    byte, None when there was no data. ``elapsed`` in seconds, ``bytes_per_second`` the
    device bytes handled per second.
    """
    backup = not p.phase.startswith("restore")
    payload = p.stored_bytes
    if backup:
        read, read_what = p.data_bytes, "device"
        written, written_what = ((payload, "payload") if archive_bytes is None
                                 else (archive_bytes, "archive"))
    else:
        read, read_what = ((payload, "payload") if archive_bytes is None
                           else (archive_bytes, "archive"))
        written, written_what = p.data_bytes, "device"
    ratio = round(p.data_bytes / payload, 3) if p.data_bytes and payload else None
    return {
        "phase": "backup" if backup else "restore",
        "device_bytes": p.done,
        "read_bytes": read, "read_what": read_what,
        "zero_bytes": p.zero_bytes,
        "written_bytes": written if writes else None,
        "written_what": written_what if writes else None,
        "data_bytes": p.data_bytes, "stored_bytes": payload, "archive_bytes": archive_bytes,
        "compression_ratio": ratio,
        "elapsed": round(p.elapsed, 6),  # to the microsecond: a tiny job's rate must match it
        "bytes_per_second": round(p.done / max(p.elapsed, 1e-9)),
    }


def summary_line(p: Progress, what: str, archive_bytes: int | None = None,
                 writes: bool = True) -> str:
    """One line naming every final number (see :func:`summary_fields`), e.g. ``backed up
    1 device(s): 256.0 MiB in 0.35 s (738.1 MiB/s): read 200.0 MiB, skipped 56.0 MiB as
    zero, wrote 210.3 MiB (compression 1.00x)``."""
    f = summary_fields(p, archive_bytes, writes)
    read = size(f["read_bytes"]) + (" of record payload" if f["read_what"] == "payload" else "")
    if not writes:
        wrote = f"checked {size(p.data_bytes)} of data"
    else:
        wrote = f"wrote {size(f['written_bytes'])}" + (
            " of record payload" if f["written_what"] == "payload" else "")
    ratio = "n/a" if f["compression_ratio"] is None else f"{p.data_bytes / p.stored_bytes:.2f}x"
    return (
        f"{what}: {size(p.done)} in {p.elapsed:.2f} s ({size(f['bytes_per_second'])}/s): "
        f"read {read}, skipped {size(p.zero_bytes)} as zero, {wrote} (compression {ratio})"
    )


def log_contents(log: logging.Logger, h: Header, devices: list[Device]) -> None:
    """An archive's header and devices, a line each, for ``--debug``."""
    log.debug("%s", h.describe())
    for dev in devices:
        log.debug("%s", device_text(dev))


def device_text(d: Device) -> str:
    """A device of an archive on one line, for ``--debug``."""
    props = ", ".join(f"{k}={v}" for k, v in d.props.items())
    return f"device {d.name!r}: {d.size} bytes" + (f" ({props})" if props else "")
