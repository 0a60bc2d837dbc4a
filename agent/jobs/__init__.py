"""Scheduled backups: the job configuration file, retention and running one job.

::

    config.py     jobs.toml -> validated Job objects (every wrong field: one clear line)
    retention.py  which archives of a directory to delete (pure logic on header fields)
    store.py      a destination directory: archive names, headers, locking, pruning
    command.py    the archive stream piped into a shell command (ssh, a tape, ...)
    runner.py     one job: choose the kind, back up the VM, name the archive, prune
"""
