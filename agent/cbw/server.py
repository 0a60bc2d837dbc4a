"""Runs the copy-before-write target: nbdkit with our Python plugin, one per disk.

nbdkit embeds the system Python and does not put the plugin's folder on sys.path, so the
process gets a PYTHONPATH holding this package's root and the site-packages we run from.
``--exit-with-parent`` makes nbdkit die with the agent: QEMU then breaks the snapshot after
``cbw-timeout`` and the guest keeps writing unharmed.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path
from types import TracebackType

import agent
from agent.cbw.control import ControlClient
from agent.errors import AgentError
from agent.process import HelperProcess, accepts

PLUGIN = Path(agent.__file__).resolve().parent.parent / "nbd-plugins" / "cbw_target.py"


def _pythonpath() -> str:
    paths = [str(PLUGIN.parent.parent), *site.getsitepackages()]
    paths += [p for p in sys.path if p.endswith("site-packages") and p not in paths]
    return ":".join(paths)


class CbwTargetServer:
    """One nbdkit process serving one disk's copy-before-write target."""

    def __init__(self, size: int, *, memory: int, spool_dir: str | None, spool_limit: int,
                 label: str) -> None:
        if not PLUGIN.exists():
            raise AgentError(f"the copy-before-write plugin is missing: {PLUGIN}")
        self.label = label
        self._proc = HelperProcess("ba-cbw-")
        self.socket = os.path.join(self._proc.dir, "nbd.sock")
        self.control_path = os.path.join(self._proc.dir, "ctl.sock")
        self.control = ControlClient(self.control_path)
        args = ["nbdkit", "--foreground", "--exit-with-parent", "-U", self.socket,
                "python", str(PLUGIN), f"size={size}", f"memory={memory}",
                f"spool-limit={spool_limit}", f"control={self.control_path}"]
        if spool_dir:
            args.append(f"spool-dir={spool_dir}")
        try:
            self._proc.start(args, env={**os.environ, "PYTHONPATH": _pythonpath()},
                             missing="nbdkit is not installed (Debian packages nbdkit, "
                             "nbdkit-plugin-python)")
            self._proc.wait_until(
                lambda: accepts(self.socket) and os.path.exists(self.control_path),
                f"device {label!r}: the copy-before-write target did not start")
        except BaseException:
            self.close()
            raise

    def output(self) -> str:
        return self._proc.output()

    def stats(self) -> dict[str, int]:
        """The store's counters (clusters copied, bytes spilled, peaks, full errors)."""
        return self.control.stats()

    def blockdev(self) -> dict[str, object]:
        """QEMU blockdev-add options of an NBD client node reaching this target."""
        return {"driver": "nbd", "server": {"type": "unix", "path": self.socket}}

    def close(self) -> None:
        self.control.close()
        self._proc.close()

    def __enter__(self) -> CbwTargetServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
