"""BAR sizing protocol, bhyve's placement rules and decode registration."""

from __future__ import annotations

import pytest

from bhyvepy.pci import BarKind, PciContext, PciFunction, PciInitError
from bhyvepy.pci.bars import bar_size

from pci_testkit import Machine, SampleDevice

GiB, MiB = 1 << 30, 1 << 20


class Bars(PciFunction):
    """A device made only of the BARs it is given: [(index, kind, size), ...]."""

    emulation = "bars"

    def __init__(self, ctx: PciContext, bars: list[tuple[int, BarKind, int]]) -> None:
        super().__init__(ctx)
        self.set_ids(0x1234, 0x5678, 0xFF0000)
        for idx, kind, size in bars:
            self.add_bar(idx, kind, size)
        self.decode_events: list[tuple[int, bool, int]] = []
        self.reads: list[tuple[int, int, int]] = []

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self.reads.append((bar, offset, size))
        return 0xA5A5A5A5 & ((1 << 8 * size) - 1)

    def on_bar_decode(self, bar: int, enabled: bool, addr: int) -> None:
        self.decode_events.append((bar, enabled, addr))


def test_sizes_round_up_to_powers_of_two_with_minimums() -> None:
    assert bar_size(BarKind.IO, 1) == 4
    assert bar_size(BarKind.MEM32, 1) == 16
    assert bar_size(BarKind.MEM32, 4097) == 8192
    assert bar_size(BarKind.MEM64, 4096) == 4096
    with pytest.raises(ValueError):
        bar_size(BarKind.MEM32, 0)


# --- sizing protocol ---------------------------------------------------------
@pytest.fixture
def sizing() -> tuple[Machine, SampleDevice]:
    m = Machine(bootrom=True)            # BARs not decoded: a firmware sizes them
    d = m.add(SampleDevice, 0, 3, 0, big64=8 * GiB)
    m.pci.finalize()
    return m, d


def size_probe(m: Machine, off: int) -> int:
    orig = m.cfg1_read(0, 3, 0, off, 4)
    m.cfg1_write(0, 3, 0, off, 4, 0xFFFFFFFF)
    probed = m.cfg1_read(0, 3, 0, off, 4)
    m.cfg1_write(0, 3, 0, off, 4, orig)
    assert m.cfg1_read(0, 3, 0, off, 4) == orig
    return probed


def test_io_bar_sizing(sizing) -> None:
    m, _ = sizing
    # The low bit says I/O; the upper half reads back what was written (bhyve
    # reads zero there, which makes 32-bit size arithmetic in firmware such
    # as SeaBIOS see a 4 GiB BAR), so all-ones gives the usual 32-bit mask.
    probe = size_probe(m, 0x10)
    assert probe == 0xFFFFFFF9
    assert ((~(probe & ~0x3)) & 0xFFFFFFFF) + 1 == 8


def test_mem32_bar_sizing(sizing) -> None:
    m, _ = sizing
    assert size_probe(m, 0x14) == 0xFFFFF000


def test_mem64_bar_sizing_both_halves(sizing) -> None:
    m, d = sizing
    lo = size_probe(m, 0x18)
    hi = size_probe(m, 0x1C)
    assert lo & 0xF == 0x4                     # 64-bit memory type
    size = (~((hi << 32) | (lo & ~0xF)) & (2**64 - 1)) + 1
    assert size == 8 * GiB == d.bars[2].size


def test_unused_bar_reads_zero_and_ignores_writes(sizing) -> None:
    m, _ = sizing
    m.cfg1_write(0, 3, 0, 0x24, 4, 0xFFFFFFFF)
    assert m.cfg1_read(0, 3, 0, 0x24, 4) == 0


def test_partial_bar_writes_are_ignored(sizing) -> None:
    m, d = sizing
    before = m.cfg1_read(0, 3, 0, 0x14, 4)
    m.cfg1_write(0, 3, 0, 0x14, 2, 0xFFFF)
    m.cfg1_write(0, 3, 0, 0x17, 1, 0x12)
    assert m.cfg1_read(0, 3, 0, 0x14, 4) == before
    assert d.bars[1].addr == before & ~0xF


