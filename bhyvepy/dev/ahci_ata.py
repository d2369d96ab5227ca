"""Decoding of ATA commands from a host-to-device register FIS, and the data
of the ATA logs bhyve's AHCI disks serve.

A register FIS (SATA 3.x, 10.5.5) holds the command in byte 2, features
in bytes 3 / 11, LBA in bytes 4-6 / 8-10, device in byte 7 and the count in
bytes 12-13.  NCQ commands keep their sector count in the features bytes
and their tag in the count.  These helpers turn a FIS into numbers; the
port decides what to do with them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bhyvepy.dev.ahci_defs import (ATA_DATA_SET_MANAGEMENT, ATA_DSM_TRIM, ATA_NCQ, ATA_RW_48,
                                   ATA_RW_WRITE, ATA_SEND_FPDMA_QUEUED, ATA_SFPDMA_DSM)

#: The log pages bhyve serves.
LOG_DIRECTORY = 0x00
LOG_NCQ_ERROR = 0x10
LOG_NCQ_SEND_RECV = 0x13
LOG_PAGE_SIZE = 512
#: One DSM range entry: 48-bit LBA and 16-bit sector count.
DSM_ENTRY = 8
DSM_BLOCK = 512


@dataclass(frozen=True)
class RwParams:
    """A sector read/write as the FIS describes it (bytes, not sectors)."""

    offset: int
    length: int
    write: bool
    ncq: bool


def lba48(cfis: bytes) -> int:
    return (cfis[10] << 40 | cfis[9] << 32 | cfis[8] << 24 | cfis[6] << 16
            | cfis[5] << 8 | cfis[4])


def rw_params(cfis: bytes, sector_size: int) -> RwParams:
    """Offset and length of READ/WRITE [DMA|MULTIPLE] [EXT] and FPDMA QUEUED.

    A count of zero means the maximum: 256 sectors for 28-bit commands,
    65536 for 48-bit and NCQ ones.
    """
    cmd = cfis[2]
    ncq = cmd in ATA_NCQ
    if ncq:
        lba, count = lba48(cfis), cfis[11] << 8 | cfis[3]
        count = count or 65536
    elif cmd in ATA_RW_48:
        lba, count = lba48(cfis), cfis[13] << 8 | cfis[12]
        count = count or 65536
    else:
        lba = (cfis[7] & 0xF) << 24 | cfis[6] << 16 | cfis[5] << 8 | cfis[4]
        count = cfis[12] or 256
    return RwParams(lba * sector_size, count * sector_size, cmd in ATA_RW_WRITE, ncq)


def is_trim(cfis: bytes) -> bool:
    """DATA SET MANAGEMENT / SEND FPDMA QUEUED (DSM) with TRIM and one
    512-byte block of ranges -- the only form bhyve accepts."""
    cmd = cfis[2]
    if cmd == ATA_DATA_SET_MANAGEMENT:
        return cfis[11] == 0 and cfis[3] == ATA_DSM_TRIM and cfis[13] == 0 and cfis[12] == 1
    if cmd == ATA_SEND_FPDMA_QUEUED:
        return ((cfis[13] & 0x1F) == ATA_SFPDMA_DSM and cfis[17] == 0
                and cfis[16] == ATA_DSM_TRIM and cfis[11] == 0 and cfis[3] == 1)
    return False


def dsm_length(cfis: bytes) -> int:
    """Bytes of range entries the command announces."""
    if cfis[2] == ATA_DATA_SET_MANAGEMENT:
        return (cfis[13] << 8 | cfis[12]) * DSM_BLOCK
    return (cfis[11] << 8 | cfis[3]) * DSM_BLOCK


def dsm_entry(buf: bytes, pos: int) -> tuple[int, int]:
    """(lba, sectors) of the range entry at ``pos``."""
    raw = buf[pos:pos + DSM_ENTRY].ljust(DSM_ENTRY, b"\0")
    value = struct.unpack("<Q", raw)[0]
    return value & 0xFFFFFFFFFFFF, value >> 48


def read_log_ok(cfis: bytes, prdtl: int) -> bool:
    """bhyve serves exactly one page of page 0 of a log, through a PRDT."""
    return prdtl != 0 and cfis[5] == 0 and cfis[9] == 0 and cfis[12] == 1 and cfis[13] == 0


def log_page(log: int, err_cfis: bytes, can_trim: bool) -> bytes | None:
    """Contents of log ``log`` page 0, or None when it does not exist."""
    buf = bytearray(LOG_PAGE_SIZE)
    if log == LOG_DIRECTORY:
        struct.pack_into("<H", buf, 0x00, 1)                  # version
        struct.pack_into("<H", buf, 2 * LOG_NCQ_ERROR, 1)     # one page each
        struct.pack_into("<H", buf, 2 * LOG_NCQ_SEND_RECV, 1)
    elif log == LOG_NCQ_ERROR:
        buf[:len(err_cfis)] = err_cfis
        buf[-1] = (-sum(buf[:-1])) & 0xFF
    elif log == LOG_NCQ_SEND_RECV:
        if can_trim:
            struct.pack_into("<II", buf, 0, 1, 1)             # DSM, and TRIM within it
    else:
        return None
    return bytes(buf)
