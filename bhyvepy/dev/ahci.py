"""AHCI 1.3 SATA host bus adapter with disks and CD-ROMs (bhyve's
``pci_ahci.c``: emulations ``ahci``, and ``ahci-hd``/``ahci-cd`` which the
command line turns into ``ahci`` with ``port.0``).

What the guest sees is bhyve's: an Intel ICH8-style HBA 8086:2821, class
mass storage / SATA / AHCI 1.0, registers (ABAR) in a 32-bit memory BAR 5
of 0x100 + 32 * 0x80 bytes (8 KiB once rounded), an MSI capability for 16
messages and INTx.  bhyve walks all 32 port numbers when it reads the
configuration, so the HBA always reports 32 ports (CAP.NP = 31) and PI has a
bit for each configured ``port.N``; CAP offers 64-bit addressing, NCQ, SNTF,
mechanical presence switch, staggered spin-up, ALPM, activity LED, CLO,
Gen 3 speed, PIO multiple DRQ, slumber/partial, 32 command slots and
external SATA; VS is 1.3, CAP2 offers automatic partial-to-slumber.

Configuration (``pci.B.S.F.port.N``): ``type`` (``hd``; anything else is a
CD-ROM, as in bhyve), ``path`` and the block options of
:class:`bhyvepy.block.BlockBackend`, ``ser`` (serial, 20 characters,
default ``BHYVE-XXXX-XXXX-XXXX`` from the MD5 of the path), ``rev``
(firmware revision, 8), ``model`` (40), ``nmrr`` (nominal media rotation
rate, IDENTIFY word 217).

Interrupts follow bhyve: with MSI, ports below the last enabled message get
their own message and the others share the last one; without MSI, INTx is
asserted while GHC.IE is set and IS is not zero.  The per-port engine is in
:mod:`bhyvepy.dev.ahci_port`.

Snapshots: the HBA registers and, per port, the registers, latched
addresses, command slot state, sense data and IDENTIFY data.  ``pause()``
stops starting commands, waits until every started command has completed
(its FIS posted, its interrupt raised) and then pauses and flushes every
disk, so no I/O is ever in flight in a snapshot; commands issued but not
started stay in PxCI and start on ``resume()``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from bhyvepy.block import BlockBackend, default_serial
from bhyvepy.config import c_strtol, to_c_int
from bhyvepy.dev.ahci_defs import (AHCI_CAP, AHCI_CAP2, AHCI_CAP2_APST, AHCI_CAP_64BIT,
                                   AHCI_CAP_ISS_SHIFT, AHCI_CAP_NCS_SHIFT, AHCI_CAP_PMD,
                                   AHCI_CAP_PSC, AHCI_CAP_SAL, AHCI_CAP_SALP, AHCI_CAP_SCLO,
                                   AHCI_CAP_SMPS, AHCI_CAP_SNCQ, AHCI_CAP_SSC, AHCI_CAP_SSNTF,
                                   AHCI_CAP_SSS, AHCI_CAP_SXS, AHCI_GHC, AHCI_GHC_AE,
                                   AHCI_GHC_HR, AHCI_GHC_IE, AHCI_IS, AHCI_OFFSET, AHCI_PI,
                                   AHCI_STEP, AHCI_VERSION, AHCI_VS, MAX_PORTS, MAX_SLOTS,
                                   P_CMD_CPS, P_CMD_POD, P_CMD_SUD)
from bhyvepy.dev.ahci_identify import (CDROM_MODEL, DEFAULT_REVISION, DISK_MODEL,
                                       IdentifyStrings, capacity, identify_cdrom,
                                       identify_disk)
from bhyvepy.dev.ahci_port import AhciPort, AhciPortState
from bhyvepy.pci import BarKind, PciContext, PciDeviceState, PciFunction
from bhyvepy.registry import pci_emul
from bhyvepy.snapshot.state import BOOL, U8, U32, ListOf, Nested, StateError, device_state

log = logging.getLogger("bhyvepy.ahci")

AHCI_VENDOR = 0x8086
AHCI_DEVICE = 0x2821
#: Mass storage / SATA / AHCI 1.0.
AHCI_CLASS = 0x010601
ABAR = 5
#: bhyve's port count after reading the configuration (it walks every port number).
NPORTS = MAX_PORTS
#: Command slots: 32, or fewer if a disk queues fewer requests (bhyve's rule).
_SLOTS_MAX = MAX_SLOTS


@device_state("ahci", version=1)
@dataclass
class AhciState(PciDeviceState):
    """HBA registers (CAP, PI, VS and CAP2 are compared with the device they
    are restored into) and the 32 ports."""

    ports: U8 = 0
    cap: U32 = 0
    ghc: U32 = 0
    hba_is: U32 = 0
    pi: U32 = 0
    vs: U32 = 0
    cap2: U32 = 0
    lintr: BOOL = False
    port: Annotated[list, ListOf(Nested(cls=AhciPortState), max_len=MAX_PORTS)] = \
        field(default_factory=list)


def _msi_messages(nports: int) -> int:
    """bhyve asks for the power of two at or above min(ports, 16)."""
    n = min(nports, 16)
    return 1 << (n.bit_length() - (0 if n & (n - 1) else 1))


def _atoi(text: str) -> int:
    return to_c_int(c_strtol(text, 10)[0])


@pci_emul("ahci")
class Ahci(PciFunction):
    state_class: ClassVar[type] = AhciState

    def __init__(self, ctx: PciContext) -> None:
        super().__init__(ctx)
        self.quiesced = False
        self._idle = threading.Condition(self._lock)
        self.ports: list[AhciPort] = []
        self.nports = NPORTS
        self._open_ports(ctx)
        slots = _SLOTS_MAX
        for p in self.ports:
            if p.backend is not None:
                slots = min(slots, p.backend.queue_depth)
        slots -= 1
        self.pi = sum(p.bit for p in self.ports if p.backend is not None)
        self.cap = (AHCI_CAP_64BIT | AHCI_CAP_SNCQ | AHCI_CAP_SSNTF | AHCI_CAP_SMPS
                    | AHCI_CAP_SSS | AHCI_CAP_SALP | AHCI_CAP_SAL | AHCI_CAP_SCLO
                    | 3 << AHCI_CAP_ISS_SHIFT | AHCI_CAP_PMD | AHCI_CAP_SSC | AHCI_CAP_PSC
                    | slots << AHCI_CAP_NCS_SHIFT | AHCI_CAP_SXS | (self.nports - 1))
        self.vs = AHCI_VERSION
        self.cap2 = AHCI_CAP2_APST
        self.ghc = 0
        self.is_ = 0
        self.lintr = False
        self.set_ids(AHCI_VENDOR, AHCI_DEVICE, AHCI_CLASS)
        self.add_msi(_msi_messages(self.nports))
        self.add_bar(ABAR, BarKind.MEM32, AHCI_OFFSET + self.nports * AHCI_STEP)
        self.intx()
        self.reset()

    # ======================================================================
    # configuration
    # ======================================================================
    def _open_ports(self, ctx: PciContext) -> None:
        ports_node = None
        if ctx.config is not None and hasattr(ctx.config, "find_node"):
            ports_node = ctx.config.find_node("port")
        try:
            for n in range(self.nports):
                node = ports_node.find_node(str(n)) if ports_node is not None else None
                kind = node.get_value("type") if node is not None else None
                if node is None or kind is None:
                    self.ports.append(AhciPort(self, n, None))
                    continue
                cd = kind != "hd"
                backend = BlockBackend.open(node, f"{ctx.slot}:{ctx.func}:{n}")
                try:
                    ident = self._identify(node, backend, cd)
                except BaseException:
                    backend.close()
                    raise
                self.ports.append(AhciPort(self, n, backend, cd, ident))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _identify(node: Any, backend: BlockBackend, cd: bool) -> bytes:
        nmrr = node.get_value("nmrr")
        strings = IdentifyStrings(
            serial=node.get_value("ser") or default_serial(node.get_value("path") or ""),
            revision=node.get_value("rev") or DEFAULT_REVISION,
            model=node.get_value("model") or (CDROM_MODEL if cd else DISK_MODEL),
            rotation_rate=_atoi(nmrr) if nmrr is not None else 0)
        if cd:
            return identify_cdrom(strings)
        return identify_disk(strings, size=backend.size, sector_size=backend.sector_size,
                             physical_sector=backend.physical_sector, chs=backend.chs(),
                             can_delete=backend.can_delete, read_only=backend.read_only)

    @property
    def lock(self) -> threading.RLock:
        return self._lock       # type: ignore[return-value]

    # ======================================================================
    # registers
    # ======================================================================
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != ABAR:
            return 0
        with self._lock:
            reg = offset & ~3
            if reg < AHCI_OFFSET:
                value = self._host_read(reg)
            elif reg < AHCI_OFFSET + self.nports * AHCI_STEP:
                port, off = divmod(reg - AHCI_OFFSET, AHCI_STEP)
                value = self.ports[port].read(off)
            else:
                value = 0
        return (value >> 8 * (offset & 3)) & ((1 << 8 * size) - 1)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != ABAR or size != 4 or offset & 3:
            log.debug("ahci: ignored %d-byte write at %#x", size, offset)
            return
        with self._lock:
            if offset < AHCI_OFFSET:
                self._host_write(offset, value)
            elif offset < AHCI_OFFSET + self.nports * AHCI_STEP:
                port, off = divmod(offset - AHCI_OFFSET, AHCI_STEP)
                self.ports[port].write(off, value)

    def _host_read(self, reg: int) -> int:
        return {AHCI_CAP: self.cap, AHCI_GHC: self.ghc, AHCI_IS: self.is_, AHCI_PI: self.pi,
                AHCI_VS: self.vs, AHCI_CAP2: self.cap2}.get(reg, 0)

    def _host_write(self, reg: int, value: int) -> None:
        if reg == AHCI_GHC:
            if value & AHCI_GHC_HR:
                self.reset()
                return
            self.ghc = self.ghc | AHCI_GHC_IE if value & AHCI_GHC_IE else self.ghc & ~AHCI_GHC_IE
            self.generate_intr(0xFFFFFFFF)
        elif reg == AHCI_IS:
            self.is_ &= ~value
            self.generate_intr(value)
        # CAP, PI, VS, CAP2 are read-only; CCC and enclosure management absent.

    def reset(self) -> None:
        """GHC.HR (and power-on): AHCI mode, interrupts off, ports reset."""
        with self._lock:
            self.ghc = AHCI_GHC_AE
            self.is_ = 0
            if self.lintr:
                self.intx_deassert()
                self.lintr = False
            for p in self.ports:
                cmd = P_CMD_SUD | P_CMD_POD | (P_CMD_CPS if p.backend is not None else 0)
                p.hba_reset(cmd)

    # ======================================================================
    # interrupts
    # ======================================================================
    def _nmsg(self) -> int:
        return self.msi.maxmsgnum if self.msi is not None and self.msi.enabled else 0

    def _shared(self, index: int, nmsg: int) -> bool:
        """Whether port ``index`` shares the last MSI message with others."""
        return not (self.nports <= nmsg or index < nmsg - 1)

    def port_intr(self, port: AhciPort) -> None:
        """A port event (``ahci_port_intr``)."""
        if not port.s.is_ & port.s.ie:
            return
        nmsg = self._nmsg()
        if not self._shared(port.index, nmsg):
            self.is_ |= port.bit
            if self.ghc & AHCI_GHC_IE:
                self.signal_vector(port.index)
            return
        if self.is_ & port.bit:
            return
        self.is_ |= port.bit
        if not self.ghc & AHCI_GHC_IE:
            return
        if nmsg > 0:
            self.signal_vector(nmsg - 1)
        elif not self.lintr:
            self.lintr = True
            self.intx_assert()

    def generate_intr(self, mask: int) -> None:
        """Re-evaluate after a write to GHC or IS (``ahci_generate_intr``)."""
        for p in self.ports:
            if p.s.is_ & p.s.ie:
                self.is_ |= p.bit
        if self.is_ == 0 or not self.ghc & AHCI_GHC_IE:
            if self.lintr:
                self.intx_deassert()
                self.lintr = False
            return
        nmsg = self._nmsg()
        if nmsg == 0:
            if not self.lintr:
                self.lintr = True
                self.intx_assert()
            return
        for i in range(nmsg):
            mmask = 1 << i if not self._shared(i, nmsg) else (0xFFFFFFFF << i) & 0xFFFFFFFF
            if self.is_ & mask and mmask & mask:
                self.signal_vector(i)

    # ======================================================================
    # I/O lifecycle
    # ======================================================================
    def io_retired(self) -> None:
        """A started command finished; wake a pause waiting for the last one."""
        if not any(p.pending for p in self.ports):
            self._idle.notify_all()

    def pause(self) -> None:
        """Stop starting commands, let started ones finish, then pause and
        flush the disks (bhyve's ``blockif_pause`` on every port)."""
        with self._lock:
            self.quiesced = True
            while any(p.pending for p in self.ports):
                self._idle.wait()
        for p in self.ports:
            if p.backend is not None:
                p.backend.pause()

    def resume(self) -> None:
        for p in self.ports:
            if p.backend is not None:
                p.backend.resume()
        with self._lock:
            self.quiesced = False
            for p in self.ports:
                p.handle_port()

    def close(self) -> None:
        for p in self.ports:
            if p.backend is not None:
                p.backend.close()

    # ======================================================================
    # snapshots
    # ======================================================================
    def save_device_fields(self) -> dict[str, Any]:
        busy = sum(bin(p.pending).count("1") for p in self.ports)
        if busy:
            raise StateError(f"{self.name}: {busy} commands in flight; "
                             "pause the device before saving it")
        return {"ports": self.nports, "cap": self.cap, "ghc": self.ghc, "hba_is": self.is_,
                "pi": self.pi, "vs": self.vs, "cap2": self.cap2, "lintr": self.lintr,
                "port": [dataclasses.replace(p.s) for p in self.ports]}

    def check_device_fields(self, state: Any) -> None:
        who = self.name
        if state.ports != self.nports or len(state.port) != self.nports:
            raise StateError(f"{who}: {state.ports} ports ({len(state.port)} saved) in the "
                             f"snapshot, {self.nports} here")
        for what in ("cap", "pi", "vs", "cap2"):
            if getattr(state, what) != getattr(self, what):
                raise StateError(f"{who}: {what.upper()} is {getattr(state, what):#x} in the "
                                 f"snapshot but {getattr(self, what):#x} here")
        if any(p.pending for p in self.ports):
            raise StateError(f"{who}: cannot restore while commands are in flight")
        for mine, saved in zip(self.ports, state.port):
            if (saved.present, saved.atapi) != (mine.s.present, mine.s.atapi):
                raise StateError(f"{who}: port {mine.index} is {_describe(saved)} in the "
                                 f"snapshot but {_describe(mine.s)} here")
            if (saved.present and not saved.atapi
                    and capacity(saved.ident) != capacity(mine.s.ident)):
                raise StateError(f"{who}: port {mine.index}: disk of {capacity(saved.ident)} "
                                 f"sectors in the snapshot, {capacity(mine.s.ident)} here")

    def load_device_fields(self, state: Any) -> None:
        self.ghc = state.ghc
        self.is_ = state.hba_is
        self.lintr = state.lintr
        for p, saved in zip(self.ports, state.port):
            p.s = dataclasses.replace(saved)


def _describe(s: AhciPortState) -> str:
    if not s.present:
        return "empty"
    return "a CD-ROM" if s.atapi else "a disk"
