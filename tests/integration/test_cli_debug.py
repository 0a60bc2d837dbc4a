"""``--debug`` gives the detail a bug report needs (which archive, its header, each device,
each source and its connections, the helper processes' command lines, where a restore writes
and what it renames), while the default prints none of it and ``--quiet`` prints nothing.

Each test runs one command three ways and checks named lines, not just "more output".
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.cli_util import KiB, MiB, agent, agent_from_file, assert_ok, info_json
from tests.integration.conftest import NbdServerFactory, make_image

pytestmark = pytest.mark.integration

Run = subprocess.CompletedProcess[bytes]


def _lines(proc: Run) -> list[str]:
    return proc.stderr.decode(errors="replace").splitlines()


def assert_debug_only(default: Run, debug: Run, *patterns: str) -> None:
    """Each regular expression matches a line of the ``--debug`` run's stderr and no line
    of the default run's."""
    for pattern in patterns:
        found = [line for line in _lines(debug) if re.search(pattern, line)]
        assert found, f"{pattern!r} in no --debug line:\n" + "\n".join(_lines(debug))
        leaked = [line for line in _lines(default) if re.search(pattern, line)]
        assert not leaked, f"{pattern!r} also without --debug: {leaked}"


def _three_ways(make: Iterable[list[str]]) -> tuple[Run, Run, Run]:
    """The default, the --debug and the --quiet runs of the argv lists given, in order;
    each must succeed, and --quiet must print nothing on stderr."""
    default, debug, quiet = (agent(*argv) for argv in make)
    for proc in (default, debug, quiet):
        assert_ok(proc)
    assert quiet.stderr == b"", quiet.stderr.decode(errors="replace")
    return default, debug, quiet


@dataclass
class Arc:
    path: Path
    uuid: str


