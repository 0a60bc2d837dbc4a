"""qemu-nbd, run by the agent to serve disk image files over a private Unix socket.

Each server lives in its own temporary directory and is stopped by its own pid
on every way out.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from agent.errors import AgentError

START_TIMEOUT = 15.0


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


class QemuNbd:
    """A qemu-nbd process serving one image; a context manager that always stops it."""

    def __init__(
        self, image: str, fmt: str, *, readonly: bool = True, shared: int = 8,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.image = image
        self.fmt = fmt
        self._dir = tempfile.mkdtemp(prefix="ba-nbd-")
        self.socket = os.path.join(self._dir, "nbd.sock")
        self.uri = f"nbd+unix:///?socket={self.socket}"
        args = ["qemu-nbd", "-f", fmt, f"--socket={self.socket}", "--persistent",
                f"--shared={shared}", *extra]
        if readonly:
            args.append("--read-only")
        args.append(image)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
            )
        except FileNotFoundError as e:
            self.close()
            raise AgentError("qemu-nbd is not installed (Debian package qemu-utils)") from e
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AgentError(f"qemu-nbd could not serve {self.image}: {self._output()}")
            if os.path.exists(self.socket):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(self.socket)
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.02)
        raise AgentError(f"qemu-nbd did not start serving {self.image} within {START_TIMEOUT}s")

    def _output(self) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip()
        return text.splitlines()[-1] if text else "no error message"

    def close(self) -> None:
        proc, self.proc = getattr(self, "proc", None), None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> QemuNbd:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
