"""Archives in a bucket (``s3://``), against a real S3 server: SeaweedFS's ``weed mini`` on
the loopback (tests/s3util.py), never a mock. The agent runs as its own process with
boto3's standard variables (credentials, ``AWS_ENDPOINT_URL``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.archive.format import Compression, Header, Kind
from agent.archive.reader import ArchiveReader
from agent.archive.writer import ArchiveWriter
from agent.archive_info import archive_info
from agent.errors import OutputError
from agent.s3.objects import ObjectStream, RangedObject
from agent.s3.upload import S3Output
from tests.integration.cli_util import (
    AGENT,
    TIMEOUT,
    MiB,
    assert_error,
    assert_ok,
    describe,
)
from tests.integration.conftest import NbdServerFactory, make_image, qemu_img_compare
from tests.integration.vm import Disk, VmFactory
from tests.s3util import Weed, free_ports

pytestmark = [pytest.mark.integration, pytest.mark.network, pytest.mark.slow]


def run(server: Weed, *args: str | os.PathLike[str], **env: str,
        ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([AGENT, *map(str, args)], env=server.env(**env),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
                          check=False)


def start(server: Weed, *args: str | os.PathLike[str], **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([AGENT, *map(str, args)], env=server.env(**env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def make_disk(path: Path, size: int, data: list[tuple[int, int]]) -> Path:
    """A sparse raw image with random data at each (offset, length)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def keys(server: Weed, bucket: str) -> list[str]:
    reply = server.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in reply.get("Contents", [])]


def uploads(server: Weed, bucket: str) -> list[dict[str, Any]]:
    return list(server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def wait_for_part(server: Weed, bucket: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the backup has sent a part of its upload (or fail if it ended first)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        for up in uploads(server, bucket):
            parts = server.client().list_parts(Bucket=bucket, Key=up["Key"],
                                               UploadId=up["UploadId"])
            if parts.get("Parts"):
                return
        time.sleep(0.05)
    pytest.fail("the backup sent no part")


def test_round_trip_in_many_parts(s3_server: Weed, s3_bucket: str, tmp_path: Path) -> None:
    # 5 MiB parts (the smallest S3 takes) over 36 MiB of incompressible data: 8 parts.
    disk = make_disk(tmp_path / "disk.raw", 96 * MiB,
                     [(0, 20 * MiB), (40 * MiB, 1 * MiB), (60 * MiB, 15 * MiB)])
    (tmp_path / "vm.conf").write_text("memory: 2048\n")
    url = f"s3://{s3_bucket}/vm1/full.arc"
    assert_ok(run(s3_server, "backup", "--image", f"disk={disk}", "--config",
                  f"vm.conf={tmp_path / 'vm.conf'}", "-o", url,
                  BACKUP_AGENT_S3_PART_SIZE="5M"))
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="vm1/full.arc")
    assert head["ETag"].strip('"').endswith("-8"), head["ETag"]  # a multipart object
    assert uploads(s3_server, s3_bucket) == []

    assert_ok(run(s3_server, "verify", url))
    out = tmp_path / "out"
    assert_ok(run(s3_server, "restore", url, "--to-dir", out))
    assert (out / "disk.raw").read_bytes() == disk.read_bytes()
    conf = run(s3_server, "config", url, "vm.conf")
    assert_ok(conf)
    assert conf.stdout == b"memory: 2048\n"
    info = run(s3_server, "info", url, "--json")
    assert_ok(info)
    assert b'"archive_bytes": %d' % head["ContentLength"] in info.stdout


def test_info_reads_only_the_ends(s3_server: Weed, s3_bucket: str, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 64 * MiB, [(0, 40 * MiB)])
    url = f"s3://{s3_bucket}/vm1/full.arc"
    assert_ok(run(s3_server, "backup", "--image", f"disk={disk}", "-o", url))
    size = s3_server.client().head_object(Bucket=s3_bucket, Key="vm1/full.arc")[
        "ContentLength"]
    gets, fetched = RangedObject.gets, RangedObject.fetched
    with s3_server.environ():
        info = archive_info(url)
    gets, fetched = RangedObject.gets - gets, RangedObject.fetched - fetched
    assert info.archive_bytes == size
    # The tail (footer, END, index) and the head (header, devices, the first record): one
    # ranged GET of 4 MiB for each end, nothing of the 40 MiB between.
    assert gets == 2, gets
    assert fetched <= 8 * MiB < size // 4, (fetched, size)

    # A stream whose start alone is read (a restore of a chain opens every archive first)
    # has fetched one 4 MiB chunk, and asks for more only as it is read on.
    gets, fetched = RangedObject.gets, RangedObject.fetched
    with s3_server.environ(), ObjectStream(url) as stream:
        assert ArchiveReader(stream).header.uuid == info.header.uuid  # type: ignore[arg-type]
        assert (RangedObject.gets - gets, RangedObject.fetched - fetched) == (1, 4 * MiB)
        while stream.read(8 * MiB):
            pass
    assert RangedObject.fetched - fetched == size  # every byte once


def test_an_existing_object_is_never_replaced(s3_server: Weed, s3_bucket: str,
                                              tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB, [(0, MiB)])
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="vm1/full.arc", Body=b"someone else's")
    proc = run(s3_server, "backup", "--image", f"disk={disk}", "-o",
               f"s3://{s3_bucket}/vm1/full.arc")
    assert_error(proc, "already exists", "never replaced")
    body = client.get_object(Bucket=s3_bucket, Key="vm1/full.arc")["Body"].read()
    assert body == b"someone else's"
    assert uploads(s3_server, s3_bucket) == []


