"""The legacy virtio PCI transport, as bhyve's ``virtio.c`` implements it.

A virtio device is a PCI function with:

* BAR 0, I/O space, ``24 + cfgsize`` bytes (rounded up to a power of two):
  the virtio 0.9.5 header -- host features, guest features, queue PFN,
  queue size, queue select, queue notify, status, ISR, and the two MSI-X
  vector registers -- followed by the device-specific configuration.  As in
  bhyve the device configuration starts at 24 while the guest has MSI-X
  enabled and at 20 otherwise, so the vector registers are reachable only
  with MSI-X on;
* with ``virtio_msix`` (the default; ``-W`` clears it) an MSI-X table of
  one vector per queue plus one for configuration changes, in a MEM32 BAR 1;
* a one-message MSI capability and INTx in every case.

Register semantics, error handling and interrupt delivery follow bhyve
(``vi_pci_read``/``vi_pci_write``, ``vi_reset_dev``, ``vi_interrupt``).  Where
bhyve would crash on guest input (an ``assert`` or a NULL host pointer from
a PFN outside RAM) this transport marks the queue broken, sets
``VIRTIO_CONFIG_S_NEEDS_RESET`` in the status register and sends a
configuration interrupt; the device stops serving that queue until the
guest resets it, and the VM keeps running.

Device models subclass :class:`VirtioPciDevice`, pass their constants to
its constructor, and implement :meth:`VirtioPciDevice.queue_notify` plus
whatever hooks they need.  All virtio and queue state is guarded by the PCI
function's lock (``self._lock``, re-entrant), which is also what
``signal_vector`` takes, so a completion thread can push to a ring and
interrupt under one lock.

The virtio part of a snapshot (bhyve's ``vi_pci_snapshot``: softc, compared
constants, per-queue state) is declared once here, in :class:`VirtioState`;
a device's state class extends :class:`VirtioDeviceState` with its own
fields only and fills them in ``save_dev_fields``/``check_dev_fields``/
``load_dev_fields``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Sequence

from bhyvepy.pci import BarKind, IrqMode, PciContext, PciDeviceState, PciFunction
from bhyvepy.snapshot.state import (BOOL, U8, U16, U32, U64, ListOf, Nested, StateError,
                                    device_state)

from bhyvepy.dev.virtio.queue import (VIRTIO_MSI_NO_VECTOR, VIRTIO_RING_F_INDIRECT_DESC,
                                      QueueState, Virtqueue, VirtqueueError)

log = logging.getLogger("bhyvepy.virtio")

# Legacy header (virtio_pci_legacy_var.h).
VIRTIO_PCI_HOST_FEATURES = 0
VIRTIO_PCI_GUEST_FEATURES = 4
VIRTIO_PCI_QUEUE_PFN = 8
VIRTIO_PCI_QUEUE_NUM = 12
VIRTIO_PCI_QUEUE_SEL = 14
VIRTIO_PCI_QUEUE_NOTIFY = 16
VIRTIO_PCI_STATUS = 18
VIRTIO_PCI_ISR = 19
VIRTIO_MSI_CONFIG_VECTOR = 20
VIRTIO_MSI_QUEUE_VECTOR = 22


def virtio_config_offset(msix_enabled: bool) -> int:
    """Where the device configuration starts (``VIRTIO_PCI_CONFIG_OFF``)."""
    return 24 if msix_enabled else 20


VIRTIO_PCI_ISR_INTR = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

VIRTIO_CONFIG_STATUS_ACK = 0x01
VIRTIO_CONFIG_STATUS_DRIVER = 0x02
VIRTIO_CONFIG_STATUS_DRIVER_OK = 0x04
VIRTIO_CONFIG_STATUS_FEATURES_OK = 0x08
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_STATUS_FAILED = 0x80

# PCI identity (virtio.h): vendor, legacy device IDs, virtio type IDs.
VIRTIO_VENDOR = 0x1AF4
VIRTIO_DEV_NET = 0x1000
VIRTIO_DEV_BLOCK = 0x1001
VIRTIO_DEV_CONSOLE = 0x1003
VIRTIO_DEV_RANDOM = 0x1005
VIRTIO_ID_NETWORK = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_ENTROPY = 4

#: Most queues a device may have (virtio-console has 34); bounds snapshot lists.
MAX_QUEUES = 64

# offset -> (size, read-only, name): bhyve's config_regs table.
_REGS: dict[int, tuple[int, bool, str]] = {
    VIRTIO_PCI_HOST_FEATURES: (4, True, "HOST_FEATURES"),
    VIRTIO_PCI_GUEST_FEATURES: (4, False, "GUEST_FEATURES"),
    VIRTIO_PCI_QUEUE_PFN: (4, False, "QUEUE_PFN"),
    VIRTIO_PCI_QUEUE_NUM: (2, True, "QUEUE_NUM"),
    VIRTIO_PCI_QUEUE_SEL: (2, False, "QUEUE_SEL"),
    VIRTIO_PCI_QUEUE_NOTIFY: (2, False, "QUEUE_NOTIFY"),
    VIRTIO_PCI_STATUS: (1, False, "STATUS"),
    VIRTIO_PCI_ISR: (1, False, "ISR"),
    VIRTIO_MSI_CONFIG_VECTOR: (2, False, "CONFIG_VECTOR"),
    VIRTIO_MSI_QUEUE_VECTOR: (2, False, "QUEUE_VECTOR"),
}

#: Guest complaints logged per device before going quiet (a guest can
#: produce them at will).
_MAX_COMPLAINTS = 32


def virtio_msix_configured(ctx: PciContext) -> bool:
    """bhyve's ``fbsdrun_virtio_msix()``: the global ``virtio_msix`` (``-W``)."""
    from bhyvepy.config import parse_bool

    tree = getattr(ctx.config, "tree", None)
    value = tree.get_value("virtio_msix") if tree is not None else None
    return True if value is None else parse_bool("virtio_msix", value)