# --- placement -------------------------------------------------------------------
def test_placement_follows_bhyve_rules() -> None:
    m = Machine()
    a = m.add(SampleDevice, 0, 3, 0)          # IO 8, MEM32 4K, MEM64 16K, MSI-X BAR 8K
    b = m.add(Bars, 0, 4, 0, [(0, BarKind.MEM64, 256 * MiB), (2, BarKind.MEM32, MiB),
                              (3, BarKind.IO, 256)])
    c = m.add(Bars, 1, 0, 0, [(0, BarKind.IO, 4), (1, BarKind.MEM32, 16),
                              (2, BarKind.MEM64, 512 * MiB)])
    m.pci.finalize()
    # bus 0, largest first; a 64-bit BAR over 128 MiB goes above high RAM
    # rounded to 32 GiB, smaller 64-bit BARs stay below 4 GiB.
    assert b.bars[0].addr == 32 * GiB
    assert b.bars[2].addr == 0xC0000000
    assert b.bars[3].addr == 0x2000
    assert a.bars[2].addr == 0xC0100000
    assert a.bars[4].addr == 0xC0104000
    assert a.bars[1].addr == 0xC0106000
    assert a.bars[0].addr == 0x2100
    # bus 1 starts after 32 ports / 1 MiB / 512 MiB of slack, rounded.
    assert c.bars[0].addr == 0x2140
    assert c.bars[1].addr == 0xC0300000
    assert c.bars[2].addr == 33 * GiB         # 32 GiB + 256 MiB + 512 MiB, rounded
    w0, w1 = m.pci.windows()
    assert (w0.iobase, w0.iolimit, w0.membase32, w0.memlimit32) == (0x2000, 0x2140, 0xC0000000, 0xC0300000)
    assert (w1.bus, w1.iobase, w1.membase64) == (1, 0x2140, 33 * GiB)
    # the guest reads the same addresses from the BAR registers
    assert m.bar_addr(b, 0) == 32 * GiB
    assert m.bar_addr(a, 0) == 0x2100


def test_64bit_window_follows_high_memory() -> None:
    m = Machine(highmem_size=30 * GiB)
    d = m.add(Bars, 0, 3, 0, [(0, BarKind.MEM64, 256 * MiB)])
    m.pci.finalize()
    assert d.bars[0].addr == 64 * GiB       # roundup(4 GiB + 30 GiB, 32 GiB)


def test_equal_sizes_keep_slot_order_whatever_the_add_order() -> None:
    m = Machine()
    late = m.add(Bars, 0, 9, 0, [(0, BarKind.MEM32, 4096)])
    early = m.add(Bars, 0, 5, 0, [(0, BarKind.MEM32, 4096)])
    m.pci.finalize()
    assert early.bars[0].addr < late.bars[0].addr


def test_exhausted_32bit_window_is_a_clear_error() -> None:
    m = Machine()
    m.add(Bars, 0, 3, 0, [(0, BarKind.MEM32, 256 * MiB), (1, BarKind.MEM32, 256 * MiB)])
    m.add(Bars, 0, 4, 0, [(0, BarKind.MEM32, 16)])
    with pytest.raises(PciInitError, match=r"pci slot 0:4:0: .*BAR 0"):
        m.pci.finalize()


def test_bad_bar_declarations_are_programming_errors() -> None:
    m = Machine()
    with pytest.raises(ValueError):
        m.add(Bars, 0, 3, 0, [(5, BarKind.MEM64, 4096)])
    with pytest.raises(ValueError):
        m.add(Bars, 0, 3, 0, [(0, BarKind.MEM64, 4096), (1, BarKind.IO, 4)])


# --- decode -------------------------------------------------------------------------
def test_enable_bars_decodes_from_the_start_and_command_toggles_registration() -> None:
    m = Machine()
    d = m.add(SampleDevice, 0, 3, 0)
    m.pci.finalize()
    io, mem = d.bars[0].addr, d.bars[1].addr
    assert m.cfg1_read(0, 3, 0, 4, 2) & 0x7 == 0x7       # I/O, memory, bus master
    assert m.dispatch.pio_in(0, io + 2, 1) == 0x11 + 2
    assert m.dispatch.mmio_read(0, mem + 0x10, 4) == 0x22 + 0x10
    m.cfg1_write(0, 3, 0, 4, 2, 0x0004)                  # I/O and memory decode off
    assert m.ports.lookup(io) is None and m.mmio.lookup(mem) is None
    assert m.dispatch.pio_in(0, io, 1) == 0xFF
    m.cfg1_write(0, 3, 0, 4, 2, 0x0001)                  # I/O only
    assert m.ports.lookup(io) is not None and m.mmio.lookup(mem) is None
    m.cfg1_write(0, 3, 0, 4, 2, 0x0002)                  # memory only
    assert m.ports.lookup(io) is None and m.mmio.lookup(mem) is not None


