"""Restore targets: where a restored device's bytes go, one module per kind.

    base.py   the Target protocol every kind implements, and Sink: one device's target with
              how it is committed (flushed, renamed into place) or thrown away
    file.py   a regular file or a block device (pwrite, holes, BLKZEROOUT, writeback windows)
    nbd.py    an NBD export: the agent's own qemu-nbd over a new qcow2 image, or a server the
              user names (the only one that imports libnbd)
    null.py   discards everything: ``verify``

Writes come from several worker threads at once and in any order. Zero ranges never become
written zeros: a freshly created target already reads as zeros, an existing file gets holes
punched, a block device BLKZEROOUT, an NBD export write-zeroes with trim allowed.

Import the kind you need from its module: this package imports nothing, so a restore into
files never loads libnbd (start-up time).
"""