def test_a_missing_bucket(s3_server: Weed, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB, [(0, MiB)])
    proc = run(s3_server, "backup", "--image", f"disk={disk}", "-o", "s3://no-such-bucket/a.arc")
    assert_error(proc, "bucket", "does not exist")
    assert_error(run(s3_server, "restore", "s3://no-such-bucket/a.arc", "--to-dir",
                     tmp_path / "out"), "no such")
    assert not (tmp_path / "out").exists()


def test_wrong_credentials(s3_server: Weed, s3_bucket: str, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB, [(0, MiB)])
    url = f"s3://{s3_bucket}/vm1/full.arc"
    assert_error(run(s3_server, "backup", "--image", f"disk={disk}", "-o", url,
                     AWS_SECRET_ACCESS_KEY="wrong"), "access denied", "credentials")
    assert keys(s3_server, s3_bucket) == []
    assert uploads(s3_server, s3_bucket) == []
    assert_ok(run(s3_server, "backup", "--image", f"disk={disk}", "-o", url))
    assert_error(run(s3_server, "info", url, AWS_ACCESS_KEY_ID="nobody"), "credentials")
    assert_error(run(s3_server, "verify", url, AWS_SECRET_ACCESS_KEY="wrong"), "credentials")


def test_no_credentials_or_no_server(s3_server: Weed, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB, [(0, MiB)])
    env = s3_server.env()
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    proc = subprocess.run([AGENT, "backup", "--image", f"disk={disk}", "-o",
                           "s3://backups/a.arc"], env=env, capture_output=True,
                          timeout=TIMEOUT, check=False)
    assert_error(proc, "no S3 credentials", "AWS_ACCESS_KEY_ID")
    closed = free_ports(1)[0]  # nothing listens there
    assert_error(run(s3_server, "info", "s3://backups/a.arc",
                     AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}"),
                 f"cannot reach the S3 endpoint http://127.0.0.1:{closed}")


def test_bad_names(s3_server: Weed, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB, [(0, MiB)])
    assert_error(run(s3_server, "backup", "--image", f"disk={disk}", "-o", "s3://backups/"),
                 "object name")
    assert_error(run(s3_server, "backup", "--image", f"disk={disk}", "-o", "s3://backups/a.arc",
                     BACKUP_AGENT_S3_PART_SIZE="1M"), "5M")
    # serve reads objects: one that is not there is named as such, not as incomplete
    msg = assert_error(run(s3_server, "serve", "s3://backups/a.arc", "--socket",
                           tmp_path / "s"), "s3://backups/a.arc", "no such object")
    assert "incomplete" not in msg


# -- interrupted uploads: a slow backup (--max-rate), stopped once a part is in the bucket