def test_without_enable_bars_nothing_decodes_until_the_guest_enables() -> None:
    m = Machine(bootrom=True)
    d = m.add(SampleDevice, 0, 3, 0)
    m.pci.finalize()
    assert d.bars[1].addr >= 0xC0000000                   # placed all the same
    assert m.cfg1_read(0, 3, 0, 4, 2) == 0
    assert m.mmio.lookup(d.bars[1].addr) is None and m.ports.lookup(d.bars[0].addr) is None
    m.cfg1_write(0, 3, 0, 4, 2, 0x0003)
    assert m.mmio.lookup(d.bars[1].addr) is not None and m.ports.lookup(d.bars[0].addr) is not None


def test_moving_a_decoded_bar_moves_its_registration() -> None:
    m = Machine()
    d = m.add(Bars, 0, 3, 0, [(0, BarKind.MEM64, 4096), (2, BarKind.IO, 16)])
    m.pci.finalize()
    old = d.bars[0].addr
    m.cfg1_write(0, 3, 0, 0x10, 4, 0xD0000000)
    m.cfg1_write(0, 3, 0, 0x14, 4, 0x00000001)            # upper half: above 4 GiB
    assert d.bars[0].addr == 0x1_D0000000
    assert m.mmio.lookup(old) is None
    assert m.dispatch.mmio_read(0, 0x1_D0000000 + 8, 2) == 0xA5A5
    m.cfg1_write(0, 3, 0, 0x18, 4, 0x3000)
    assert m.ports.lookup(0x3000) is not None and m.ports.lookup(0x2000) is None
    assert (0, True, 0x1_D0000000) in d.decode_events and (0, False, old) in d.decode_events


def test_bar_over_another_range_stays_undecoded_until_the_range_is_free() -> None:
    m = Machine()
    a = m.add(Bars, 0, 3, 0, [(0, BarKind.MEM32, 4096)])
    b = m.add(Bars, 0, 4, 0, [(0, BarKind.MEM32, 4096)])
    m.pci.finalize()
    a_addr = a.bars[0].addr
    m.cfg1_write(0, 4, 0, 0x10, 4, a_addr)                 # b over a
    assert b.bars[0].addr == a_addr
    assert m.pci.decoded_ranges(b)[0] == (a_addr, 4096, False)
    m.dispatch.mmio_read(0, a_addr, 4)
    assert a.reads and not b.reads                        # a keeps its accesses
    m.cfg1_write(0, 3, 0, 0x10, 4, 0xD0000000)             # a moves away
    assert m.pci.decoded_ranges(b)[0] == (a_addr, 4096, True)
    m.dispatch.mmio_read(0, a_addr, 4)
    assert b.reads


def test_bar_over_ecam_or_config_ports_is_refused_quietly() -> None:
    m = Machine()
    d = m.add(Bars, 0, 3, 0, [(0, BarKind.MEM32, 4096), (1, BarKind.IO, 4)])
    m.pci.finalize()
    m.cfg1_write(0, 3, 0, 0x10, 4, 0xE0000000)
    m.cfg1_write(0, 3, 0, 0x14, 4, 0xCF8)
    assert m.pci.decoded_ranges(d)[0][2] is False and m.pci.decoded_ranges(d)[1][2] is False
    # config access still works
    assert m.cfg1_read(0, 3, 0, 0, 4) == 0x56781234


def test_bar_accesses_are_bounds_checked_and_qwords_split() -> None:
    m = Machine()
    d = m.add(SampleDevice, 0, 3, 0)
    m.pci.finalize()
    io = d.bars[0].addr
    assert m.dispatch.pio_in(0, io + 6, 4) == 0xFFFFFFFF   # runs past the 8-port BAR
    assert not d.accesses
    mem = d.bars[2].addr
    v = m.dispatch.mmio_read(0, mem + 8, 8)
    assert d.accesses == [("r", 2, 8, 4), ("r", 2, 12, 4)]
    assert v == (0x33 + 8) | (0x33 + 12) << 32
    m.dispatch.mmio_write(0, mem, 8, 0x1122334455667788)
    assert d.accesses[-2:] == [("w", 2, 0, 4, 0x55667788), ("w", 2, 4, 4, 0x11223344)]
