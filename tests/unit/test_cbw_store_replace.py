"""The copy-before-write store takes each cluster once: a write over a cluster that is stored,
or was stored and trimmed, is another client's, and is refused without changing anything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cbw.store import ClusterStore, Extent, NotStored, Replaced

K = 64 * 1024
MiB = 1024 * 1024


def pat(byte: int, n: int = 1) -> bytes:
    return bytes([byte]) * (K * n)


@pytest.fixture(params=[64 * MiB + 512, None], ids=["sized", "unsized"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterStore]:
    s = ClusterStore(2 * K, str(tmp_path), 4 * K, size=request.param)
    yield s
    s.close()


@pytest.mark.parametrize("where", ["memory", "spool", "zero"])
def test_a_stored_cluster_is_never_replaced(store: ClusterStore, where: str) -> None:
    store.write(0, pat(1, 2))  # fills memory: what follows goes to the spool
    old = pat(2) if where != "zero" else bytes(K)
    at = {"memory": 0, "spool": 4 * K, "zero": 8 * K}[where]
    if where != "memory":
        store.write(at, old)
    else:
        old = pat(1)
    with pytest.raises(Replaced, match=f"offset {at}.*another client"):
        store.write(at, pat(0xEE))
    with pytest.raises(Replaced):
        store.write_zeroes(at, K)
    # A 1 MiB piece overlapping one stored cluster is refused whole: nothing of it stays.
    with pytest.raises(Replaced):
        store.write(at - (at % MiB), pat(0xDD, 16))
    assert store.read(at, K) == old
    st = store.stats()
    assert st.writes_refused == 3
    assert st.clusters_copied == (2 if where == "memory" else 3)


def test_a_trimmed_cluster_cannot_be_written_again(store: ClusterStore) -> None:
    """After the agent released a cluster QEMU never copies it again: a write there could
    only replace data already in the archive (or make a read of it succeed again)."""
    store.write(0, pat(1, 3))
    assert store.trim(K, K) == 1
    with pytest.raises(Replaced, match="already backed up"):
        store.write(K, pat(9))
    with pytest.raises(NotStored):
        store.read(K, K)
    assert store.extents(0, 3 * K) == [Extent(0, K, True, False), Extent(K, K, False, False),
                                       Extent(2 * K, K, True, False)]
    assert store.stats().writes_refused == 1


def test_first_writes_anywhere_still_succeed(store: ClusterStore) -> None:
    """QEMU's own pattern: each cluster once, in any order, up to a short last cluster."""
    store.write(3 * K, pat(3))
    store.write(0, pat(1, 3))
    store.write_zeroes(4 * K, 2 * K)
    if store.size is not None:
        store.write(64 * MiB, b"\x07" * 512)  # the disk's short last cluster
        assert store.read(64 * MiB, 512) == b"\x07" * 512
    assert store.read(0, 4 * K) == pat(1, 3) + pat(3)
    assert store.stats().writes_refused == 0


def test_the_plugin_serves_only_its_secret_export(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.cbw.plugin import EXPORT_ENV, CbwTarget, WrongExport

    monkeypatch.setenv(EXPORT_ENV, "a" * 32)
    target = CbwTarget()
    target.check_export("a" * 32)
    for other in ("", "vda", "a" * 31, "A" * 32, "a" * 33):
        with pytest.raises(WrongExport, match="not the QEMU being backed up"):
            target.check_export(other)
    monkeypatch.delenv(EXPORT_ENV)
    CbwTarget().check_export("anything")  # started by hand, without the agent: no secret