# ----------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------

@device_state("virtio", version=1)
@dataclass
class VirtioState:
    """The common virtio part of every virtio device's snapshot.

    ``use_msix``, ``host_features``, ``nvq`` and ``cfgsize`` are constants of
    the device model (bhyve compares ``vc_nvq``, ``vc_cfgsize``,
    ``vc_hv_caps``); a snapshot that disagrees belongs to another device.
    """

    use_msix: BOOL = True
    host_features: U64 = 0
    nvq: U16 = 0
    cfgsize: U32 = 0
    features: U64 = 0
    curq: U16 = 0
    status: U8 = 0
    isr: U8 = 0
    msix_config_vector: U16 = VIRTIO_MSI_NO_VECTOR
    queues: Annotated[list, ListOf(Nested(cls=QueueState), max_len=MAX_QUEUES)] = \
        field(default_factory=list)

    def validate(self) -> None:
        if len(self.queues) != self.nvq:
            raise StateError(f"{len(self.queues)} queue records for {self.nvq} queues")
        if self.features & ~self.host_features:
            raise StateError(f"negotiated features {self.features:#x} exceed the offer "
                             f"{self.host_features:#x}")
        if self.isr & ~(VIRTIO_PCI_ISR_INTR | VIRTIO_PCI_ISR_CONFIG):
            raise StateError(f"ISR value {self.isr:#x} invalid")


@device_state("virtio-pci-device", version=1)
@dataclass
class VirtioDeviceState(PciDeviceState):
    """PCI common part, then the virtio common part; devices add their own."""

    virtio: VirtioState = field(default_factory=VirtioState)


# ----------------------------------------------------------------------------
# the transport
# ----------------------------------------------------------------------------

