#!/usr/bin/env python3
"""Where should the copy-before-write target run: next to QEMU, or on the backup server?

Two hosts on one machine (tests/integration/netns.py): QEMU in one network namespace, the
backup server in another, joined through a third whose bridge delays every frame by 1 ms
and 5 ms each way (round trips of 2 and 10 ms). The bridge is bench/delay_bridge.py, a
userspace netem: the kernel of this project's machines has no ``sch_netem`` (``tc qdisc ...
netem`` answers "Specified qdisc kind is unknown") and no modules to load. Both placements
send the archive to the same sink on the backup server and read QEMU's snapshot through the
same NBD server (TCP, TLS-PSK), so the only difference is where the agent and plugin run:

- ``hypervisor``: the agent (and so the plugin) on QEMU's host, with its local monitor; the
  plugin is a Unix socket away from QEMU; the archive crosses the link (as with ``-o - | ssh``).
- ``backup server``: the agent and plugin on the backup server (``--qmp HOST:PORT``, all of
  QMP, NBD and the copy-before-write target under TLS); each old cluster crosses the link
  to the plugin before the guest's write may go on; the snapshot's reads cross it too.

Two measurements for each placement and delay, side by side in one run:

1. backup throughput: a full live backup of an idle 1 GiB disk of random data, no
   compression, into the sink as fast as it reads (wall time of the whole command);
2. guest writes during a backup: fio random 64 KiB writes at depth 16 for ``--runtime``
   seconds (the approach of bench/guest_cost.py: fio over an NBD export of the node the
   guest's device writes to, here the agent's copy-before-write filter), while the backup
   runs into a sink that reads 100 MiB/s; compared with the same writes without a backup.

    .venv/bin/python bench/network.py [--runs 3] [--runtime 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import SMOKE_NOTE, add_smoke_flag  # noqa: E402
from tests.integration.netns import (  # noqa: E402
    BK_ADDR,
    HV_ADDR,
    PSK_USER,
    Pki,
    TwoHosts,
    make_pki,
    qemu_tls_args,
    two_hosts,
)
from tests.integration.vm import Vm, VmFactory  # noqa: E402

AGENT = str(Path(sys.executable).parent / "backup-agent")
PY = sys.executable
MiB = 1024 * 1024
GiB = 1024 * MiB
DEPTH = 16
QMP_PORT = 4444
NBD_PORT = 10809
SINK_PORT = 9000
RATE = 100 * MiB  # the sink's pace while fio measures (about an ssh link's)
DELAYS = (1, 5)
BRIDGE = str(ROOT / "bench" / "delay_bridge.py")
PLACEMENTS = ("hypervisor", "backup server")

# Reads TCP connections on BK_ADDR:SINK_PORT, each to its end, at most RATE bytes/s when
# argv[1] is not 0; prints the bytes of each connection.
SINK = r"""
import socket, sys, time
rate = int(sys.argv[1])
srv = socket.create_server((sys.argv[2], int(sys.argv[3])))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    got, start = 0, time.monotonic()
    with conn:
        while chunk := conn.recv(1 << 20):
            got += len(chunk)
            if rate:
                ahead = got / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    print(got, flush=True)
"""
# Copies standard input to a TCP connection.
SEND = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
while chunk := sys.stdin.buffer.read1(1 << 20):
    s.sendall(chunk)
s.close()
"""


@dataclass(frozen=True)
class Fio:
    mib_s: float
    p50_ms: float
    p99_ms: float


