"""The kinds of backup a user asks for (``backup --mode``, the job file's ``mode``): the one
list every front end takes its choices from.

A leaf module: the command line builds its parser from it without loading QEMU's modules.
"""

from __future__ import annotations

import enum


class Mode(enum.Enum):
    FULL = "full"  # every allocated cluster; starts a checkpoint on qcow2 disks
    INCREMENTAL = "incremental"  # what changed since the last backup of any kind
    DIFFERENTIAL = "differential"  # what changed since the last full backup
    AUTO = "auto"  # incremental when possible, else full (saying why)


#: The values, as typed: argparse's ``choices`` and the job file's ``mode``.
MODES = tuple(m.value for m in Mode)
