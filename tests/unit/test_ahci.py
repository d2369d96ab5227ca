"""The AHCI HBA driven through its ABAR like a guest driver: command lists,
command tables and PRDTs built in guest RAM, disks and CD-ROMs backed by
real files, completions arriving from the block backend's worker threads."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bhyvepy.block import _fallocate, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from bhyvepy.dev import ahci_identify as ident
from bhyvepy.dev.ahci import Ahci, AhciState
from bhyvepy.dev.ahci_port import AhciPortState
from bhyvepy.dev.hostbridge import HostBridge
from bhyvepy.snapshot.state import StateError, decode, encode, strategy

from pci_testkit import Machine
from virtio_driver import Allocator, make_memory

RAM = (0x100000, 0x400000)          # 4 MiB of RAM at 1 MiB, nothing around it
SLOT = 4

# Registers.
CAP, GHC, IS, PI, VS, CAP2 = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x24
P_CLB, P_CLBU, P_FB, P_FBU, P_IS, P_IE, P_CMD = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18
P_TFD, P_SIG, P_SSTS, P_SCTL, P_SERR, P_SACT, P_CI = 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38
CMD_ST, CMD_FRE, CMD_FR, CMD_CR = 0x1, 0x10, 0x4000, 0x8000
IX_DHR, IX_PS, IX_SDB, IX_TFE = 0x1, 0x2, 0x8, 0x40000000
TFD_ERR, TFD_BSY = 0x01, 0x80

# ATA commands.
IDENTIFY, IDENTIFY_PACKET, PACKET = 0xEC, 0xA1, 0xA0
READ_DMA, WRITE_DMA, READ_DMA_EXT, WRITE_DMA_EXT = 0xC8, 0xCA, 0x25, 0x35
READ_FPDMA, WRITE_FPDMA, SEND_FPDMA = 0x60, 0x61, 0x64
FLUSH_EXT, DSM, READ_LOG_EXT, SET_FEATURES, SET_MULTI = 0xEA, 0x06, 0x2F, 0xEF, 0xC6
IDLE_IMMEDIATE, SMART, CHECK_POWER = 0xE1, 0xB0, 0xE5

SECTOR = 512
CD_BLOCK = 2048


# ============================================================================
# a small guest driver
# ============================================================================
def h2d(cmd: int, lba: int = 0, count: int = 0, features: int = 0, device: int = 0x40,
        control: int = 0, c: bool = True, aux: int = 0) -> bytes:
    """A register host-to-device FIS."""
    f = bytearray(20)
    f[0], f[1], f[2], f[3] = 0x27, 0x80 if c else 0, cmd, features & 0xFF
    f[4:7] = (lba & 0xFFFFFF).to_bytes(3, "little")
    f[7] = device
    f[8:11] = ((lba >> 24) & 0xFFFFFF).to_bytes(3, "little")
    f[11] = (features >> 8) & 0xFF
    f[12], f[13] = count & 0xFF, (count >> 8) & 0xFF
    f[15] = control
    f[16:20] = aux.to_bytes(4, "little")
    return bytes(f)


class Driver:
    """Programs the HBA through BAR 5 and guest RAM."""

    def __init__(self, m: Machine, dev: Ahci, mem, alloc: Allocator) -> None:
        self.m, self.dev, self.mem, self.alloc = m, dev, mem, alloc
        self.base = m.bar_addr(dev, 5)
        self.clb: dict[int, int] = {}
        self.fb: dict[int, int] = {}
        self.ct: dict[tuple[int, int], int] = {}

    def r(self, off: int, size: int = 4) -> int:
        return self.m.dispatch.mmio_read(0, self.base + off, size)

    def w(self, off: int, value: int, size: int = 4) -> None:
        self.m.dispatch.mmio_write(0, self.base + off, size, value)

    def pr(self, port: int, off: int) -> int:
        return self.r(0x100 + 0x80 * port + off)

    def pw(self, port: int, off: int, value: int) -> None:
        self.w(0x100 + 0x80 * port + off, value)

    def buf(self, n: int, align: int = 2) -> int:
        return self.alloc.alloc(n, align)

    def start(self, port: int, ie: int = 0) -> None:
        """The usual driver sequence: stop, bases, clear errors, FRE, ST."""
        self.pw(port, P_CMD, 0)
        if port not in self.clb:
            self.clb[port] = self.buf(1024, 1024)
            self.fb[port] = self.buf(256, 256)
            for slot in range(32):
                self.ct[(port, slot)] = self.buf(0x80 + 16 * 256, 128)
        self.pw(port, P_CLB, self.clb[port])
        self.pw(port, P_CLBU, 0)
        self.pw(port, P_FB, self.fb[port])
        self.pw(port, P_FBU, 0)
        self.pw(port, P_SERR, 0xFFFFFFFF)
        self.pw(port, P_IS, 0xFFFFFFFF)
        self.pw(port, P_IE, ie)
        self.pw(port, P_CMD, CMD_FRE)
        self.pw(port, P_CMD, CMD_FRE | CMD_ST)

    def restart(self, port: int) -> None:
        """Error recovery: ST off (clears CI and the error stop), then on."""
        self.pw(port, P_CMD, CMD_FRE)
        assert not self.pr(port, P_CMD) & CMD_CR
        self.pw(port, P_IS, 0xFFFFFFFF)
        self.pw(port, P_CMD, CMD_FRE | CMD_ST)

    def prepare(self, port: int, slot: int, fis: bytes, prds=(), acmd: bytes = b"",
                write: bool = False, atapi: bool = False, ctba: int | None = None,
                prdtl: int | None = None) -> int:
        table = self.ct[(port, slot)] if ctba is None else ctba
        self.mem.write(table, fis.ljust(0x40, b"\0") + acmd.ljust(16, b"\0"))
        for i, (addr, n) in enumerate(prds):
            self.mem.write(table + 0x80 + 16 * i, struct.pack("<Q4xI", addr, n - 1))
        flags = 5 | (0x20 if atapi else 0) | (0x40 if write else 0)
        n = len(prds) if prdtl is None else prdtl
        self.mem.write(self.clb[port] + 32 * slot, struct.pack("<HHIQ", flags, n, 0, table))
        return table

    def issue(self, port: int, slot: int, fis: bytes, prds=(), *, ncq: bool = False, **kw) -> None:
        self.prepare(port, slot, fis, prds, **kw)
        if ncq:
            self.pw(port, P_SACT, 1 << slot)
        self.pw(port, P_CI, 1 << slot)

    def wait(self, port: int, mask: int, timeout: float = 10.0) -> int:
        """Wait until the slots in ``mask`` left CI and SACT or the port
        reported an error (ERR without BSY: a stale ERR stays in PxTFD while
        the next command runs); returns PxTFD."""
        end = time.monotonic() + timeout
        while True:
            tfd = self.pr(port, P_TFD)
            busy = (self.pr(port, P_CI) | self.pr(port, P_SACT)) & mask
            if not busy or tfd & (TFD_ERR | TFD_BSY) == TFD_ERR:
                return tfd
            if time.monotonic() > end:
                raise AssertionError(f"port {port}: slots {busy:#x} still busy, TFD {tfd:#x}")
            time.sleep(0.0005)

    def run(self, port: int, slot: int, fis: bytes, prds=(), **kw) -> int:
        self.issue(port, slot, fis, prds, **kw)
        return self.wait(port, 1 << slot)

    def prdbc(self, port: int, slot: int) -> int:
        return struct.unpack("<I", self.mem.read(self.clb[port] + 32 * slot + 4, 4))[0]

    def rfis(self, port: int, off: int, n: int) -> bytes:
        return self.mem.read(self.fb[port] + off, n)

    def packet(self, port: int, slot: int, cdb: bytes, prds=()) -> int:
        return self.run(port, slot, h2d(PACKET, features=1), prds, acmd=cdb, atapi=True)

    def sense(self, port: int) -> tuple[int, int]:
        b = self.buf(18)
        assert self.packet(port, 0, bytes([0x03, 0, 0, 0, 18, 0]), [(b, 18)]) & TFD_ERR == 0
        s = self.mem.read(b, 18)
        return s[2], s[12]


def disk_file(path, size: int = 1 << 20, fill: bytes | None = None):
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write((fill * (size // len(fill) + 1))[:size])
    return str(path)


def iso_file(path, blocks: int = 64):
    """2048-byte blocks, each tagged with its number and the file's name."""
    tag = os.path.basename(str(path)).encode()
    with open(path, "wb") as f:
        for i in range(blocks):
            f.write((struct.pack("<I", i) + tag).ljust(16, b".") * (CD_BLOCK // 16))
    return str(path)


def iso_block(path, i: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(i * CD_BLOCK)
        return f.read(CD_BLOCK)


def build(ports: dict[int, dict[str, str]], *, slot: int = SLOT):
    mem = make_memory(RAM)
    m = Machine(mem=mem)
    for n, values in ports.items():
        for k, v in values.items():
            m.tree.set_value(f"pci.0.{slot}.0.port.{n}.{k}", v)
    m.add(HostBridge, 0, 0, 0)
    dev = m.add(Ahci, 0, slot, 0)
    m.pci.finalize()
    return m, dev, Driver(m, dev, mem, Allocator(*RAM))


@pytest.fixture
def closing():
    devs: list[Ahci] = []
    yield devs.append
    for d in devs:
        d.close()


@pytest.fixture
def one_disk(tmp_path, closing):
    path = disk_file(tmp_path / "disk.img")
    m, dev, drv = build({0: {"type": "hd", "path": path}})
    closing(dev)
    drv.start(0)
    return m, dev, drv, path


# ============================================================================
# identity and HBA registers
# ============================================================================
def test_pci_identity_bar_and_msi(one_disk) -> None:
    m, dev, drv, _ = one_disk
    assert m.cfg1_read(0, SLOT, 0, 0x00, 4) == 0x2821_8086
    assert m.cfg1_read(0, SLOT, 0, 0x08, 4) >> 8 == 0x010601
    assert dev.bars[5].size == 0x2000                       # 0x100 + 32 * 0x80, rounded up
    for i in range(5):
        assert m.cfg1_read(0, SLOT, 0, 0x10 + 4 * i, 4) == 0
    assert dev.msi is not None and dev.msi.nvec == 16
    assert dev.msix is None and dev.intx_pin
    cap = drv.r(CAP)
    assert cap & 0x1F == 31                                 # 32 ports, as bhyve walks them all
    assert (cap >> 8) & 0x1F == 31                          # 32 command slots
    assert cap & 0x80000000 and cap & 0x40000000            # 64-bit, NCQ
    assert (cap >> 20) & 0xF == 3                           # Gen 3
    assert drv.r(PI) == 1 and drv.r(VS) == 0x10300 and drv.r(CAP2) == 0x4
    assert drv.r(GHC) == 0x80000000
    drv.w(CAP, 0)
    drv.w(PI, 0xFF)
    assert drv.r(CAP) == cap and drv.r(PI) == 1              # read-only
    assert drv.r(0x0E, 2) == 0 and drv.r(0x0C, 1) == 1       # narrow reads of PI
    assert drv.r(0x1FFC) == 0                               # beyond the last port


def test_hba_reset_and_port_registers(tmp_path, closing) -> None:
    m, dev, drv = build({0: {"type": "hd", "path": disk_file(tmp_path / "a")},
                         2: {"type": "cd", "path": iso_file(tmp_path / "b.iso")}})
    closing(dev)
    assert drv.r(PI) == 0b101
    assert drv.pr(0, P_SSTS) == 0x143 and drv.pr(0, P_SIG) == 0x101
    assert drv.pr(0, P_TFD) == 0x170                         # DRDY | DMA ready | DSC, error 1
    assert drv.pr(2, P_SIG) == 0xEB140101 and drv.pr(2, P_TFD) == 0x130
    assert drv.pr(1, P_SSTS) == 0 and drv.pr(1, P_SIG) == 0xFFFFFFFF and drv.pr(1, P_TFD) == 0x7F
    assert drv.pr(0, P_CMD) == 0x10006 and drv.pr(1, P_CMD) == 0x6
    drv.start(0, ie=0xFFFFFFFF)
    drv.w(GHC, 0x2)
    assert drv.r(GHC) == 0x80000002
    assert drv.pr(0, P_IE) == 0xFDC000FF                     # reserved bits dropped
    drv.pw(0, P_SERR, 0)
    drv.w(GHC, 0x1)                                         # HR
    assert drv.r(GHC) == 0x80000000 and drv.r(IS) == 0
    assert drv.pr(0, P_CMD) == 0x10006 and drv.pr(0, P_IE) == 0 and drv.pr(0, P_CI) == 0
    assert drv.pr(0, P_SSTS) == 0x143
    drv.pw(0, P_SSTS, 0)                                    # read-only
    drv.pw(0, P_SIG, 0)
    assert drv.pr(0, P_SSTS) == 0x143 and drv.pr(0, P_SIG) == 0x101
    drv.w(0x100, 0x1234, size=2)                            # only aligned dword writes count
    assert drv.pr(0, P_CLB) == drv.clb[0]                   # (HR keeps the bases)


def test_port_start_stop_and_comreset_posts_signature(tmp_path, closing) -> None:
    m, dev, drv = build({1: {"type": "cd", "path": iso_file(tmp_path / "c.iso")}})
    closing(dev)
    drv.start(1)
    cmd = drv.pr(1, P_CMD)
    assert cmd & (CMD_ST | CMD_CR | CMD_FRE | CMD_FR) == CMD_ST | CMD_CR | CMD_FRE | CMD_FR
    drv.pw(1, P_CMD, CMD_FRE)                               # stop
    assert not drv.pr(1, P_CMD) & (CMD_ST | CMD_CR)
    drv.pw(1, P_SCTL, 0x301)                                # COMRESET while stopped
    fis = drv.rfis(1, 0x40, 20)
    assert fis[0] == 0x34 and fis[3] == 1 and fis[4:7] == bytes([1, 0x14, 0xEB]) and fis[12] == 1
    drv.pw(1, P_SCTL, 0x300)
    assert drv.pr(1, P_SSTS) == 0x143


# ============================================================================
# ATA disks
# ============================================================================
def test_identify_device_data(tmp_path, closing) -> None:
    path = disk_file(tmp_path / "disk.img", 3 << 20)
    m, dev, drv = build({0: {"type": "hd", "path": path},
                         1: {"type": "hd", "path": disk_file(tmp_path / "e.img", 1 << 20),
                             "ser": "MYSERIAL42", "rev": "9.1", "model": "Some Disk",
                             "nmrr": "1", "sectorsize": "512/4096", "nodelete": "true"}})
    closing(dev)
    out = {}
    for port in (0, 1):
        drv.start(port, ie=0xFFFFFFFF)
        b = drv.buf(512)
        assert drv.run(port, 0, h2d(IDENTIFY), [(b, 512)]) == 0x50
        assert drv.prdbc(port, 0) == 512
        assert drv.pr(port, P_IS) & (IX_DHR | IX_PS) == IX_DHR  # bhyve's PIO setup has no I bit
        assert drv.rfis(port, 0x20, 2) == b"\x5f\x00"      # PIO setup FIS
        d = drv.rfis(port, 0x40, 20)
        assert d[0] == 0x34 and d[1] & 0x40 and d[2] == 0x50
        out[port] = drv.mem.read(b, 512)
    a, e = out[0], out[1]
    for data in (a, e):
        assert sum(data) % 256 == 0 and data[510] == 0xA5       # checksum, signature
        assert ident.word(data, 0) == 0x0040
        assert ident.word(data, 83) & 0x0400                    # LBA48
        assert ident.word(data, 75) == 31                       # 32 NCQ tags
        assert ident.word(data, 76) & 0x0100                    # NCQ
        assert ident.word(data, 49) & 0x0300 == 0x0300          # DMA, LBA
    assert ident.text(a, 27, 40) == "BHYVE SATA DISK"
    digest = hashlib.md5(path.encode()).digest()
    assert ident.text(a, 10, 20) == "BHYVE-%02X%02X-%02X%02X-%02X%02X" % tuple(digest[:6])
    assert ident.text(a, 23, 8) == "001"
    assert ident.capacity(a) == (3 << 20) // 512
    assert ident.word(a, 60) | ident.word(a, 61) << 16 == (3 << 20) // 512
    assert ident.word(a, 169) == 1 and ident.word(a, 105) == 1    # TRIM: a file can punch holes
    assert ident.word(a, 69) & 0x4020 == 0x4020
    assert ident.text(e, 10, 20) == "MYSERIAL42" and ident.text(e, 23, 8) == "9.1"
    assert ident.text(e, 27, 40) == "Some Disk" and ident.word(e, 217) == 1
    assert ident.word(e, 106) == 0x6003                      # 4096/512 = 2^3 per physical sector
    assert ident.word(e, 169) == 0 and ident.word(e, 69) == 0     # nodelete: no TRIM
    cyl, heads, secs = ident.word(a, 1), ident.word(a, 3), ident.word(a, 6)
    assert cyl * heads * secs <= (3 << 20) // 512 and heads and secs


def test_identify_4k_logical_sectors(tmp_path, closing) -> None:
    m, dev, drv = build({0: {"type": "hd", "path": disk_file(tmp_path / "d"),
                             "sectorsize": "4096"}})
    closing(dev)
    drv.start(0)
    b = drv.buf(512)
    assert drv.run(0, 3, h2d(IDENTIFY), [(b, 512)]) == 0x50
    data = drv.mem.read(b, 512)
    assert ident.word(data, 106) & 0x1000                    # logical sector > 512 bytes
    assert ident.word(data, 117) | ident.word(data, 118) << 16 == 2048     # in words
    assert ident.capacity(data) == (1 << 20) // 4096


def test_dma_write_then_read_and_file_bytes(one_disk) -> None:
    m, dev, drv, path = one_disk
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(8 * SECTOR))
    parts = [drv.buf(1000), drv.buf(2000), drv.buf(8 * SECTOR - 3000)]
    pos = 0
    for addr, n in zip(parts, (1000, 2000, 8 * SECTOR - 3000)):
        drv.mem.write(addr, pattern[pos:pos + n])
        pos += n
    prds = list(zip(parts, (1000, 2000, 8 * SECTOR - 3000)))
    assert drv.run(0, 5, h2d(WRITE_DMA_EXT, lba=10, count=8), prds, write=True) == 0x50
    assert drv.prdbc(0, 5) == 8 * SECTOR
    with open(path, "rb") as f:
        data = f.read()
    assert data[10 * SECTOR:18 * SECTOR] == pattern
    assert data[:10 * SECTOR] == bytes(10 * SECTOR) and not any(data[18 * SECTOR:])
    back = drv.buf(8 * SECTOR)
    assert drv.run(0, 6, h2d(READ_DMA_EXT, lba=10, count=8), [(back, 8 * SECTOR)]) == 0x50
    assert drv.mem.read(back, 8 * SECTOR) == pattern
    # 28-bit READ DMA of the last two sectors written.
    b2 = drv.buf(2 * SECTOR)
    assert drv.run(0, 7, h2d(READ_DMA, lba=16, count=2, device=0x40), [(b2, 2 * SECTOR)]) == 0x50
    assert drv.mem.read(b2, 2 * SECTOR) == pattern[6 * SECTOR:]
    d2h = drv.rfis(0, 0x40, 20)
    assert d2h[0] == 0x34 and d2h[2] == 0x50 and d2h[4] == 16     # the command's LBA echoed


def test_large_transfer_in_chunks_of_128_segments(one_disk) -> None:
    """More PRD entries than one backend request takes: the I/O is split."""
    m, dev, drv, path = one_disk
    n = 300                                                 # 300 segments of 512 bytes
    bufs = [drv.buf(SECTOR, 512) for _ in range(n)]
    for i, b in enumerate(bufs):
        drv.mem.write(b, bytes([i & 0xFF]) * SECTOR)
    prds = [(b, SECTOR) for b in bufs]
    assert drv.run(0, 0, h2d(WRITE_DMA_EXT, lba=100, count=n), prds, write=True) == 0x50
    assert drv.prdbc(0, 0) == n * SECTOR
    with open(path, "rb") as f:
        f.seek(100 * SECTOR)
        data = f.read(n * SECTOR)
    assert all(data[i * SECTOR:(i + 1) * SECTOR] == bytes([i & 0xFF]) * SECTOR for i in range(n))


def test_ncq_many_commands_at_once(one_disk) -> None:
    m, dev, drv, path = one_disk
    drv.pw(0, P_IE, IX_SDB | IX_DHR)
    slots = range(0, 32, 3)
    for slot in slots:
        b = drv.buf(4 * SECTOR)
        drv.mem.write(b, bytes([slot + 1]) * (4 * SECTOR))
        drv.issue(0, slot, h2d(WRITE_FPDMA, lba=8 * slot, features=4, count=slot << 3),
                  [(b, 4 * SECTOR)], ncq=True, write=True)
    mask = sum(1 << s for s in slots)
    assert drv.wait(0, mask) == 0x50
    assert drv.pr(0, P_SACT) == 0 and drv.pr(0, P_CI) == 0
    assert drv.pr(0, P_IS) & IX_SDB
    sdb = drv.rfis(0, 0x58, 8)
    assert sdb[0] == 0xA1 and sdb[1] & 0x40 and struct.unpack("<I", sdb[4:8])[0] & mask
    with open(path, "rb") as f:
        data = f.read()
    for slot in slots:
        assert data[8 * slot * SECTOR:(8 * slot + 4) * SECTOR] == bytes([slot + 1]) * (4 * SECTOR)
    reads = {}
    for slot in slots:
        reads[slot] = drv.buf(4 * SECTOR)
        drv.issue(0, slot, h2d(READ_FPDMA, lba=8 * slot, features=4, count=slot << 3),
                  [(reads[slot], 4 * SECTOR)], ncq=True)
    assert drv.wait(0, mask) == 0x50
    for slot, b in reads.items():
        assert drv.mem.read(b, 4 * SECTOR) == bytes([slot + 1]) * (4 * SECTOR)


def test_ncq_error_goes_to_sdb_and_log_page(one_disk) -> None:
    m, dev, drv, _ = one_disk
    b = drv.buf(SECTOR)
    drv.issue(0, 9, h2d(READ_FPDMA, lba=1 << 40, features=1, count=9 << 3), [(b, SECTOR)],
              ncq=True)
    tfd = drv.wait(0, 1 << 9)
    assert tfd & TFD_ERR and drv.pr(0, P_IS) & IX_TFE
    assert drv.pr(0, P_SACT) & (1 << 9)                     # left for the driver to see
    sdb = drv.rfis(0, 0x58, 8)
    assert sdb[2] & TFD_ERR and sdb[3] == 0x04
    drv.restart(0)
    assert drv.pr(0, P_SACT) == 0
    log = drv.buf(512)
    assert drv.run(0, 0, h2d(READ_LOG_EXT, lba=0x10, count=1), [(log, 512)]) == 0x50
    page = drv.mem.read(log, 512)
    assert page[0] == 9 and page[2] & TFD_ERR and page[3] == 0x04 and sum(page) % 256 == 0
    assert drv.run(0, 0, h2d(READ_LOG_EXT, lba=0x00, count=1), [(log, 512)]) == 0x50
    directory = drv.mem.read(log, 512)
    assert struct.unpack_from("<H", directory, 0x20)[0] == 1
    assert drv.run(0, 0, h2d(READ_LOG_EXT, lba=0x13, count=1), [(log, 512)]) == 0x50
    assert struct.unpack_from("<II", drv.mem.read(log, 8)) == (1, 1)   # SEND FPDMA DSM TRIM
    assert drv.run(0, 0, h2d(READ_LOG_EXT, lba=0x30, count=1), [(log, 512)]) & TFD_ERR


def test_flush_and_non_data_commands(one_disk) -> None:
    m, dev, drv, _ = one_disk
    assert drv.run(0, 1, h2d(FLUSH_EXT)) == 0x50
    assert drv.run(0, 2, h2d(IDLE_IMMEDIATE)) == 0x50
    assert drv.run(0, 3, h2d(SET_FEATURES, features=0x02)) == 0x50      # write cache on
    assert drv.run(0, 3, h2d(SET_FEATURES, features=0x03, count=0x46)) == 0x50   # UDMA6
    assert dev.ports[0].s.xfermode == 6
    assert drv.run(0, 4, h2d(SET_MULTI, count=16)) == 0x50
    assert dev.ports[0].s.mult_sectors == 16
    assert drv.run(0, 5, h2d(CHECK_POWER)) == 0x50
    assert drv.rfis(0, 0x40 + 12, 1) == b"\xff"
    tfd = drv.run(0, 6, h2d(SET_MULTI, count=3))
    assert tfd & TFD_ERR and (tfd >> 8) & 0xFF == 0x04           # ABRT
    drv.restart(0)
    assert drv.run(0, 7, h2d(SMART)) & TFD_ERR
    drv.restart(0)
    assert drv.run(0, 8, h2d(0x9F)) & TFD_ERR                    # unknown command
    drv.restart(0)
    assert drv.run(0, 8, h2d(IDENTIFY_PACKET), [(drv.buf(512), 512)]) & TFD_ERR


def _punch_supported(directory) -> bool:
    probe = os.path.join(directory, "probe")
    with open(probe, "wb") as f:
        f.write(b"x" * (256 << 10))
        f.flush()
        os.fsync(f.fileno())
        ok = _fallocate(f.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 128 << 10) == 0
    os.unlink(probe)
    return ok


@pytest.mark.parametrize("ncq", [False, True])
def test_trim_punches_holes(tmp_path, closing, ncq) -> None:
    path = disk_file(tmp_path / "t.img", 2 << 20, fill=b"\xAB\xCD")
    m, dev, drv = build({0: {"type": "hd", "path": path}})
    closing(dev)
    drv.start(0)
    blocks_before = os.stat(path).st_blocks
    ranges = bytearray(512)
    struct.pack_into("<Q", ranges, 0, 256 | 512 << 48)          # 256 KiB at 128 KiB
    struct.pack_into("<Q", ranges, 16, 2048 | 256 << 48)        # an empty entry in between
    lst = drv.buf(512)
    drv.mem.write(lst, bytes(ranges))
    if ncq:
        fis = h2d(SEND_FPDMA, features=1, count=0 << 3, aux=0x01)   # DSM, TRIM in AUX
        drv.issue(0, 2, fis, [(lst, 512)], ncq=True, write=True)
        tfd = drv.wait(0, 1 << 2)
    else:
        tfd = drv.run(0, 2, h2d(DSM, features=1, count=1), [(lst, 512)], write=True)
    assert tfd == 0x50
    with open(path, "rb") as f:
        data = f.read()
    assert data[128 << 10:384 << 10] == bytes(256 << 10)
    assert data[1 << 20:(1 << 20) + (128 << 10)] == bytes(128 << 10)
    assert data[:128 << 10] == b"\xAB\xCD" * (64 << 10)
    assert data[384 << 10:1 << 20] == (b"\xAB\xCD" * (320 << 10))[:(1 << 20) - (384 << 10)]
    if not _punch_supported(tmp_path):
        pytest.skip("the file system under tmp_path cannot punch holes; zeros were checked")
    assert os.stat(path).st_blocks < blocks_before


def test_trim_refused_without_delete(tmp_path, closing) -> None:
    path = disk_file(tmp_path / "n.img", fill=b"\x11")
    m, dev, drv = build({0: {"type": "hd", "path": path, "nodelete": "true"}})
    closing(dev)
    drv.start(0)
    lst = drv.buf(512)
    drv.mem.write(lst, struct.pack("<Q", 8 | 8 << 48))
    assert drv.run(0, 0, h2d(DSM, features=1, count=1), [(lst, 512)], write=True) & TFD_ERR
    with open(path, "rb") as f:
        assert f.read() == b"\x11" * (1 << 20)


def test_read_only_disk_refuses_writes(tmp_path, closing) -> None:
    path = disk_file(tmp_path / "ro.img", fill=b"\x22")
    m, dev, drv = build({0: {"type": "hd", "path": path, "ro": "true"}})
    closing(dev)
    drv.start(0)
    b = drv.buf(SECTOR)
    tfd = drv.run(0, 0, h2d(WRITE_DMA_EXT, lba=0, count=1), [(b, SECTOR)], write=True)
    assert tfd & TFD_ERR and (tfd >> 8) & 0xFF == 0x04
    with open(path, "rb") as f:
        assert f.read(SECTOR) == b"\x22" * SECTOR


# ============================================================================
# several devices on one HBA
# ============================================================================
def test_two_disks_and_two_cdroms_never_mix(tmp_path, closing) -> None:
    d0 = disk_file(tmp_path / "d0.img", fill=b"\x00")
    d1 = disk_file(tmp_path / "d1.img", fill=b"\x01")
    c0 = iso_file(tmp_path / "first.iso", 40)
    c1 = iso_file(tmp_path / "second.iso", 50)
    m, dev, drv = build({0: {"type": "hd", "path": d0}, 1: {"type": "hd", "path": d1},
                         4: {"type": "cd", "path": c0}, 7: {"type": "cd", "path": c1}})
    closing(dev)
    assert drv.r(PI) == (1 << 0) | (1 << 1) | (1 << 4) | (1 << 7)
    for p in (0, 1, 4, 7):
        drv.start(p)
    bufs = {}
    for p, fill in ((0, b"\xA0"), (1, b"\xB1")):
        bufs[p] = drv.buf(4 * SECTOR)
        drv.mem.write(bufs[p], fill * (4 * SECTOR))
        drv.issue(p, 0, h2d(WRITE_DMA_EXT, lba=4, count=4), [(bufs[p], 4 * SECTOR)], write=True)
    cd = {}
    for p in (4, 7):
        cd[p] = drv.buf(3 * CD_BLOCK)
        drv.issue(p, 0, h2d(PACKET, features=1), [(cd[p], 3 * CD_BLOCK)],
                  acmd=bytes([0x28, 0, 0, 0, 0, 5, 0, 0, 3, 0]), atapi=True)
    for p in (0, 1, 4, 7):
        assert drv.wait(p, 1) == 0x50
    for path, fill, other in ((d0, b"\xA0", b"\x00"), (d1, b"\xB1", b"\x01")):
        with open(path, "rb") as f:
            data = f.read()
        assert data[4 * SECTOR:8 * SECTOR] == fill * (4 * SECTOR)
        assert data[:4 * SECTOR] == other * (4 * SECTOR)
        assert data[8 * SECTOR:] == other * ((1 << 20) - 8 * SECTOR)
    for p, path in ((4, c0), (7, c1)):
        assert drv.mem.read(cd[p], 3 * CD_BLOCK) == b"".join(iso_block(path, i) for i in (5, 6, 7))
    # Capacities are per port.
    for p, blocks in ((4, 40), (7, 50)):
        b = drv.buf(8)
        assert drv.packet(p, 1, bytes([0x25] + [0] * 9), [(b, 8)]) & TFD_ERR == 0
        assert struct.unpack(">II", drv.mem.read(b, 8)) == (blocks - 1, CD_BLOCK)


# ============================================================================
# ATAPI
# ============================================================================
@pytest.fixture
def one_cd(tmp_path, closing):
    path = iso_file(tmp_path / "media.iso", 64)
    m, dev, drv = build({0: {"type": "cd", "path": path}})
    closing(dev)
    drv.start(0, ie=0xFFFFFFFF)
    return m, dev, drv, path


def test_atapi_identify_inquiry_capacity(one_cd) -> None:
    m, dev, drv, _ = one_cd
    assert drv.pr(0, P_SIG) == 0xEB140101
    b = drv.buf(512)
    assert drv.run(0, 0, h2d(IDENTIFY_PACKET), [(b, 512)]) == 0x50
    data = drv.mem.read(b, 512)
    assert ident.word(data, 0) == 0x85C0                     # ATAPI, CD-ROM, removable
    assert ident.text(data, 27, 40) == "BHYVE SATA DVD ROM" and sum(data) % 256 == 0
    tfd = drv.run(0, 1, h2d(IDENTIFY), [(b, 512)])             # ATA IDENTIFY is aborted
    assert tfd & TFD_ERR
    drv.restart(0)
    inq = drv.buf(96)
    assert drv.packet(0, 2, bytes([0x12, 0, 0, 0, 96, 0]), [(inq, 96)]) & TFD_ERR == 0
    assert drv.prdbc(0, 2) == 36
    data = drv.mem.read(inq, 36)
    assert data[0] == 0x05 and data[1] == 0x80
    assert data[8:16] == b"BHYVE   " and data[16:32] == b"BHYVE DVD-ROM   "
    assert data[32:36] == b"001 "
    assert drv.packet(0, 2, bytes([0x12, 0, 0, 0, 5, 0]), [(inq, 96)]) & TFD_ERR == 0
    assert drv.prdbc(0, 2) == 5                              # allocation length honoured
    d2h = drv.rfis(0, 0x40, 20)
    assert d2h[4] & 3 == 3                                  # interrupt reason: command, in
    cap = drv.buf(8)
    assert drv.packet(0, 3, bytes([0x25] + [0] * 9), [(cap, 8)]) & TFD_ERR == 0
    assert struct.unpack(">II", drv.mem.read(cap, 8)) == (63, CD_BLOCK)


def test_atapi_read10_read12_and_past_the_end(one_cd) -> None:
    m, dev, drv, path = one_cd
    b = drv.buf(4 * CD_BLOCK)
    assert drv.packet(0, 0, bytes([0x28, 0, 0, 0, 0, 10, 0, 0, 2, 0]), [(b, 4 * CD_BLOCK)]) == 0x50
    assert drv.mem.read(b, 2 * CD_BLOCK) == iso_block(path, 10) + iso_block(path, 11)
    assert drv.prdbc(0, 0) == 2 * CD_BLOCK
    assert drv.packet(0, 1, bytes([0xA8, 0, 0, 0, 0, 60, 0, 0, 0, 4, 0, 0]),
                      [(b, 4 * CD_BLOCK)]) == 0x50
    assert drv.mem.read(b, 4 * CD_BLOCK) == b"".join(iso_block(path, i) for i in range(60, 64))
    assert drv.packet(0, 2, bytes([0x28] + [0] * 9), [(b, CD_BLOCK)]) == 0x50   # zero blocks
    tfd = drv.packet(0, 3, bytes([0x28, 0, 0, 0, 0, 63, 0, 0, 2, 0]), [(b, 2 * CD_BLOCK)])
    assert tfd & TFD_ERR and (tfd >> 12) & 0xF == 0x5
    drv.restart(0)
    assert drv.sense(0) == (0x5, 0x21)                      # LBA out of range


def test_atapi_toc_formats(one_cd) -> None:
    m, dev, drv, _ = one_cd
    b = drv.buf(64)
    assert drv.packet(0, 0, bytes([0x43, 0, 0, 0, 0, 0, 0, 0, 64, 0]), [(b, 64)]) == 0x50
    toc = drv.mem.read(b, 20)
    assert drv.prdbc(0, 0) == 20
    assert toc[:4] == bytes([0, 18, 1, 1])
    assert toc[4:12] == bytes([0, 0x14, 1, 0, 0, 0, 0, 0])              # track 1 at LBA 0
    assert toc[12:16] == bytes([0, 0x14, 0xAA, 0]) and struct.unpack(">I", toc[16:20])[0] == 64
    assert drv.packet(0, 0, bytes([0x43, 2, 0, 0, 0, 0, 0, 0, 64, 0]), [(b, 64)]) == 0x50
    msf = drv.mem.read(b, 20)
    assert msf[8:12] == bytes([0, 0, 2, 0])                  # LBA 0 = 00:02:00
    assert msf[16:20] == bytes([0, 0, 2, 64])                # lead-out at LBA 64
    assert drv.packet(0, 0, bytes([0x43, 0, 0, 0, 0, 0, 0xAA, 0, 64, 0]), [(b, 64)]) == 0x50
    assert drv.prdbc(0, 0) == 12                             # lead-out only
    assert drv.packet(0, 0, bytes([0x43, 0, 0, 0, 0, 0, 0, 0, 64, 0x40]), [(b, 64)]) == 0x50
    assert drv.mem.read(b, 12) == bytes([0, 0x0A, 1, 1] + [0] * 8)     # session info
    assert drv.packet(0, 0, bytes([0x43, 0, 0, 0, 0, 0, 0, 0, 64, 0x80]), [(b, 64)]) == 0x50
    assert drv.prdbc(0, 0) == 48 and drv.mem.read(b, 4) == bytes([0, 46, 1, 1])   # raw TOC
    tfd = drv.packet(0, 0, bytes([0x43, 0, 0, 0, 0, 0, 5, 0, 64, 0]), [(b, 64)])
    assert tfd & TFD_ERR
    drv.restart(0)
    assert drv.sense(0) == (0x5, 0x24)


def test_atapi_misc_commands_and_sense(one_cd) -> None:
    m, dev, drv, _ = one_cd
    b = drv.buf(64)
    assert drv.packet(0, 0, bytes(12)) == 0x50                             # TEST UNIT READY
    assert drv.packet(0, 0, bytes([0x1E, 0, 0, 0, 1, 0])) == 0x50          # PREVENT
    assert drv.packet(0, 0, bytes([0x1B, 0, 0, 0, 1, 0])) == 0x50          # START
    assert drv.packet(0, 0, bytes([0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 64, 0]), [(b, 64)]) == 0x50
    page = drv.mem.read(b, 30)
    assert drv.prdbc(0, 0) == 30 and page[8] == 0x2A and page[1] == 28
    assert drv.packet(0, 0, bytes([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]), [(b, 64)]) == 0x50
    assert drv.mem.read(b, 8) == bytes([0, 6, 4, 0x10, 0, 2, 0, 0])        # media present
    assert drv.packet(0, 0, bytes([0x4A, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]), [(b, 64)]) & TFD_ERR
    drv.restart(0)
    assert drv.sense(0) == (0x5, 0x24)
    assert drv.packet(0, 0, bytes([0x1B, 0, 0, 0, 2, 0])) & TFD_ERR        # eject refused
    drv.restart(0)
    assert drv.sense(0) == (0x5, 0x53)
    assert drv.packet(0, 0, bytes([0x5A, 0, 0xC1, 0, 0, 0, 0, 0, 64, 0]), [(b, 64)]) & TFD_ERR
    drv.restart(0)
    assert drv.sense(0) == (0x5, 0x39)                      # saved values not supported


def test_writes_to_cd_are_rejected(one_cd) -> None:
    m, dev, drv, path = one_cd
    before = open(path, "rb").read()
    b = drv.buf(CD_BLOCK)
    drv.mem.write(b, b"\xEE" * CD_BLOCK)
    tfd = drv.run(0, 0, h2d(PACKET, features=1), [(b, CD_BLOCK)],
                  acmd=bytes([0x2A, 0, 0, 0, 0, 3, 0, 0, 1, 0]), atapi=True, write=True)
    assert tfd & TFD_ERR and (tfd >> 8) & 0xFF == 0x50       # sense key 5 in the error register
    drv.restart(0)
    assert drv.sense(0) == (0x5, 0x20)                      # invalid command operation code
    tfd = drv.run(0, 1, h2d(WRITE_DMA_EXT, lba=0, count=4), [(b, CD_BLOCK)], write=True)
    assert tfd & TFD_ERR                                    # ATA writes to a CD: aborted
    drv.restart(0)
    assert drv.run(0, 2, h2d(DSM, features=1, count=1), [(b, 512)]) & TFD_ERR
    assert open(path, "rb").read() == before


# ============================================================================
# hostile command tables
# ============================================================================
def test_garbage_tables_fail_the_command_not_the_device(one_disk) -> None:
    m, dev, drv, path = one_disk
    good = drv.buf(SECTOR)

    def works() -> None:
        drv.restart(0)
        assert drv.run(0, 31, h2d(READ_DMA_EXT, lba=1, count=1), [(good, SECTOR)]) == 0x50

    cases = [
        dict(prds=[(0x8000_0000, SECTOR)]),                          # PRD outside RAM
        dict(prds=[(RAM[0] + RAM[1] - 100, SECTOR)]),                # PRD straddles the end
        dict(prds=[(good, 1 << 22)] * 9, count=0),                   # 32 MiB in 4 MiB segments
        dict(prds=[(good, SECTOR)], ctba=0xFFFF_FFFF_FFFF_FF00),     # table outside RAM
        dict(prds=[(good, SECTOR)] * 8, prdtl=0xFFFF, slot=1),        # garbage after 8 entries
    ]
    for case in cases:
        prds = case.pop("prds")
        count = case.pop("count", 64)
        slot = case.pop("slot", 0)
        ctba = case.get("ctba")
        if ctba is not None:
            drv.mem.write(drv.clb[0], struct.pack("<HHIQ", 5, len(prds), 0, ctba))
            drv.pw(0, P_CI, 1)
            tfd = drv.wait(0, 1)
        else:
            tfd = drv.run(0, slot, h2d(READ_DMA_EXT, lba=0, count=count), prds, **case)
        assert tfd & TFD_ERR and (tfd >> 8) & 0xFF == 0x04, (prds[0], case)
        assert drv.pr(0, P_IS) & IX_TFE
        works()
    # A PRD segment far larger than the transfer is fine: only what is asked moves.
    assert drv.run(0, 0, h2d(READ_DMA_EXT, lba=0, count=1), [(good, 1 << 22)]) == 0x50
    assert drv.prdbc(0, 0) == SECTOR
    # A FIS that is not a register H2D FIS.
    tfd = drv.run(0, 0, b"\x46" + bytes(19), [(good, SECTOR)])
    assert tfd & TFD_ERR
    works()
    # LBA beyond the disk, and a write running over its end: nothing is
    # written and the file does not grow.  (A PRDT shorter than the count
    # is a short transfer, as in bhyve: count 0 = 65536 sectors here.)
    assert drv.run(0, 0, h2d(READ_DMA_EXT, lba=4096, count=1), [(good, SECTOR)]) & TFD_ERR
    works()
    assert drv.run(0, 0, h2d(WRITE_DMA_EXT, lba=2000, count=0), [(good, SECTOR)],
                   write=True) == 0x50
    assert drv.prdbc(0, 0) == SECTOR
    assert drv.run(0, 0, h2d(WRITE_DMA_EXT, lba=2047, count=0), [(good, 2 * SECTOR)],
                   write=True) & TFD_ERR
    assert os.path.getsize(path) == 1 << 20
    works()
    # IDENTIFY without a PRDT is refused; a read without one moves nothing.
    assert drv.run(0, 0, h2d(IDENTIFY), prdtl=0) & TFD_ERR
    works()
    assert drv.run(0, 0, h2d(READ_DMA_EXT, lba=0, count=1), []) == 0x50
    assert drv.prdbc(0, 0) == 0
    # A command list outside RAM.
    drv.pw(0, P_CMD, CMD_FRE)
    drv.pw(0, P_CLB, 0xF000_0000)
    drv.pw(0, P_CMD, CMD_FRE | CMD_ST)
    drv.pw(0, P_CI, 1)
    assert drv.wait(0, 1) & TFD_ERR
    drv.pw(0, P_CMD, CMD_FRE)
    drv.pw(0, P_CLB, drv.clb[0])
    works()
    # A FIS area outside RAM: the status still lands in PxTFD.
    drv.pw(0, P_CMD, 0)
    drv.pw(0, P_FB, 0xF000_0000)
    drv.pw(0, P_CMD, CMD_FRE | CMD_ST)
    assert drv.run(0, 0, h2d(READ_DMA_EXT, lba=2, count=1), [(good, SECTOR)]) == 0x50
    assert drv.run(0, 0, h2d(SMART)) & TFD_ERR             # stops until ST is cleared
    drv.pw(0, P_CMD, 0)
    drv.pw(0, P_FB, drv.fb[0])
    works()


def test_prd_entries_smaller_than_a_sector_beyond_iov_max(one_disk) -> None:
    m, dev, drv, _ = one_disk
    small = drv.buf(2)
    prds = [(small, 2)] * 200                               # 128 segments hold 256 bytes
    tfd = drv.run(0, 0, h2d(READ_DMA_EXT, lba=0, count=1), prds)
    assert tfd & TFD_ERR
    drv.restart(0)
    b = drv.buf(SECTOR)
    assert drv.run(0, 1, h2d(READ_DMA_EXT, lba=0, count=1), [(b, SECTOR)]) == 0x50


_REG_OFFSETS = st.one_of(
    st.sampled_from([GHC, IS] + [0x100 + 0x80 * p + o for p in (0, 1, 2)
                                 for o in (P_CLB, P_CLBU, P_FB, P_FBU, P_IS, P_IE, P_CMD,
                                           P_SCTL, P_SERR, P_SACT, P_CI, 0x3C, 0x40)]),
    st.integers(0, 0x1FFF))
_VALUES = st.one_of(st.integers(0, 0xFFFFFFFF),
                    st.sampled_from([0, 1, 0x11, 0x10, 0xFFFFFFFF, 0x80000002, 0x301]))
_CMDS = st.one_of(st.sampled_from([IDENTIFY, IDENTIFY_PACKET, PACKET, READ_DMA, WRITE_DMA,
                                   READ_DMA_EXT, WRITE_DMA_EXT, READ_FPDMA, WRITE_FPDMA,
                                   SEND_FPDMA, FLUSH_EXT, DSM, READ_LOG_EXT, SET_FEATURES,
                                   SET_MULTI, CHECK_POWER, 0x20, 0x30, 0xC4, 0xC5]),
                  st.integers(0, 255))
_ADDRS = st.one_of(st.integers(RAM[0], RAM[0] + RAM[1] - 1), st.integers(0, 2**64 - 1),
                   st.integers(RAM[0] + RAM[1] - 64, RAM[0] + RAM[1] + 64))
_OPS = st.one_of(
    st.tuples(st.just("w"), _REG_OFFSETS, _VALUES),
    st.tuples(st.just("r"), st.integers(0, 0x1FFF), st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("cmd"), st.integers(0, 2), st.integers(0, 31), _CMDS,
              st.binary(min_size=20, max_size=20), st.binary(min_size=16, max_size=16),
              st.lists(st.tuples(_ADDRS, st.integers(0, 0x3FFFFF)), max_size=6),
              st.booleans()),
    st.tuples(st.just("pause")),
)


def test_random_guest_never_breaks_the_hba(tmp_path, closing, caplog) -> None:
    m, dev, drv = build({0: {"type": "hd", "path": disk_file(tmp_path / "r.img", 256 << 10)},
                         2: {"type": "cd", "path": iso_file(tmp_path / "r.iso", 16)}})
    closing(dev)
    for p in (0, 1, 2):
        drv.start(p)
    caplog.set_level(logging.WARNING)

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(_OPS, max_size=12))
    def run(ops) -> None:
        for op in ops:
            if op[0] == "w":
                drv.w(op[1] & ~3, op[2])
            elif op[0] == "r":
                off = op[1] & ~(op[2] - 1)
                assert 0 <= drv.r(off, op[2]) < 1 << (8 * op[2])
            elif op[0] == "cmd":
                _, port, slot, cmd, raw, acmd, prds, ncq = op
                fis = bytes([0x27 if raw[0] & 7 else raw[0], raw[1] | 0x80, cmd]) + raw[3:]
                if drv.clb.get(port) is None:
                    drv.start(port)
                drv.prepare(port, slot, fis, [(a, n + 1) for a, n in prds], acmd=acmd)
                if ncq:
                    drv.pw(port, P_SACT, 1 << slot)
                drv.pw(port, P_CI, 1 << slot)
            else:
                dev.pause()
                dev.resume()
        dev.pause()                                         # drains everything started
        assert all(p.pending == 0 and not p.inflight for p in dev.ports)
        dev.resume()
        for p in (0, 1, 2):
            drv.pr(p, P_TFD)

    run()
    dev.pause()
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, problems[0].getMessage()
    dev.resume()
    # After all that, a clean restart still serves I/O.
    drv.w(GHC, 1)
    drv.clb.clear()
    drv.alloc = Allocator(*RAM)
    drv.start(0)
    b = drv.buf(SECTOR)
    assert drv.run(0, 0, h2d(READ_DMA_EXT, lba=0, count=1), [(b, SECTOR)]) == 0x50


# ============================================================================
# interrupts
# ============================================================================
def intx(m: Machine) -> list[tuple]:
    return [c for c in m.vm.calls if c[0] in ("ioapic_assert", "ioapic_deassert")]


def test_intx_follows_ghc_ie_and_is(one_disk) -> None:
    m, dev, drv, _ = one_disk
    drv.pw(0, P_IE, IX_DHR)
    assert drv.run(0, 0, h2d(FLUSH_EXT)) == 0x50
    assert drv.r(IS) == 1 and not intx(m)                   # GHC.IE off: no interrupt
    drv.w(GHC, 0x2)
    assert intx(m) and intx(m)[-1][0] == "ioapic_assert"
    assert m.cfg1_read(0, SLOT, 0, 0x06, 2) & 0x08          # INTx status bit
    drv.pw(0, P_IS, 0xFFFFFFFF)
    drv.w(IS, 1)
    assert intx(m)[-1][0] == "ioapic_deassert" and drv.r(IS) == 0
    assert drv.run(0, 1, h2d(FLUSH_EXT)) == 0x50
    assert intx(m)[-1][0] == "ioapic_assert"
    drv.w(GHC, 0)                                           # IE off drops the line
    assert intx(m)[-1][0] == "ioapic_deassert"
    assert all(v == 0 for v in m.vm.levels().values())


def enable_msi(m: Machine, dev: Ahci, mme: int) -> None:
    cap = next(off for off, cid in dev.caps if cid == 0x05)
    m.cfg1_write(0, SLOT, 0, cap + 4, 4, 0xFEE00000)
    m.cfg1_write(0, SLOT, 0, cap + 12, 2, 0x40)
    m.cfg1_write(0, SLOT, 0, cap + 2, 2, 0x0001 | mme << 4)
    assert dev.msi_enabled


def test_msi_message_per_port(tmp_path, closing) -> None:
    m, dev, drv = build({0: {"type": "hd", "path": disk_file(tmp_path / "a")},
                         3: {"type": "hd", "path": disk_file(tmp_path / "b")}})
    closing(dev)
    enable_msi(m, dev, 4)                                   # 16 messages
    drv.w(GHC, 0x2)
    for p in (0, 3):
        drv.start(p, ie=IX_DHR)
        assert drv.run(p, 0, h2d(FLUSH_EXT)) == 0x50
    assert m.msi.sent == [(0xFEE00000, 0x40), (0xFEE00000, 0x43)]
    assert not intx(m)                                      # no INTx with MSI


def test_msi_single_message_shared(tmp_path, closing) -> None:
    m, dev, drv = build({0: {"type": "hd", "path": disk_file(tmp_path / "a")},
                         1: {"type": "hd", "path": disk_file(tmp_path / "b")}})
    closing(dev)
    enable_msi(m, dev, 0)                                   # one message for all ports
    drv.w(GHC, 0x2)
    for p in (0, 1):
        drv.start(p, ie=IX_DHR)
    assert drv.run(0, 0, h2d(FLUSH_EXT)) == 0x50
    assert drv.run(1, 0, h2d(FLUSH_EXT)) == 0x50
    assert m.msi.sent == [(0xFEE00000, 0x40)] * 2
    assert drv.run(1, 1, h2d(FLUSH_EXT)) == 0x50            # IS bit still set: no new message
    assert len(m.msi.sent) == 2
    drv.pw(1, P_IS, 0xFFFFFFFF)
    drv.pw(0, P_IS, 0xFFFFFFFF)
    drv.w(IS, 0x3)
    assert drv.run(0, 1, h2d(FLUSH_EXT)) == 0x50
    assert len(m.msi.sent) == 3


# ============================================================================
# pause / resume and snapshots
# ============================================================================
def test_pause_drains_and_holds_new_commands(one_disk) -> None:
    m, dev, drv, path = one_disk
    bufs = []
    for slot in range(16):
        b = drv.buf(64 * SECTOR)
        bufs.append(b)
        drv.issue(0, slot, h2d(READ_FPDMA, lba=64 * slot, features=64, count=slot << 3),
                  [(b, 64 * SECTOR)], ncq=True)
    dev.pause()
    assert all(p.pending == 0 for p in dev.ports)
    assert drv.pr(0, P_SACT) == 0 and drv.pr(0, P_CI) == 0    # every completion delivered
    drv.mem.write(bufs[0], b"\x5A" * SECTOR)
    drv.issue(0, 0, h2d(WRITE_DMA_EXT, lba=0, count=1), [(bufs[0], SECTOR)], write=True)
    time.sleep(0.05)
    assert drv.pr(0, P_CI) == 1                              # held while paused
    dev.resume()
    assert drv.wait(0, 1) == 0x50
    with open(path, "rb") as f:
        assert f.read(SECTOR) == b"\x5A" * SECTOR


def test_state_round_trip(tmp_path, closing) -> None:
    disk = disk_file(tmp_path / "s.img")
    iso = iso_file(tmp_path / "s.iso", 8)
    cfg = {0: {"type": "hd", "path": disk, "ser": "SNAP"}, 5: {"type": "cd", "path": iso}}
    m, dev, drv = build(cfg)
    closing(dev)
    enable_msi(m, dev, 4)
    drv.w(GHC, 0x2)
    drv.start(0, ie=0xFFFFFFFF)
    drv.start(5, ie=0xFFFFFFFF)
    b = drv.buf(SECTOR)
    drv.mem.write(b, b"\x77" * SECTOR)
    assert drv.run(0, 3, h2d(WRITE_DMA_EXT, lba=9, count=1), [(b, SECTOR)], write=True) == 0x50
    assert drv.packet(5, 0, bytes([0x2A] + [0] * 9)) & TFD_ERR      # leaves sense data
    drv.prepare(0, 4, h2d(READ_DMA_EXT, lba=9, count=1), [(b + SECTOR, SECTOR)])
    dev.pause()
    drv.pw(0, P_CI, 1 << 4)                                 # issued while paused: not started
    state = dev.save_state()
    blob = encode(state)
    dev.resume()
    assert drv.wait(0, 1 << 4) == 0x50

    m2, dev2, drv2 = build(cfg)
    closing(dev2)
    restored = decode(AhciState, blob)
    dev2.pause()
    dev2.restore_state(restored)
    assert drv2.r(GHC) == 0x80000002 and drv2.pr(0, P_CI) == 1 << 4
    assert drv2.pr(0, P_IE) == 0xFDC000FF and drv2.pr(5, P_SIG) == 0xEB140101
    assert dev2.ports[5].s.sense_key == 5 and dev2.ports[5].s.asc == 0x20
    assert dev2.ports[0].s.ident == dev.ports[0].s.ident
    assert encode(dev2.save_state()) == blob
    # Guest memory is not part of the device: copy it as the snapshot would.
    drv2.mem.write(RAM[0], drv.mem.read(RAM[0], RAM[1]))
    drv2.clb, drv2.fb, drv2.ct = drv.clb, drv.fb, drv.ct
    drv2.mem.write(b + SECTOR, bytes(SECTOR))
    dev2.resume()                                           # starts the pending command
    assert drv2.wait(0, 1 << 4) == 0x50
    assert drv2.mem.read(b + SECTOR, SECTOR) == b"\x77" * SECTOR


def test_state_refused_for_another_configuration(tmp_path, closing) -> None:
    a = disk_file(tmp_path / "a.img")
    m, dev, drv = build({0: {"type": "hd", "path": a}})
    closing(dev)
    blob = encode(dev.save_state())
    for cfg, words in (({0: {"type": "cd", "path": iso_file(tmp_path / "x.iso")}}, "CD-ROM"),
                       ({1: {"type": "hd", "path": a}}, "PI"),
                       ({0: {"type": "hd", "path": disk_file(tmp_path / "big", 2 << 20)}},
                        "sectors")):
        m2, dev2, _ = build(cfg)
        closing(dev2)
        before = encode(dev2.save_state())
        with pytest.raises(StateError, match=words):
            dev2.restore_state(decode(AhciState, blob))
        assert encode(dev2.save_state()) == before           # nothing changed


@settings(max_examples=60, deadline=None)
@given(strategy(AhciPortState), st.lists(strategy(AhciPortState), max_size=3),
       st.integers(0, 0xFFFFFFFF))
def test_state_codec_round_trip(port, more, reg) -> None:
    assert decode(AhciPortState, encode(port)) == port
    state = AhciState(ports=32, cap=reg, ghc=reg ^ 1, hba_is=reg >> 3, pi=reg, vs=0x10300,
                      cap2=4, lintr=bool(reg & 1), port=[port, *more])
    assert decode(AhciState, encode(state)) == state


def test_state_validation_rejects_bad_records() -> None:
    with pytest.raises(StateError):
        decode(AhciPortState, encode(AhciPortState(ccs=31))[:-3])
    for bad in (dict(ccs=32), dict(mult_sectors=200), dict(sense_key=16),
                dict(present=True, ident=b"")):
        with pytest.raises(StateError):
            decode(AhciPortState, encode(AhciPortState(**bad)))


def test_bad_configuration_is_refused_cleanly(tmp_path, closing) -> None:
    from bhyvepy.block import BlockOpenError

    with pytest.raises(BlockOpenError, match="Missing \"path\""):
        build({0: {"type": "hd"}})
    with pytest.raises(BlockOpenError, match="Could not open backing file"):
        build({0: {"type": "hd", "path": disk_file(tmp_path / "ok")},
                  1: {"type": "cd", "path": str(tmp_path / "missing.iso")}})
    m, dev, drv = build({0: {"path": disk_file(tmp_path / "ok2")}})  # no type: no device
    closing(dev)
    assert drv.r(PI) == 0
