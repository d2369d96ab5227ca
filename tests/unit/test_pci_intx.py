"""INTx: pin choice, I/O APIC pins, PIRQ links to ISA IRQs, level sharing."""

from __future__ import annotations

import pytest

from bhyvepy.dev.lpc import LpcBridge
from bhyvepy.pci import PciContext, PciFunction

from pci_testkit import Machine


class Intx(PciFunction):
    emulation = "intx"

    def __init__(self, ctx: PciContext, use_intx: bool = True) -> None:
        super().__init__(ctx)
        self.set_ids(0x1234, 0x0001, 0xFF0000)
        if use_intx:
            self.line = self.intx()


def routed(m: Machine, fn: PciFunction) -> tuple[int, int, int]:
    """(INTPIN, INTLINE, I/O APIC pin) as the guest and the router see them."""
    route = fn._intx_line.route if fn._intx_line else None
    return (m.cfg1_read(fn.bus, fn.slot, fn.func, 0x3D, 1), m.cfg1_read(fn.bus, fn.slot, fn.func, 0x3C, 1),
            route.ioapic_pin if route else 0)


def isa_machine(**kw) -> Machine:
    m = Machine(**kw)
    m.pci.router.reserve(4)      # COM1/COM3, as the LPC UARTs do
    m.pci.router.reserve(3)      # COM2/COM4
    return m


def test_round_robin_ioapic_pins_and_least_used_pirq_links() -> None:
    m = isa_machine()
    m.pci.router.use(9)          # the SCI shares IRQ 9
    fns = [m.add(Intx, 0, s, 0) for s in (3, 4, 5, 6, 7, 8, 9, 10, 11)]
    none = m.add(Intx, 0, 12, 0, use_intx=False)
    m.pci.finalize()
    got = [routed(m, f) for f in fns]
    # INTA everywhere; I/O APIC pins 16-23 then wrap; links A-H then A again;
    # link IRQs: least-used permitted IRQ not reserved (3, 4) -- 9 comes late.
    assert [g[2] for g in got] == [16, 17, 18, 19, 20, 21, 22, 23, 16]
    assert [g[1] for g in got] == [5, 6, 7, 10, 11, 12, 14, 15, 5]
    assert all(g[0] == 1 for g in got)
    assert routed(m, none) == (0, 255, 0)
    assert ("isa_set_irq_trigger", 5, True) in m.vm.calls
    assert m.pci.router.pirq_read(1) == 5 and m.pci.router.pirq_read(8) == 15


def test_vmm_sized_ioapic_uses_pins_up_to_31() -> None:
    m = isa_machine(ioapic_pincount=32)
    fns = [m.add(Intx, 0, s, 0) for s in range(1, 19)]
    m.pci.finalize()
    assert [routed(m, f)[2] for f in fns] == list(range(16, 32)) + [16, 17]


def test_fixed_mapping_with_a_boot_rom() -> None:
    m = isa_machine(bootrom=True)
    a = m.add(Intx, 0, 3, 0)
    b = m.add(Intx, 0, 4, 0)
    m.pci.finalize()
    assert a._intx_line.route.ioapic_pin == 16 + (4 + 3 + 1) % 8
    assert a._intx_line.route.pirq_pin == (4 + 3 + 1) % 8 + 1
    assert b._intx_line.route.ioapic_pin == 16 + (4 + 4 + 1) % 8
    assert b._intx_line.route.pirq_pin == (4 + 4 + 1) % 8 + 1


def test_functions_of_a_slot_spread_over_inta_to_intd() -> None:
    m = isa_machine()
    fns = [m.add(Intx, 0, 6, f) for f in range(6)]
    m.pci.finalize()
    assert [routed(m, f)[0] for f in fns] == [1, 2, 3, 4, 1, 2]
    assert fns[0]._intx_line.route == fns[4]._intx_line.route
    assert [r[1] for r in m.pci.intx_routes(0)] == [1, 2, 3, 4]


