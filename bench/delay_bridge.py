#!/usr/bin/env python3
"""A userspace Ethernet bridge between two interfaces that delays every frame, in each
direction: netem's ``delay`` for kernels without ``sch_netem`` (such as this project's
machines, which have no kernel modules at all).

    python bench/delay_bridge.py IFACE_A IFACE_B DELAY_MS

Frames are read and written with packet sockets carrying a virtio-net header
(``PACKET_VNET_HDR``), passed through unchanged: checksum offload and GSO metadata survive, so
veth's large segments cross whole and the receiving stack checks no checksum twice. One thread
per direction; each frame leaves DELAY_MS after it arrived, in order. It runs until killed
(SIGTERM) and prints ``ready`` once both sockets are open.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import sys
import threading
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
MAX_FRAME = 10 + 65536 + 14 + 64  # virtio-net header + the largest GSO frame


def _open(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    s.bind((iface, 0))
    return s


def _forward(src: socket.socket, dst: socket.socket, delay: float) -> None:
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()

    def send() -> None:
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, frame = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            # A frame the other side cannot take is a lost frame, as on a wire.
            with contextlib.suppress(OSError):
                dst.send(frame)

    threading.Thread(target=send, daemon=True).start()
    while True:
        frame, addr = src.recvfrom(MAX_FRAME)
        if addr[2] == PACKET_OUTGOING:  # what we sent ourselves on this interface
            continue
        with ready:
            queue.append((time.monotonic() + delay, frame))
            ready.notify()


def main() -> int:
    a, b, ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sa, sb = _open(a), _open(b)
    threading.Thread(target=_forward, args=(sa, sb, ms / 1000), daemon=True).start()
    print("ready", flush=True)
    _forward(sb, sa, ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
