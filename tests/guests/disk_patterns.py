"""What the disk-writing guests leave on their disks, and the checksums they print.

The host side of tests/guests/virtio_blk.c, ahci.c and the CD reads in ahci.c
and iostress.c: a test builds images, boots a guest, then compares the image
files (or the printed checksums) with these functions.  Pure stdlib; the
layouts are described in README.md.
"""

from __future__ import annotations

import struct

SECTOR_SIZE = 512
CD_BLOCK = 2048
TAG_LEN = 16
VBLK_TAG = "bhyvepy-vblk"
AHCI_TAG = "bhyvepy-ahci"
HEAD_SECTORS = 4
FNV32_INIT = 0x811C9DC5
FNV32_PRIME = 0x01000193
AHCI_PORTS_PER_HBA = 32
CD_PVD_LBA = 16
CD_READ_BLOCKS = 4


def sector_pattern(tag: str, disk: int, lba: int) -> bytes:
    """The 512 bytes the guests write to sector LBA of disk number DISK."""
    head = tag.encode("ascii")[:TAG_LEN].ljust(TAG_LEN, b" ")
    head += struct.pack("<IQ", disk & 0xFFFFFFFF, lba & 0xFFFFFFFFFFFFFFFF)
    start = 28 + 7 * disk + 13 * lba
    return head + bytes((start + i) & 0xFF for i in range(SECTOR_SIZE - len(head)))


def written_sectors(capacity: int) -> list[int]:
    """LBAs virtio_blk and ahci write on a disk of CAPACITY sectors."""
    return list(range(HEAD_SECTORS)) + [capacity - 1]


def vblk_expected(disk: int, capacity: int) -> dict[int, bytes]:
    """Sector contents virtio_blk leaves on its DISK-th disk (slot order)."""
    return {lba: sector_pattern(VBLK_TAG, disk, lba) for lba in written_sectors(capacity)}


def ahci_disk_number(hba: int, port: int) -> int:
    """The DISK value ahci uses for a port: 32 * HBA index (slot order) + port."""
    return hba * AHCI_PORTS_PER_HBA + port


def ahci_expected(hba: int, port: int, capacity: int) -> dict[int, bytes]:
    """Sector contents ahci leaves on the SATA disk at PORT of the HBA-th HBA."""
    disk = ahci_disk_number(hba, port)
    return {lba: sector_pattern(AHCI_TAG, disk, lba) for lba in written_sectors(capacity)}


def fnv32_words(data: bytes, h: int = FNV32_INIT) -> int:
    """FNV-1a over little-endian 32-bit words (len(data) must be a multiple of 4)."""
    if len(data) % 4:
        raise ValueError("length must be a multiple of 4")
    for (w,) in struct.iter_unpack("<I", data):
        h = ((h ^ w) * FNV32_PRIME) & 0xFFFFFFFF
    return h


def cd_reads(image: bytes) -> list[tuple[int, int, int, str]]:
    """The "cd read" lines ahci prints for a CD image: (lba, blocks, fnv, head-hex)."""
    blocks = len(image) // CD_BLOCK
    first = CD_PVD_LBA if blocks >= CD_PVD_LBA + CD_READ_BLOCKS else 0
    out = []
    for lba, n in ((first, min(blocks, CD_READ_BLOCKS)), (blocks - 1, 1)):
        data = image[lba * CD_BLOCK:(lba + n) * CD_BLOCK]
        out.append((lba, n, fnv32_words(data), data[:16].hex()))
    return out


def check_image(image: bytes, expected: dict[int, bytes]) -> list[int]:
    """LBAs whose contents in IMAGE differ from EXPECTED (empty if all match)."""
    return [lba for lba, want in sorted(expected.items())
            if image[lba * SECTOR_SIZE:(lba + 1) * SECTOR_SIZE] != want]
