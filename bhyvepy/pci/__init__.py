"""PCI for bhyvepy: config space, BARs, MSI/MSI-X, INTx routing, the bus.

How to write a PCI device
=========================

A device is one class in ``bhyvepy/dev/``, derived from :class:`PciFunction`
and registered under its ``-s`` emulation name::

    from bhyvepy.pci import BarKind, PciContext, PciDeviceState, PciFunction
    from bhyvepy.registry import pci_emul

    @pci_emul("virtio-blk")
    class VirtioBlk(PciFunction):
        state_class = VirtioBlkState            # see "State" below

        def __init__(self, ctx: PciContext) -> None:
            super().__init__(ctx)               # always first
            path = ctx.get_value("path")        # this device's config node
            self.set_ids(0x1AF4, 0x1001, 0x010000, subvendor=0x1AF4, subdevice=2)
            self.add_bar(0, BarKind.IO, 64)     # size is rounded up to a power of 2
            self.add_msix(2, bar=1)             # table + PBA in their own MEM32 BAR 1
            self.irq = self.intx()              # only if the device uses INTx

        def bar_read(self, bar: int, offset: int, size: int) -> int: ...
        def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...

Constructor.  ``ctx`` (:class:`PciContext`) carries ``bus``/``slot``/``func``,
``config`` (the ``pci.B.S.F`` node; read it with ``ctx.get_value("a.b")`` /
``ctx.get_bool(...)``), ``mem`` (the bounds-checked guest memory for all DMA)
and ``vm``.  Refuse a bad configuration by raising
``bhyvepy.pci.PciInitError("message as bhyve words it")``.  Declarations are
made in the constructor only; the bus places BARs and routes INTx later.

Declaring.  ``set_ids(vendor, device, class_code, revid=, subvendor=,
subdevice=)`` (class_code is 24-bit: class, subclass, prog-if);
``add_bar(index, BarKind.IO|MEM32|MEM64, size, trap=True)`` (MEM64 takes two
slots; ``trap=False`` for memory the device maps itself, reported through
``on_bar_decode``); ``add_msi(nvec)``; ``add_msix(nvec, bar, table_offset=0,
pba_offset=None)`` -- if ``bar`` was not declared a MEM32 BAR is made for the
table and PBA, otherwise they share the device's BAR at those offsets;
``add_pcie_cap(port_type)``; ``add_capability(bytes, wmask)`` for anything
else; ``intx()`` returns the function's level-triggered line.  Capabilities
go into config space in call order from 0x40, like bhyve.

Guest access.  ``bar_read(bar, offset, size)`` / ``bar_write(...)`` get
offsets within the BAR, bounds already checked; 8-byte MMIO arrives as two
4-byte calls; MSI-X table and PBA accesses are handled by the base class
and never arrive.  They run on vCPU threads, several at once: guard your own
state.  Override ``cfg_read``/``cfg_write`` only for device registers in
config space and call ``super()`` for the rest.  Never raise on guest input.

Interrupts.  ``self.signal_vector(n)`` raises vector ``n`` the way the
guest configured the function -- MSI-X entry ``n`` (kept pending while
masked, sent on unmask), else MSI message ``n``, else INTx asserted -- and
returns the :class:`IrqMode` used.  INTx is level-triggered: call
``self.intx_deassert()`` when the guest acknowledges (e.g. reads an ISR), or
use ``self.intx_assert()`` directly.  ``self.irq_mode()`` tells which
mechanism is live (virtio picks its ISR/MSI-X logic from it).

State.  Every function is registered for snapshots as
``<emulation>-pci-<bus>-<slot>-<func>``; the common PCI part (config space,
BARs, MSI, MSI-X table and PBA, INTx) is saved and restored by the base
class.  Declare only your own fields in a subclass of
:class:`PciDeviceState`, all with defaults, and implement three hooks::

    @device_state("virtio-blk", version=1)
    @dataclass
    class VirtioBlkState(PciDeviceState):
        status: U8 = 0
        queue_pfn: U32 = 0

    def save_device_fields(self) -> dict: return {"status": ..., "queue_pfn": ...}
    def check_device_fields(self, state) -> None: ...  # raise StateError, change nothing
    def load_device_fields(self, state) -> None: ...   # apply (already checked)

``restore_state`` checks the common part against this device (same IDs and
capabilities, same BAR types and sizes, same MSI-X table size) and your
``check_device_fields`` before changing anything.  ``pause``/``resume``
bracket a checkpoint; override them if the device has I/O in flight.
"""

from bhyvepy.pci.bars import Bar, BarAllocator, BarKind, BusWindow
from bhyvepy.pci.bus import PciBus, PciInitError
from bhyvepy.pci.config_space import PciConfigSpace
from bhyvepy.pci.device import (PCIEM_TYPE_ENDPOINT, PCIEM_TYPE_LEGACY_ENDPOINT,
                                PCIEM_TYPE_ROOT_INT_EP, PCIEM_TYPE_ROOT_PORT, IrqMode,
                                PciContext, PciFunction, config_lookup, config_read_reg)
from bhyvepy.pci.intx import IntxLine, IntxRoute, IntxRouter, pirq_name
from bhyvepy.pci.msi import MsiCapability, MsixCapability
from bhyvepy.pci.state import (BarState, IntxState, MsiState, MsixEntryState, MsixState,
                               PciDeviceState, PciState)

__all__ = [
    "Bar", "BarAllocator", "BarKind", "BusWindow", "PciBus", "PciInitError", "PciConfigSpace",
    "PCIEM_TYPE_ENDPOINT", "PCIEM_TYPE_LEGACY_ENDPOINT", "PCIEM_TYPE_ROOT_INT_EP",
    "PCIEM_TYPE_ROOT_PORT", "IrqMode", "PciContext", "PciFunction", "config_lookup",
    "config_read_reg", "IntxLine", "IntxRoute", "IntxRouter", "pirq_name", "MsiCapability",
    "MsixCapability", "BarState", "IntxState", "MsiState", "MsixEntryState", "MsixState",
    "PciDeviceState", "PciState",
]
