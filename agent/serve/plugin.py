"""Configuration and request handling of the serving nbdkit plugin.

``nbd-plugins/serve_archive.py`` only forwards nbdkit's callbacks here and turns errors into
errno values (a damaged record or a read outside the device -> EIO, an unknown export ->
ENOENT). Parameters::

    archive=PATH    an archive; repeated for a chain, oldest (the full backup) first
    device=NAME     serve only this device (repeatable; default: every device)
    cache=SIZE      bytes of decompressed records kept (default 64M)
    keyfd=FD        a pipe holding the raw private keys (32 bytes each) for encrypted
                    archives; read to its end and closed as it is given

One export per device, named after it. A client that asks for the default export (an empty
name) gets the only device when there is one; with several it must name one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agent.cbw.plugin import parse_size
from agent.errors import AgentError, InvalidArgument
from agent.serve.archives import DEFAULT_CACHE, ServedArchives
from agent.serve.image import DeviceImage
from agent.serve.server import KEY_BYTES, MAX_KEYS

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


def read_keys(fd: int) -> list[X25519PrivateKey]:
    """The private keys in the pipe ``fd`` (closed here), raw, 32 bytes each."""
    try:
        data = b""
        while len(data) <= KEY_BYTES * MAX_KEYS:
            piece = os.read(fd, 4096)
            if not piece:
                break
            data += piece
    except OSError as e:
        raise InvalidArgument(f"serve_archive: keyfd={fd}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if not data or len(data) % KEY_BYTES or len(data) > KEY_BYTES * MAX_KEYS:
        raise InvalidArgument(f"serve_archive: keyfd={fd} holds {len(data)} bytes, not "
                              f"1 to {MAX_KEYS} keys of {KEY_BYTES}")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return [X25519PrivateKey.from_private_bytes(data[i:i + KEY_BYTES])
            for i in range(0, len(data), KEY_BYTES)]


class NoSuchExport(AgentError):
    """A client asked for an export that is not a served device."""


class ServePlugin:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.wanted: list[str] = []
        self.cache = DEFAULT_CACHE
        self.keys: list[X25519PrivateKey] = []
        self.served: ServedArchives | None = None

    def set(self, key: str, value: str) -> None:
        if key == "archive":
            self.paths.append(value)
        elif key == "device":
            self.wanted.append(value)
        elif key == "cache":
            self.cache = parse_size(key, value)
        elif key == "keyfd":
            if not value.isdigit():
                raise InvalidArgument(f"serve_archive: keyfd={value!r} is not a descriptor")
            self.keys += read_keys(int(value))
        else:
            raise InvalidArgument(f"serve_archive: unknown parameter {key!r}")

    def complete(self) -> None:
        if not self.paths:
            raise InvalidArgument("serve_archive: archive=PATH is required")
        self.served = ServedArchives(self.paths, self.wanted or None, self.cache,
                                     keys=self.keys)

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
