"""Byte units, and the one grammar of sizes and rates everywhere a user writes one: the
command line (``--memory 256M``, ``--max-rate 50M``), the job file (``cbw_memory = "256 M"``)
and the copy-before-write plugin's parameters (``memory=256M``)::

    SIZE = DIGITS [BLANKS] [K | M | G | T] [B | iB]     in any case, blanks around it ignored

Units are always powers of 1024: ``64K``, ``64k``, ``64KB`` and ``64KiB`` are all 65536,
``4096``, ``4096B`` and ``4K`` the same. Each user checks its own bounds (at least 4K on the
command line and in the job file, for example).

A leaf module (it imports only agent.errors) without ``re``: the plugin imports it, and every
live backup waits for the plugin's start.
"""

from __future__ import annotations

from agent.errors import InvalidArgument

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_FACTOR = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str) -> int:
    """The bytes ``text`` says (the module's grammar), or :class:`InvalidArgument`."""
    s = text.strip()
    end = 0
    while end < len(s) and s[end].isdecimal():
        end += 1
    digits, unit = s[:end], s[end:].lstrip().lower()
    unit = unit[:-2] if unit.endswith("ib") else unit[:-1] if unit.endswith("b") else unit
    if digits and unit in _FACTOR:
        try:
            return int(digits) * _FACTOR[unit]
        except ValueError:  # more digits than int() converts (thousands)
            pass
    raise InvalidArgument(f"not a size: {text!r} (e.g. 4096, 64K, 256M or 1G)")
