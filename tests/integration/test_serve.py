"""``backup-agent serve`` with the real nbdkit, qemu-img and libnbd: every device of an
archive or chain reads back equal over NBD, block status keeps holes, many connections
read at random, and what cannot be served is refused in one line, never as wrong data.

Each test starts the real command; its process (and with it nbdkit, which exits with its
parent) is stopped by its pid in teardown."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import nbd
import pytest

from agent.archive.format import Kind
from tests.integration.cli_util import AGENT, ERROR_PREFIX, agent
from tests.serve_util import KiB, MiB, build_chain

START_TIMEOUT = 30.0


class Serving:
    def __init__(self, proc: subprocess.Popen[bytes], uris: list[str], socket: Path) -> None:
        self.proc = proc
        self.uris = uris
        self.socket = socket
        self.stderr = b""

    def uri(self, device: str) -> str:
        return next(u for u in self.uris if u.startswith(f"nbd+unix:///{device}?"))

    def stop(self) -> int:
        """SIGTERM to the agent by its pid; its exit code (stderr kept)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, self.stderr = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
        return self.proc.returncode


@contextlib.contextmanager
def serving(archives: Sequence[Path | str], socket: Path, *args: str | Path,
            devices: int, env: dict[str, str] | None = None) -> Iterator[Serving]:
    """``backup-agent serve`` until the block ends; yields once it printed its URIs."""
    proc = subprocess.Popen([AGENT, "serve", *map(str, archives), "--socket", str(socket),
                             *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    s = Serving(proc, [], socket)
    try:
        assert proc.stdout is not None
        out = b""
        while out.count(b"\n") < devices:
            ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
            chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                s.stop()
                raise AssertionError(f"serve did not start: {s.stderr.decode()}")
            out += chunk
        s.uris = out.decode().splitlines()
        yield s
    finally:
        s.stop()


def _raw_disk(path: Path, size: int, seed: int) -> bytes:
    """A sparse raw image: scattered runs of text and random bytes, holes between."""
    rng = random.Random(seed)
    img = bytearray(size)
    for _ in range(30):
        off, n = rng.randrange(size), rng.randrange(1, 400 * KiB)
        n = min(n, size - off)
        img[off : off + n] = (rng.randbytes(n) if rng.random() < 0.5
                              else (b"line %d\n" % off * (n // 8 + 1))[:n])
    with open(path, "wb") as f:
        f.truncate(size)
        for k in range(0, size, 64 * KiB):  # write only the non-zero pieces: stays sparse
            piece = img[k : k + 64 * KiB]
            if any(piece):
                f.seek(k)
                f.write(piece)
    return bytes(img)


def _compare(raw: Path, uri: str) -> None:
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", str(raw), uri],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def two_disks(tmp_path: Path) -> tuple[Path, Path]:
    vda, vdb = tmp_path / "vda.raw", tmp_path / "vdb.raw"
    _raw_disk(vda, 24 * MiB, 1)
    _raw_disk(vdb, 9 * MiB, 2)
    return vda, vdb


@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_every_device_reads_back_equal(tmp_path: Path, short_tmp: Path,
                                       two_disks: tuple[Path, Path], compress: str) -> None:
    vda, vdb = two_disks
    arc = tmp_path / "vm.arc"
    proc = agent("backup", "--image", f"vda={vda}", "--image", f"vdb={vdb}", "--compress",
                 compress, "-o", arc)
    assert proc.returncode == 0, proc.stderr
    sock = short_tmp / "s.sock"
    with serving([arc], sock, devices=2) as s:
        assert s.uris == [f"nbd+unix:///vda?socket={sock}", f"nbd+unix:///vdb?socket={sock}"]
        _compare(vda, s.uri("vda"))
        _compare(vdb, s.uri("vdb"))
        pid = s.proc.pid
        (nbdkit,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert s.stop() == 0  # SIGTERM: the normal way to stop serving
    assert not sock.exists()  # cleaned up
    assert not Path(f"/proc/{nbdkit}").exists()  # nbdkit stopped with it (and reaped)


@pytest.mark.parametrize("kinds", [
    [Kind.FULL, Kind.INCREMENTAL, Kind.INCREMENTAL],
    [Kind.FULL, Kind.DIFFERENTIAL, Kind.INCREMENTAL],
], ids=["full+inc+inc", "full+diff+inc"])
def test_a_chain_reads_back_as_its_newest_point_in_time(tmp_path: Path, short_tmp: Path,
                                                        kinds: list[Kind]) -> None:
    chain = build_chain(tmp_path, kinds)
    with serving(chain.paths, short_tmp / "s.sock", devices=2) as s:
        for name, want in chain.expected.items():
            raw = tmp_path / f"{name}.want"
            raw.write_bytes(want)
            _compare(raw, s.uri(name))


def test_an_encrypted_chain_is_served_with_its_keys(tmp_path: Path, short_tmp: Path) -> None:
    """The full backup encrypted to one key, the incremental to another: served with both
    (the second protected by a passphrase), each device reads back as the chain; without
    a key, or with only one, serve refuses in one line before it listens."""
    from agent import keys

    k1, k2 = keys.generate(), keys.generate()
    key1, key2 = tmp_path / "k1.key", tmp_path / "k2.key"
    keys.write_private(str(key1), keys.encode_private(k1))
    keys.write_private(str(key2), keys.encode_private(k2, b"pass phrase"))
    secret = tmp_path / "pass"
    secret.write_text("pass phrase\n")
    chain = build_chain(tmp_path, [Kind.FULL, Kind.INCREMENTAL],
                        encrypt_to={0: [k1.public], 1: [k2.public]})
    sock = short_tmp / "s.sock"
    with serving(chain.paths, sock, "--key", key1, "--key", key2, "--passphrase-file", secret,
                 devices=2) as s:
        argv = Path(f"/proc/{s.proc.pid}/cmdline").read_bytes()
        (nbdkit,) = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
        nbdkit_argv = Path(f"/proc/{nbdkit}/cmdline").read_bytes().split(b"\0")
        assert any(a.startswith(b"keyfd=") for a in nbdkit_argv), nbdkit_argv
        # The keys reach nbdkit through the pipe only: nothing of them in what others
        # may read of either process (the command line; the environment for the owner).
        shown = argv + b"".join(nbdkit_argv) + Path(f"/proc/{nbdkit}/environ").read_bytes()
        for pair in (k1, k2):
            raw = keys.raw_private(pair.private)
            assert raw not in shown and raw.hex().encode() not in shown
        assert b"pass phrase" not in shown and key1.read_bytes().strip() not in shown
        for name, want in chain.expected.items():
            raw = tmp_path / f"{name}.want"
            raw.write_bytes(want)
            _compare(raw, s.uri(name))
    assert not sock.exists()
    _refused(*chain.paths, "--socket", sock, expect="is encrypted (recipient keys")
    _refused(*chain.paths, "--socket", sock, "--key", key1,
             expect=f"{chain.paths[1]} is encrypted for other keys")
    assert not sock.exists()


def test_block_status_shows_the_holes_of_a_sparse_disk(tmp_path: Path, short_tmp: Path,
                                                       two_disks: tuple[Path, Path]) -> None:
    vda, _ = two_disks
    arc = tmp_path / "vm.arc"
    assert agent("backup", "--image", f"vda={vda}", "-o", arc).returncode == 0
    image = vda.read_bytes()
    with serving([arc], short_tmp / "s.sock", devices=1) as s:
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(s.uri("vda"))
        extents: list[tuple[int, int, int]] = []

        def got(meta: str, off: int, entries: list[int], err: int) -> int:
            for k in range(0, len(entries), 2):
                extents.append((off, entries[k], entries[k + 1]))
                off += entries[k]
            return 0

        off = 0
        while off < len(image):
            h.block_status(len(image) - off, off, got)
            off = extents[-1][0] + extents[-1][1]
        h.shutdown()
        holes = [(o, n) for o, n, flags in extents if flags == nbd.STATE_HOLE | nbd.STATE_ZERO]
        assert sum(n for _, n in holes) > len(image) // 2  # mostly holes, and said so
        for o, n in holes:
            assert image[o : o + n] == bytes(n)
        # nbdcopy keeps them: the copy is as sparse as the source
        copy = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", s.uri("vda"), str(copy)], check=True, timeout=60)
        assert copy.read_bytes() == image
        assert os.stat(copy).st_blocks * 512 < len(image) // 2


def test_random_reads_on_many_connections(tmp_path: Path, short_tmp: Path) -> None:
    """Unaligned reads, 1 byte to 3 MiB, across record boundaries, on 4 connections at
    once (the server says multi-conn is safe), each checked against the chain's bytes."""
    chain = build_chain(tmp_path, [Kind.FULL, Kind.INCREMENTAL], seed=5)
    want = bytes(chain.expected["vda"])
    with serving(chain.paths, short_tmp / "s.sock", "--cache", "2M", devices=2) as s:
        errors: list[str] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            h = nbd.NBD()
            h.connect_uri(s.uri("vda"))
            try:
                if not h.can_multi_conn():
                    errors.append("no multi-conn")
                for _ in range(150):
                    off = rng.randrange(len(want))
                    n = min(rng.choice([1, 511, 4097, 70000, 3 * MiB]), len(want) - off)
                    if bytes(h.pread(n, off)) != want[off : off + n]:
                        errors.append(f"wrong data at {off}+{n}")
            finally:
                h.shutdown()

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []


def _refused(*args: str | Path, expect: str) -> str:
    proc = agent("serve", *args)
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), lines
    assert expect in lines[0], lines[0]
    assert proc.stdout == b""
    return lines[0]


@pytest.mark.slow
def test_what_cannot_be_served_is_refused_in_one_line(tmp_path: Path, short_tmp: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL, Kind.INCREMENTAL, Kind.INCREMENTAL])
    f, i1, i2 = chain.paths
    sock = short_tmp / "s.sock"
    _refused("-", "--socket", sock, expect="save it to a file first (`cat > vm.arc`)")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(fifo, "--socket", sock, expect="is a pipe")
    cut = tmp_path / "cut.arc"
    cut.write_bytes(f.read_bytes()[:-1000])
    _refused(cut, "--socket", sock, expect="incomplete")
    _refused(f, i2, "--socket", sock, expect="missing link")
    _refused(f, i2, i1, "--socket", sock, expect="wrong order")
    _refused(f, "--socket", sock, "--writable", expect="--writable serves one device")
    # A damaged index passes the command's check of the ends; nbdkit's walk of it stops
    # the server before it listens, with the reason as the one line.
    from agent.archive.format import FRAME
    from agent.archive.indexed import read_seal

    with open(f, "rb") as fh:
        index_pos = read_seal(fh).footer.index_pos
    damaged = tmp_path / "damaged-index.arc"
    data = bytearray(f.read_bytes())
    data[index_pos + FRAME.size + 10] ^= 0x40
    damaged.write_bytes(bytes(data))
    line = _refused(damaged, "--socket", short_tmp / "d.sock", expect="could not serve: ")
    assert f"index record at byte {index_pos} fails its checksum" in line, line
    assert not (short_tmp / "d.sock").exists()
    sock.write_bytes(b"")
    _refused(f, "--socket", sock, expect="exists")
    assert not any(p.suffix == ".sock" for p in short_tmp.iterdir() if p != sock)


def test_a_damaged_record_fails_with_eio_and_names_the_record(tmp_path: Path,
                                                              short_tmp: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL], compress=False)
    arc = chain.paths[0]
    # a stored DATA record in the middle of the archive (not the first or last: opening
    # checks those), found through the serve's own table
    from agent.serve.archives import ServedArchives

    name, off, n = next((nm, o, ln) for _, nm, o, ln, d in chain.records[1:-1]
                        if d and ln > 8 * KiB)
    served = ServedArchives([str(arc)])
    segs = served.devices[name].segments
    pos = segs[segs.first_at(off)].pos
    served.close()
    raw = bytearray(arc.read_bytes())
    raw[pos + 24 + 24 + n // 2] ^= 0x40
    arc.write_bytes(raw)
    want = chain.expected[name]
    with serving([arc], short_tmp / "s.sock", devices=2) as s:
        h = nbd.NBD()
        h.connect_uri(s.uri(name))
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, off + 4096)
        assert e.value.errno == "EIO"
        # the records around it still serve, on the same connection
        lo = max(0, off - 8192)
        assert bytes(h.pread(off - lo, lo)) == want[lo:off]
        assert bytes(h.pread(4096, off + n)) == want[off + n : off + n + 4096]
        h.shutdown()
        assert s.stop() == 0
    err = s.stderr.decode()
    assert f"data record at byte {pos}: it fails its checksum" in err
    assert "Traceback" not in err  # nbdkit's tracebacks only with --debug


def test_writable_keeps_writes_in_an_overlay_and_never_touches_the_archive(
        tmp_path: Path, short_tmp: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL])
    arc = chain.paths[0]
    before = hashlib.sha256(arc.read_bytes()).hexdigest()
    want = chain.expected["vdb"]
    with serving([arc], short_tmp / "s.sock", "--writable", "--device", "vdb",
                 devices=1) as s:
        assert s.uris == [f"nbd+unix:///vdb?socket={short_tmp / 's.sock'}"]
        h = nbd.NBD()
        h.connect_uri(s.uri("vdb"))
        h.pwrite(b"\xab" * 5000, 70001)
        assert bytes(h.pread(6000, 70000)) == want[70000:70001] + b"\xab" * 5000 + want[
            75001:76000]
        h.shutdown()
        h = nbd.NBD()  # a second connection sees the write
        h.connect_uri(s.uri("vdb"))
        assert bytes(h.pread(5000, 70001)) == b"\xab" * 5000
        h.shutdown()
    assert hashlib.sha256(arc.read_bytes()).hexdigest() == before
    with serving([arc], short_tmp / "s2.sock", "--device", "vdb", devices=1) as s:
        h = nbd.NBD()  # the writes are gone with the server that took them
        h.connect_uri(s.uri("vdb"))
        assert bytes(h.pread(5000, 70001)) == want[70001:75001]
        assert h.is_read_only()
        h.shutdown()


def _start_tcp(archive: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([AGENT, "serve", str(archive), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line:
        proc.kill()
        raise AssertionError(f"serve did not start: {proc.communicate()[1].decode()}")
    return proc, line


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode


def test_tcp_is_served_under_tls_psk_only(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL], sizes={"vda": 3 * MiB})
    psk = tmp_path / "keys.psk"
    psk.write_text(f"backup:{os.urandom(32).hex()}\n")
    psk.chmod(0o600)
    proc, uri = _start_tcp(chain.paths[0], "--listen", "127.0.0.1:0", "--tls-psk", str(psk))
    try:
        assert uri.startswith("nbds://backup@127.0.0.1:") and uri.endswith("/vda")
        h = nbd.NBD()  # with the key: the disk
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(psk))
        h.set_tls_username("backup")
        h.connect_uri(uri)
        assert bytes(h.pread(MiB, 1000)) == chain.expected["vda"][1000 : 1000 + MiB]
        h.shutdown()
        plain = nbd.NBD()  # without TLS: refused before any option is answered
        with pytest.raises(nbd.Error):
            plain.connect_uri(uri.replace("nbds://backup@", "nbd://"))
        # the port is taken: said at once, not taken for this server being ready
        port = uri.split(":")[2].split("/")[0]
        _refused(chain.paths[0], "--listen", f"127.0.0.1:{port}", "--tls-psk", str(psk),
                 expect=f"cannot listen on 127.0.0.1:{port}")
    finally:
        assert _stop(proc) == 0


def test_tcp_in_clear_text_only_when_asked_in_so_many_words(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL], sizes={"vda": 1 * MiB})
    line = _refused(chain.paths[0], "--listen", "127.0.0.1:0", expect="in clear text")
    assert "--insecure-plaintext" in line and "--tls-creds" in line
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ca-cert.pem").write_text("not checked before the server files\n")
    _refused(chain.paths[0], "--listen", "127.0.0.1:0", "--tls-creds", creds,
             expect="has no server-cert.pem")
    proc, uri = _start_tcp(chain.paths[0], "--listen", "127.0.0.1:0", "--insecure-plaintext")
    try:
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/vda")
        h = nbd.NBD()
        h.connect_uri(uri)
        assert bytes(h.pread(4096, 0)) == chain.expected["vda"][:4096]
        h.shutdown()
    finally:
        assert _stop(proc) == 0


_VANISHING_CLIENT = """
import os, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
bufs = [nbd.Buffer(1 << 20) for _ in range(64)]
for k, buf in enumerate(bufs):  # many reads in flight, then gone without a word (as if killed)
    h.aio_pread(buf, (k << 20) % (size - (1 << 20)))
while h.aio_in_flight() == 64 and h.aio_peek_command_completed() == 0:
    h.poll(1)  # until the server answers the first: it is busy with the rest
os._exit(0)
"""


def test_a_client_that_vanishes_mid_read_does_not_stop_the_server(
        tmp_path: Path, short_tmp: Path, two_disks: tuple[Path, Path]) -> None:
    """nbdkit 1.32.5 aborts when a client goes away while several threads answer its
    requests (agent/serve/server.py, NBDKIT_THREADS): every other client would lose its disk."""
    vda, _ = two_disks
    arc = tmp_path / "vm.arc"
    assert agent("backup", "--image", f"vda={vda}", "--compress", "none", "-o",
                 arc).returncode == 0
    image = vda.read_bytes()
    with serving([arc], short_tmp / "s.sock", devices=1) as s:
        for _ in range(5):
            subprocess.run([sys.executable, "-c", _VANISHING_CLIENT, s.uri("vda")],
                           check=True, timeout=60)
            assert s.proc.poll() is None, s.stop() and s.stderr
            h = nbd.NBD()
            h.connect_uri(s.uri("vda"))
            assert bytes(h.pread(MiB, 5 * MiB)) == image[5 * MiB : 6 * MiB]
            h.shutdown()
