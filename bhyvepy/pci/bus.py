"""The PCI hierarchy of one VM: functions by (bus, slot, func), config access
through mechanism #1 (ports 0xCF8/0xCFC-0xCFF) and PCIe ECAM, and BAR decode.

Functions never learn where they are decoded.  After every config write,
and after a restore, the bus compares what a function wants decoded (its
BARs whose I/O or memory enable is on) with what it registered in the
:class:`~bhyvepy.bus.PortBus`/:class:`~bhyvepy.bus.MmioBus` and moves the
difference.  A guest that points a BAR over another range (bhyve would
abort on its assertion) gets that BAR left undecoded -- the other range
keeps its accesses -- and it is decoded as soon as the address is free.

Config accesses follow bhyve's ``pci_cfgrw``: absent functions, sizes other
than 1/2/4 and unaligned offsets read all-ones and drop writes; the
multi-function bit of the header type is computed on every read.  The
0xCF8 address latch is one per VM, as in bhyve and in hardware.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from bhyvepy.bus import BusConflict, MmioBus, PortBus, Range
from bhyvepy.errors import PlainBhyveExit
from bhyvepy.errors import ExitStatus
from bhyvepy.irq import LapicMsi, MsiSender
from bhyvepy.layout import PCI_ECFG_BASE, PCI_ECFG_SIZE
from bhyvepy.pci.bars import BarAllocator, BarKind, BarRequest, BarSpaceExhausted, BusWindow
from bhyvepy.pci.config_space import (CMD_BUSMASTER, CMD_MEMEN, CMD_PORTEN, EXT_SIZE,
                                      HDRTYPE_MFDEV, PCIR_COMMAND, PCIR_HDRTYPE, ones)
from bhyvepy.pci.device import PciContext, PciFunction
from bhyvepy.pci.intx import IntxRoute, IntxRouter

log = logging.getLogger("bhyvepy.pci")

CONF1_ADDR_PORT = 0xCF8
CONF1_DATA_PORT = 0xCFC
CONF1_ENABLE = 0x80000000
#: Bits of the 0xCF8 latch bhyve keeps: enable, bus, slot, function, dword offset.
CONF1_KEPT = 0x80FFFFFC
MAXBUSES, MAXSLOTS, MAXFUNCS = 256, 32, 8


class PciInitError(PlainBhyveExit):
    """A device refused its configuration (bhyve prints these plainly and
    then exits 4 after "Device emulation initialization error")."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitStatus.ERROR)


