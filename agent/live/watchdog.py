"""The thaw watchdog: a small process that outlives a killed agent and thaws its guest.

Started by :class:`agent.live.freeze.Freezer` in a session of its own, it reads lines from a
pipe whose only writer is the agent: ``frozen`` (a freeze is being asked for), ``thawed``,
``done``. When the pipe closes (the agent exited, however it died, or handed the thaw over)
while the last word was ``frozen``, it thaws the guest: through the guest agent's channel
(``--qga``; the channel serves one client, free once the agent's socket is closed) or with
``--thaw-command``, retrying for up to :data:`GRACE` seconds until the guest is thawed.

Run as ``python -m agent.live.watchdog --qga SOCKET`` (or ``--thaw-command CMD``); it is
its own entry point, so it reports on stderr through logging.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable

from agent.qemu.qga import AgentBusy, GuestAgent, GuestAgentError

log = logging.getLogger("backup-agent")

#: How long the watchdog keeps trying to thaw (a freeze that is still running must end first).
GRACE = 120.0
#: Seconds between attempts, and each attempt's timeout.
RETRY = 0.5
ATTEMPT_TIMEOUT = 5.0


def watch(lines: Iterable[bytes]) -> bool:
    """Read the agent's words until the pipe closes; True if the guest must be thawed."""
    state = "idle"
    for raw in lines:
        word = raw.strip().decode(errors="replace")
        if word == "done":
            return False
        if word in ("frozen", "thawed"):
            state = word
    return state == "frozen"


def thaw_via_agent(path: str, grace: float = GRACE) -> bool:
    deadline = time.monotonic() + grace
    last = ""
    while time.monotonic() < deadline:
        try:
            with GuestAgent(path, timeout=ATTEMPT_TIMEOUT) as ga:
                n = ga.fsfreeze_thaw()
                status = ga.fsfreeze_status()
                if status == "thawed":
                    log.warning("backup-agent thaw watchdog: the agent went away while the "
                                "guest was frozen; thawed it (%d file system(s))", n)
                    return True
                last = f"status {status!r} after the thaw"
        except AgentBusy as e:
            last = str(e)  # the dead agent's socket may linger an instant
        except GuestAgentError as e:
            last = str(e)
        time.sleep(RETRY)
    log.error("backup-agent thaw watchdog: could not thaw the guest through %s within %g s: "
              "%s; thaw it by hand (guest-fsfreeze-thaw)", path, grace, last)
    return False


def thaw_via_command(command: str, grace: float = GRACE) -> bool:
    deadline = time.monotonic() + grace
    last = ""
    while time.monotonic() < deadline:
        try:
            done = subprocess.run(shlex.split(command), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=ATTEMPT_TIMEOUT * 2, check=False)
            if done.returncode == 0:
                log.warning("backup-agent thaw watchdog: the agent went away while the "
                            "guest was frozen; ran the thaw command")
                return True
            last = f"exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}"
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            last = str(e)
        time.sleep(RETRY * 2)
    log.error("backup-agent thaw watchdog: the thaw command kept failing for %g s (%s); thaw "
              "the guest by hand", grace, last)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="backup-agent-thaw-watchdog")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--qga")
    g.add_argument("--thaw-command")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    if not watch(sys.stdin.buffer):
        return 0
    ok = thaw_via_agent(args.qga) if args.qga else thaw_via_command(args.thaw_command)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
