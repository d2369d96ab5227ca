"""Test doubles and a sample device shared by the test_pci_* files."""

from __future__ import annotations

from bhyvepy.bus import MmioBus, PortBus
from bhyvepy.config import ConfigTree
from bhyvepy.dispatch import Dispatcher
from bhyvepy.pci import BarKind, PciBus, PciContext, PciFunction


class RecordingVm:
    """Test double for the backend VM: records interrupt calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.msis: list[tuple[int, int]] = []

    def ioapic_assert(self, pin: int) -> None:
        self.calls.append(("ioapic_assert", pin))

    def ioapic_deassert(self, pin: int) -> None:
        self.calls.append(("ioapic_deassert", pin))

    def ioapic_pulse(self, pin: int) -> None:
        self.calls.append(("ioapic_pulse", pin))

    def isa_assert(self, irq: int, pin: int) -> None:
        self.calls.append(("isa_assert", irq, pin))

    def isa_deassert(self, irq: int, pin: int) -> None:
        self.calls.append(("isa_deassert", irq, pin))

    def isa_pulse(self, irq: int, pin: int) -> None:
        self.calls.append(("isa_pulse", irq, pin))

    def isa_set_irq_trigger(self, irq: int, level: bool) -> None:
        self.calls.append(("isa_set_irq_trigger", irq, level))

    def lapic_msi(self, addr: int, data: int) -> None:
        self.msis.append((addr, data))

    def levels(self) -> dict:
        """Net level per line from the recorded calls (must never go below 0)."""
        lv: dict = {}
        for c in self.calls:
            if c[0] in ("ioapic_assert", "ioapic_deassert"):
                key = ("ioapic", c[1])
            elif c[0] in ("isa_assert", "isa_deassert"):
                key = ("isa", c[1])
            else:
                continue
            lv[key] = lv.get(key, 0) + (1 if c[0].endswith("_assert") else -1)
            assert lv[key] in (0, 1), f"line {key} driven twice the same way: {self.calls}"
        return lv


class RecordingMsi:
    """Test double MsiSender."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def send(self, addr: int, data: int) -> None:
        self.sent.append((addr, data))


class SampleDevice(PciFunction):
    """A device with one of everything: I/O, MEM32 and MEM64 BARs, MSI, MSI-X, INTx.

    BAR accesses are recorded; reads return a pattern derived from the offset.
    """

    emulation = "sample"

    def __init__(self, ctx: PciContext, *, msi: int = 4, msix: int = 3, big64: int = 0x4000,
                 intx: bool = True) -> None:
        super().__init__(ctx)
        self.set_ids(0x10DD, 0x0001, 0x020000, subvendor=0x10DD, subdevice=0x55)
        self.add_bar(0, BarKind.IO, 8)
        self.add_bar(1, BarKind.MEM32, 4096)
        self.add_bar(2, BarKind.MEM64, big64)
        if msi:
            self.add_msi(msi)
        if msix:
            self.add_msix(msix, 4)
        self.line = self.intx() if intx else None
        self.accesses: list[tuple] = []

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self.accesses.append(("r", bar, offset, size))
        return (0x11 * (bar + 1) + offset) & ((1 << (8 * size)) - 1)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", bar, offset, size, value))


class Machine:
    """A PCI bus on real Port/MMIO buses with a recording VM, like vm.py builds it."""

    def __init__(self, **kw) -> None:
        self.vm = RecordingVm()
        self.msi = RecordingMsi()
        self.ports, self.mmio = PortBus(), MmioBus()
        self.dispatch = Dispatcher(self.ports, self.mmio)
        self.tree = ConfigTree(warn=lambda m: None)
        kw.setdefault("msi", self.msi)
        self.pci = PciBus(self.ports, self.mmio, vm=self.vm, **kw)

    def node(self, b: int, s: int, f: int, **values: str):
        for k, v in values.items():
            self.tree.set_value(f"pci.{b}.{s}.{f}.{k}", v)
        return self.tree.create_node(f"pci.{b}.{s}.{f}")

    def add(self, cls, b: int, s: int, f: int, *args, config=None, **kw):
        ctx = self.pci.context(b, s, f, config if config is not None else self.node(b, s, f))
        fn = cls(ctx, *args, **kw)
        self.pci.add(fn)
        return fn

    # guest-side helpers -------------------------------------------------------
    def cfg1_read(self, b: int, s: int, f: int, off: int, size: int) -> int:
        self.dispatch.pio_out(0, 0xCF8, 4, 0x80000000 | b << 16 | s << 11 | f << 8 | (off & 0xFC))
        return self.dispatch.pio_in(0, 0xCFC + (off & 3), size)

    def cfg1_write(self, b: int, s: int, f: int, off: int, size: int, value: int) -> None:
        self.dispatch.pio_out(0, 0xCF8, 4, 0x80000000 | b << 16 | s << 11 | f << 8 | (off & 0xFC))
        self.dispatch.pio_out(0, 0xCFC + (off & 3), size, value)

    def ecam_addr(self, b: int, s: int, f: int, off: int) -> int:
        return 0xE0000000 | b << 20 | s << 15 | f << 12 | off

    def ecam_read(self, b: int, s: int, f: int, off: int, size: int) -> int:
        return self.dispatch.mmio_read(0, self.ecam_addr(b, s, f, off), size)

    def ecam_write(self, b: int, s: int, f: int, off: int, size: int, value: int) -> None:
        self.dispatch.mmio_write(0, self.ecam_addr(b, s, f, off), size, value)

    def bar_addr(self, fn: PciFunction, idx: int) -> int:
        lo = self.pci.cfg_read(fn.bus, fn.slot, fn.func, 0x10 + 4 * idx, 4)
        if lo & 1:
            return lo & ~0x3
        addr = lo & ~0xF
        if (lo >> 1) & 3 == 2:
            addr |= self.pci.cfg_read(fn.bus, fn.slot, fn.func, 0x14 + 4 * idx, 4) << 32
        return addr
