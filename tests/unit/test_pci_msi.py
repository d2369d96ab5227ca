"""Capability list, MSI and MSI-X programming, masking and delivery."""

from __future__ import annotations

import pytest

from bhyvepy.dev.hostbridge import HostBridge
from bhyvepy.pci import IrqMode

from pci_testkit import Machine, SampleDevice

LAPIC = 0xFEE00000


@pytest.fixture
def m() -> Machine:
    m = Machine()
    m.dev = m.add(SampleDevice, 0, 3, 0)
    m.add(HostBridge, 0, 0, 0)
    m.pci.finalize()
    return m


def walk_caps(m: Machine, b: int, s: int, f: int) -> list[tuple[int, int]]:
    assert m.cfg1_read(b, s, f, 0x06, 2) & 0x10          # capability list present
    caps, ptr, seen = [], m.cfg1_read(b, s, f, 0x34, 1), set()
    while ptr:
        assert ptr >= 0x40 and ptr & 3 == 0 and ptr not in seen
        seen.add(ptr)
        caps.append((ptr, m.cfg1_read(b, s, f, ptr, 1)))
        ptr = m.cfg1_read(b, s, f, ptr + 1, 1)
    return caps


def test_capability_list_walk(m: Machine) -> None:
    assert walk_caps(m, 0, 3, 0) == [(0x40, 0x05), (0x50, 0x11)]   # MSI (14 bytes -> 16), MSI-X
    assert walk_caps(m, 0, 0, 0) == [(0x40, 0x10)]                  # PCIe


def test_capability_ids_and_links_are_read_only(m: Machine) -> None:
    m.cfg1_write(0, 3, 0, 0x40, 2, 0xFFFF)
    m.cfg1_write(0, 3, 0, 0x50, 4, 0xFFFFFFFF)
    assert walk_caps(m, 0, 3, 0) == [(0x40, 0x05), (0x50, 0x11)]


def msi_program(m: Machine, data: int, ctrl: int) -> None:
    m.cfg1_write(0, 3, 0, 0x44, 4, LAPIC)
    m.cfg1_write(0, 3, 0, 0x48, 4, 0)
    m.cfg1_write(0, 3, 0, 0x4C, 2, data)
    m.cfg1_write(0, 3, 0, 0x42, 2, ctrl)


def test_msi_control_read_only_bits(m: Machine) -> None:
    ctrl = m.cfg1_read(0, 3, 0, 0x42, 2)
    assert ctrl == 0x0084                       # 64-bit, 4 messages capable, disabled
    m.cfg1_write(0, 3, 0, 0x42, 2, 0xFF00)
    assert m.cfg1_read(0, 3, 0, 0x42, 2) == 0x0084


def test_msi_delivery_uses_the_enabled_message_count(m: Machine) -> None:
    d = m.dev
    msi_program(m, 0x4040, 0x0021)              # enable, 4 messages
    assert d.msi_enabled and d.irq_mode() == IrqMode.MSI
    assert d.signal_vector(2) == IrqMode.MSI
    assert d.signal_vector(3) == IrqMode.MSI
    assert d.signal_vector(4) == IrqMode.MSI    # beyond the granted count: dropped
    assert m.msi.sent == [(LAPIC, 0x4042), (LAPIC, 0x4043)]
    msi_program(m, 0x4040, 0x0001)              # one message only
    d.signal_vector(1)
    assert len(m.msi.sent) == 2


def test_msi_enable_through_a_dword_write_at_the_capability(m: Machine) -> None:
    m.cfg1_write(0, 3, 0, 0x44, 4, LAPIC)
    m.cfg1_write(0, 3, 0, 0x4C, 2, 0x51)
    m.cfg1_write(0, 3, 0, 0x40, 4, 0x0001_FFFF)  # id/next ignored, control enabled
    assert m.dev.msi_enabled
    m.dev.signal_vector(0)
    assert m.msi.sent == [(LAPIC, 0x51)]


def msix_table(m: Machine) -> int:
    return m.dev.bars[4].addr


def msix_entry(m: Machine, i: int, addr: int, data: int, ctrl: int) -> None:
    base = msix_table(m) + 16 * i
    m.dispatch.mmio_write(0, base, 8, addr)
    m.dispatch.mmio_write(0, base + 8, 4, data)
    m.dispatch.mmio_write(0, base + 12, 4, ctrl)


def pba(m: Machine) -> int:
    return m.dispatch.mmio_read(0, msix_table(m) + 0x1000, 8)


