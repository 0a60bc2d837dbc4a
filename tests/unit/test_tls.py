"""TLS options and the clear-text rule (agent/tls.py, agent/network.py): every bad input is
one clear error naming what to do. Certificates themselves are exercised with real QEMU in
tests/integration/test_network.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import InvalidArgument
from agent.live.job import NetworkOptions
from agent.live.network import NBD_PORT, Network, host_port, plan
from agent.tls import TlsCreds, check_nbd_uri, check_private, psk_users, require_tls

KEY = "backup:" + "ab" * 32


def _psk(tmp_path: Path, text: str = KEY + "\n", mode: int = 0o600) -> Path:
    p = tmp_path / "keys.psk"
    p.write_text(text)
    p.chmod(mode)
    return p


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_private_files_may_be_read_by_owner_and_group(tmp_path: Path, mode: int) -> None:
    check_private(str(_psk(tmp_path, mode=mode)), "PSK file")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o601, 0o666])
def test_private_files_open_to_others_are_refused(tmp_path: Path, mode: int) -> None:
    p = _psk(tmp_path, mode=mode)
    with pytest.raises(InvalidArgument) as e:
        check_private(str(p), "PSK file")
    assert str(e.value) == (f"PSK file {p} is open to other users (mode {mode:04o}): "
                            f"run chmod 600 {p}")


def test_missing_private_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no such file"):
        check_private(str(tmp_path / "nope.pem"), "private key")


def test_psk_file_format(tmp_path: Path) -> None:
    assert psk_users(str(_psk(tmp_path, f"{KEY}\nother:00ff\n"))) == ["backup", "other"]
    with pytest.raises(InvalidArgument, match="line 2: expected USER:HEXKEY"):
        psk_users(str(_psk(tmp_path, f"{KEY}\nbackup:not-hex\n")))
    with pytest.raises(InvalidArgument, match="holds no key"):
        psk_users(str(_psk(tmp_path, "\n")))


def test_load_credentials(tmp_path: Path) -> None:
    psk = _psk(tmp_path)
    assert TlsCreds.load(None, None) is None
    creds = TlsCreds.load(None, str(psk))
    assert creds is not None and creds.psk_user == "backup" and creds.nbd_kind == "psk"
    with pytest.raises(InvalidArgument, match=r"no key for user 'root' .it has: backup."):
        TlsCreds.load(None, str(psk), "root")
    with pytest.raises(InvalidArgument, match=r"--tls-username .* needs --tls-psk"):
        TlsCreds.load(None, None, "backup")
    with pytest.raises(InvalidArgument, match="no such directory"):
        TlsCreds.load(str(tmp_path / "nope"), None)
    certs = tmp_path / "certs"
    certs.mkdir()
    with pytest.raises(InvalidArgument, match=r"has no ca-cert.pem"):
        TlsCreds.load(str(certs), None)
    (certs / "ca-cert.pem").write_text("x")
    key = certs / "client-key.pem"
    key.write_text("x")
    key.chmod(0o644)
    with pytest.raises(InvalidArgument, match=f"chmod 600 {key}"):
        TlsCreds.load(str(certs), None)


def test_nbdkit_needs_a_server_certificate_for_x509(tmp_path: Path) -> None:
    (tmp_path / "ca-cert.pem").write_text("x")
    creds = TlsCreds.load(str(tmp_path), None)
    assert creds is not None
    with pytest.raises(InvalidArgument, match=r"has no server-cert.pem"):
        creds.nbdkit_args()
    for name in ("server-cert.pem", "server-key.pem"):
        (tmp_path / name).write_text("x")
    with pytest.raises(InvalidArgument, match="open to other users"):
        creds.nbdkit_args()
    (tmp_path / "server-key.pem").chmod(0o600)
    assert creds.nbdkit_args() == ["--tls=require", f"--tls-certificates={tmp_path}",
                                   "--tls-verify-peer"]
    psk = TlsCreds.load(str(tmp_path), str(_psk(tmp_path)))
    assert psk is not None and psk.nbdkit_args()[1].startswith("--tls-psk=")


def test_clear_text_needs_to_be_asked_for(tmp_path: Path) -> None:
    creds = TlsCreds.load(None, str(_psk(tmp_path)))
    with pytest.raises(InvalidArgument, match=r"clear text.*--insecure-plaintext"):
        require_tls("QEMU's NBD server", "h:1", None, insecure=False)
    assert require_tls("QEMU's NBD server", "h:1", None, insecure=True) is None
    assert require_tls("QEMU's NBD server", "h:1", creds, insecure=False) is creds
    with pytest.raises(InvalidArgument, match="do not combine"):
        require_tls("QEMU's NBD server", "h:1", creds, insecure=True)


@pytest.mark.parametrize("uri", ["nbd://localhost/x", "nbd://127.0.0.1:10809/x",
                                 "nbd://[::1]/x", "nbds://10.0.0.1/x",
                                 "nbd+unix:///x?socket=/s"])
def test_nbd_uris_that_stay_private(uri: str) -> None:
    check_nbd_uri(uri, insecure=False)


def test_clear_text_nbd_uri_to_another_host() -> None:
    with pytest.raises(InvalidArgument, match=r"clear text: use nbds:// .*e\.g\. nbds://10\.0\.0\.1:10809/x\?"):
        check_nbd_uri("nbd://10.0.0.1:10809/x", insecure=False)
    check_nbd_uri("nbd://10.0.0.1:10809/x", insecure=True)


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1", ("10.0.0.1", 7)), ("10.0.0.1:99", ("10.0.0.1", 99)),
    ("host.example", ("host.example", 7)), ("[::1]", ("::1", 7)), ("[::1]:99", ("::1", 99)),
])
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert host_port(text, 7, "--x") == expected


@pytest.mark.parametrize("text", ["h:x", "h:70000", "[::1", "[::1]x", ":5"])
def test_bad_host_port(text: str) -> None:
    with pytest.raises(InvalidArgument, match="--x"):
        host_port(text, 7, "--x")


LOCAL = "/run/vm.qmp"  # --qmp of an agent on the VM's host
TCP = "10.0.0.1:4444"  # --qmp of an agent on another host
Opts = NetworkOptions


def test_a_local_monitor_needs_no_network() -> None:
    assert plan(LOCAL, Opts()) == Network()


@pytest.mark.parametrize(("qmp", "opts", "words"), [
    (LOCAL, Opts(tls_psk="/x"), "apply to TCP connections"),
    (LOCAL, Opts(insecure_plaintext=True), "apply to TCP connections"),
    (LOCAL, Opts(cbw_listen="10.0.0.2"), "--cbw-listen is for"),
    (TCP, Opts(nbd_socket="/s"), "--qemu-nbd-socket is QEMU's NBD server on a Unix"),
    (TCP, Opts(), "clear text"),
    (TCP, Opts(qemu_nbd_addr="h:x", insecure_plaintext=True), "--qemu-nbd-addr 'h:x'"),
])
def test_network_option_errors(qmp: str, opts: NetworkOptions, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        plan(qmp, opts)


def test_qmp_needs_x509_even_with_a_psk(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"QMP over TCP needs x509 .* no TLS-PSK"):
        plan(TCP, Opts(tls_psk=str(_psk(tmp_path))))


def test_insecure_network_defaults() -> None:
    net = plan(TCP, Opts(insecure_plaintext=True, cbw_listen=":10900"))
    assert net.qmp_tls is None and net.nbd_tls is None and net.cbw_tls is None
    assert net.nbd_tcp == ("10.0.0.1", NBD_PORT) and not net.nbd_explicit
    assert net.cbw_tcp and net.cbw_listen == (None, 10900)
    net = plan(TCP, Opts(insecure_plaintext=True, qemu_nbd_addr="10.0.0.9:7000",
                         cbw_listen="10.0.0.2"))
    assert net.nbd_tcp == ("10.0.0.9", 7000) and net.nbd_explicit
    assert net.cbw_listen == ("10.0.0.2", 0)
    # An agent on the VM's host reading a TCP NBD server someone else started.
    local = plan(LOCAL, Opts(qemu_nbd_addr="127.0.0.1:10809", insecure_plaintext=True))
    assert local.nbd_tcp == ("127.0.0.1", 10809) and not local.cbw_tcp
