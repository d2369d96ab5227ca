"""The host's model of tests/guests/iostress.c: what it writes, reads and prints.

iostress is deterministic: iteration i writes sector (i mod SECTORS) of
virtio-blk disks 0 and 1 with a pattern that depends only on (disk, i),
reads both back, and folds what it read into a running checksum that it
prints as "ITER <i> <checksum>".  A snapshot test can therefore check, after
any number of iterations (with or without a suspend/resume in between),
that the printed checksums and the image files are exactly what an
uninterrupted run gives.  Pure stdlib; keep in step with iostress.c.
"""

from __future__ import annotations

import struct

ITERATIONS = 200        # IOSTRESS_ITERATIONS in iostress.c
SECTORS = 16            # IOSTRESS_SECTORS: LBAs 0..15 of each disk
SECTOR_SIZE = 512
CD_BLOCK = 2048
CD_CYCLE = 16           # IOSTRESS_CD_CYCLE: CD blocks read in turn
MAGIC = b"IOSTRESS"
FNV32_INIT = 0x811C9DC5
FNV32_PRIME = 0x01000193
SEED_MUL = 0x9E3779B1


def _fnv32_words(h: int, data: bytes) -> int:
    for (w,) in struct.iter_unpack("<I", data):
        h = ((h ^ w) * FNV32_PRIME) & 0xFFFFFFFF
    return h


def lba(iteration: int) -> int:
    """The sector iteration ITERATION writes on both disks."""
    return iteration % SECTORS


def sector(disk: int, iteration: int) -> bytes:
    """The 512 bytes iteration ITERATION writes to disk DISK (0 or 1)."""
    x = ((iteration * 2 + disk + 1) * SEED_MUL) & 0xFFFFFFFF or 1
    words = []
    for _ in range((SECTOR_SIZE - 16) // 4):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        words.append(x)
    return MAGIC + struct.pack("<II", iteration & 0xFFFFFFFF, disk) + struct.pack(
        f"<{len(words)}I", *words)


def checksums(iterations: int = ITERATIONS) -> list[int]:
    """The checksum printed on each "ITER i" line, for i in range(ITERATIONS)."""
    h = FNV32_INIT
    out = []
    for i in range(iterations):
        h = _fnv32_words(h, sector(0, i))
        h = _fnv32_words(h, sector(1, i))
        out.append(h)
    return out


def disk_contents(disk: int, iterations: int = ITERATIONS) -> dict[int, bytes]:
    """LBA -> bytes of every sector iostress has written after ITERATIONS iterations.

    Sectors never written (fewer than SECTORS iterations) are absent: the
    guest leaves them as they were.
    """
    return {lba(i): sector(disk, i) for i in range(max(0, iterations - SECTORS), iterations)}


def cd_block(iteration: int, cd_blocks: int) -> int:
    """The CD block iteration ITERATION reads (when a CD is attached)."""
    return iteration % min(cd_blocks, CD_CYCLE)


def cd_checksum(image: bytes, iterations: int = ITERATIONS) -> int:
    """The value of the "IOSTRESS CD ... fnv=" line for the first CD's IMAGE."""
    blocks = len(image) // CD_BLOCK
    h = FNV32_INIT
    for i in range(iterations):
        b = cd_block(i, blocks)
        h = _fnv32_words(h, image[b * CD_BLOCK:(b + 1) * CD_BLOCK])
    return h
