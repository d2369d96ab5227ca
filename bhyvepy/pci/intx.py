"""Legacy PCI interrupts (INTx): bhyve's pin assignment and its PIRQ router.

bhyve wires every (bus, slot, INTx pin) in use to two places at once, so a
guest finds it whether it runs the 8259 or the I/O APIC:

* an I/O APIC pin of 16 and up -- round-robin over the pins above 15, or,
  when booting from a ROM (whose tables are fixed), ``16 + (4 + slot + pin) % 8``;
* one of eight PIRQ links A-H of an ICH-like interrupt router -- the least
  used link, or ``(4 + slot + pin) % 8`` with a ROM -- whose routing register
  (LPC config bytes 0x60-0x63, 0x68-0x6B) selects an ISA IRQ.  An unrouted
  link gets the least-used ISA IRQ among 3-7, 9-12, 14-15 that no ISA
  device reserved, and that IRQ is switched to level-triggered.

Lines are level-triggered and shared: each asserted function counts once on
its I/O APIC pin (:class:`~bhyvepy.irq.SharedIoapicPin`), each PIRQ link
with at least one asserted function counts once on its ISA IRQ, and the
backend is told only about 0 <-> 1 transitions, so one function deasserting
never drops another's interrupt.  The 8259 side is driven with
``isa_assert(irq, -1)`` (no I/O APIC pin), as bhyve's ``pirq_write`` does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from bhyvepy.irq import SharedIoapicPin, SharedPinLine

PIRQ_DIS = 0x80
PIRQ_IRQ = 0x0F
NPIRQS = 8
#: ISA IRQs a PIRQ link may use: 3-7, 9-12, 14, 15.
PERMITTED_IRQS = 0xDEF8
NISA_IRQS = 16
IRQ_DISABLED = 0xFF
#: LPC config offsets of the PIRQ routing registers, link A first.
PIRQ_OFFSETS = (0x60, 0x61, 0x62, 0x63, 0x68, 0x69, 0x6A, 0x6B)


def irq_permitted(irq: int) -> bool:
    return 0 <= irq < NISA_IRQS and bool((1 << irq) & PERMITTED_IRQS)


def pirq_valid(reg: int) -> bool:
    """A link drives its IRQ only when enabled and set to a permitted IRQ."""
    return not reg & PIRQ_DIS and irq_permitted(reg & PIRQ_IRQ)


def pirq_name(pin: int) -> str:
    """ACPI name of a link device (bhyve's ``\\_SB.PC00.ISA.LNKx``)."""
    return f"\\_SB.PC00.ISA.LNK{'ABCDEFGH'[pin - 1]}"


@dataclass(frozen=True, slots=True)
class IntxRoute:
    """Where one (bus, slot, INTx pin) is wired: PIRQ link 1-8, I/O APIC pin."""

    pirq_pin: int
    ioapic_pin: int


class IntxRouter:
    """INTx wiring of one VM: pin choice, I/O APIC pins, PIRQ links A-H.

    ``vm`` needs ``isa_assert/isa_deassert(irq, ioapic_pin)`` and, for
    the default ``pin_source``, ``ioapic_assert/ioapic_deassert``; an optional
    ``isa_set_irq_trigger(irq, level)`` is called when a link gets an IRQ.
    ``ioapic_pincount`` is the backend's I/O APIC size (32 on vmm.ko, 24 on
    KVM).  ``pin_source`` lets the VM share :class:`SharedIoapicPin` objects
    with other users of those pins (an HPET may use pins 20-23).
    """

    def __init__(self, vm: Any, *, ioapic_pincount: int = 24, fixed_mapping: bool = False,
                 pin_source: Callable[[int], SharedIoapicPin] | None = None) -> None:
        self.vm = vm
        self.fixed_mapping = fixed_mapping
        self.pci_pins = max(0, ioapic_pincount - 16)
        self._pin_source = pin_source
        self._ioapic_pins: dict[int, SharedIoapicPin] = {}
        self._lock = threading.Lock()
        self._regs = [PIRQ_DIS] * NPIRQS
        self._use = [0] * NPIRQS
        self._active = [0] * NPIRQS
        self._irq_counts = [0 if irq_permitted(i) else IRQ_DISABLED for i in range(NISA_IRQS)]
        self._isa_level = [0] * NISA_IRQS
        self._slot_pins: dict[tuple[int, int], list[int]] = {}
        self._routes: dict[tuple[int, int, int], IntxRoute] = {}
        self._next_ioapic = 0
        self._cold = True

    # --- set-up: ISA devices claim IRQs before PCI interrupts are routed -----
    def reserve(self, irq: int) -> None:
        """An ISA device owns ``irq``: no PIRQ link will be routed to it."""
        if not 0 <= irq < NISA_IRQS:
            raise ValueError(f"ISA IRQ {irq} out of range")
        if not self._cold:
            raise RuntimeError("ISA IRQs must be reserved before PCI interrupts are routed")
        if self._irq_counts[irq] not in (0, IRQ_DISABLED):
            raise RuntimeError(f"ISA IRQ {irq} is already used by a PIRQ link")
        self._irq_counts[irq] = IRQ_DISABLED

    def use(self, irq: int) -> None:
        """An ISA device shares ``irq`` (the SCI): links prefer other IRQs."""
        if not 0 <= irq < NISA_IRQS:
            raise ValueError(f"ISA IRQ {irq} out of range")
        if not self._cold:
            raise RuntimeError("ISA IRQs must be claimed before PCI interrupts are routed")
        if self._irq_counts[irq] == IRQ_DISABLED:
            raise RuntimeError(f"ISA IRQ {irq} is reserved")
        self._irq_counts[irq] += 1

    # --- pin choice and routing ----------------------------------------------
    def request_pin(self, bus: int, slot: int) -> int:
        """The least-used INTA-INTD of a slot for one more function (1-4)."""
        counts = self._slot_pins.setdefault((bus, slot), [0, 0, 0, 0])
        best = min(range(4), key=lambda p: counts[p])      # first minimum
        counts[best] += 1
        return best + 1

    def route(self, bus: int, slot: int, pin: int) -> IntxRoute:
        """Wire (bus, slot, pin) once; later calls return the same route."""
        key = (bus, slot, pin)
        r = self._routes.get(key)
        if r is None:
            r = IntxRoute(self._alloc_pirq(slot, pin), self._alloc_ioapic(slot, pin))
            self._routes[key] = r
        return r

    def _alloc_ioapic(self, slot: int, pin: int) -> int:
        if self.pci_pins == 0:
            raise RuntimeError("the I/O APIC has no pins for PCI interrupts")
        if self.fixed_mapping:
            return 16 + (4 + slot + pin) % 8
        p = 16 + self._next_ioapic % self.pci_pins
        self._next_ioapic += 1
        return p

    def _alloc_pirq(self, slot: int, pin: int) -> int:
        self._cold = False
        if self.fixed_mapping:
            best = (4 + slot + pin) % NPIRQS
        else:
            best = min(range(NPIRQS), key=lambda p: self._use[p])
        self._use[best] += 1
        if self._regs[best] == PIRQ_DIS:
            candidates = [i for i in range(NISA_IRQS) if self._irq_counts[i] != IRQ_DISABLED]
            if not candidates:
                raise RuntimeError("no ISA IRQ left for PCI interrupts")
            irq = min(candidates, key=lambda i: self._irq_counts[i])
            self._irq_counts[irq] += 1
            self._regs[best] = irq
            set_trigger = getattr(self.vm, "isa_set_irq_trigger", None)
            if set_trigger is not None:
                set_trigger(irq, True)
        return best + 1

    def routes(self, bus: int | None = None) -> list[tuple[int, int, int, IntxRoute]]:
        """(bus, slot, pin, route) in bus/slot/pin order: the DSDT's _PRT."""
        return [(b, s, p, r) for (b, s, p), r in sorted(self._routes.items())
                if bus is None or b == bus]

    def intline(self, route: IntxRoute) -> int:
        """Interrupt Line register value: the link's IRQ field (bhyve's choice)."""
        return self._regs[route.pirq_pin - 1] & PIRQ_IRQ

    def line(self, route: IntxRoute) -> "IntxLine":
        """A new per-function handle on ``route`` (each function counts once)."""
        return IntxLine(self, route, self._ioapic_pin(route.ioapic_pin).line())

    def _ioapic_pin(self, pin: int) -> SharedIoapicPin:
        p = self._ioapic_pins.get(pin)
        if p is None:
            p = self._pin_source(pin) if self._pin_source is not None else SharedIoapicPin(self.vm, pin)
            self._ioapic_pins[pin] = p
        return p

    # --- the PIRQ routing registers (LPC config space) --------------------------
    def pirq_read(self, pin: int) -> int:
        return self._regs[pin - 1]

    def pirq_write(self, pin: int, value: int) -> None:
        """Guest write of link ``pin``'s register: move an asserted line along."""
        new = value & (PIRQ_DIS | PIRQ_IRQ)
        with self._lock:
            old = self._regs[pin - 1]
            if old == new:
                return
            active = self._active[pin - 1] != 0
            if active and pirq_valid(old):
                self._isa_down(old & PIRQ_IRQ)
            self._regs[pin - 1] = new
            if active and pirq_valid(new):
                self._isa_up(new & PIRQ_IRQ)

    def pirq_regs(self) -> bytes:
        return bytes(self._regs)

    def load_pirq_regs(self, regs: bytes) -> None:
        """Restore the registers without touching interrupt lines: the
        kernel's interrupt-controller state is restored separately."""
        if len(regs) != NPIRQS:
            raise ValueError("eight PIRQ registers expected")
        with self._lock:
            self._regs = [r & (PIRQ_DIS | PIRQ_IRQ) for r in regs]
            self._recount_isa()

    # --- line levels -------------------------------------------------------------
    def _isa_up(self, irq: int) -> None:
        self._isa_level[irq] += 1
        if self._isa_level[irq] == 1:
            self.vm.isa_assert(irq, -1)

    def _isa_down(self, irq: int) -> None:
        if self._isa_level[irq] == 0:
            return
        self._isa_level[irq] -= 1
        if self._isa_level[irq] == 0:
            self.vm.isa_deassert(irq, -1)

    def _recount_isa(self) -> None:
        self._isa_level = [0] * NISA_IRQS
        for i, reg in enumerate(self._regs):
            if self._active[i] and pirq_valid(reg):
                self._isa_level[reg & PIRQ_IRQ] += 1

    def _link_up(self, pin: int, quiet: bool) -> None:
        with self._lock:
            self._active[pin - 1] += 1
            reg = self._regs[pin - 1]
            if self._active[pin - 1] == 1 and pirq_valid(reg):
                if quiet:
                    self._isa_level[reg & PIRQ_IRQ] += 1
                else:
                    self._isa_up(reg & PIRQ_IRQ)

    def _link_down(self, pin: int, quiet: bool) -> None:
        with self._lock:
            if self._active[pin - 1] == 0:
                return
            self._active[pin - 1] -= 1
            reg = self._regs[pin - 1]
            if self._active[pin - 1] == 0 and pirq_valid(reg):
                irq = reg & PIRQ_IRQ
                if quiet:
                    self._isa_level[irq] = max(0, self._isa_level[irq] - 1)
                else:
                    self._isa_down(irq)

    def isa_level(self, irq: int) -> int:
        return self._isa_level[irq]


class IntxLine:
    """One function's level-triggered INTx output, wired through the router."""

    def __init__(self, router: IntxRouter, route: IntxRoute, ioapic: SharedPinLine) -> None:
        self.router = router
        self.route = route
        self._ioapic = ioapic
        self.asserted = False

    def assert_(self) -> None:
        if self.asserted:
            return
        self.asserted = True
        self.router._link_up(self.route.pirq_pin, quiet=False)
        self._ioapic.assert_()

    def deassert(self) -> None:
        if not self.asserted:
            return
        self.asserted = False
        self.router._link_down(self.route.pirq_pin, quiet=False)
        self._ioapic.deassert()

    def pulse(self) -> None:
        self.assert_()
        self.deassert()

    def adopt(self, asserted: bool) -> None:
        """Take over a level after a restore without telling the backend: the
        restored kernel interrupt controllers already hold it."""
        if asserted == self.asserted:
            return
        self.asserted = asserted
        if asserted:
            self.router._link_up(self.route.pirq_pin, quiet=True)
        else:
            self.router._link_down(self.route.pirq_pin, quiet=True)
        self._ioapic.adopt(asserted)
