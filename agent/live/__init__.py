"""Live backups of a running QEMU VM: its disks at one point in time, while it runs.

- :mod:`agent.live.job`: what a live backup is asked to do (:class:`~agent.live.job.LiveJob`,
  with its copy-before-write and network options);
- :mod:`agent.live.network`: which transport each connection uses, decided and checked
  before anything runs;
- :mod:`agent.live.run`: the set-up, the stream into the archive and the teardown
  (:func:`~agent.live.run.run_live_backup`);
- :mod:`agent.live.stats`: what the backup cost the guest.

The QEMU side (block graph, checkpoints) is agent/qemu/; the copy-before-write target and
the feed of its copies, agent/cbw/; the per-disk bookkeeping, agent/tracker.py and
agent/releaser.py.
"""
