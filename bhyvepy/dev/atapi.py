"""SCSI (MMC) commands of bhyve's AHCI CD-ROM, as pure functions.

An ATAPI PACKET command carries a 12/16-byte SCSI CDB.  bhyve's drive is a
read-only DVD-ROM with one data track of 2048-byte blocks; it answers the
commands guests and firmware use to find and boot from it, and rejects the
rest with ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE (so a WRITE(10)
is refused exactly like any other unsupported opcode).  The replies are
bhyve's byte for byte, including its quirks: READ TOC takes the format from
the old location (bits 7-6 of byte 9) and the lead-out from the disk size
in 512-byte units divided by four; REQUEST SENSE reports the last error
without clearing it.

:func:`execute` decides; the port performs (writes the data through the
PRDT, starts the read, posts the status).  It never touches guest memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bhyvepy.dev.ahci_defs import (ASC_INVALID_FIELD, ASC_INVALID_OPCODE,
                                   ASC_REMOVAL_PREVENTED, ASC_SAVING_NOT_SUPPORTED,
                                   ATA_SENSE_ILLEGAL_REQUEST, CD_BLOCK,
                                   GET_EVENT_STATUS_NOTIFICATION, INQUIRY, MODE_SENSE_10,
                                   MODEPAGE_CD_CAPABILITIES, MODEPAGE_RW_ERROR_RECOVERY,
                                   PREVENT_ALLOW, READ_10, READ_12, READ_CAPACITY, READ_TOC,
                                   REPORT_LUNS, REQUEST_SENSE, START_STOP_UNIT,
                                   TEST_UNIT_READY)

VENDOR = "BHYVE"
PRODUCT = "BHYVE DVD-ROM"
REVISION = "001"
#: Peripheral type 5 (CD/DVD), removable, SPC-3-ish response data.
_INQUIRY_HEAD = bytes([0x05, 0x80, 0x00, 0x21, 31, 0, 0, 0])


@dataclass(frozen=True)
class Reply:
    """Success.  ``data`` goes to the host through the PRDT; ``None`` means
    the command has no data phase (the byte count is left alone)."""

    data: bytes | None = None


@dataclass(frozen=True)
class Fail:
    """CHECK CONDITION with this sense key and additional sense code."""

    key: int
    asc: int


@dataclass(frozen=True)
class Read:
    """Read ``length`` bytes at byte ``offset`` of the medium into the PRDT."""

    offset: int
    length: int


Outcome = Reply | Fail | Read


def _padded(text: str, length: int) -> bytes:
    return text.encode()[:length].ljust(length, b" ")


def lba_to_msf(lba: int) -> bytes:
    """Minute/second/frame of a logical block (2-second pre-gap of 150 frames)."""
    lba += 150
    return bytes([(lba // 75 // 60) & 0xFF, (lba // 75) % 60, lba % 75])


def _be16(b: bytes, off: int) -> int:
    return struct.unpack_from(">H", b, off)[0]


def _be32(b: bytes, off: int) -> int:
    return struct.unpack_from(">I", b, off)[0]


def _addr(msf: bool, lba: int) -> bytes:
    return b"\0" + lba_to_msf(lba) if msf else struct.pack(">I", lba & 0xFFFFFFFF)


def _invalid_field() -> Fail:
    return Fail(ATA_SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD)


def inquiry(acmd: bytes) -> Outcome:
    if acmd[1] & 1:                              # EVPD
        if acmd[2] != 0:
            return _invalid_field()
        buf = bytes([0x05, 0, 0, 1, 0])          # supported pages: page 0 only
    else:
        buf = (_INQUIRY_HEAD + _padded(VENDOR, 8) + _padded(PRODUCT, 16)
               + _padded(REVISION, 4))
    return Reply(buf[:acmd[4]])


def read_capacity(media_size: int) -> Outcome:
    last = (media_size // CD_BLOCK - 1) & 0xFFFFFFFF
    return Reply(struct.pack(">II", last, CD_BLOCK))


def read_toc(acmd: bytes, media_size: int, sector_size: int) -> Outcome:
    alloc = _be16(acmd, 7)
    fmt = acmd[9] >> 6
    msf = bool(acmd[1] & 2)
    leadout = (media_size // sector_size) >> 2
    if fmt == 0:
        start_track = acmd[6]
        if start_track > 1 and start_track != 0xAA:
            return _invalid_field()
        body = bytearray([1, 1])                 # first and last track
        if start_track <= 1:
            body += bytes([0, 0x14, 1, 0]) + _addr(msf, 0)
        body += bytes([0, 0x14, 0xAA, 0]) + _addr(msf, leadout)
    elif fmt == 1:                               # multi-session information
        return Reply(bytes([0, 0x0A, 1, 1]).ljust(12, b"\0")[:alloc])
    elif fmt == 2:                               # raw TOC
        body = bytearray([1, 1])
        for point in (0xA0, 0xA1):               # first / last track number
            body += bytes([1, 0x14, 0, point, 0, 0, 0, 0, 1, 0, 0])
        body += bytes([1, 0x14, 0, 0xA2, 0, 0, 0]) + _addr(msf, leadout)
        body += bytes([1, 0x14, 0, 1, 0, 0, 0]) + _addr(msf, 0)
    else:
        return _invalid_field()
    buf = struct.pack(">H", len(body)) + bytes(body)
    return Reply(buf[:alloc])


def request_sense(acmd: bytes, key: int, asc: int) -> Outcome:
    length = min(acmd[4], 64)
    buf = bytearray(64)
    buf[0] = 0x70 | 0x80                         # current error, valid
    buf[2] = key
    buf[7] = 10
    buf[12] = asc
    return Reply(bytes(buf[:length]))


def start_stop_unit(acmd: bytes) -> Outcome:
    if acmd[4] & 3 == 2:                         # eject: not possible
        return Fail(ATA_SENSE_ILLEGAL_REQUEST, ASC_REMOVAL_PREVENTED)
    return Reply()


def mode_sense(acmd: bytes) -> Outcome:
    alloc = _be16(acmd, 7)
    pc, code = acmd[2] >> 6, acmd[2] & 0x3F
    if pc == 3:
        return Fail(ATA_SENSE_ILLEGAL_REQUEST, ASC_SAVING_NOT_SUPPORTED)
    if pc != 0:
        return _invalid_field()
    if code == MODEPAGE_RW_ERROR_RECOVERY:
        buf = bytearray(16)
        buf[9] = 16 - 10
        buf[11] = 0x05
    elif code == MODEPAGE_CD_CAPABILITIES:
        buf = bytearray(30)
        buf[9] = 30 - 10
        buf[10] = 0x08                           # reads DVD-ROM
        buf[12] = 0x71
        buf[18:20] = struct.pack(">H", 2)
        buf[20:22] = struct.pack(">H", 512)
    else:
        return _invalid_field()
    buf[0:2] = struct.pack(">H", len(buf) - 2)
    buf[2] = 0x70                                # medium type
    buf[8] = code
    return Reply(bytes(buf[:alloc]))


def get_event_status(acmd: bytes) -> Outcome:
    if not acmd[1] & 1:                          # only polled operation
        return _invalid_field()
    buf = bytes([0, 8 - 2, 0x04, 0x10, 0, 0x02, 0, 0])   # media class: media present
    return Reply(buf[:_be16(acmd, 7)])


def read(acmd: bytes) -> Outcome:
    lba = _be32(acmd, 2)
    count = _be16(acmd, 7) if acmd[0] == READ_10 else _be32(acmd, 6)
    if count == 0:
        return Reply()
    return Read(lba * CD_BLOCK, count * CD_BLOCK)


def execute(acmd: bytes, *, media_size: int, sector_size: int, sense: tuple[int, int]) -> Outcome:
    """What the drive does with CDB ``acmd`` (16 bytes)."""
    op = acmd[0]
    if op == TEST_UNIT_READY or op == PREVENT_ALLOW:
        return Reply()
    if op == INQUIRY:
        return inquiry(acmd)
    if op == READ_CAPACITY:
        return read_capacity(media_size)
    if op == READ_TOC:
        return read_toc(acmd, media_size, sector_size)
    if op == REPORT_LUNS:
        return Reply(bytes([0, 0, 0, 8]).ljust(16, b"\0"))
    if op == READ_10 or op == READ_12:
        return read(acmd)
    if op == REQUEST_SENSE:
        return request_sense(acmd, *sense)
    if op == START_STOP_UNIT:
        return start_stop_unit(acmd)
    if op == MODE_SENSE_10:
        return mode_sense(acmd)
    if op == GET_EVENT_STATUS_NOTIFICATION:
        return get_event_status(acmd)
    return Fail(ATA_SENSE_ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
