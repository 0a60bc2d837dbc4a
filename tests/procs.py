"""A server process a test started: its log, whether it runs, and a stop by its own pid.

Shared by the NBD servers of tests/integration/conftest.py and SeaweedFS (tests/s3util.py,
which bench/s3.py imports too, so this module needs nothing from pytest).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


class OwnedProcess:
    """Mixin for a record of a started process: ``proc`` (its handle) and ``log`` (the file
    that receives its stdout and stderr)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        """Everything the process has written to stdout/stderr so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    def stop(self, timeout: float) -> int:
        """SIGTERM by pid, then SIGKILL after ``timeout`` s. Idempotent; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
