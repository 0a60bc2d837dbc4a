"""``serve --listen`` under x509: a real TLS connection with certificates from a throwaway CA
(openssl, as tests/integration/netns.py makes them, for 127.0.0.1). The server's certificate
is checked by the client, and the client's by nbdkit (``--tls-verify-peer``): a client
without a certificate from the CA, or without TLS, reads nothing."""

from __future__ import annotations

from pathlib import Path

import nbd
import pytest

from agent.archive.format import Kind
from tests.integration.netns import _ca, _cert, _install
from tests.integration.test_serve import _start_tcp, _stop
from tests.serve_util import MiB, build_chain

pytestmark = [pytest.mark.integration, pytest.mark.network, pytest.mark.slow]


def creds(root: Path) -> tuple[Path, Path, Path]:
    """(the server's --tls-creds, a client's directory, a client of another CA)."""
    work = root / "openssl"
    work.mkdir(parents=True, mode=0o700)
    _ca(work, "test-ca")
    _ca(work, "other-ca")
    _cert(work, "server", "test-ca", "127.0.0.1")
    _cert(work, "client", "test-ca", "127.0.0.1")
    _cert(work, "stranger", "other-ca", "127.0.0.1")
    server, client, stranger = root / "server", root / "client", root / "stranger"
    _install(work, "server", server, work / "test-ca-cert.pem")
    _install(work, "client", client, work / "test-ca-cert.pem")
    # the stranger trusts the server's CA, but its own certificate is from another one
    _install(work, "stranger", stranger, work / "test-ca-cert.pem")
    return server, client, stranger


def _client(directory: Path | None) -> nbd.NBD:
    h = nbd.NBD()
    if directory is not None:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(directory))
    return h


def test_tcp_is_served_under_x509_to_certified_clients_only(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL], sizes={"vda": 2 * MiB})
    server, client, stranger = creds(tmp_path / "pki")
    proc, uri = _start_tcp(chain.paths[0], "--listen", "127.0.0.1:0", "--tls-creds",
                           str(server))
    try:
        assert uri.startswith("nbds://127.0.0.1:") and uri.endswith("/vda")
        h = _client(client)
        h.connect_uri(uri)
        assert bytes(h.pread(MiB, 4096)) == chain.expected["vda"][4096 : 4096 + MiB]
        h.shutdown()
        with pytest.raises(nbd.Error):  # its certificate is from another CA
            _client(stranger).connect_uri(uri)
        with pytest.raises(nbd.Error):  # no TLS at all
            _client(None).connect_uri(uri.replace("nbds://", "nbd://"))
        h = _client(client)  # the server still serves after refusing those
        h.connect_uri(uri)
        assert bytes(h.pread(4096, 0)) == chain.expected["vda"][:4096]
        h.shutdown()
    finally:
        assert _stop(proc) == 0
