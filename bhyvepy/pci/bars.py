"""Base address registers: sizes, bhyve's placement rules, the sizing protocol.

Placement must match bhyve's exactly: firmware that does not reprogram BARs
(``pci.enable_bars``, bhyveload guests) and snapshots taken by one build and
restored by another both depend on every device landing where bhyve puts it.
The rules (``pci_emul_alloc_bar``/``pci_emul_assign_bar``/``init_pci``):

* sizes are rounded up to a power of two, at least 4 (I/O) or 16 (memory);
* all BARs of one bus are placed after all its functions are built, largest
  first (equal sizes keep their declaration order), to limit fragmentation;
* I/O from 0x2000 up to 0x10000; 32-bit memory from 0xC0000000 up to the
  ECAM window at 0xE0000000; a 64-bit BAR of at most 128 MiB also goes into
  the 32-bit window (some drivers mishandle BARs above 4 GiB), larger ones go
  into a 32 GiB window starting at the end of high RAM rounded up to 32 GiB;
* after each bus the cursors skip 32 ports, 1 MiB and 512 MiB (rounded up
  to those units), leaving each bus a little room to move BARs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable

from bhyvepy.layout import (GiB, HIGHMEM_BASE, MiB, PCI_ECFG_BASE, PCI_IOBASE, PCI_IOLIMIT,
                            PCI_MEMBASE32)

assert PCI_MEMBASE32 == 0xC0000000   # OVMF assumes this base
PCI_MEMLIMIT32 = PCI_ECFG_BASE
PCI_MEMSIZE64 = 32 * GiB
MEM64_IN_32BIT_MAX = 128 * MiB       # 64-bit BARs up to this size live below 4 GiB
BUSIO_ROUNDUP = 32
BUSMEM32_ROUNDUP = 1 * MiB
BUSMEM64_ROUNDUP = 512 * MiB

# Low bits of BAR registers.
BAR_IO_SPACE = 0x1
BAR_MEM_64 = 0x4
BAR_IO_MASK = 0xFFFF                 # x86 port addresses are 16 bits (PCI_EMUL_IOMASK)


class BarKind(enum.IntEnum):
    """bhyve's ``enum pcibar_type`` (the values go into snapshots)."""

    NONE = 0
    IO = 1
    MEM32 = 2
    MEM64 = 3
    MEMHI64 = 4      # the upper half of the preceding MEM64 BAR
    ROM = 5


@dataclass(slots=True)
class Bar:
    """One BAR of one function: what the device declared and where it is now."""

    kind: BarKind = BarKind.NONE
    size: int = 0
    addr: int = 0
    #: False for BARs backed by guest memory the device maps itself (a
    #: framebuffer): the bus then registers no trap handler, only tells the
    #: device where the BAR went.
    trap: bool = True
    #: Upper 16 bits of an I/O BAR register as the guest last wrote them.
    #: Decoding uses only the low 16 (x86 ports), as bhyve; but bhyve also
    #: reads them back as zero, so sizing an I/O BAR yields 0x0000FFxx and
    #: firmware that computes sizes in 32 bits (SeaBIOS) sees a 4 GiB BAR
    #: and gives up.  Real chipsets and QEMU read back what was written.
    io_upper: int = 0

    @property
    def lobits(self) -> int:
        if self.kind == BarKind.IO:
            return BAR_IO_SPACE
        if self.kind == BarKind.MEM64:
            return BAR_MEM_64
        return 0

    @property
    def is_memory(self) -> bool:
        return self.kind in (BarKind.MEM32, BarKind.MEM64)


def bar_size(kind: BarKind, size: int) -> int:
    """Round a requested size like bhyve: a power of two with the spec minimum."""
    if size <= 0:
        raise ValueError(f"BAR size {size} must be positive")
    if size & (size - 1):
        size = 1 << size.bit_length()
    minimum = 4 if kind == BarKind.IO else (2048 if kind == BarKind.ROM else 16)
    return max(size, minimum)


def register_value(bars: list[Bar], idx: int) -> int:
    """The 32-bit value BAR register ``idx`` holds for the current address."""
    b = bars[idx]
    if b.kind == BarKind.MEMHI64:
        return (bars[idx - 1].addr >> 32) & 0xFFFFFFFF
    if b.kind in (BarKind.NONE, BarKind.ROM):
        return 0
    if b.kind == BarKind.IO:
        return (b.io_upper << 16) | (b.addr & BAR_IO_MASK) | b.lobits
    return ((b.addr & 0xFFFFFFFF) | b.lobits) & 0xFFFFFFFF


