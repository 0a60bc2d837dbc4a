"""Network addresses as users write them: a QMP monitor's (a Unix socket path or
``HOST:PORT``) and a TCP endpoint's (``HOST[:PORT]``, ``[V6ADDR]:PORT``).

A leaf module (it imports only agent.errors): the job file and the command line check
addresses without loading the QMP client.
"""

from __future__ import annotations

from agent.errors import InvalidArgument

#: NBD's registered port: QEMU's NBD server started for another host, and `serve --listen`.
NBD_PORT = 10809


def parse_address(address: str) -> str | tuple[str, int]:
    """A monitor address as ``QMPClient`` takes it: a Unix socket path, or ``(host, port)``.

    ``HOST:PORT`` (no ``/``, a numeric port; ``[::1]:4444`` for IPv6) is a TCP address;
    anything else is a Unix socket path (write ``./name:1234`` for a socket with such a name).
    """
    host, sep, port = address.rpartition(":")
    if sep and host and "/" not in address and port.isdecimal():
        return host.removeprefix("[").removesuffix("]"), int(port)
    return address


def is_tcp(address: str) -> bool:
    """Whether a monitor ``address`` is ``HOST:PORT`` (TCP) rather than a Unix socket."""
    return isinstance(parse_address(address), tuple)


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, the inverse of :func:`parse_address` (``[::1]:4444`` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_port(text: str, default_port: int, flag: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6ADDR]`` or ``[V6ADDR]:PORT`` as ``(host, port)``;
    ``flag`` names the option in the error."""
    host, port = text, default_port
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InvalidArgument(f"{flag} {text!r}: expected HOST[:PORT] ([V6ADDR]:PORT)")
        if rest:
            port = parse_port(rest[1:], text, flag)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = parse_port(p, text, flag)
    if not host:
        raise InvalidArgument(f"{flag} {text!r}: expected HOST[:PORT]")
    return host, port


def parse_port(text: str, whole: str, flag: str) -> int:
    """A port number 0..65535 (``whole``: the text the user gave, for the message)."""
    if not text.isdecimal() or not 0 <= int(text) <= 65535:
        raise InvalidArgument(f"{flag} {whole!r}: the port must be a number from 0 to 65535")
    return int(text)
