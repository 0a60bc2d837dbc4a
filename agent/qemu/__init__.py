"""Talking to QEMU: the QMP client, block-graph queries (and, later, copy-before-write setup)."""
