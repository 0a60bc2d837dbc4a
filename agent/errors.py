"""The one exception tree of backup-agent.

Every error a user can meet is an :class:`AgentError`; ``str(e)`` is the complete,
one-line message they read, naming what is wrong and where (device, offset, byte
position). Third-party errors (libnbd, OSError, zstd) are wrapped at the module
boundary with ``raise ... from e`` so the cause survives for ``--debug``.

::

    AgentError
     ├── ArchiveError           the archive is damaged, truncated or not an archive
     │    └── UnsupportedArchive  a newer format or a required feature we lack
     ├── SourceError            an NBD source or disk image cannot be read
     ├── TargetError            a restore target cannot be opened or written
     ├── OutputError            the archive output failed (disk full, closed pipe)
     ├── InvalidArgument        a bad value given by the user (name twice, bad URI)
     └── Interrupted            Ctrl-C, SIGTERM
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error backup-agent reports; the message is for the user."""


class ArchiveError(AgentError):
    """The archive is damaged, truncated, or not a backup-agent archive."""


class UnsupportedArchive(ArchiveError):
    """The archive needs a newer backup-agent (format version, required record type)."""


class SourceError(AgentError):
    """A source (NBD export, disk image) cannot be opened or read."""


class TargetError(AgentError):
    """A restore target cannot be opened or written."""


class OutputError(AgentError):
    """Writing the archive failed: disk full, closed pipe, a terminal as output."""


class InvalidArgument(AgentError):
    """A value the user gave is wrong: a name given twice, a malformed URI."""


class Interrupted(AgentError):
    """The user or the system asked us to stop (SIGINT, SIGTERM)."""
