"""A live backup into a pipe that guest writes race: the flow the live tests share."""

from __future__ import annotations

import subprocess
import threading

from tests.integration.cli_util import AGENT, running
from tests.integration.vm import Vm

Write = tuple[str, int, int, int]  # (device, pattern, offset, length)


def backup_racing_guest_writes(vm: Vm, args: list[str], magic: bytes,
                               writes: list[Write]) -> tuple[bytes, bytes]:
    """Run ``backup --qmp VM ARGS -o -``; once the archive's first bytes (``magic``) show the
    snapshot exists, the guest makes ``writes`` while the backup stalls on the pipe nobody
    reads (so the sweep cannot overtake them). Returns the archive and the agent's stderr;
    the agent must exit 0."""
    with running(
        [AGENT, "backup", "--qmp", str(vm.agent_qmp), *args, "-o", "-"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        head = proc.stdout.read(4096)
        assert head.startswith(magic), proc.stderr.read().decode()
        for dev, pattern, off, length in writes:
            vm.guest_write(dev, pattern, off, length)
        rest: list[bytes] = []
        reader = threading.Thread(target=lambda: rest.append(proc.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        err = proc.stderr.read()
        reader.join(120)
        assert proc.wait(120) == 0, err.decode()
    return head + rest[0], err
