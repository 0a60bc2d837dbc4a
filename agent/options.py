"""What a user may tune about a run, as small frozen dataclasses whose defaults are the only
place those defaults are written: the command line takes its own from here.

A leaf module: every command builds its parser from these, and must not pay for importing
the pipelines that use them (a restore's reader, a backup's engine) to do so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agent.units import MiB


@dataclass(frozen=True)
class RestoreOptions:
    memory: int = 64 * MiB  # archive bytes read but not yet written
    workers: int = max(2, os.cpu_count() or 2)
    connections: int = 4  # per NBD target
    # Targets open at once at most: a file each, or a qemu-nbd, its connections and a lock
    # for an image. Each is opened when its device's first record arrives; past this many,
    # the least recently used one is closed and reopened when it gets a record again.
    open_targets: int = 64