def write_register(bars: list[Bar], idx: int, value: int) -> int | None:
    """Apply a guest's 32-bit write to BAR register ``idx``.

    Returns the index of the BAR whose address changed, or None.  The
    address keeps only the bits above the BAR's size, which is what makes
    the sizing protocol work: after writing all-ones the guest reads back
    ``~(size - 1)`` plus the type bits.
    """
    value &= 0xFFFFFFFF
    b = bars[idx]
    if b.kind in (BarKind.NONE, BarKind.ROM):
        return None
    if b.kind == BarKind.MEMHI64:
        lo = bars[idx - 1]
        mask = ~(lo.size - 1) & 0xFFFFFFFFFFFFFFFF
        new = (lo.addr & 0xFFFFFFFF) | ((value << 32) & mask)
        if new != lo.addr:
            lo.addr = new
            return idx - 1
        return None
    mask = ~(b.size - 1) & 0xFFFFFFFF
    low = value & mask
    if b.kind == BarKind.IO:
        b.io_upper = (value >> 16) & 0xFFFF
        low &= BAR_IO_MASK
        new = low
    elif b.kind == BarKind.MEM32:
        new = low
    else:  # MEM64: replace the low half only
        new = (b.addr & ~0xFFFFFFFF) | low
    if new != b.addr:
        b.addr = new
        return idx
    return None


def address_limit(kind: BarKind) -> int:
    """One past the highest address a BAR of this kind can decode."""
    if kind == BarKind.IO:
        return 0x10000
    if kind == BarKind.MEM32:
        return 1 << 32
    return 1 << 64


class BarSpaceExhausted(Exception):
    def __init__(self, kind: BarKind, size: int, request: "BarRequest | None" = None) -> None:
        super().__init__(f"no room for a {kind.name} BAR of {size:#x} bytes")
        self.kind, self.size, self.request = kind, size, request


@dataclass
class BarRequest:
    """A BAR waiting for an address; ``owner`` is opaque to the allocator."""

    owner: object
    idx: int
    kind: BarKind
    size: int


@dataclass
class BusWindow:
    """Address ranges a bus decodes, as bhyve writes them into the DSDT's _CRS."""

    bus: int
    iobase: int
    iolimit: int
    membase32: int
    memlimit32: int
    membase64: int
    memlimit64: int


@dataclass
class BarAllocator:
    """bhyve's three cursors (I/O, 32-bit and 64-bit memory) for one VM."""

    highmem_size: int = 0
    iobase: int = PCI_IOBASE
    membase32: int = PCI_MEMBASE32
    membase64: int = 0
    memlimit64: int = 0
    windows: list[BusWindow] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.membase64:
            self.membase64 = _roundup(HIGHMEM_BASE + self.highmem_size, PCI_MEMSIZE64)
        if not self.memlimit64:
            self.memlimit64 = self.membase64 + PCI_MEMSIZE64

    def _take(self, which: str, limit: int, size: int) -> int:
        base = _roundup(getattr(self, which), size)
        if base + size > limit:
            raise BarSpaceExhausted(BarKind.NONE, size)
        setattr(self, which, base + size)
        return base

    def place(self, kind: BarKind, size: int) -> int:
        """An address for one BAR (ROM BARs get none: firmware places them)."""
        try:
            if kind == BarKind.IO:
                return self._take("iobase", PCI_IOLIMIT, size)
            if kind == BarKind.MEM32 or (kind == BarKind.MEM64 and size <= MEM64_IN_32BIT_MAX):
                return self._take("membase32", PCI_MEMLIMIT32, size)
            if kind == BarKind.MEM64:
                return self._take("membase64", self.memlimit64, size)
        except BarSpaceExhausted:
            raise BarSpaceExhausted(kind, size) from None
        return 0

    def assign_bus(self, bus: int, requests: Iterable[BarRequest]) -> list[tuple[BarRequest, int]]:
        """Place one bus's BARs, largest first, and close the bus's windows."""
        w = BusWindow(bus, self.iobase, 0, self.membase32, 0, self.membase64, 0)
        ordered = sorted(requests, key=lambda r: -r.size)     # stable: ties keep order
        placed = []
        for r in ordered:
            try:
                placed.append((r, self.place(r.kind, r.size)))
            except BarSpaceExhausted as e:
                raise BarSpaceExhausted(e.kind, e.size, r) from None
        self.iobase = _roundup(self.iobase + BUSIO_ROUNDUP, BUSIO_ROUNDUP)
        self.membase32 = _roundup(self.membase32 + BUSMEM32_ROUNDUP, BUSMEM32_ROUNDUP)
        self.membase64 = _roundup(self.membase64 + BUSMEM64_ROUNDUP, BUSMEM64_ROUNDUP)
        w.iolimit, w.memlimit32, w.memlimit64 = self.iobase, self.membase32, self.membase64
        self.windows.append(w)
        return placed


def _roundup(x: int, align: int) -> int:
    return (x + align - 1) // align * align
