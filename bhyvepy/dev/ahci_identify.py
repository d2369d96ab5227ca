"""The 512-byte IDENTIFY (PACKET) DEVICE data of bhyve's AHCI disks and
CD-ROMs.

Guests size disks, choose LBA48, NCQ depth, TRIM and sector geometry from
these words, so they are exactly bhyve's ``ata_identify_init``: built once
when the HBA is created and never recomputed.  Because bhyve builds them
before its first port reset, the link speed, transfer mode and multiple
count it would fold in are still zero at that time, and so they are here.
Word numbers follow ATA8-ACS (FreeBSD's ``struct ata_params``).
"""

from __future__ import annotations

import struct

IDENT_SIZE = 512

# Word numbers.
W_CONFIG = 0
W_CYLINDERS = 1
W_HEADS = 3
W_SECTORS = 6
W_SERIAL = 10            # 20 bytes
W_REVISION = 23          # 8 bytes
W_MODEL = 27             # 40 bytes
W_SECTORS_INTR = 47
W_CAPABILITIES1 = 49
W_CAPABILITIES2 = 50
W_ATAVALID = 53
W_MULTI = 59
W_LBA_SIZE = 60          # 2 words
W_OBSOLETE62 = 62
W_MWDMAMODES = 63
W_APIOMODES = 64
W_MWDMAMIN = 65
W_MWDMAREC = 66
W_PIOBLIND = 67
W_PIOIORDY = 68
W_SUPPORT3 = 69
W_QUEUE = 75
W_SATACAP = 76
W_SATACAP2 = 77
W_SATASUPPORT = 78
W_VERSION_MAJOR = 80
W_VERSION_MINOR = 81
W_SUPPORT_CMD1 = 82
W_SUPPORT_CMD2 = 83
W_SUPPORT_EXT = 84
W_ENABLED_CMD1 = 85
W_ENABLED_CMD2 = 86
W_ENABLED_EXT = 87
W_UDMAMODES = 88
W_LBA48 = 100            # 4 words
W_MAX_DSM_BLOCKS = 105
W_PSS = 106
W_LSS = 117              # 2 words
W_SUPPORT2 = 119
W_ENABLED2 = 120
W_SUPPORT_DSM = 169
W_LSALIGN = 209
W_ROTATION_RATE = 217
W_TRANSPORT_MAJOR = 222
W_INTEGRITY = 255

# Bits.
ATA_PROTO_ATAPI = 0x8000
ATA_ATAPI_TYPE_CDROM = 0x0500
ATA_ATAPI_REMOVABLE = 0x0080
ATA_DRQ_FAST = 0x0040
ATA_SUPPORT_DMA = 0x0100
ATA_SUPPORT_LBA = 0x0200
ATA_SUPPORT_IORDY = 0x0800
ATA_FLAG_64_70 = 0x0002
ATA_FLAG_88 = 0x0004
ATA_MULTI_VALID = 0x0100
ATA_SUPPORT_RZAT = 0x0020
ATA_SUPPORT_DRAT = 0x4000
ATA_SATA_GEN1 = 0x0002
ATA_SATA_GEN2 = 0x0004
ATA_SATA_GEN3 = 0x0008
ATA_SUPPORT_NCQ = 0x0100
ATA_SUPPORT_NCQ_STREAM = 0x0010
ATA_SUPPORT_RCVSND_FPDMA_QUEUED = 0x0040
ATA_SUPPORT_POWERMGT = 0x0008
ATA_SUPPORT_PACKET = 0x0010
ATA_SUPPORT_WRITECACHE = 0x0020
ATA_SUPPORT_LOOKAHEAD = 0x0040
ATA_SUPPORT_RESET = 0x0200
ATA_SUPPORT_NOP = 0x4000
ATA_SUPPORT_ADDRESS48 = 0x0400
ATA_SUPPORT_FLUSHCACHE = 0x1000
ATA_SUPPORT_FLUSHCACHE48 = 0x2000
ATA_PSS_LSSABOVE512 = 0x1000
ATA_PSS_MULTLS = 0x2000
ATA_PSS_VALID_VALUE = 0x4000
ATA_SUPPORT_RWLOGDMAEXT = 0x0008
ATA_SUPPORT_DSM_TRIM = 0x0001
#: "Word is valid" marker: bit 14 set, bit 15 clear.
VALID = 1 << 14