def fio(hosts: TwoHosts, uri: str, runtime: int) -> Fio:
    args = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=64k", f"--iodepth={DEPTH}", "--size=1G", "--output-format=json",
            "--norandommap", "--randrepeat=0", "--time_based", f"--runtime={runtime}"]
    proc = subprocess.run(hosts.run_in(hosts.hv, args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fio failed: {proc.stderr.strip() or proc.stdout[-500:]}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["write"]
    pct = job["clat_ns"]["percentile"]
    return Fio(job["bw_bytes"] / MiB, pct["50.000000"] / 1e6, pct["99.000000"] / 1e6)


class Bench:
    def __init__(self, work: Path, hosts: TwoHosts, pki: Pki, vm: Vm, size: int) -> None:
        self.work, self.hosts, self.pki, self.vm = work, hosts, pki, vm
        self.size = size  # of the VM's disk: what a full backup sends
        # fio's NBD engine may not read a PSK file named in a URI: it reaches the TLS export
        # through a local clear-text proxy (nbdkit's nbd plugin), the same in every run.
        sock = work / "fio.sock"
        self.proxy = subprocess.Popen(hosts.run_in(hosts.hv, [
            "nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "nbd",
            f"hostname={HV_ADDR}", f"port={NBD_PORT}", "export=bench", "tls=require",
            f"tls-psk={pki.psk}", f"tls-username={PSK_USER}"]))
        self.fio_uri = f"nbd+unix:///?socket={sock}"
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.02)

    def close(self) -> None:
        self.proxy.terminate()
        self.proxy.wait()

    def export(self, node: str) -> None:
        self.vm.qmp.execute("block-export-add", {"type": "nbd", "id": "bench",
                                                 "node-name": node, "name": "bench",
                                                 "writable": True})

    def unexport(self) -> None:
        self.vm.qmp.execute("block-export-del", {"id": "bench", "mode": "hard"})
        while any(e["id"] == "bench" for e in self.vm.qmp.execute("query-block-exports")):
            time.sleep(0.05)

    def agent_argv(self, placement: str) -> tuple[str, list[str]]:
        """Namespace and command of the agent for ``placement``."""
        # Both read QEMU's snapshot through the NBD server the bench started (TCP, PSK).
        common = ["-q", "--compress", "none", "--qemu-nbd-addr", f"{HV_ADDR}:{NBD_PORT}",
                  "--tls-psk", str(self.pki.psk), "--qemu-tls-server", "backup-psk",
                  "--cbw-memory", "512M", "--spool-limit", "2G", "-o", "-"]
        if placement == "hypervisor":
            return self.hosts.hv, [AGENT, "backup", "--qmp", str(self.vm.agent_qmp), *common]
        return self.hosts.bk, [AGENT, "backup", "--qmp", f"{HV_ADDR}:{QMP_PORT}",
                               "--tls-creds", str(self.pki.agent), "--qemu-tls-client",
                               "backup-psk-client", *common]

    def backup(self, placement: str, rate: int, during: bool, runtime: int
               ) -> tuple[float, Fio | None]:
        """One live backup into the sink; (seconds, fio result if ``during``)."""
        sink = subprocess.Popen(self.hosts.run_in(self.hosts.bk, [
            PY, "-c", SINK, str(rate), BK_ADDR, str(SINK_PORT)]), stdout=subprocess.PIPE,
            text=True)
        assert sink.stdout is not None
        try:
            if sink.stdout.readline().strip() != "ready":
                raise SystemExit("the sink did not start")
            ns, argv = self.agent_argv(placement)
            start = time.monotonic()
            agent = subprocess.Popen(self.hosts.run_in(ns, argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
            send = subprocess.Popen(self.hosts.run_in(ns, [PY, "-c", SEND, BK_ADDR,
                                                           str(SINK_PORT)]),
                                    stdin=agent.stdout)
            assert agent.stdout is not None
            agent.stdout.close()  # the sender holds it now
            result = None
            try:
                if during:
                    self.export(self._filter_node(agent))
                    result = fio(self.hosts, self.fio_uri, runtime)
                    self.unexport()
                    if agent.poll() is not None:
                        raise SystemExit("the backup ended before fio did: lower --runtime")
            finally:
                err = agent.stderr.read() if agent.stderr else b""
                code = agent.wait(600)
                send.wait(600)
            seconds = time.monotonic() - start
            if code != 0:
                raise SystemExit(f"the backup ({placement}) failed: {err.decode().strip()}")
            got = int(sink.stdout.readline())
            if got < self.size:
                raise SystemExit(f"the sink got only {got} bytes")
            return seconds, result
        finally:
            sink.terminate()
            sink.wait()

    def _filter_node(self, agent: subprocess.Popen[bytes]) -> str:
        for _ in range(1500):
            names = [n["node-name"] for n in self.vm.qmp.execute("query-named-block-nodes")]
            found = [n for n in names if n.startswith("ba-") and n.endswith("-cbw")]
            # The snapshot view comes after the device was switched onto the filter.
            if found and any(n.startswith("ba-") and n.endswith("-snap") for n in names):
                return found[0]
            if agent.poll() is not None:
                break
            time.sleep(0.02)
        agent.kill()
        raise SystemExit("the agent's copy-before-write filter never appeared: "
                         f"{agent.stderr.read().decode().strip() if agent.stderr else ''}")


class Link:
    """The delaying bridge between the two hosts; restarted for each delay, stopped by pid."""

    def __init__(self, hosts: TwoHosts) -> None:
        self.hosts = hosts
        self.proc: subprocess.Popen[str] | None = None

    def delay(self, ms: float) -> None:
        self.close()
        assert self.hosts.mid is not None
        self.proc = subprocess.Popen(self.hosts.run_in(self.hosts.mid, [
            PY, BRIDGE, *self.hosts.mid_devs, str(ms)]), stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the delaying bridge did not start")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=6, help="seconds of fio per run (6)")
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.runtime = 1, 1
    size = 512 * MiB if args.smoke else GiB
    work = Path(tempfile.mkdtemp(prefix="ba-net-"))
    tput: dict[tuple[str, int], list[float]] = {}
    lat: dict[tuple[str, int], list[Fio]] = {}
    alone: list[Fio] = []
    try:
        disk = work / "vm.raw"
        with open(disk, "wb") as f:
            block = os.urandom(16 * MiB)
            for _ in range(size // len(block)):
                f.write(block)
        os.sync()
        pki = make_pki(work / "pki")
        with two_hosts(bridged=True) as hosts, VmFactory(work) as vms, ExitStack() as stack:
            link = Link(hosts)
            stack.callback(link.close)
            vm = vms.start(netns=hosts.hv, extra_args=[
                *qemu_tls_args(pki, QMP_PORT),
                "-blockdev", json.dumps({"driver": "file", "node-name": "vda-file",
                                         "filename": str(disk)}),
                "-blockdev", json.dumps({"driver": "raw", "node-name": "vda-fmt",
                                         "file": "vda-file"}),
                # share-rw: the device lets our export write beside it (the "guest")
                "-device", "virtio-blk-pci,drive=vda-fmt,id=vda,share-rw=on"])
            vm.qmp.execute("nbd-server-start", {
                "addr": {"type": "inet", "data": {"host": HV_ADDR, "port": str(NBD_PORT)}},
                "tls-creds": "backup-psk"})
            bench = Bench(work, hosts, pki, vm, size)
            stack.callback(bench.close)
            for _ in range(args.runs):
                bench.export("vda-fmt")
                alone.append(fio(hosts, bench.fio_uri, args.runtime))
                bench.unexport()
                for delay in DELAYS:
                    link.delay(delay)
                    for placement in PLACEMENTS:
                        key = (placement, delay)
                        seconds, _ = bench.backup(placement, 0, False, args.runtime)
                        tput.setdefault(key, []).append(size / MiB / seconds)
                        _, during = bench.backup(placement, RATE, True, args.runtime)
                        assert during is not None
                        lat.setdefault(key, []).append(during)
            vm.qmp.execute("nbd-server-stop")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(runs: list[Fio]) -> Fio:
        return Fio(*(statistics.median(getattr(r, f) for r in runs)
                     for f in ("mib_s", "p50_ms", "p99_ms")))

    base = med(alone)
    print(f"\nplugin next to QEMU (agent on the hypervisor) vs on the backup server: "
          f"{os.cpu_count()} cores, a link delayed each way by bench/delay_bridge.py, "
          f"medians of {args.runs} runs\n")
    print(f"guest without a backup: {base.mib_s:.0f} MiB/s, p50 {base.p50_ms:.2f} ms, "
          f"p99 {base.p99_ms:.2f} ms (fio randwrite 64 KiB, depth {DEPTH})\n")
    print(f"| {'agent, plugin on':<16} | {'delay':>5} | {'RTT':>5} | {'backup MiB/s':>12} | "
          f"{'guest MiB/s':>11} | {'vs none':>7} | {'p50 ms':>6} | {'p99 ms':>7} |")
    print(f"|{'-' * 18}|{'-' * 7}|{'-' * 7}|{'-' * 14}|{'-' * 13}|{'-' * 9}|{'-' * 8}|"
          f"{'-' * 9}|")
    for delay in DELAYS:
        for placement in PLACEMENTS:
            key = (placement, delay)
            t, g = statistics.median(tput[key]), med(lat[key])
            print(f"| {placement:<16} | {delay:>3}ms | {2 * delay:>3}ms | {t:>12.0f} | "
                  f"{g.mib_s:>11.0f} | {g.mib_s / base.mib_s:>6.2f}x | {g.p50_ms:>6.2f} | "
                  f"{g.p99_ms:>7.2f} |")
    print("\nbackup server / hypervisor:\n")
    print(f"| {'delay':>5} | {'backup throughput':>17} | {'guest MiB/s':>11} | "
          f"{'guest p50':>9} | {'guest p99':>9} |")
    print(f"|{'-' * 7}|{'-' * 19}|{'-' * 13}|{'-' * 11}|{'-' * 11}|")
    for delay in DELAYS:
        hv, bk = ("hypervisor", delay), ("backup server", delay)
        th, tb = statistics.median(tput[hv]), statistics.median(tput[bk])
        gh, gb = med(lat[hv]), med(lat[bk])
        print(f"| {delay:>3}ms | {tb / th:>16.2f}x | {gb.mib_s / gh.mib_s:>10.2f}x | "
              f"{gb.p50_ms / gh.p50_ms:>8.2f}x | {gb.p99_ms / gh.p99_ms:>8.2f}x |")
    if args.smoke:
        print(SMOKE_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