def test_assert_drives_pirq_irq_and_ioapic_pin_and_shares_levels() -> None:
    m = isa_machine()
    fns = [m.add(Intx, 0, 6, f) for f in range(5)]    # f0 and f4 share INTA of slot 6
    m.pci.finalize()
    m.vm.calls.clear()
    a, b = fns[0], fns[4]
    irq, pin = routed(m, a)[1], routed(m, a)[2]
    a.line.assert_()
    assert m.vm.calls == [("isa_assert", irq, -1), ("ioapic_assert", pin)]
    b.line.assert_()
    assert len(m.vm.calls) == 2                        # already high
    a.line.deassert()
    assert len(m.vm.calls) == 2                        # b still holds it
    b.line.deassert()
    assert m.vm.calls[2:] == [("isa_deassert", irq, -1), ("ioapic_deassert", pin)]
    assert all(v == 0 for v in m.vm.levels().values())


def test_pirq_register_writes_move_an_asserted_line() -> None:
    m = isa_machine()
    lpc = m.add(LpcBridge, 0, 31, 0)
    dev = m.add(Intx, 0, 3, 0)
    m.pci.finalize()
    link = dev._intx_line.route.pirq_pin
    off = (0x60, 0x61, 0x62, 0x63, 0x68, 0x69, 0x6A, 0x6B)[link - 1]
    old_irq = m.cfg1_read(0, 31, 0, off, 1)
    assert old_irq == routed(m, dev)[1]
    dev.intx_assert()
    m.vm.calls.clear()
    m.cfg1_write(0, 31, 0, off, 1, 10)                 # the guest's _SRS
    assert m.vm.calls == [("isa_deassert", old_irq, -1), ("isa_assert", 10, -1)]
    assert m.cfg1_read(0, 31, 0, off, 1) == 10
    m.cfg1_write(0, 31, 0, off, 1, 0x8A)               # _DIS: link disabled
    assert m.vm.calls[-1] == ("isa_deassert", 10, -1)
    assert m.cfg1_read(0, 31, 0, off, 1) == 0x8A
    m.cfg1_write(0, 31, 0, off, 1, 0x0D)               # IRQ 13 is not permitted: not driven
    assert m.vm.calls[-1] == ("isa_deassert", 10, -1)
    m.cfg1_write(0, 31, 0, off, 1, 0x7B)               # reserved bits dropped
    assert m.cfg1_read(0, 31, 0, off, 1) == 0x0B
    assert m.vm.calls[-1] == ("isa_assert", 11, -1)
    dev.intx_deassert()
    assert m.vm.calls[-2:] == [("isa_deassert", 11, -1), ("ioapic_deassert", routed(m, dev)[2])]
    # a dword write over the four registers routes each of them
    m.cfg1_write(0, 31, 0, 0x60, 4, 0x0E0C0B0A)
    assert [m.pci.router.pirq_read(p) for p in (1, 2, 3, 4)] == [0x0A, 0x0B, 0x0C, 0x0E]
    assert m.cfg1_read(0, 31, 0, 0x60, 4) == 0x0E0C0B0A
    assert lpc.cfg.get32(0x60) == 0x0E0C0B0A


def test_intx_disable_and_msi_keep_the_line_pending() -> None:
    m = isa_machine()
    d = m.add(Intx, 0, 3, 0)
    m.pci.finalize()
    pin = routed(m, d)[2]
    d.intx_assert()
    m.cfg1_write(0, 3, 0, 0x04, 2, 0x0400 | m.cfg1_read(0, 3, 0, 0x04, 2))   # INTx disable
    assert m.vm.calls[-1] == ("ioapic_deassert", pin)
    assert m.cfg1_read(0, 3, 0, 0x06, 2) & 0x08       # still pending in status
    m.cfg1_write(0, 3, 0, 0x04, 2, m.cfg1_read(0, 3, 0, 0x04, 2) & ~0x0400)
    assert m.vm.calls[-1] == ("ioapic_assert", pin)
    d.intx_deassert()
    m.cfg1_write(0, 3, 0, 0x04, 2, 0x0400)
    d.intx_assert()                                    # raised while disabled
    assert m.vm.calls[-1] == ("ioapic_deassert", pin)
    d.intx_deassert()                                  # withdrawn before enable
    m.cfg1_write(0, 3, 0, 0x04, 2, 0)
    assert m.vm.calls[-1] == ("ioapic_deassert", pin)
    assert all(v == 0 for v in m.vm.levels().values())


def test_isa_irqs_must_be_claimed_before_routing() -> None:
    m = isa_machine()
    m.add(Intx, 0, 3, 0)
    m.pci.finalize()
    with pytest.raises(RuntimeError):
        m.pci.router.reserve(5)
