"""backup-agent: live backups of virtual-machine disks over NBD into one sequential stream."""

__version__ = "0.1.0"
