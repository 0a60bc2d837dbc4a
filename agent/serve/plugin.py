"""Configuration and request handling of the serving nbdkit plugin.

``nbd-plugins/serve_archive.py`` only forwards nbdkit's callbacks here and turns errors into
errno values (a damaged record or a read outside the device -> EIO, an unknown export ->
ENOENT). Parameters::

    archive=PATH    an archive; repeated for a chain, oldest (the full backup) first
    device=NAME     serve only this device (repeatable; default: every device)
    cache=SIZE      bytes of decompressed records kept (default 64M)

One export per device, named after it. A client that asks for the default export (an empty
name) gets the only device when there is one; with several it must name one.
"""

from __future__ import annotations

from agent.cbw.plugin import parse_size
from agent.errors import AgentError, InvalidArgument
from agent.serve.archives import DEFAULT_CACHE, ServedArchives
from agent.serve.image import DeviceImage


class NoSuchExport(AgentError):
    """A client asked for an export that is not a served device."""


class ServePlugin:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.wanted: list[str] = []
        self.cache = DEFAULT_CACHE
        self.served: ServedArchives | None = None

    def set(self, key: str, value: str) -> None:
        if key == "archive":
            self.paths.append(value)
        elif key == "device":
            self.wanted.append(value)
        elif key == "cache":
            self.cache = parse_size(key, value)
        else:
            raise InvalidArgument(f"serve_archive: unknown parameter {key!r}")

    def complete(self) -> None:
        if not self.paths:
            raise InvalidArgument("serve_archive: archive=PATH is required")
        self.served = ServedArchives(self.paths, self.wanted or None, self.cache)

    def _served(self) -> ServedArchives:
        if self.served is None:
            raise AgentError("serve_archive: not configured")
        return self.served

    def exports(self) -> list[str]:
        return list(self._served().devices)

    def default_export(self) -> str | None:
        names = self.exports()
        return names[0] if len(names) == 1 else None

    def device(self, export: str) -> DeviceImage:
        devices = self._served().devices
        name = export or self.default_export() or ""
        image = devices.get(name)
        if image is None:
            raise NoSuchExport(f"no export {export!r}: this server serves "
                               f"{', '.join(devices)}")
        return image

    def close(self) -> None:
        if self.served is not None:
            self.served.close()
