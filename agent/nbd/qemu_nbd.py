"""qemu-nbd, run by the agent to serve disk image files over a private Unix socket.

Each server lives in its own temporary directory and is stopped by its own pid
on every way out.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
from types import TracebackType

from agent.errors import AgentError
from agent.process import HelperProcess, accepts

log = logging.getLogger(__name__)


def image_info(path: str) -> dict[str, object]:
    """``qemu-img info`` of an image file, as a dict."""
    if not os.path.exists(path):
        raise AgentError(f"image {path}: no such file")
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", path],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout
    except FileNotFoundError as e:
        raise AgentError("qemu-img is not installed (Debian package qemu-utils)") from e
    except subprocess.CalledProcessError as e:
        msg = (e.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise AgentError(f"image {path}: {msg}") from e
    info: dict[str, object] = json.loads(out)
    return info


#: glibc maps every allocation at or above its mmap threshold afresh and unmaps it when
#: freed, and the threshold only rises to the largest block freed so far; qemu-nbd
#: allocates a buffer per request, so every large request paid for fresh pages (2 MiB
#: reads: page faults were a fifth of its CPU, 0.57 CPU-s per GiB served, 0.37 without).
#: The agent's reads are 512 KiB now, but a restore writes whole records (up to 32 MiB).
#: Up to that size, its buffers stay in its heap (mallopt(3)'s M_MMAP_THRESHOLD, which
#: also stops the threshold from moving).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024)}


class QemuNbd:
    """A qemu-nbd process serving one image; a context manager that always stops it."""

    def __init__(
        self, image: str, fmt: str, *, readonly: bool = True, shared: int = 8,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.image = image
        self.fmt = fmt
        self._proc = HelperProcess("ba-nbd-")
        self.socket = os.path.join(self._proc.dir, "nbd.sock")
        self.uri = f"nbd+unix:///?socket={self.socket}"
        args = ["qemu-nbd", "-f", fmt, f"--socket={self.socket}", "--persistent",
                f"--shared={shared}", *extra]
        if readonly:
            args.append("--read-only")
        args.append(image)
        log.debug("starting %s", shlex.join(args))
        try:
            self._proc.start(args, env=MALLOC_ENV,
                             missing="qemu-nbd is not installed (Debian package qemu-utils)")
            self._proc.wait_until(lambda: accepts(self.socket),
                                  f"qemu-nbd could not serve {self.image}")
            log.debug("qemu-nbd (pid %s) serves %s on %s",
                      self._proc.proc.pid if self._proc.proc else "?", image, self.socket)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._proc.close()

    def __enter__(self) -> QemuNbd:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
