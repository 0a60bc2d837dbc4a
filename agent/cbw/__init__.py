"""The copy-before-write target: the logic behind ``nbd-plugins/cbw_target.py``.

- :mod:`agent.cbw.store`: the bounded cluster store (memory, then a spool file);
- :mod:`agent.cbw.control`: the Unix control socket (stored ranges, the copies' feed, stats);
- :mod:`agent.cbw.plugin`: the nbdkit callbacks' logic (configuration, request handling);
- :mod:`agent.cbw.server`: nbdkit started with the plugin, one per disk of a live backup;
- :mod:`agent.cbw.feed`: the agent's end of the copies' feed (not loaded by the plugin).
"""
