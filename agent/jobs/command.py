"""The archive stream piped into a shell command: ssh to a backup host, mbuffer to a tape.

How the stream reaches the command without changing the output layer: the backup jobs take
an output *path*, and agent/archive/output.py writes straight to a path that exists and is
not a regular file (a FIFO, a tape), without a temporary name. We hand over the write end
of the command's stdin pipe as ``/proc/self/fd/N``: opening that path opens the same pipe.
Our own descriptor stays open until the backup is over, so the command sees the end of its
input only when we close it: after a complete archive, or never (it is stopped first) after
a failed one — given an end of file, ``cat > x`` would keep a truncated archive as if whole.

Commands run as ``bash -o pipefail -c COMMAND``, so a failure anywhere in a pipeline
(``mbuffer ... | ssh ...``) fails the job. Not /bin/sh: on Debian that is dash, which has no
pipefail (dash 0.5.12: "Illegal option -o pipefail").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from types import TracebackType

from agent import interrupts
from agent.archive.output import grow_pipe
from agent.errors import AgentError

SHELL = ("/bin/bash", "-o", "pipefail", "-c")
#: Seconds a stopped command gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0
#: How long to wait for a command that closed its input to exit, to report why it failed.
EXIT_WAIT = 2.0


def status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class CommandOutput:
    """A running command whose standard input is the archive (use as a context manager:
    leaving it without :meth:`finish` stops the command)."""

    def __init__(self, command: str, what: str = "command") -> None:
        self.what = what
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in _close())
        read_end, self._fd = os.pipe()  # neither is inherited by other children (PEP 446)
        try:
            # A session of its own: stopping it reaches every process of its pipeline.
            self.proc = subprocess.Popen([*SHELL, command], stdin=read_end, stdout=self._log,
                                         stderr=self._log, start_new_session=True)
        except OSError as e:
            os.close(self._fd)
            self._log.close()
            raise AgentError(f"cannot run the {what}: {e.strerror}") from e
        finally:
            os.close(read_end)
        grow_pipe(self._fd)
        #: The output path to give the backup job.
        self.path = f"/proc/self/fd/{self._fd}"

    def output(self) -> str:
        """What the command printed (stdout and stderr), at most the last 4 KiB."""
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - 4096))
        return self._log.read().decode(errors="replace").strip()

    def finish(self) -> str:
        """The archive is complete: close the pipe, wait for the command; returns what it
        printed, or raises AgentError if it failed."""
        self._close_pipe()
        while True:  # in steps, so that Ctrl-C is answered: see agent.interrupts
            try:
                code = self.proc.wait(interrupts.STEP)
                break
            except subprocess.TimeoutExpired:
                pass
        if code != 0:
            raise AgentError(f"the {self.what} failed ({status(code)}): "
                             f"{_last_line(self.output())}")
        return self.output()

    def failure(self) -> AgentError | None:
        """Why the command stopped reading, if it did: after the backup failed to write,
        the command's own message says more than "the reader closed the pipe"."""
        try:
            code = self.proc.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            return None
        if code == 0:
            return AgentError(f"the {self.what} exited before it read the whole archive: "
                              f"{_last_line(self.output())}")
        return AgentError(f"the {self.what} failed ({status(code)}): "
                          f"{_last_line(self.output())}")

    def stop(self) -> None:
        """Stop the command (and its pipeline) before it sees the end of its input."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> CommandOutput:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()  # a no-op after finish()
        finally:
            self._log.close()


def run_shell(command: str, what: str) -> str:
    """Run a command to its end (no input); returns what it printed, or raises AgentError."""
    try:
        done = subprocess.run([*SHELL, command], stdin=subprocess.DEVNULL,
                              capture_output=True, check=False)
    except OSError as e:
        raise AgentError(f"cannot run the {what}: {e.strerror}") from e
    text = (done.stdout + done.stderr).decode(errors="replace").strip()
    if done.returncode != 0:
        raise AgentError(f"the {what} failed ({status(done.returncode)}): {_last_line(text)}")
    return text
