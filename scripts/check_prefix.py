#!/usr/bin/env python3
"""Is a disk image a prefix state of the demo guest's write sequence? (scripts/demo-live.sh)

The guest writes blocks 0, 1, 2... of BLOCK_SIZE bytes in order, each on the disk before the
next starts; every 512-byte sector of block i reads ``BA-SEQ block i`` padded with spaces and
a newline. A disk image taken at one point in time must then be, for some k, blocks 0..k-1
new and everything from block k on exactly as in BEFORE (the disk before the guest ran).

    check_prefix.py IMAGE BEFORE --blocks N [--block-size BYTES] [--expect K]

Both files are raw images of the same size. Prints one line and exits 0 when IMAGE is such a
state (and, with --expect, k == K); otherwise says which block is wrong and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys


def new_block(i: int, block_size: int) -> bytes:
    """What the guest writes as block ``i``."""
    return (f"BA-SEQ block {i}".ljust(511) + "\n").encode() * (block_size // 512)


def describe(data: bytes) -> str:
    text = data[:32].decode("ascii", errors="replace").rstrip()
    if data.count(data[:1]) == len(data):
        return f"all bytes {data[0]:#04x}"
    return f"starting {text!r}"


def check(image: str, before: str, blocks: int, block_size: int) -> tuple[int, str | None]:
    """(k, None) when ``image`` is blocks 0..k-1 new and the rest as ``before``; otherwise
    (k so far, why not)."""
    size = os.path.getsize(image)
    if size != os.path.getsize(before):
        return 0, f"{image} has {size} bytes, {before} {os.path.getsize(before)}"
    if blocks * block_size > size:
        return 0, f"{blocks} blocks of {block_size} bytes do not fit in {size} bytes"
    k = 0
    with open(image, "rb") as img, open(before, "rb") as old:
        i = 0
        while True:
            got, was = img.read(block_size), old.read(block_size)
            if not got:
                return k, None
            if i == k and i < blocks and got == new_block(i, block_size):
                k += 1
            elif got != was:
                if i < blocks and got == new_block(i, block_size):
                    why = "new, but block {k} before it is not"
                else:
                    why = f"neither the guest's block {i} nor as before ({describe(got)})"
                return k, f"block {i} is {why.format(k=k)}: blocks 0..{k - 1} are new"
            i += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="the raw image to check (e.g. a restored disk)")
    p.add_argument("before", help="the raw image of the disk before the guest wrote")
    p.add_argument("--blocks", type=int, required=True, help="blocks in the guest's sequence")
    p.add_argument("--block-size", type=int, default=65536, help="bytes per block (65536)")
    p.add_argument("--expect", type=int, help="the k the image must show")
    args = p.parse_args()
    k, why = check(args.image, args.before, args.blocks, args.block_size)
    if why is not None:
        print(f"NOT consistent: {why}")
        return 1
    new = f"blocks 0..{k - 1} new" if k else "no block new"
    print(f"{new}, {k}.. old: consistent at block {k} of {args.blocks}")
    if args.expect is not None and k != args.expect:
        print(f"but block {args.expect} of {args.blocks} was expected")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
