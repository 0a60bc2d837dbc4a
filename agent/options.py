"""What a user may tune about a run, as small frozen dataclasses whose defaults are the only
place those defaults are written: the command line takes its own from here.

A leaf module: every command builds its parser from these, and must not pay for importing
the pipelines that use them (a restore's reader, a backup's engine) to do so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.archive import codec
from agent.archive.format import MAX_DATA_LENGTH
from agent.errors import InvalidArgument
from agent.pace import PaceSpec
from agent.units import MiB

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


@dataclass(frozen=True)
class RestoreOptions:
    memory: int = 64 * MiB  # archive bytes read but not yet written
    workers: int = max(2, os.cpu_count() or 2)
    connections: int = 4  # per NBD target
    # Targets open at once at most: a file each, or a qemu-nbd, its connections and a lock
    # for an image. Each is opened when its device's first record arrives; past this many,
    # the least recently used one is closed and reopened when it gets a record again.
    open_targets: int = 64
    keys: tuple[X25519PrivateKey, ...] = ()  # --key: private keys for encrypted archives


@dataclass(frozen=True)
class EngineOptions:
    compression: codec.CompressionSpec = field(default_factory=codec.CompressionSpec)
    connections: int | None = None  # per source; None: see connections_for()
    request_size: int = 2 * MiB
    memory: int = 32 * MiB  # read buffers: 16 requests in flight, small enough to stay in cache
    workers: int = max(2, os.cpu_count() or 2)
    inflight_per_connection: int = 16
    status_window: int = 1024 * MiB
    pace: PaceSpec = field(default_factory=PaceSpec)  # the sweep's rate: agent/pace.py
    archive_format: str = "native"  # or "vma": Proxmox's (agent/vma/, docs/VMA.md)
    encrypt_to: tuple[bytes, ...] = ()  # --encrypt-to: X25519 public keys (agent/keys.py)

    def __post_init__(self) -> None:
        if not 0 < self.request_size <= MAX_DATA_LENGTH:
            raise InvalidArgument(f"request size must be 1..{MAX_DATA_LENGTH} bytes")
        if ((self.connections is not None and self.connections < 1) or self.workers < 1
                or self.inflight_per_connection < 1):
            raise InvalidArgument("connections, workers and reads in flight must be >= 1")

    def connections_for(self, changes: bool) -> int:
        """Connections per source: as given, else one Python thread per core up to 4 for
        whole disks (2 cores: 2 connections back up 25% faster than 4), and one for an
        incremental's changes. Its reads are mostly single scattered clusters, which one
        connection with 16 in flight keeps QEMU busy with; a second reader thread costs
        more in GIL hand-offs than it gains (2 cores, 1% of 8 GiB: 0.31 s against 0.33)."""
        if self.connections is not None:
            return self.connections
        return 1 if changes else max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class CbwOptions:
    """The copy-before-write filter over each disk and its target (agent/cbw/)."""

    timeout: int = 5  # seconds a guest write may wait for its copy
    memory: int = 256 * MiB  # per disk, old clusters kept in memory
    cluster: int | None = None  # copy granularity (QEMU 9.2+); None: QEMU's (64 KiB)
    spool_dir: str | None = None
    spool_limit: int = 1024 * MiB  # per disk, old clusters spilled to a file