class VirtioPciDevice(PciFunction):
    """Base class of bhyvepy's virtio devices (legacy PCI transport).

    Subclasses call ``super().__init__(ctx, ...)`` with their constants,
    then implement :meth:`queue_notify` and, where needed,
    :meth:`cfg_read_dev`/:meth:`cfg_write_dev` (device configuration),
    :meth:`reset_device` (status 0 written), :meth:`apply_features`
    (guest features written) and the ``*_dev_fields`` snapshot hooks.
    """

    state_class: ClassVar[type] = VirtioDeviceState
    #: Short name for diagnostics (bhyve's ``vc_name``: "vtblk", ...).
    vc_name: ClassVar[str] = "virtio"

    def __init__(self, ctx: PciContext, *, device_id: int, class_code: int, subdevice: int,
                 queue_sizes: Sequence[int], host_features: int, cfgsize: int = 0,
                 use_msix: bool | None = None) -> None:
        super().__init__(ctx)
        self.host_features = host_features
        self.cfgsize = cfgsize
        self.use_msix = virtio_msix_configured(ctx) if use_msix is None else use_msix
        self.set_ids(VIRTIO_VENDOR, device_id, class_code, subvendor=VIRTIO_VENDOR,
                     subdevice=subdevice)
        # bhyve: vi_intr_init (MSI-X table in BAR 1 if enabled, one MSI
        # message, INTx), then vi_set_io_bar (BAR 0).
        initial_vector = VIRTIO_MSI_NO_VECTOR if self.use_msix else 0
        if self.use_msix:
            self.add_msix(len(queue_sizes) + 1, bar=1)
        self.add_msi(1)
        self.intx()
        self.add_bar(0, BarKind.IO, virtio_config_offset(True) + cfgsize)
        self.queues = [Virtqueue(ctx.mem, i, qs, name=self.vc_name, msix_vector=initial_vector)
                       for i, qs in enumerate(queue_sizes)]
        for vq in self.queues:
            vq.indirect_ok = bool(host_features & VIRTIO_RING_F_INDIRECT_DESC)
        self.features = 0
        self.curq = 0
        self.status = 0
        self.isr = 0
        self.msix_config_vector = initial_vector
        self._complaints = 0

    # ======================================================================
    # hooks for device models
    # ======================================================================
    def queue_notify(self, vq: Virtqueue) -> None:
        """The guest kicked ``vq`` (called with the lock held)."""

    def cfg_read_dev(self, offset: int, size: int) -> int | None:
        """Read of the device configuration; None makes it a bad access."""
        return self.devcfg_bytes_read(offset, size)

    def cfg_write_dev(self, offset: int, size: int, value: int) -> bool:
        """Write to the device configuration; False makes it a bad access."""
        return False

    def apply_features(self, features: int) -> None:
        """The guest wrote its feature bits (already masked by the offer)."""

    def reset_device(self) -> None:
        """Status 0 was written; override to drop device state, then call super()."""
        self.reset_virtio()

    def device_config(self) -> bytes:
        """The device configuration bytes (override, or override cfg_read_dev)."""
        return b""

    def devcfg_bytes_read(self, offset: int, size: int) -> int | None:
        data = self.device_config()
        if offset < 0 or offset + size > len(data):
            return None
        return int.from_bytes(data[offset:offset + size], "little")

    # ======================================================================
    # bhyve's virtio.c
    # ======================================================================
    def complain(self, message: str) -> None:
        """A guest misbehaved: log it, a bounded number of times per device."""
        self._complaints += 1
        if self._complaints <= _MAX_COMPLAINTS:
            log.warning("%s (%s): %s", self.name, self.vc_name, message)
            if self._complaints == _MAX_COMPLAINTS:
                log.warning("%s: further guest errors are not logged", self.name)

    def reset_virtio(self) -> None:
        """bhyve's ``vi_reset_dev``."""
        with self._lock:
            for vq in self.queues:
                vq.reset(VIRTIO_MSI_NO_VECTOR)
                vq.features = 0
            self.features = 0
            self.curq = 0
            if self.isr:
                self.intx_deassert()
            self.isr = 0
            self.msix_config_vector = VIRTIO_MSI_NO_VECTOR

    def interrupt(self, isr_bit: int, vector: int) -> None:
        """bhyve's ``vi_interrupt``: an MSI-X vector, or ISR bit + MSI + INTx."""
        with self._lock:
            if self.msix_enabled:
                self.signal_vector(vector)
                return
            self.isr |= isr_bit
            if self.signal_vector(0) == IrqMode.MSI:
                # bhyve raises INTx too; with MSI on it stays pending.
                self.intx_assert()

    def queue_interrupt(self, vq: Virtqueue) -> None:
        """bhyve's ``vq_interrupt``."""
        self.interrupt(VIRTIO_PCI_ISR_INTR, vq.msix_vector)

    def config_interrupt(self) -> None:
        """Tell the driver the device configuration (or status) changed."""
        self.interrupt(VIRTIO_PCI_ISR_CONFIG, self.msix_config_vector)

    def end_chains(self, vq: Virtqueue, used_all_avail: bool = False) -> None:
        """bhyve's ``vq_endchains``: interrupt if the ring rules say so."""
        with self._lock:
            if vq.end_chains(used_all_avail):
                self.queue_interrupt(vq)

    def needs_reset(self, reason: str, vq: Virtqueue | None = None) -> None:
        """The guest broke the device: stop the queue, set NEEDS_RESET, tell it."""
        with self._lock:
            self.complain(reason)
            if vq is not None:
                vq.mark_broken(reason)
            if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
                return
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
            if self.status & VIRTIO_CONFIG_STATUS_DRIVER_OK:
                self.config_interrupt()

    def pop(self, vq: Virtqueue):
        """``vq.pop()`` with a corrupt ring turned into needs-reset (None)."""
        try:
            return vq.pop()
        except VirtqueueError as e:
            self.needs_reset(str(e), vq)
            return None

    def _notify(self, index: int) -> None:
        vq = self.queues[index]
        try:
            self.queue_notify(vq)
        except VirtqueueError as e:
            self.needs_reset(str(e), vq)
        except Exception as e:      # a device bug must not reach the vCPU
            log.exception("%s: queue %d notify failed", self.name, index)
            self.needs_reset(f"internal error on queue {index}: {e}", vq)

    def _set_pfn(self, vq: Virtqueue, pfn: int) -> None:
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET and vq.broken:
            vq.pfn = pfn            # a broken queue stays broken until a device reset
            return
        try:
            vq.set_pfn(pfn)
        except VirtqueueError as e:
            self.needs_reset(str(e), vq)

    # --- BAR 0 ---------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != 0:
            return (1 << (8 * size)) - 1
        with self._lock:
            return self._vi_read(offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0:
            return
        with self._lock:
            self._vi_write(offset, size, value)

    def _device_window(self, offset: int, size: int) -> int | None:
        """Offset into the device configuration, if the access goes there."""
        base = virtio_config_offset(self.msix_enabled)
        if offset < base:
            return None
        newoff = offset - base
        limit = self.cfgsize if self.cfgsize else 1 << 32
        return newoff if newoff + size <= limit else None

    def _vi_read(self, offset: int, size: int) -> int:
        value = (1 << (8 * size)) - 1
        if size not in (1, 2, 4):
            self.complain(f"read from bad offset/size {offset}/{size}")
            return value
        newoff = self._device_window(offset, size)
        if newoff is not None:
            if self.cfgsize == 0:
                return value
            got = self.cfg_read_dev(newoff, size)
            if got is not None:
                return got & value
        reg = _REGS.get(offset)
        if reg is None or reg[0] != size:
            if reg is not None:
                self.complain(f"read from {reg[2]}: bad size {size}")
            else:
                self.complain(f"read from bad offset/size {offset}/{size}")
            return value
        nvq = len(self.queues)
        cur = self.queues[self.curq] if self.curq < nvq else None
        if offset == VIRTIO_PCI_HOST_FEATURES:
            return self.host_features & 0xFFFFFFFF
        if offset == VIRTIO_PCI_GUEST_FEATURES:
            return self.features & 0xFFFFFFFF
        if offset == VIRTIO_PCI_QUEUE_PFN:
            return cur.pfn if cur is not None else value
        if offset == VIRTIO_PCI_QUEUE_NUM:
            return cur.size if cur is not None else 0
        if offset == VIRTIO_PCI_QUEUE_SEL:
            return self.curq
        if offset == VIRTIO_PCI_QUEUE_NOTIFY:
            return 0
        if offset == VIRTIO_PCI_STATUS:
            return self.status
        if offset == VIRTIO_PCI_ISR:
            isr, self.isr = self.isr, 0     # reading clears it
            if isr:
                self.intx_deassert()
            return isr
        if offset == VIRTIO_MSI_CONFIG_VECTOR:
            return self.msix_config_vector
        return cur.msix_vector if cur is not None else VIRTIO_MSI_NO_VECTOR

    def _vi_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            self.complain(f"write to bad offset/size {offset}/{size}")
            return
        newoff = self._device_window(offset, size)
        if newoff is not None:
            if self.cfgsize == 0 or self.cfg_write_dev(newoff, size, value):
                return
        reg = _REGS.get(offset)
        if reg is None or reg[0] != size or reg[1]:
            if reg is None:
                self.complain(f"write to bad offset/size {offset}/{size}")
            else:
                if reg[0] != size:
                    self.complain(f"write to {reg[2]}: bad size {size}")
                if reg[1]:
                    self.complain(f"write to read-only reg {reg[2]}")
            return
        nvq = len(self.queues)
        if offset == VIRTIO_PCI_GUEST_FEATURES:
            self.features = value & self.host_features
            for vq in self.queues:
                vq.features = self.features
            self.apply_features(self.features)
        elif offset == VIRTIO_PCI_QUEUE_PFN:
            if self.curq >= nvq:
                self.complain(f"write config reg {reg[2]}: curq {self.curq} >= max {nvq}")
            else:
                self._set_pfn(self.queues[self.curq], value)
        elif offset == VIRTIO_PCI_QUEUE_SEL:
            # Selecting a queue that does not exist is allowed: QUEUE_NUM reads 0.
            self.curq = value
        elif offset == VIRTIO_PCI_QUEUE_NOTIFY:
            if value >= nvq:
                self.complain(f"queue {value} notify out of range")
            else:
                self._notify(value)
        elif offset == VIRTIO_PCI_STATUS:
            if value == 0:
                self.status = 0
                self.reset_device()
            else:
                # NEEDS_RESET is the device's to clear, by a reset.
                self.status = value | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET)
        elif offset == VIRTIO_MSI_CONFIG_VECTOR:
            self.msix_config_vector = value
        elif offset == VIRTIO_MSI_QUEUE_VECTOR:
            if self.curq >= nvq:
                self.complain(f"write config reg {reg[2]}: curq {self.curq} >= max {nvq}")
            else:
                self.queues[self.curq].msix_vector = value
        # ISR writes are accepted and ignored, as in bhyve.

    # ======================================================================
    # snapshots
    # ======================================================================
    def save_dev_fields(self) -> dict[str, Any]:
        """The device model's own fields (beyond ``pci`` and ``virtio``)."""
        return {}

    def check_dev_fields(self, state: Any) -> None:
        """Raise StateError if the device's own fields do not fit; change nothing."""

    def load_dev_fields(self, state: Any) -> None:
        """Apply the device's own fields (already checked)."""

    def save_device_fields(self) -> dict[str, Any]:
        with self._lock:
            v = VirtioState(self.use_msix, self.host_features, len(self.queues), self.cfgsize,
                            self.features, self.curq, self.status, self.isr,
                            self.msix_config_vector, [vq.save() for vq in self.queues])
            return {"virtio": v, **self.save_dev_fields()}

    def check_device_fields(self, state: Any) -> None:
        v: VirtioState = state.virtio
        who = self.name
        if v.use_msix != self.use_msix:
            raise StateError(f"{who}: virtio MSI-X is {'on' if v.use_msix else 'off'} in the "
                             f"snapshot but {'on' if self.use_msix else 'off'} here (-W)")
        if v.host_features != self.host_features:
            raise StateError(f"{who}: host features {v.host_features:#x} in the snapshot, "
                             f"{self.host_features:#x} here")
        if v.nvq != len(self.queues) or v.cfgsize != self.cfgsize:
            raise StateError(f"{who}: {v.nvq} queues/{v.cfgsize} config bytes in the snapshot, "
                             f"{len(self.queues)}/{self.cfgsize} here")
        for vq, qs in zip(self.queues, v.queues):
            try:
                vq.check(qs)
            except StateError as e:
                raise StateError(f"{who}: {e}") from None
        self.check_dev_fields(state)

    def load_device_fields(self, state: Any) -> None:
        v: VirtioState = state.virtio
        with self._lock:
            self.features = v.features
            self.curq = v.curq
            self.status = v.status
            self.isr = v.isr
            self.msix_config_vector = v.msix_config_vector
            for vq, qs in zip(self.queues, v.queues):
                vq.load(qs)
                vq.features = v.features
            self.load_dev_fields(state)


