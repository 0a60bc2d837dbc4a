"""Talking to QEMU and changing its block graph.

- :mod:`agent.qemu.qmp`: the QMP client (on ``qemu.qmp``) and QMP addresses;
- :mod:`agent.qemu.block`: the running VM's block devices;
- :mod:`agent.qemu.graph`: copy-before-write snapshots: the block graph built, exported
  and torn down, and the cleanup of what a killed agent left;
- :mod:`agent.qemu.checkpoints`: the dirty bitmaps of incremental and differential backups;
- :mod:`agent.qemu.caps`: what the running QEMU's copy-before-write can do;
- :mod:`agent.qemu.names`: the names of everything the agent adds to a QEMU.
"""
