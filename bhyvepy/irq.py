"""Interrupt lines handed to devices, so devices never talk to the backend.

A device model receives an object with ``assert_()``, ``deassert()`` and
``pulse()`` (or an ``MsiSender``) at construction.  Tests give it a recorder;
the VM gives it one of the classes below, bound to the backend's IOAPIC/8259
or LAPIC-MSI calls.  Level-triggered pins shared by several PCI functions are
reference-counted in :class:`SharedIoapicPin` so one device deasserting does
not drop another's interrupt.
"""

from __future__ import annotations

import threading
from typing import Protocol

from bhyvepy.vmm import VirtualMachine


class IrqLine(Protocol):
    def assert_(self) -> None: ...
    def deassert(self) -> None: ...
    def pulse(self) -> None: ...


class MsiSender(Protocol):
    def send(self, addr: int, data: int) -> None: ...


class IsaIrq:
    """An ISA interrupt: the 8259 input ``irq`` and the IOAPIC pin it is wired to."""

    def __init__(self, vm: VirtualMachine, irq: int, pin: int | None = None) -> None:
        self.vm, self.irq = vm, irq
        # ISA IRQ 0 is wired to IOAPIC pin 2 (the MADT interrupt source override).
        self.pin = pin if pin is not None else (2 if irq == 0 else irq)

    def assert_(self) -> None:
        self.vm.isa_assert(self.irq, self.pin)

    def deassert(self) -> None:
        self.vm.isa_deassert(self.irq, self.pin)

    def pulse(self) -> None:
        self.vm.isa_pulse(self.irq, self.pin)


class SharedIoapicPin:
    """A level-triggered IOAPIC pin that several devices may hold asserted."""

    def __init__(self, vm: VirtualMachine, pin: int) -> None:
        self.vm, self.pin = vm, pin
        self._count = 0
        self._lock = threading.Lock()

    def line(self) -> "SharedPinLine":
        return SharedPinLine(self)

    def _up(self) -> None:
        with self._lock:
            self._count += 1
            if self._count == 1:
                self.vm.ioapic_assert(self.pin)

    def adopt(self, up: bool) -> None:
        """Count a holder up or down without driving the backend: after a
        restore the kernel's interrupt controllers already hold the level."""
        with self._lock:
            self._count = self._count + 1 if up else max(0, self._count - 1)

    def _down(self) -> None:
        with self._lock:
            if self._count == 0:
                return
            self._count -= 1
            if self._count == 0:
                self.vm.ioapic_deassert(self.pin)


class SharedPinLine:
    """One device's view of a shared pin: its own asserted flag, idempotent."""

    def __init__(self, pin: SharedIoapicPin) -> None:
        self._pin = pin
        self.asserted = False

    def assert_(self) -> None:
        if not self.asserted:
            self.asserted = True
            self._pin._up()

    def deassert(self) -> None:
        if self.asserted:
            self.asserted = False
            self._pin._down()

    def pulse(self) -> None:
        self._pin.vm.ioapic_pulse(self._pin.pin)

    def adopt(self, asserted: bool) -> None:
        """Take over a restored level quietly (see :meth:`SharedIoapicPin.adopt`)."""
        if asserted != self.asserted:
            self.asserted = asserted
            self._pin.adopt(asserted)


class LapicMsi:
    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm

    def send(self, addr: int, data: int) -> None:
        self.vm.lapic_msi(addr, data)