def slow_backup(server: Weed, bucket: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    disk = make_disk(tmp_path / "disk.raw", 48 * MiB, [(0, 40 * MiB)])
    return start(server, "backup", "--image", f"disk={disk}", "--max-rate", "8M", "-o",
                 f"s3://{bucket}/vm1/full.arc", BACKUP_AGENT_S3_PART_SIZE="5M")


def test_sigterm_mid_upload_aborts_it(s3_server: Weed, s3_bucket: str, tmp_path: Path) -> None:
    proc = slow_backup(s3_server, s3_bucket, tmp_path)
    try:
        wait_for_part(s3_server, s3_bucket, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_error((proc.returncode, err), "SIGTERM")
    assert keys(s3_server, s3_bucket) == []
    assert uploads(s3_server, s3_bucket) == []  # aborted: no parts left to pay for


def test_kill_9_mid_upload_leaves_no_object(s3_server: Weed, s3_bucket: str,
                                            tmp_path: Path) -> None:
    proc = slow_backup(s3_server, s3_bucket, tmp_path)
    try:
        wait_for_part(s3_server, s3_bucket, proc)
        proc.kill()
    finally:
        proc.wait()
    assert keys(s3_server, s3_bucket) == []
    # The upload itself stays until the lifecycle rule or prune aborts it.
    assert [u["Key"] for u in uploads(s3_server, s3_bucket)] == ["vm1/full.arc"]


def test_a_source_failing_mid_upload_aborts_it(s3_server: Weed, s3_bucket: str,
                                               nbd_server: NbdServerFactory, short_tmp: Path,
                                               tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 48 * MiB, [(0, 40 * MiB)])
    trigger = short_tmp / "fail-now"
    source = nbd_server.nbdkit(["file", str(disk), "error=EIO", "error-pread-rate=100%",
                                f"error-pread-file={trigger}"], filters=["error"],
                               readonly=True)
    proc = start(s3_server, "backup", "--source", f"disk={source.uri}", "--max-rate", "8M",
                 "-o", f"s3://{s3_bucket}/vm1/full.arc", BACKUP_AGENT_S3_PART_SIZE="5M")
    try:
        wait_for_part(s3_server, s3_bucket, proc)
        trigger.touch()  # every read fails from now on
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_error((proc.returncode, err), "disk")
    assert keys(s3_server, s3_bucket) == []
    assert uploads(s3_server, s3_bucket) == []


def test_server_gone_mid_upload(s3_servers: Callable[[Path], Weed], short_tmp: Path,
                                tmp_path: Path) -> None:
    server = s3_servers(short_tmp / "weed")
    proc = slow_backup(server, "backups", tmp_path)
    try:
        wait_for_part(server, "backups", proc)
        server.stop()
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    message = assert_error((proc.returncode, err), "s3://backups/vm1/full.arc")
    assert "endpoint" in message or "connection" in message, message
    again = s3_servers(short_tmp / "weed")  # the same data, served again
    assert keys(again, "backups") == []


# -- chains and retention in a bucket ---------------------------------------------------------


def put_incremental(server: Weed, url: str, parent: str, pattern: int,
                    size: int = 8 * MiB) -> str:
    """An incremental archive (one changed 64 KiB cluster) on archive ``parent``, written
    through the agent's own upload output, as another agent of a fleet would; its uuid."""
    header = Header(uuid=uuid.uuid4(), created_ns=time.time_ns(), tool_version="test",
                    kind=Kind.INCREMENTAL, parent_uuid=uuid.UUID(parent))
    with server.environ():
        out = S3Output(url)
        try:
            w = ArchiveWriter(out, header)
            w.add_device("disk", size)
            w.write_data(0, 0, 65536, Compression.NONE, bytes([pattern]) * 65536)
            w.finish()
            out.commit()
        finally:
            out.close()
    return str(header.uuid)


def full_backup(server: Weed, disk: Path, url: str) -> str:
    assert_ok(run(server, "backup", "--image", f"disk={disk}", "-o", url))
    info = run(server, "info", url, "--json")
    assert_ok(info)
    return str(json.loads(info.stdout)["uuid"])


def test_a_chain_in_a_bucket_and_prune(s3_server: Weed, s3_bucket: str,
                                       tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB, [(0, 2 * MiB)])
    base = f"s3://{s3_bucket}/vm1/"
    f1 = base + "vm1-20261101T000000Z-full.arc"
    i1 = base + "vm1-20261102T000000Z-incremental.arc"
    f2 = base + "vm1-20261103T000000Z-full.arc"
    i2 = base + "vm1-20261104T000000Z-incremental.arc"
    put_incremental(s3_server, i1, full_backup(s3_server, disk, f1), 0x41)
    put_incremental(s3_server, i2, full_backup(s3_server, disk, f2), 0x42)
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="vm1/notes.txt", Body=b"not an archive")
    client.put_object(Bucket=s3_bucket, Key="vm1/deeper/vm1-20261101T000000Z-full.arc",
                      Body=b"another folder's")

    out = tmp_path / "out"
    assert_ok(run(s3_server, "restore", f2, i2, "--to-dir", out))
    expected = bytearray(disk.read_bytes())
    expected[:65536] = b"\x42" * 65536
    assert (out / "disk.raw").read_bytes() == expected

    # A backup killed mid-upload left its upload behind.
    proc = slow_backup(s3_server, s3_bucket, tmp_path)
    try:
        wait_for_part(s3_server, s3_bucket, proc)
        proc.kill()
    finally:
        proc.wait()
    assert len(uploads(s3_server, s3_bucket)) == 1

    dry = run(s3_server, "prune", base, "--keep-chains", "1", "--dry-run")
    assert_ok(dry)
    assert keys(s3_server, s3_bucket) != [] and len(uploads(s3_server, s3_bucket)) == 1
    assert b"would delete  " + i1.encode() in dry.stdout
    # Younger than the default 24 hours: a fleet's running backup is never cut off.
    assert_ok(run(s3_server, "prune", base, "--keep-chains", "1"))
    assert len(uploads(s3_server, s3_bucket)) == 1

    done = run(s3_server, "prune", base, "--keep-chains", "1", "--uploads-older-than", "0")
    assert_ok(done)
    assert b"aborted" in done.stdout
    assert uploads(s3_server, s3_bucket) == []
    assert sorted(keys(s3_server, s3_bucket)) == [
        "vm1/deeper/vm1-20261101T000000Z-full.arc", "vm1/notes.txt",
        "vm1/vm1-20261103T000000Z-full.arc", "vm1/vm1-20261104T000000Z-incremental.arc"]
    # The first chain went whole: deleted, children first, in the earlier prune.
    assert_error(run(s3_server, "prune", f"s3://{s3_bucket}/vm1", "--keep-chains", "1",
                     AWS_SECRET_ACCESS_KEY="wrong"), "credentials")


def test_serve_a_chain_from_a_bucket(s3_server: Weed, s3_bucket: str, tmp_path: Path,
                                     short_tmp: Path) -> None:
    """An encrypted full backup and a plain incremental on it, both in the bucket, served
    over NBD with ranged GETs: the disk reads back as the chain's newest point in time."""
    from agent import keys as keyfiles
    from tests.integration.test_serve import serving

    pair = keyfiles.generate()
    keyfile = tmp_path / "k.key"
    keyfiles.write_private(str(keyfile), keyfiles.encode_private(pair))
    # Many records (1 MiB requests), data and holes, so reads cross record boundaries.
    disk = make_disk(tmp_path / "disk.raw", 24 * MiB,
                     [(0, 5 * MiB), (9 * MiB + 4096, 3 * MiB), (20 * MiB, 4 * MiB)])
    full = f"s3://{s3_bucket}/vm1/full.arc"
    inc = f"s3://{s3_bucket}/vm1/inc.arc"
    assert_ok(run(s3_server, "backup", "--image", f"disk={disk}", "--request-size", "1M",
                  "--encrypt-to", keyfiles.format_public(pair.public), "-o", full))
    info = run(s3_server, "info", full, "--json", "--key", keyfile)
    assert_ok(info)
    put_incremental(s3_server, inc, str(json.loads(info.stdout)["uuid"]), 0x5A, 24 * MiB)
    want = tmp_path / "want.raw"
    expected = bytearray(disk.read_bytes())
    expected[:65536] = b"\x5a" * 65536
    want.write_bytes(expected)
    with serving([full, inc], short_tmp / "s.sock", "--key", keyfile, devices=1,
                 env=s3_server.env()) as s:
        assert s.uris == [f"nbd+unix:///disk?socket={short_tmp / 's.sock'}"]
        assert qemu_img_compare(want, "raw", s.uris[0], "raw")
    refused = run(s3_server, "serve", full, inc, "--socket", short_tmp / "t.sock")
    assert_error(refused, "is encrypted (recipient keys")


# -- a fleet: jobs into a bucket, several at once ----------------------------------------------


@pytest.mark.qemu  # live backups: run on QEMU 10 too (make test)
def test_jobs_into_a_bucket_in_parallel(s3_server: Weed, s3_bucket: str, vms: VmFactory,
                                        tmp_path: Path) -> None:
    machines, befores = [], []
    for i in range(3):
        disk = make_image(tmp_path / f"vm{i}.qcow2", "qcow2", 16 * MiB,
                          [("write", 0x10 + i, 0, 3 * MiB), ("write", 0xA0 + i, 9 * MiB, MiB)])
        befores.append(tmp_path / f"before{i}.qcow2")
        shutil.copy(disk, befores[-1])
        machine = vms.start([Disk(disk, "qcow2", "vda")])
        machine.monitor.execute("cont")
        machines.append(machine)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text("".join(f"""
[jobs.vm{i}]
qmp = "{m.agent_qmp}"
dir = "s3://{s3_bucket}/host1/vm{i}"
mode = "full"
keep_chains = 1
spool_dir = "{tmp_path}"
""" for i, m in enumerate(machines)))
    first = run(s3_server, "job", "run", "--config", jobs, "--parallel", "2")
    assert_ok(first)
    names = keys(s3_server, s3_bucket)
    assert len(names) == 3, names
    for i, key in enumerate(sorted(names)):
        assert re.fullmatch(rf"host1/vm{i}/vm{i}-\d{{8}}T\d{{6}}Z-full\.arc", key), key
        out = tmp_path / f"out{i}"
        assert_ok(run(s3_server, "restore", f"s3://{s3_bucket}/{key}", "--to-dir", out))
        assert qemu_img_compare(befores[i], "qcow2", out / "vda.raw", "raw")
    time.sleep(1.1)  # a new second: new names
    second = run(s3_server, "job", "run", "--config", jobs, "--parallel", "3")
    assert_ok(second)
    newer = keys(s3_server, s3_bucket)
    assert len(newer) == 3 and not set(newer) & set(names), (names, newer)  # keep_chains = 1
    assert uploads(s3_server, s3_bucket) == []

    # One job failing (its VM gone) fails the run, not the others.
    machines[1].stop()
    time.sleep(1.1)
    third = run(s3_server, "job", "run", "--config", jobs, "--parallel", "2")
    assert third.returncode == 1, describe(third)
    assert b'job "vm1"' in third.stderr
    after = keys(s3_server, s3_bucket)  # vm0 and vm2: a new chain each, vm1: its last
    assert len(after) == 3 and len(set(after) & set(newer)) == 1, (newer, after)


# -- races and broken connections, in-process against the same server ---------------------


def test_two_writers_of_one_name_the_second_fails(s3_server: Weed, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/vm1/full.arc"
    with s3_server.environ():
        first, second = S3Output(url), S3Output(url)  # both find the name free
        try:
            first.write([b"A" * (6 * MiB)])
            second.write([b"B" * (6 * MiB)])
            first.commit()
            with pytest.raises(OutputError, match="created by someone else"):
                second.commit()
            second.abort()
        finally:
            first.close()
            second.close()
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="vm1/full.arc")["Body"].read()
    assert body == b"A" * (6 * MiB)  # the first one's, never replaced
    assert uploads(s3_server, s3_bucket) == []


class CuttingProxy:
    """A TCP proxy to the server that cuts the first connection that has carried
    ``cut_after`` bytes towards the client (a network failure in the middle of a GET), or
    towards the server with ``upload=True`` (in the middle of a part)."""

    def __init__(self, target: str, cut_after: int, upload: bool = False) -> None:
        self.upload = upload
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b, down in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pipe, args=(a, b, down), daemon=True)
                t.start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        carried = 0
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                carried += len(data)
                if down != self.upload and carried >= self.cut_after and self.cuts == 0:
                    self.cuts += 1
                    break
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_stream_resumes_after_a_cut(s3_server: Weed, s3_bucket: str, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 32 * MiB, [(0, 24 * MiB)])
    url = f"s3://{s3_bucket}/vm1/full.arc"
    assert_ok(run(s3_server, "backup", "--image", f"disk={disk}", "-o", url))
    proxy = CuttingProxy(s3_server.endpoint, cut_after=5 * MiB)
    try:
        out = tmp_path / "out"
        restored = run(s3_server, "restore", url, "--to-dir", out, "--debug",
                       AWS_ENDPOINT_URL=proxy.endpoint)
        assert_ok(restored)
        assert proxy.cuts == 1
        assert b"fetching bytes " in restored.stderr  # that chunk again, the same ETag
        assert (out / "disk.raw").read_bytes() == disk.read_bytes()
    finally:
        proxy.close()


def test_a_part_cut_mid_upload_is_sent_again(s3_server: Weed, s3_bucket: str,
                                             tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 32 * MiB, [(0, 24 * MiB)])
    url = f"s3://{s3_bucket}/vm1/full.arc"
    proxy = CuttingProxy(s3_server.endpoint, cut_after=7 * MiB, upload=True)
    try:
        done = run(s3_server, "backup", "--image", f"disk={disk}", "-o", url,
                   AWS_ENDPOINT_URL=proxy.endpoint)
    finally:
        proxy.close()
    assert_ok(done)  # botocore sent the part again: it is safe to repeat
    assert proxy.cuts == 1
    out = tmp_path / "out"
    assert_ok(run(s3_server, "restore", url, "--to-dir", out))
    assert (out / "disk.raw").read_bytes() == disk.read_bytes()