def test_msix_capability_layout(m: Machine) -> None:
    assert m.cfg1_read(0, 3, 0, 0x52, 2) == 2             # table size 3 encoded as N-1
    assert m.cfg1_read(0, 3, 0, 0x54, 4) == 0x0000 | 4    # table at 0 of BAR 4
    assert m.cfg1_read(0, 3, 0, 0x58, 4) == 0x1000 | 4    # PBA on the next 4 KiB
    # all vectors start masked
    for i in range(3):
        assert m.dispatch.mmio_read(0, msix_table(m) + 16 * i + 12, 4) == 1


def test_msix_delivery_masking_and_pending_bits(m: Machine) -> None:
    d = m.dev
    m.cfg1_write(0, 3, 0, 0x52, 2, 0x8000)                # enable MSI-X
    assert d.irq_mode() == IrqMode.MSIX
    msix_entry(m, 1, LAPIC | 0x1000, 0x61, 0)
    msix_entry(m, 0, LAPIC, 0x60, 1)                      # programmed, still masked
    assert d.signal_vector(1) == IrqMode.MSIX
    assert m.msi.sent == [(LAPIC | 0x1000, 0x61)]
    d.signal_vector(0)                                    # masked: latched
    assert m.msi.sent == [(LAPIC | 0x1000, 0x61)]
    assert pba(m) == 0b001
    m.dispatch.mmio_write(0, msix_table(m) + 12, 4, 0)    # unmask entry 0
    assert m.msi.sent[-1] == (LAPIC, 0x60)
    assert pba(m) == 0
    # function mask holds every vector, lifting it sends what is pending
    m.cfg1_write(0, 3, 0, 0x52, 2, 0xC000)
    d.signal_vector(1)
    d.signal_vector(0)
    assert len(m.msi.sent) == 2 and pba(m) == 0b011
    m.cfg1_write(0, 3, 0, 0x52, 2, 0x8000)
    assert sorted(m.msi.sent[2:]) == [(LAPIC, 0x60), (LAPIC | 0x1000, 0x61)]
    assert pba(m) == 0
    assert not d.accesses                                 # the device never saw the table


def test_msix_table_access_rules(m: Machine) -> None:
    t = msix_table(m)
    m.dispatch.mmio_write(0, t + 8, 4, 0xABCD)
    assert m.dispatch.mmio_read(0, t + 8, 4) == 0xABCD
    assert m.dispatch.mmio_read(0, t + 8, 1) == 0xCD      # byte reads allowed (ddb)
    assert m.dispatch.mmio_read(0, t + 8, 2) == 0xFFFF    # word reads are not
    m.dispatch.mmio_write(0, t + 8, 2, 0)                 # nor word writes
    m.dispatch.mmio_write(0, t + 10, 4, 0)                # nor unaligned ones
    assert m.dispatch.mmio_read(0, t + 8, 4) == 0xABCD
    m.dispatch.mmio_write(0, t + 0x1000, 8, 0xFF)         # PBA is read-only
    assert pba(m) == 0
    # the rest of the BAR is the device's
    m.dispatch.mmio_read(0, t + 0x1800, 4)
    assert m.dev.accesses == [("r", 4, 0x1800, 4)]


def test_msix_needs_msi_off_and_disables_intx(m: Machine) -> None:
    d = m.dev
    m.cfg1_write(0, 3, 0, 0x52, 2, 0x8000)
    msix_entry(m, 0, LAPIC, 0x70, 0)
    msi_program(m, 0x40, 0x0001)                          # MSI wins when both are on (bhyve)
    assert d.irq_mode() == IrqMode.MSI and not d.msix_enabled
    d.signal_vector(0)
    assert m.msi.sent == [(LAPIC, 0x40)]
    msi_program(m, 0x40, 0x0000)
    d.signal_vector(0)
    assert m.msi.sent[-1] == (LAPIC, 0x70)


def test_without_msi_or_msix_signal_vector_asserts_intx(m: Machine) -> None:
    d = m.dev
    assert d.irq_mode() == IrqMode.INTX
    assert d.signal_vector(5) == IrqMode.INTX
    assert m.cfg1_read(0, 3, 0, 0x06, 2) & 0x08           # interrupt status bit
    assert any(c[0] == "ioapic_assert" for c in m.vm.calls)
    d.intx_deassert()
    assert not m.cfg1_read(0, 3, 0, 0x06, 2) & 0x08
