"""The base class of every PCI device model, and what its constructor gets.

A device model knows nothing of buses (rust-vmm style).  It declares in its
constructor what it is -- IDs, BARs, capabilities, whether it uses INTx --
through the helpers of :class:`PciFunction`, and then only answers BAR
accesses (``bar_read``/``bar_write``) and, rarely, config accesses.  The
:class:`~bhyvepy.pci.bus.PciBus` places the BARs, routes INTx and decides what
is decoded where.

Everything every PCI function has in common lives here once: the config
space with its masks, the BAR sizing protocol, the command register's decode
and INTx-disable bits, MSI and MSI-X (including the MSI-X table and PBA
inside a BAR, which device models never see), bhyve's INTx state machine, and
the common part of the snapshot.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from bhyvepy.irq import MsiSender
from bhyvepy.pci.bars import (Bar, BarKind, address_limit, bar_size, register_value,
                              write_register)
from bhyvepy.pci.config_space import (CAP_START, CMD_INTX_DISABLE, CMD_MEMEN, CMD_PORTEN,
                                      EXT_SIZE, PCI_NUM_BARS, PCIR_BAR0,
                                      PCIR_CAP_PTR, PCIR_CLASS, PCIR_COMMAND, PCIR_DEVICE,
                                      PCIR_HDRTYPE, PCIR_INTLINE, PCIR_INTPIN, PCIR_PROGIF,
                                      PCIR_REVID, PCIR_STATUS, PCIR_SUBCLASS, PCIR_SUBDEV_0,
                                      PCIR_SUBVEND_0, PCIR_VENDOR, STATUS_CAPLIST, STATUS_INTX,
                                      STD_SIZE, PciConfigSpace, ones)
from bhyvepy.pci.intx import IntxLine
from bhyvepy.pci.msi import (MSIX_ENTRY_SIZE, PCIY_EXPRESS, MsiCapability, MsixCapability,
                             pba_size)
from bhyvepy.pci.state import (INTX_ASSERTED, INTX_IDLE, INTX_PENDING, BarState, IntxState,
                               MsiState, MsixEntryState, MsixState, PciDeviceState, PciState)
from bhyvepy.snapshot.registry import pci_instance_name
from bhyvepy.snapshot.state import StateError

log = logging.getLogger("bhyvepy.pci")

# PCI Express capability (pcireg.h): device/port types and the layout bhyve uses.
PCIEM_TYPE_ENDPOINT = 0x00
PCIEM_TYPE_LEGACY_ENDPOINT = 0x10
PCIEM_TYPE_ROOT_PORT = 0x40
PCIEM_TYPE_ROOT_INT_EP = 0x90
PCIECAP_VERSION = 0x2
PCIECAP_LENGTH = 60
_BARS_END = PCIR_BAR0 + 4 * PCI_NUM_BARS


class IrqMode(enum.IntEnum):
    """How :meth:`PciFunction.signal_vector` delivered (or would deliver)."""

    NONE = 0
    INTX = 1
    MSI = 2
    MSIX = 3


class _NullMsi:
    def send(self, addr: int, data: int) -> None:
        pass


def config_lookup(node: Any, path: str, default: str | None = None) -> str | None:
    """``path`` (``"pcireg.vendor"``) below a device's config node.

    Works with :class:`bhyvepy.config.ConfigNode` (one name per level) and
    with any object whose ``get_value`` takes a dotted path.
    """
    if node is None:
        return default
    parts = path.split(".")
    if hasattr(node, "find_node"):
        for name in parts[:-1]:
            node = node.find_node(name)
            if node is None:
                return default
        return node.get_value(parts[-1], default)
    return node.get_value(path, default)


def config_read_reg(ctx: "PciContext", name: str, size: int, default: int,
                    host_value: int | None = None) -> int:
    """bhyve's ``pci_config_read_reg``: ``pcireg.<name>`` as hexadecimal
    (``strtol(..., 16)``), ``host`` for the host device's value when one is
    known, else ``default``; truncated to the register's ``size`` bytes.
    Without a host device ``host`` parses as 0, as it does in bhyve."""
    from bhyvepy.config import c_strtol

    value = config_lookup(ctx.config, f"pcireg.{name}")
    if value is None:
        return default
    if value == "host" and host_value is not None:
        return host_value & ones(size)
    return c_strtol(value, 16)[0] & ones(size)


@dataclass
class PciContext:
    """What a device constructor receives: where it sits and what it may use.

    ``config`` is the device's node ``pci.<bus>.<slot>.<func>`` of the
    configuration tree; ``mem`` the bounds-checked guest memory for DMA;
    ``msi`` where MSI/MSI-X messages go (the base class uses it, devices do
    not); ``vm`` the backend VM for the rare device that maps memory itself;
    ``intx_router`` the VM's INTx/PIRQ router (the LPC bridge exposes its
    registers); ``shared`` per-VM scratch for devices that must be unique.
    """

    bus: int
    slot: int
    func: int
    config: Any = None
    mem: Any = None
    msi: MsiSender = field(default_factory=_NullMsi)
    vm: Any = None
    intx_router: Any = None
    shared: dict[str, Any] = field(default_factory=dict)
    enable_bars: bool = True
    bootrom: bool = False

    def get_value(self, path: str, default: str | None = None) -> str | None:
        return config_lookup(self.config, path, default)

    def get_bool(self, path: str, default: bool = False) -> bool:
        from bhyvepy.config import parse_bool

        value = self.get_value(path)
        return default if value is None else parse_bool(path, value)


class _IntxHandle:
    """The :class:`~bhyvepy.irq.IrqLine` a device gets from ``self.intx()``."""

    def __init__(self, fn: "PciFunction") -> None:
        self._fn = fn

    def assert_(self) -> None:
        self._fn.intx_assert()

    def deassert(self) -> None:
        self._fn.intx_deassert()

    def pulse(self) -> None:
        self._fn.intx_assert()
        self._fn.intx_deassert()


class PciFunction:
    """One PCI function.  Subclass it, decorate with ``@pci_emul("name")``.

    Constructor: ``__init__(self, ctx: PciContext)``; call
    ``super().__init__(ctx)`` first, then the ``set_ids``/``add_*`` helpers.
    Guest accesses arrive in ``bar_read``/``bar_write`` (override them) and
    ``cfg_read``/``cfg_write`` (override only for device-specific config
    registers; call ``super()`` for the rest).  They come from vCPU threads,
    possibly several at once: a device guards its own state.
    """

    emulation: ClassVar[str] = ""
    #: The device's ``@device_state`` class, a subclass of PciDeviceState.
    state_class: ClassVar[type] = PciDeviceState

    def __init__(self, ctx: PciContext) -> None:
        self.ctx = ctx
        self.bus, self.slot, self.func = ctx.bus, ctx.slot, ctx.func
        self.cfg = PciConfigSpace()
        self.bars: list[Bar] = [Bar() for _ in range(PCI_NUM_BARS)]
        self.bar_order: list[int] = []          # declaration order (placement ties)
        self.msi: MsiCapability | None = None
        self.msix: MsixCapability | None = None
        self.caps: list[tuple[int, int]] = []   # (offset, capability id)
        self._capend = 0
        self._prevcap = 0
        # Config space and interrupt state; re-entrant because a device's
        # cfg_write may raise an interrupt.
        self._lock = threading.RLock()
        self._intx_wanted = False
        self._intx_pin = 0
        self._intx_state = INTX_IDLE
        self._intx_line: IntxLine | None = None
        self._decode_listener: Callable[["PciFunction"], None] | None = None
        # bhyve's pci_emul_init: legacy interrupts off until a pin is routed.
        self.cfg.set8(PCIR_INTLINE, 255)
        self.cfg.set8(PCIR_INTPIN, 0)

    @property
    def name(self) -> str:
        """Snapshot instance name, ``<emulation>-pci-<bus>-<slot>-<func>``."""
        return pci_instance_name(self.emulation or type(self).__name__, self.bus, self.slot, self.func)

    # ======================================================================
    # declarations (constructor only)
    # ======================================================================
    def set_ids(self, vendor: int, device: int, class_code: int, *, revid: int = 0,
                subvendor: int = 0, subdevice: int = 0, header_type: int = 0) -> None:
        """IDs and the 24-bit class code (class << 16 | subclass << 8 | prog-if)."""
        c = self.cfg
        c.set16(PCIR_VENDOR, vendor)
        c.set16(PCIR_DEVICE, device)
        c.set8(PCIR_REVID, revid)
        c.set8(PCIR_PROGIF, class_code)
        c.set8(PCIR_SUBCLASS, class_code >> 8)
        c.set8(PCIR_CLASS, class_code >> 16)
        c.set16(PCIR_SUBVEND_0, subvendor)
        c.set16(PCIR_SUBDEV_0, subdevice)
        c.set8(PCIR_HDRTYPE, header_type & 0x7F)

    def add_bar(self, index: int, kind: BarKind, size: int, *, trap: bool = True) -> int:
        """Declare BAR ``index``; returns the size it really gets (a power of
        two, at least 4 for I/O, 16 for memory).  A MEM64 BAR also takes
        ``index + 1``.  ``trap=False``: accesses are not trapped (the device
        maps memory there itself, told by :meth:`on_bar_decode`)."""
        kind = BarKind(kind)
        if kind not in (BarKind.IO, BarKind.MEM32, BarKind.MEM64):
            raise ValueError(f"cannot declare a BAR of type {kind.name}")
        last = index + 1 if kind == BarKind.MEM64 else index
        if not 0 <= index or last >= PCI_NUM_BARS:
            raise ValueError(f"BAR index {index} out of range for a {kind.name} BAR")
        for i in range(index, last + 1):
            if self.bars[i].kind != BarKind.NONE:
                raise ValueError(f"BAR {i} declared twice")
        size = bar_size(kind, size)
        self.bars[index] = Bar(kind, size, 0, trap)
        if kind == BarKind.MEM64:
            self.bars[index + 1] = Bar(BarKind.MEMHI64)
        self.bar_order.append(index)
        self._sync_bar_registers(index)
        return size

    def add_capability(self, data: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (``data[0]`` is its ID); returns its offset.

        Like bhyve: the first goes at 0x40, each is padded to dwords, the
        ID and next pointer are read-only; other bytes are read-only unless
        ``wmask`` says otherwise.
        """
        if not data:
            raise ValueError("empty capability")
        reallen = (len(data) + 3) & ~3
        capoff = CAP_START if not self.caps else self._capend + 1
        if capoff + reallen > STD_SIZE:
            raise ValueError("no room left in config space for another capability")
        c = self.cfg
        if not self.caps:
            c.set8(PCIR_CAP_PTR, capoff)
            c.set16(PCIR_STATUS, c.get16(PCIR_STATUS) | STATUS_CAPLIST)
        else:
            c.set8(self._prevcap + 1, capoff)
        c.data[capoff:capoff + reallen] = bytes(data).ljust(reallen, b"\0")
        c.set8(capoff + 1, 0)
        c.set_wmask(capoff, reallen, 0)
        if wmask is not None:
            m = bytes(wmask)[:len(data)]
            c.wmask[capoff + 2:capoff + len(m)] = m[2:]
        self.caps.append((capoff, data[0]))
        self._prevcap = capoff
        self._capend = capoff + reallen - 1
        return capoff

    def add_msi(self, nvec: int) -> MsiCapability:
        """An MSI capability for ``nvec`` (power of two, 1-32) messages."""
        if self.msi is not None:
            raise ValueError("MSI capability declared twice")
        cap = MsiCapability(nvec)
        cap.install(self.cfg, self.add_capability(cap.image()))
        self.msi = cap
        return cap

    def add_msix(self, nvec: int, bar: int, *, table_offset: int = 0,
                 pba_offset: int | None = None) -> MsixCapability:
        """An MSI-X capability with ``nvec`` vectors in BAR ``bar``.

        If the device has not declared that BAR, a MEM32 BAR just big enough
        for the table (rounded to 4 KiB) and the PBA behind it is declared,
        as bhyve's ``pci_emul_add_msixcap`` does.  A device that shares the
        BAR with its own registers declares the BAR first and passes the
        offsets; accesses to the table and PBA never reach ``bar_read``.
        """
        if self.msix is not None:
            raise ValueError("MSI-X capability declared twice")
        if pba_offset is None:
            pba_offset = (table_offset + nvec * MSIX_ENTRY_SIZE + 4095) & ~4095
        cap = MsixCapability(nvec, bar, table_offset, pba_offset)
        b = self.bars[bar] if 0 <= bar < PCI_NUM_BARS else None
        if b is None or b.kind == BarKind.NONE:
            self.add_bar(bar, BarKind.MEM32, cap.span)
        elif not b.is_memory or b.size < cap.span:
            raise ValueError(f"BAR {bar} cannot hold the MSI-X table and PBA")
        cap.install(self.cfg, self.add_capability(cap.image()))
        self.msix = cap
        return cap

    def add_pcie_cap(self, port_type: int = PCIEM_TYPE_ENDPOINT) -> int:
        """A PCI Express capability, version 2, as bhyve builds it.

        An endpoint on bus 0 becomes a root-complex integrated endpoint
        (bhyve has a single root complex); anything else reports a gen1 x1
        link.
        """
        if port_type == PCIEM_TYPE_ENDPOINT and self.bus == 0:
            port_type = PCIEM_TYPE_ROOT_INT_EP
        data = bytearray(PCIECAP_LENGTH)
        data[0] = PCIY_EXPRESS
        data[2:4] = (PCIECAP_VERSION | port_type).to_bytes(2, "little")
        if port_type != PCIEM_TYPE_ROOT_INT_EP:
            data[0x0C:0x10] = (0x411).to_bytes(4, "little")   # link capabilities: gen1 x1
            data[0x12:0x14] = (0x11).to_bytes(2, "little")    # link status: gen1 x1
        off = self.add_capability(bytes(data))
        c = self.cfg
        # Control registers are read/write, status error bits write-1-to-clear,
        # capability registers read-only.
        c.set_wmask(off + 0x08, 2, 0x7FFF)       # device control (not FLR initiate)
        c.set_w1c(off + 0x0A, 2, 0x000F)         # device status error bits
        c.set_wmask(off + 0x10, 2, 0xFFDF)       # link control (retrain reads 0)
        c.set_w1c(off + 0x12, 2, 0xC000)         # link status bandwidth bits
        c.set_wmask(off + 0x18, 2, 0xFFFF)       # slot control
        c.set_w1c(off + 0x1A, 2, 0x011F)         # slot status
        c.set_wmask(off + 0x1C, 2, 0x001F)       # root control
        c.set_w1c(off + 0x20, 4, 0x00010000)     # root status: PME status
        c.set_wmask(off + 0x28, 2, 0xFFFF)       # device control 2
        c.set_wmask(off + 0x30, 2, 0xFFFF)       # link control 2
        c.set_wmask(off + 0x38, 2, 0xFFFF)       # slot control 2
        return off

    def intx(self) -> _IntxHandle:
        """Declare that this function uses INTx; returns its level-triggered
        line (``assert_``/``deassert``).  The bus picks the pin (INTA-INTD,
        least used in the slot) and routes it when the VM is assembled."""
        self._intx_wanted = True
        return _IntxHandle(self)

    # ======================================================================
    # guest access: override these in device models
    # ======================================================================
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        """A guest read of ``size`` (1, 2, 4, or 8 for memory BARs split in
        two 4-byte reads) bytes at ``offset`` within BAR ``bar``."""
        return ones(size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """A guest write; ``value`` is already truncated to ``size`` bytes."""

    def on_bar_decode(self, bar: int, enabled: bool, addr: int) -> None:
        """The bus started or stopped decoding BAR ``bar`` at ``addr``
        (bhyve's ``pe_baraddr``).  Devices with ``trap=False`` BARs map
        their memory here."""

    def cfg_read(self, offset: int, size: int) -> int:
        """A config read; the default reads the config space bytes."""
        return self.cfg.read(offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        """A config write; the default applies PCI semantics (masks, BARs,
        command register, MSI/MSI-X control).  Overrides handle their own
        registers and call ``super().cfg_write`` for everything else."""
        if offset < _BARS_END and offset + size > PCIR_BAR0:
            self._bar_register_write(offset, size, value)
            return
        old_cmd = self.cfg.get16(PCIR_COMMAND)
        self.cfg.write(offset, size, value)
        intx_relevant = self.cfg.get16(PCIR_COMMAND) != old_cmd
        if self.msi is not None and self.msi.overlaps(offset, size):
            self.msi.refresh(self.cfg)
            intx_relevant = True
        if self.msix is not None and self.msix.overlaps(offset, size):
            self.msix.refresh(self.cfg)
            intx_relevant = True
        if intx_relevant:
            if self.msix is not None and self._msix_active():
                self.msix.flush(self.ctx.msi)     # unmasked or enabled: send what is pending
            self._intx_update()

    # ======================================================================
    # interrupts
    # ======================================================================
    @property
    def msi_enabled(self) -> bool:
        return self.msi is not None and self.msi.enabled

    @property
    def msix_enabled(self) -> bool:
        """MSI-X is in use (bhyve: enabled and MSI not enabled)."""
        return self._msix_active()

    def _msix_active(self) -> bool:
        return self.msix is not None and self.msix.enabled and not self.msi_enabled

    def irq_mode(self) -> IrqMode:
        """What :meth:`signal_vector` would use now."""
        if self._msix_active():
            return IrqMode.MSIX
        if self.msi_enabled:
            return IrqMode.MSI
        return IrqMode.INTX if self._intx_wanted else IrqMode.NONE

    def signal_vector(self, n: int = 0) -> IrqMode:
        """Raise interrupt vector ``n`` the way the guest set the function up.

        MSI-X: table entry ``n`` (latched in the PBA while masked).  MSI:
        message ``n`` if the guest enabled that many.  Otherwise INTx is
        *asserted* and stays so until the device calls :meth:`intx_deassert`
        (typically when the guest reads its interrupt status register).
        """
        with self._lock:
            if self._msix_active():
                assert self.msix is not None
                self.msix.fire(self.ctx.msi, n)
                return IrqMode.MSIX
            if self.msi is not None and self.msi.enabled:
                self.msi.send(self.ctx.msi, n)
                return IrqMode.MSI
        if self._intx_wanted:
            self.intx_assert()
            return IrqMode.INTX
        return IrqMode.NONE

    def _intx_permitted(self) -> bool:
        return not (self.msi_enabled or (self.msix is not None and self.msix.enabled) or
                    self.cfg.get16(PCIR_COMMAND) & CMD_INTX_DISABLE)

    def intx_assert(self) -> None:
        """Raise the level of INTx (kept pending while INTx is disabled)."""
        with self._lock:
            if not self._intx_wanted or self._intx_state != INTX_IDLE:
                return
            if self._intx_permitted():
                self._intx_state = INTX_ASSERTED
                if self._intx_line is not None:
                    self._intx_line.assert_()
            else:
                self._intx_state = INTX_PENDING
            self._intx_status_bit()

    def intx_deassert(self) -> None:
        with self._lock:
            if self._intx_state == INTX_ASSERTED and self._intx_line is not None:
                self._intx_line.deassert()
            self._intx_state = INTX_IDLE
            self._intx_status_bit()

    def _intx_update(self) -> None:
        """Re-evaluate INTx after the command register or MSI/MSI-X changed."""
        with self._lock:
            if self._intx_state == INTX_ASSERTED and not self._intx_permitted():
                if self._intx_line is not None:
                    self._intx_line.deassert()
                self._intx_state = INTX_PENDING
            elif self._intx_state == INTX_PENDING and self._intx_permitted():
                self._intx_state = INTX_ASSERTED
                if self._intx_line is not None:
                    self._intx_line.assert_()

    def _intx_status_bit(self) -> None:
        st = self.cfg.get16(PCIR_STATUS) & ~STATUS_INTX
        if self._intx_state != INTX_IDLE:
            st |= STATUS_INTX
        self.cfg.set16(PCIR_STATUS, st)

    @property
    def intx_pin(self) -> int:
        """INTA-INTD as 1-4 once the bus assigned one, else 0."""
        return self._intx_pin

    # --- called by the bus while assembling the VM ------------------------------
    def _assign_intx_pin(self, pin: int) -> None:
        self._intx_pin = pin
        self.cfg.set8(PCIR_INTPIN, pin)

    def _connect_intx(self, line: IntxLine, intline: int) -> None:
        with self._lock:
            self._intx_line = line
            self.cfg.set8(PCIR_INTLINE, intline)
            if self._intx_state == INTX_ASSERTED:
                line.assert_()

    # ======================================================================
    # BARs as seen by the bus
    # ======================================================================
    def _bar_register_write(self, offset: int, size: int, value: int) -> None:
        # bhyve ignores BAR writes that are not whole aligned dwords; the
        # expansion ROM register reads as zero (no ROM BARs yet).
        if size != 4 or offset & 3:
            return
        idx = (offset - PCIR_BAR0) >> 2
        changed = write_register(self.bars, idx, value)
        self._sync_bar_registers(idx if changed is None else changed)

    def _sync_bar_registers(self, idx: int) -> None:
        for i in (idx, idx + 1):
            if i < PCI_NUM_BARS and (i == idx or self.bars[i].kind == BarKind.MEMHI64):
                self.cfg.set32(PCIR_BAR0 + 4 * i, register_value(self.bars, i))

    def _place_bar(self, idx: int, addr: int) -> None:
        """The bus assigned ``addr`` to BAR ``idx`` at start-up."""
        self.bars[idx].addr = addr
        self._sync_bar_registers(idx)

    def decoded_bars(self) -> list[tuple[int, Bar]]:
        """BARs the command register currently lets the function decode."""
        cmd = self.cfg.get16(PCIR_COMMAND)
        out = []
        for i, b in enumerate(self.bars):
            if b.kind == BarKind.IO and cmd & CMD_PORTEN:
                out.append((i, b))
            elif b.kind in (BarKind.MEM32, BarKind.MEM64) and cmd & CMD_MEMEN:
                out.append((i, b))
        return out

    def guest_bar_read(self, idx: int, offset: int, size: int) -> int:
        """Entry point for the bus: the MSI-X table and PBA, else the device."""
        b = self.bars[idx]
        if offset < 0 or offset + size > b.size:
            return ones(size)
        cap = self.msix
        if cap is not None and idx == cap.bar:
            if cap.in_table(offset):
                with self._lock:
                    return cap.table_read(offset, size)
            if cap.in_pba(offset):
                with self._lock:
                    return cap.pba_read(offset, size)
        if size == 8:
            lo = self.bar_read(idx, offset, 4) & 0xFFFFFFFF
            return lo | (self.bar_read(idx, offset + 4, 4) & 0xFFFFFFFF) << 32
        return self.bar_read(idx, offset, size) & ones(size)

    def guest_bar_write(self, idx: int, offset: int, size: int, value: int) -> None:
        b = self.bars[idx]
        if offset < 0 or offset + size > b.size:
            return
        value &= ones(size)
        cap = self.msix
        if cap is not None and idx == cap.bar:
            if cap.in_table(offset):
                with self._lock:
                    unmasked = cap.table_write(offset, size, value)
                    if unmasked and self._msix_active():
                        cap.flush(self.ctx.msi, unmasked)
                return
            if cap.in_pba(offset):
                return                      # pending bits are read-only
        if size == 8:
            self.bar_write(idx, offset, 4, value & 0xFFFFFFFF)
            self.bar_write(idx, offset + 4, 4, value >> 32)
            return
        self.bar_write(idx, offset, size, value)

    # ======================================================================
    # snapshots
    # ======================================================================
    def save_device_fields(self) -> dict[str, Any]:
        """The device's own state fields (beyond ``pci``) for ``state_class``."""
        return {}

    def check_device_fields(self, state: Any) -> None:
        """Raise StateError if the device's own fields do not fit this device."""

    def load_device_fields(self, state: Any) -> None:
        """Apply the device's own fields (already checked)."""

    def save_state(self) -> Any:
        with self._lock:
            return self.state_class(pci=self._save_pci_state(), **self.save_device_fields())

    def _save_pci_state(self) -> PciState:
        msi = MsiState()
        if self.msi is not None:
            msi = MsiState(*self.msi.derive(self.cfg))
        msix = MsixState()
        if self.msix is not None:
            cap = self.msix
            msix = MsixState(cap.enabled, cap.function_mask,
                             [MsixEntryState(*cap.entry(i)) for i in range(cap.nvec)],
                             bytes(cap.pending))
        return PciState(
            config=self.cfg.image(),
            bars=[BarState(int(b.kind), b.size, b.addr) for b in self.bars],
            msi=msi, msix=msix, intx=IntxState(self._intx_pin, self._intx_state))

    def validate_state(self, state: Any) -> None:
        """Check that ``state`` fits this device, changing nothing.

        The checkpoint code can validate every device before restoring any.
        """
        if not isinstance(state, self.state_class):
            raise StateError(f"{self.name}: expected {self.state_class.__name__}, "
                             f"got {type(state).__name__}")
        self._check_pci_state(state.pci)
        self.check_device_fields(state)

    def _check_pci_state(self, p: PciState) -> None:
        who = self.name
        if len(p.config) != EXT_SIZE:
            raise StateError(f"{who}: config space of {len(p.config)} bytes")
        off = self.cfg.fixed_mismatch(p.config)
        if off is not None:
            raise StateError(f"{who}: read-only config byte {off:#x} is {p.config[off]:#04x} in the "
                             f"snapshot but {self.cfg.data[off]:#04x} here (a different device?)")
        if len(p.bars) != PCI_NUM_BARS:
            raise StateError(f"{who}: {len(p.bars)} BARs in the snapshot")
        restored = [Bar(BarKind(s.kind), s.size, s.addr) for s in p.bars]
        for i, b in enumerate(restored):
            if b.kind == BarKind.IO:
                b.io_upper = int.from_bytes(p.config[PCIR_BAR0 + 4 * i + 2:PCIR_BAR0 + 4 * i + 4], "little")
        for i, (mine, s) in enumerate(zip(self.bars, p.bars)):
            if s.kind != mine.kind or s.size != mine.size:
                raise StateError(f"{who}: BAR {i} is {BarKind(s.kind).name}/{s.size:#x} in the "
                                 f"snapshot but {mine.kind.name}/{mine.size:#x} here")
            if mine.kind in (BarKind.IO, BarKind.MEM32, BarKind.MEM64):
                if s.addr % s.size or s.addr + s.size > address_limit(mine.kind):
                    raise StateError(f"{who}: BAR {i} address {s.addr:#x} invalid")
            elif s.addr:
                raise StateError(f"{who}: BAR {i} has an address but is not a base BAR")
            reg = int.from_bytes(p.config[PCIR_BAR0 + 4 * i:PCIR_BAR0 + 4 * i + 4], "little")
            if reg != register_value(restored, i):
                raise StateError(f"{who}: BAR {i} register {reg:#x} disagrees with address {s.addr:#x}")
        image = PciConfigSpace()
        image.load(p.config)
        if self.msi is not None:
            got = (p.msi.enabled, p.msi.addr, p.msi.data, p.msi.maxmsgnum)
            if got != self.msi.derive(image):
                raise StateError(f"{who}: MSI state disagrees with its capability registers")
        elif p.msi != MsiState():
            raise StateError(f"{who}: MSI state for a function without MSI")
        cap = self.msix
        if cap is not None:
            if len(p.msix.table) != cap.nvec:
                raise StateError(f"{who}: MSI-X table of {len(p.msix.table)} entries, "
                                 f"this device has {cap.nvec}")
            if len(p.msix.pba) != pba_size(cap.nvec):
                raise StateError(f"{who}: MSI-X PBA of {len(p.msix.pba)} bytes")
            if any(p.msix.pba[i >> 3] >> (i & 7) & 1 for i in range(cap.nvec, len(p.msix.pba) * 8)):
                raise StateError(f"{who}: MSI-X pending bits beyond the table")
            if (p.msix.enabled, p.msix.function_mask) != cap.derive(image):
                raise StateError(f"{who}: MSI-X state disagrees with its capability registers")
        elif p.msix != MsixState():
            raise StateError(f"{who}: MSI-X state for a function without MSI-X")
        if p.intx.pin != self._intx_pin:
            raise StateError(f"{who}: INTx pin {p.intx.pin} in the snapshot, {self._intx_pin} here")
        if p.intx.state not in (INTX_IDLE, INTX_ASSERTED, INTX_PENDING):
            raise StateError(f"{who}: INTx state {p.intx.state} invalid")

    def restore_state(self, state: Any) -> None:
        """Validate, then apply; the bus re-decodes the BARs afterwards."""
        self.validate_state(state)
        with self._lock:
            p: PciState = state.pci
            self.cfg.load(p.config)
            for i, (mine, s) in enumerate(zip(self.bars, p.bars)):
                mine.addr = s.addr
                if mine.kind == BarKind.IO:
                    mine.io_upper = self.cfg.get32(PCIR_BAR0 + 4 * i) >> 16
            if self.msi is not None:
                self.msi.refresh(self.cfg)
            if self.msix is not None:
                cap = self.msix
                cap.refresh(self.cfg)
                for i, e in enumerate(p.msix.table):
                    off = i * MSIX_ENTRY_SIZE
                    cap.table[off:off + 16] = (e.addr.to_bytes(8, "little") + e.data.to_bytes(4, "little")
                                               + e.vector_control.to_bytes(4, "little"))
                cap.pending[:] = p.msix.pba
            self._intx_state = p.intx.state
            if self._intx_line is not None:
                self._intx_line.adopt(self._intx_state == INTX_ASSERTED)
            self._intx_status_bit()
            self.load_device_fields(state)
        if self._decode_listener is not None:
            self._decode_listener(self)

    def pause(self) -> None:
        """Drain in-flight I/O before a checkpoint (devices with I/O override)."""

    def resume(self) -> None:
        """Restart I/O after a checkpoint or restore."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.bus}:{self.slot}:{self.func}>"