__all__ = [
    "VirtioPciDevice", "VirtioState", "VirtioDeviceState", "virtio_config_offset",
    "virtio_msix_configured", "VIRTIO_VENDOR", "VIRTIO_DEV_BLOCK", "VIRTIO_DEV_CONSOLE",
    "VIRTIO_DEV_RANDOM", "VIRTIO_DEV_NET", "VIRTIO_ID_BLOCK", "VIRTIO_ID_CONSOLE",
    "VIRTIO_ID_ENTROPY", "VIRTIO_ID_NETWORK", "VIRTIO_PCI_ISR_INTR", "VIRTIO_PCI_ISR_CONFIG",
    "VIRTIO_CONFIG_S_NEEDS_RESET", "VIRTIO_CONFIG_STATUS_DRIVER_OK",
    "VIRTIO_PCI_HOST_FEATURES", "VIRTIO_PCI_GUEST_FEATURES", "VIRTIO_PCI_QUEUE_PFN",
    "VIRTIO_PCI_QUEUE_NUM", "VIRTIO_PCI_QUEUE_SEL", "VIRTIO_PCI_QUEUE_NOTIFY",
    "VIRTIO_PCI_STATUS", "VIRTIO_PCI_ISR", "VIRTIO_MSI_CONFIG_VECTOR",
    "VIRTIO_MSI_QUEUE_VECTOR",
]