class _NoVm:
    """Interrupt sink for a bus built without a VM (tools, some tests)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


@dataclass
class _Decode:
    kind: BarKind
    addr: int
    size: int
    range: Range | None          # None: wanted, but the addresses are taken


class PciBus:
    """All PCI buses of a VM (bhyve has one flat hierarchy, buses 0-255)."""

    def __init__(self, ports: PortBus, mmio: MmioBus, *, vm: Any = None, mem: Any = None,
                 msi: MsiSender | None = None, router: IntxRouter | None = None,
                 bootrom: bool = False, enable_bars: bool | None = None,
                 highmem_size: int = 0, ioapic_pincount: int = 24,
                 ecam_base: int = PCI_ECFG_BASE) -> None:
        self.ports, self.mmio = ports, mmio
        self.vm = vm
        self.mem = mem
        self.msi: MsiSender = msi if msi is not None else (LapicMsi(vm) if vm is not None else _NoVm())
        self.bootrom = bootrom
        #: bhyve's ``pci.enable_bars``: decode BARs from the start unless a
        #: boot ROM (which programs them itself) is used.
        self.enable_bars = (not bootrom) if enable_bars is None else enable_bars
        self.router = router if router is not None else IntxRouter(
            vm if vm is not None else _NoVm(), ioapic_pincount=ioapic_pincount, fixed_mapping=bootrom)
        self.allocator = BarAllocator(highmem_size=highmem_size)
        self.ecam_base = ecam_base
        self.shared: dict[str, Any] = {}
        self._funcs: dict[tuple[int, int, int], PciFunction] = {}
        self._slot_count: dict[tuple[int, int], int] = {}
        self._cfgaddr = 0
        self._lock = threading.Lock()
        self._decoded: dict[int, dict[int, _Decode]] = {}     # id(fn) -> bar -> decode
        self._complained: set[str] = set()
        self._ranges: list[Range] = []
        self.finalized = False

    # ======================================================================
    # assembling the VM
    # ======================================================================
    def context(self, bus: int, slot: int, func: int, config: Any = None) -> PciContext:
        return PciContext(bus=bus, slot=slot, func=func, config=config, mem=self.mem,
                          msi=self.msi, vm=self.vm, intx_router=self.router, shared=self.shared,
                          enable_bars=self.enable_bars, bootrom=self.bootrom)

    def create(self, cls: type[PciFunction], bus: int, slot: int, func: int,
               config: Any = None) -> PciFunction:
        """Build ``cls`` at bus:slot:func from its config node and add it."""
        self._check_free(bus, slot, func)
        fn = cls(self.context(bus, slot, func, config))
        self.add(fn)
        return fn

    def _check_free(self, bus: int, slot: int, func: int) -> None:
        if self.finalized:
            raise RuntimeError("PCI functions cannot be added to a running VM")
        if not (0 <= bus < MAXBUSES and 0 <= slot < MAXSLOTS and 0 <= func < MAXFUNCS):
            raise PciInitError(f"Invalid PCI slot info field \"{bus}:{slot}:{func}\"")
        if (bus, slot, func) in self._funcs:
            raise PciInitError(f"pci slot {bus}:{slot}:{func} already occupied!")

    def add(self, fn: PciFunction) -> None:
        self._check_free(fn.bus, fn.slot, fn.func)
        if self.enable_bars:
            # bhyve: bus mastering from the start, and each BAR type's decode.
            cmd = fn.cfg.get16(PCIR_COMMAND) | CMD_BUSMASTER
            for b in fn.bars:
                if b.kind == BarKind.IO:
                    cmd |= CMD_PORTEN
                elif b.kind in (BarKind.MEM32, BarKind.MEM64):
                    cmd |= CMD_MEMEN
            fn.cfg.set16(PCIR_COMMAND, cmd)
        self._funcs[(fn.bus, fn.slot, fn.func)] = fn
        key = (fn.bus, fn.slot)
        self._slot_count[key] = self._slot_count.get(key, 0) + 1

    def finalize(self) -> None:
        """Place BARs bus by bus, wire INTx, start decoding config space and BARs.

        ISA devices must have reserved their IRQs in :attr:`router` before.
        """
        if self.finalized:
            return
        for bus in sorted({b for b, _, _ in self._funcs}):
            fns = [fn for (b, _, _), fn in sorted(self._funcs.items()) if b == bus]
            reqs = [BarRequest(fn, idx, fn.bars[idx].kind, fn.bars[idx].size)
                    for fn in fns for idx in fn.bar_order]
            try:
                placed = self.allocator.assign_bus(bus, reqs)
            except BarSpaceExhausted as e:
                r = e.request
                fn = r.owner if r is not None else None
                where = f"pci slot {fn.bus}:{fn.slot}:{fn.func}: " if isinstance(fn, PciFunction) else ""
                raise PciInitError(f"{where}no address space left for BAR "
                                   f"{r.idx if r else '?'} ({e.kind.name}, {e.size:#x} bytes)") from None
            for r, addr in placed:
                r.owner._place_bar(r.idx, addr)         # type: ignore[attr-defined]
            for fn in fns:
                if fn._intx_wanted:
                    fn._assign_intx_pin(self.router.request_pin(bus, fn.slot))
        # Interrupts are routed once every bus is built (bhyve: after all
        # devices, so the LPC's ISA devices reserved their IRQs first).
        for fn in self.functions():
            if fn.intx_pin:
                route = self.router.route(fn.bus, fn.slot, fn.intx_pin)
                fn._connect_intx(self.router.line(route), self.router.intline(route))
        self._ranges.append(self.ports.register("pci_cfgaddr", CONF1_ADDR_PORT, 1,
                                                self._cfgaddr_read, self._cfgaddr_write))
        self._ranges.append(self.ports.register("pci_cfgdata", CONF1_DATA_PORT, 4,
                                                self._cfgdata_read, self._cfgdata_write))
        self._ranges.append(self.mmio.register("PCI ECFG", self.ecam_base, PCI_ECFG_SIZE,
                                               self._ecam_read, self._ecam_write))
        self.finalized = True
        for fn in self.functions():
            fn._decode_listener = self.sync_decode
            self.sync_decode(fn)

    # ======================================================================
    # lookup
    # ======================================================================
    def get(self, bus: int, slot: int, func: int) -> PciFunction | None:
        return self._funcs.get((bus, slot, func))

    def functions(self) -> Iterator[PciFunction]:
        """Functions in bus/slot/function order (bhyve's ``pci_next`` walk)."""
        for _, fn in sorted(self._funcs.items()):
            yield fn

    def windows(self) -> list[BusWindow]:
        """Per-bus I/O and memory windows for the DSDT's _CRS."""
        return list(self.allocator.windows)

    def intx_routes(self, bus: int) -> list[tuple[int, int, IntxRoute]]:
        """(slot, pin, route) of one bus, for the DSDT's _PRT."""
        return [(s, p, r) for _, s, p, r in self.router.routes(bus)]

    def register_snapshots(self, registry: Any) -> None:
        """Register every function as ``<emulation>-pci-<bus>-<slot>-<func>``."""
        for fn in self.functions():
            registry.register(fn.name, fn.emulation, fn)

    # ======================================================================
    # config space access
    # ======================================================================
    def _target(self, bus: int, slot: int, func: int, off: int, size: int) -> PciFunction | None:
        if size not in (1, 2, 4) or off & (size - 1) or not 0 <= off < EXT_SIZE:
            return None
        return self._funcs.get((bus, slot, func))

    def cfg_read(self, bus: int, slot: int, func: int, off: int, size: int) -> int:
        fn = self._target(bus, slot, func, off, size)
        if fn is None:
            return ones(size)
        try:
            with fn._lock:
                value = fn.cfg_read(off, size) & ones(size)
        except Exception:
            self._device_error(fn, f"config read {off:#x}/{size}")
            return ones(size)
        if off <= PCIR_HDRTYPE < off + size:
            bit = HDRTYPE_MFDEV << (8 * (PCIR_HDRTYPE - off))
            value &= ~bit
            if self._slot_count.get((bus, slot), 0) > 1:
                value |= bit
        return value

    def cfg_write(self, bus: int, slot: int, func: int, off: int, size: int, value: int) -> None:
        fn = self._target(bus, slot, func, off, size)
        if fn is None:
            return
        try:
            with fn._lock:
                fn.cfg_write(off, size, value & ones(size))
        except Exception:
            self._device_error(fn, f"config write {off:#x}/{size} value {value:#x}")
        if self.finalized:
            self.sync_decode(fn)

    def _device_error(self, fn: PciFunction, what: str) -> None:
        if fn.name not in self._complained:
            self._complained.add(fn.name)
            log.error("PCI function %s failed on guest %s", fn.name, what, exc_info=True)

    # --- mechanism #1 ---------------------------------------------------------
    def _cfgaddr_read(self, offset: int, size: int) -> int:
        if size != 4:
            return ones(size)
        return self._cfgaddr

    def _cfgaddr_write(self, offset: int, size: int, value: int) -> None:
        if size == 4:
            self._cfgaddr = value & CONF1_KEPT

    def _cfgdata_target(self, offset: int) -> tuple[int, int, int, int] | None:
        latch = self._cfgaddr
        if not latch & CONF1_ENABLE:
            return None
        return ((latch >> 16) & 0xFF, (latch >> 11) & 0x1F, (latch >> 8) & 0x7,
                (latch & 0xFC) + offset)

    def _cfgdata_read(self, offset: int, size: int) -> int:
        t = self._cfgdata_target(offset)
        return ones(size) if t is None else self.cfg_read(*t, size)

    def _cfgdata_write(self, offset: int, size: int, value: int) -> None:
        t = self._cfgdata_target(offset)
        if t is not None:
            self.cfg_write(*t, size, value)

    # --- ECAM -----------------------------------------------------------------
    @staticmethod
    def _ecam_decode(offset: int) -> tuple[int, int, int, int]:
        return (offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def _ecam_read(self, offset: int, size: int) -> int:
        return self.cfg_read(*self._ecam_decode(offset), size)

    def _ecam_write(self, offset: int, size: int, value: int) -> None:
        self.cfg_write(*self._ecam_decode(offset), size, value)

    # ======================================================================
    # BAR decode
    # ======================================================================
    def sync_decode(self, fn: PciFunction) -> None:
        """Make the registered ranges match what ``fn`` decodes now."""
        with self._lock:
            with fn._lock:
                want = {i: (b.kind, b.addr, b.size, b.trap) for i, b in fn.decoded_bars()}
            have = self._decoded.setdefault(id(fn), {})
            freed = False
            for idx in list(have):
                d = have[idx]
                w = want.get(idx)
                if w is None or (w[0], w[1], w[2]) != (d.kind, d.addr, d.size):
                    freed |= d.range is not None
                    self._unmap(fn, idx, d)
                    del have[idx]
            for idx, (kind, addr, size, trap) in want.items():
                if idx not in have:
                    have[idx] = self._map(fn, idx, kind, addr, size, trap)
            if freed:
                self._retry_blocked()

    def _map(self, fn: PciFunction, idx: int, kind: BarKind, addr: int, size: int,
             trap: bool) -> _Decode:
        d = _Decode(kind, addr, size, None)
        if trap:
            d.range = self._register(fn, idx, kind, addr, size)
        self._notify(fn, idx, True, addr)
        return d

    def _register(self, fn: PciFunction, idx: int, kind: BarKind, addr: int, size: int,
                  retry: bool = False) -> Range | None:
        space = self.ports if kind == BarKind.IO else self.mmio
        try:
            return space.register(f"{fn.name} BAR{idx}", addr, size,
                                  lambda off, sz, f=fn, i=idx: f.guest_bar_read(i, off, sz),
                                  lambda off, sz, v, f=fn, i=idx: f.guest_bar_write(i, off, sz, v))
        except BusConflict as e:
            if not retry:
                log.warning("%s: BAR %d not decoded at %#x: %s", fn.name, idx, addr, e)
            return None

    def _unmap(self, fn: PciFunction, idx: int, d: _Decode) -> None:
        if d.range is not None:
            (self.ports if d.kind == BarKind.IO else self.mmio).unregister(d.range)
            d.range = None
        self._notify(fn, idx, False, d.addr)

    def _retry_blocked(self) -> None:
        for fn in self.functions():
            for idx, d in self._decoded.get(id(fn), {}).items():
                if d.range is None and fn.bars[idx].trap:
                    d.range = self._register(fn, idx, d.kind, d.addr, d.size, retry=True)

    def _notify(self, fn: PciFunction, idx: int, enabled: bool, addr: int) -> None:
        try:
            fn.on_bar_decode(idx, enabled, addr)
        except Exception:
            self._device_error(fn, f"BAR {idx} decode change")

    def decoded_ranges(self, fn: PciFunction) -> dict[int, tuple[int, int, bool]]:
        """BAR -> (address, size, registered) as currently decoded (for tests/tools)."""
        with self._lock:
            return {i: (d.addr, d.size, d.range is not None)
                    for i, d in self._decoded.get(id(fn), {}).items()}
