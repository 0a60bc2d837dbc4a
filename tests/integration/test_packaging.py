"""A non-editable install carries the nbdkit plugin of live backups, and the agent finds it.

The plugin is a script nbdkit loads (nbd-plugins/cbw_target.py), not a module of the
package: pyproject's data-files put it in <prefix>/share/backup-agent/. Built offline
(no build isolation, no dependencies).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.cbw import server
from agent.serve import server as serve_server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_installs_the_plugin_under_share(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("backup_agent-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in ("cbw_target.py", "serve_archive.py"):  # live backups' and serve's
            plugin = [n for n in z.namelist() if n.endswith(f"/data/share/backup-agent/{name}")]
            assert plugin, z.namelist()
            assert z.read(plugin[0]) == (REPO / "nbd-plugins" / name).read_bytes()


def test_serve_finds_its_plugin_in_the_checkout() -> None:
    assert serve_server.find_plugin() == REPO / "nbd-plugins" / "serve_archive.py"


def test_find_plugin_prefers_the_checkout_then_the_install(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.find_plugin() == REPO / "nbd-plugins" / "cbw_target.py"  # this checkout
    fake_pkg = tmp_path / "site" / "agent"
    fake_pkg.mkdir(parents=True)
    installed = tmp_path / "prefix" / "share" / "backup-agent" / "cbw_target.py"
    installed.parent.mkdir(parents=True)
    installed.write_text("# plugin\n")
    monkeypatch.setattr(server.agent, "__file__", str(fake_pkg / "__init__.py"))
    monkeypatch.setattr(server.sys, "prefix", str(tmp_path / "prefix"))
    assert server.find_plugin() == installed