@pytest.fixture(scope="module")
def arc() -> Iterator[Arc]:
    work = Path(tempfile.mkdtemp(prefix="ba-debug-"))
    try:
        image = make_image(work / "d.raw", "raw", 1 * MiB, [("write", 0x61, 0, 64 * KiB)])
        conf = work / "vm.conf"
        conf.write_text("name=vm\n")
        path = work / "a.arc"
        assert_ok(agent("backup", "--image", f"vda={image}", "--config", f"vm.conf={conf}",
                        "-o", path))
        yield Arc(path, info_json(path)["uuid"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_backup_debug(short_tmp: Path, nbd_server: NbdServerFactory) -> None:
    disk = make_image(short_tmp / "src.raw", "raw", 1 * MiB, [("write", 0x41, 0, 64 * KiB)])
    image = make_image(short_tmp / "img.qcow2", "qcow2", 2 * MiB,
                       [("write", 0x42, 0, 64 * KiB)])
    conf = short_tmp / "vm.conf"
    conf.write_text("name=vm\n")
    server = nbd_server.qemu_nbd(disk, "raw", shared=4)  # shared > 1: multi-conn
    out = {flag: short_tmp / f"{flag.strip('-') or 'default'}.arc"
           for flag in ("", "--debug", "--quiet")}
    default, debug, _ = _three_ways(
        [["backup", *([flag] if flag else []), "--source", f"src={server.uri}",
          "--image", f"img={image}", "--config", f"vm.conf={conf}", "--connections", "2",
          "--compress", "zstd:3", "-o", str(path)] for flag, path in out.items()])
    uuid = info_json(out["--debug"])["uuid"]
    assert_debug_only(
        default, debug,
        r"options: compression zstd:3, connections per source 2, ",
        rf"source 'src': {re.escape(server.uri)}: 1048576 bytes, 2 connection\(s\)",
        rf"image 'img': {re.escape(str(image))}: format qcow2, 2097152 bytes",
        rf"starting qemu-nbd .*--read-only {re.escape(str(image))}$",
        r"source 'img': nbd\+unix:///\?socket=.*: 2097152 bytes, 2 connection\(s\)",
        rf"writing archive {uuid} to {re.escape(str(short_tmp))}/debug\.arc$",
        rf"archive {uuid}: kind full, created ",
        r"device 0 'src': 1048576 bytes \(source-format=nbd\)",
        r"device 1 'img': 2097152 bytes \(source-format=qcow2, cluster-size=65536\)",
        r"config 'vm\.conf': 8 bytes",
    )


def test_restore_debug(arc: Arc, short_tmp: Path) -> None:
    dirs = [short_tmp / name for name in ("default", "debug", "quiet")]
    default, debug, _ = _three_ways(
        [["restore", str(arc.path), "--to-dir", str(d), *flags]
         for d, flags in zip(dirs, ([], ["--debug"], ["--quiet"]), strict=True)])
    out = re.escape(str(dirs[1]))
    assert_debug_only(
        default, debug,
        rf"reading archive {re.escape(str(arc.path))}$",
        r"restore to directory .*debug as raw, connections 4",
        rf"device 'vda': 1048576 bytes \(source-format=raw\): writing "
        rf"{out}/\.vda\.raw\.[a-z0-9]{{8}}\.partial",
        rf"renamed {out}/\.vda\.raw\.[a-z0-9]{{8}}\.partial to {out}/vda\.raw$",
    )


def test_restore_to_target_debug(arc: Arc, short_tmp: Path) -> None:
    targets = [short_tmp / f"{name}.raw" for name in ("default", "debug", "quiet")]
    for t in targets:
        t.write_bytes(bytes(1 * MiB))
    default, debug, _ = _three_ways(
        [["restore", str(arc.path), "--device", "vda", "--to", str(t), *flags]
         for t, flags in zip(targets, ([], ["--debug"], ["--quiet"]), strict=True)])
    assert_debug_only(
        default, debug,
        rf"device 'vda': 1048576 bytes \(source-format=raw\): writing "
        rf"{re.escape(str(targets[1]))} in place$",
    )


def test_restore_from_pipe_debug(arc: Arc, short_tmp: Path) -> None:
    default = agent_from_file(arc.path, "restore", "-", "--to-dir", short_tmp / "a")
    debug = agent_from_file(arc.path, "restore", "-", "--to-dir", short_tmp / "b", "--debug")
    assert_ok(default)
    assert_ok(debug)
    assert_debug_only(default, debug, r"reading archive standard input$")


def test_verify_debug(arc: Arc) -> None:
    default, debug, _ = _three_ways(
        [["verify", str(arc.path), *flags] for flags in ([], ["--debug"], ["--quiet"])])
    assert_debug_only(
        default, debug,
        rf"reading archive {re.escape(str(arc.path))}$",
        r"device 'vda': 1048576 bytes \(source-format=raw\): checking",
    )


def test_info_debug(arc: Arc) -> None:
    default, debug, _ = _three_ways(
        [["info", str(arc.path), *flags] for flags in ([], ["--debug"], ["--quiet"])])
    assert debug.stdout == default.stdout  # the detail goes to stderr only
    assert_debug_only(
        default, debug,
        rf"reading archive {re.escape(str(arc.path))}$",
        rf"archive {arc.uuid}: kind full, created \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC, "
        r"tool backup-agent \S+",
        r"device 'vda': 1048576 bytes \(source-format=raw\)$",
        r"config 'vm\.conf': 8 bytes$",
    )


def test_config_debug(arc: Arc) -> None:
    default, debug, _ = _three_ways(
        [["config", str(arc.path), "vm.conf", *flags]
         for flags in ([], ["--debug"], ["--quiet"])])
    assert debug.stdout == default.stdout == b"name=vm\n"
    assert_debug_only(
        default, debug,
        rf"reading archive {re.escape(str(arc.path))}$",
        rf"archive {arc.uuid}: kind full, created ",
        r"device 'vda': 1048576 bytes \(source-format=raw\)$",
        r"config 'vm\.conf': 8 bytes, writing it to standard output",
    )