DEFAULT_REVISION = "001"
DISK_MODEL = "BHYVE SATA DISK"
CDROM_MODEL = "BHYVE SATA DVD ROM"
#: NCQ queue depth - 1 (word 75): 32 tags.
NCQ_DEPTH_MINUS_1 = 31


def ata_string(text: str | bytes, length: int) -> bytes:
    """An ATA string field: space padded, truncated, bytes swapped per word
    (ATA strings are big-endian pairs inside little-endian words)."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    # bhyve copies up to the first NUL, as a C string.
    raw = raw.split(b"\0", 1)[0][:length].ljust(length, b" ")
    out = bytearray(length)
    out[0::2], out[1::2] = raw[1::2], raw[0::2]
    return bytes(out)


def checksum(buf: bytearray) -> None:
    """Make the 512 bytes sum to zero mod 256 (integrity word's high byte)."""
    buf[-1] = (-sum(buf[:-1])) & 0xFF


class IdentifyStrings:
    """Serial, firmware revision, model and rotation rate for one port."""

    __slots__ = ("serial", "revision", "model", "rotation_rate")

    def __init__(self, serial: str, revision: str = DEFAULT_REVISION, model: str = "",
                 rotation_rate: int = 0) -> None:
        self.serial = serial
        self.revision = revision
        self.model = model
        self.rotation_rate = rotation_rate & 0xFFFF


def _base(strings: IdentifyStrings) -> list[int]:
    words = [0] * (IDENT_SIZE // 2)
    for word, text, length in ((W_SERIAL, strings.serial, 20),
                               (W_REVISION, strings.revision, 8),
                               (W_MODEL, strings.model, 40)):
        words[word:word + length // 2] = struct.unpack(f"<{length // 2}H", ata_string(text, length))
    words[W_ROTATION_RATE] = strings.rotation_rate
    # Timing words every bhyve device reports.
    words[W_ATAVALID] = ATA_FLAG_64_70 | ATA_FLAG_88
    words[W_MWDMAMODES] = 0x7
    words[W_APIOMODES] = 0x3
    words[W_MWDMAMIN] = words[W_MWDMAREC] = words[W_PIOBLIND] = words[W_PIOIORDY] = 0x0078
    words[W_VERSION_MAJOR] = 0x03F0          # ATA/ATAPI-4 .. ACS-2
    words[W_UDMAMODES] = 0x7F
    words[W_TRANSPORT_MAJOR] = 0x1020        # Serial ATA, SATA 2.6
    words[W_INTEGRITY] = 0x00A5              # signature; checksum goes in the high byte
    return words


def _finish(words: list[int]) -> bytes:
    buf = bytearray(struct.pack("<256H", *(w & 0xFFFF for w in words)))
    checksum(buf)
    return bytes(buf)


def identify_disk(strings: IdentifyStrings, *, size: int, sector_size: int,
                  physical_sector: tuple[int, int], chs: tuple[int, int, int],
                  can_delete: bool, read_only: bool) -> bytes:
    """IDENTIFY DEVICE data of an AHCI disk (bhyve's values)."""
    w = _base(strings)
    sectors = size // sector_size
    psectsz, psectoff = physical_sector
    cyl, heads, secpt = chs
    w[W_CONFIG] = ATA_DRQ_FAST
    w[W_CYLINDERS], w[W_HEADS], w[W_SECTORS] = cyl, heads, secpt
    w[W_SECTORS_INTR] = 0x8000 | 128
    w[W_CAPABILITIES1] = ATA_SUPPORT_DMA | ATA_SUPPORT_LBA | ATA_SUPPORT_IORDY
    w[W_CAPABILITIES2] = VALID
    if sectors <= 0x0FFFFFFF:
        w[W_LBA_SIZE], w[W_LBA_SIZE + 1] = sectors & 0xFFFF, (sectors >> 16) & 0xFFFF
    else:
        w[W_LBA_SIZE], w[W_LBA_SIZE + 1] = 0xFFFF, 0x0FFF
    w[W_QUEUE] = NCQ_DEPTH_MINUS_1
    w[W_SATACAP] = ATA_SATA_GEN1 | ATA_SATA_GEN2 | ATA_SATA_GEN3 | ATA_SUPPORT_NCQ
    w[W_SATACAP2] = ATA_SUPPORT_RCVSND_FPDMA_QUEUED
    w[W_VERSION_MINOR] = 0x28
    cmd1 = ATA_SUPPORT_POWERMGT | ATA_SUPPORT_WRITECACHE | ATA_SUPPORT_LOOKAHEAD | ATA_SUPPORT_NOP
    cmd2 = ATA_SUPPORT_ADDRESS48 | ATA_SUPPORT_FLUSHCACHE | ATA_SUPPORT_FLUSHCACHE48
    w[W_SUPPORT_CMD1] = w[W_ENABLED_CMD1] = cmd1
    w[W_SUPPORT_CMD2] = cmd2 | VALID
    w[W_ENABLED_CMD2] = cmd2 | 1 << 15
    w[W_SUPPORT_EXT] = w[W_ENABLED_EXT] = VALID
    for i in range(4):
        w[W_LBA48 + i] = (sectors >> (16 * i)) & 0xFFFF
    if can_delete and not read_only:
        w[W_SUPPORT3] |= ATA_SUPPORT_RZAT | ATA_SUPPORT_DRAT
        w[W_MAX_DSM_BLOCKS] = 1
        w[W_SUPPORT_DSM] = ATA_SUPPORT_DSM_TRIM
    w[W_PSS] = ATA_PSS_VALID_VALUE
    w[W_LSALIGN] = VALID
    if psectsz > sector_size:
        ratio = psectsz // sector_size
        w[W_PSS] |= ATA_PSS_MULTLS | ((ratio & -ratio).bit_length() - 1)
        w[W_LSALIGN] |= psectoff // sector_size
    if sector_size > 512:
        w[W_PSS] |= ATA_PSS_LSSABOVE512
        words = sector_size // 2
        w[W_LSS], w[W_LSS + 1] = words & 0xFFFF, (words >> 16) & 0xFFFF
    w[W_SUPPORT2] = w[W_ENABLED2] = ATA_SUPPORT_RWLOGDMAEXT | VALID
    return _finish(w)


def identify_cdrom(strings: IdentifyStrings) -> bytes:
    """IDENTIFY PACKET DEVICE data of an AHCI CD/DVD drive (bhyve's values)."""
    w = _base(strings)
    w[W_CONFIG] = ATA_PROTO_ATAPI | ATA_ATAPI_TYPE_CDROM | ATA_ATAPI_REMOVABLE | ATA_DRQ_FAST
    w[W_CAPABILITIES1] = ATA_SUPPORT_LBA | ATA_SUPPORT_DMA
    w[W_CAPABILITIES2] = VALID | 1
    w[W_OBSOLETE62] = 0x3F
    w[W_SATACAP] = ATA_SATA_GEN1 | ATA_SATA_GEN2 | ATA_SATA_GEN3
    w[W_SATASUPPORT] = ATA_SUPPORT_NCQ_STREAM
    cmd1 = ATA_SUPPORT_POWERMGT | ATA_SUPPORT_PACKET | ATA_SUPPORT_RESET | ATA_SUPPORT_NOP
    w[W_SUPPORT_CMD1] = w[W_ENABLED_CMD1] = cmd1
    w[W_SUPPORT_CMD2] = VALID
    w[W_SUPPORT_EXT] = w[W_ENABLED_EXT] = VALID
    return _finish(w)


def word(ident: bytes, n: int) -> int:
    """Word ``n`` of IDENTIFY data."""
    return struct.unpack_from("<H", ident, 2 * n)[0]


def text(ident: bytes, first_word: int, length: int) -> str:
    """An ATA string field back as text (trailing blanks removed)."""
    raw = ident[2 * first_word:2 * first_word + length]
    out = bytearray(length)
    out[0::2], out[1::2] = raw[1::2], raw[0::2]
    return out.decode("latin-1").rstrip(" ")


def capacity(ident: bytes) -> int:
    """LBA48 sector count of disk IDENTIFY data."""
    return sum(word(ident, W_LBA48 + i) << (16 * i) for i in range(4))
