"""One AHCI port: its registers, the command list engine, ATA and ATAPI
command execution, FIS delivery and disk I/O (bhyve's ``struct ahci_port``
and the functions that work on it in ``pci_ahci.c``).

Behaviour is bhyve's: commands are taken from the command list in
round-robin order starting at PxCMD.CCS, one non-queued command at a time
(the port is BSY while it runs) or up to 32 NCQ commands at once; data moves
through the PRDT in chunks of at most ``BLOCKIF_IOV_MAX`` segments;
completions post a D2H register FIS (non-queued) or a Set Device Bits FIS
(NCQ) into the received-FIS area and raise the port's interrupt.

Where bhyve trusts the guest, this model does not.  Every guest address --
command list, command table, PRDT, data buffers, received-FIS area -- goes
through the bounds-checked :class:`~bhyvepy.memory.GuestMemory`; a bad one
fails the command with ERR/ABRT in PxTFD (a task file error), never with an
exception.  The command table is copied when the command starts, so a guest
rewriting it mid-flight cannot confuse the model.  A FIS that is not a
register host-to-device FIS fails its slot (bhyve would spin on it forever),
and an error always stops command processing until software clears
PxCMD.ST, even when no FIS could be posted.  ATA media commands sent to a
CD-ROM port are aborted: the medium is read-only.

Locking: every method runs with the HBA's lock held -- register accesses
from vCPU threads, completions from the block backend's worker threads.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from bhyvepy.block import BLOCKIF_IOV_MAX, BlockBackend, BlockRequest
from bhyvepy.dev import atapi
from bhyvepy.dev.ahci_ata import (dsm_entry, dsm_length, is_trim, log_page, read_log_ok,
                                  rw_params)
from bhyvepy.dev.ahci_defs import (AHCI_CL_SIZE, ATA_ATA_IDENTIFY, ATA_ATAPI_IDENTIFY,
                                   ATA_A_RESET, ATA_CHECK_POWER_MODE, ATA_DATA_SET_MANAGEMENT,
                                   ATA_E_ABORT, ATA_FLUSHCACHE, ATA_FLUSHCACHE48, ATA_I_CMD,
                                   ATA_I_IN, ATA_NCQ, ATA_NOOPS, ATA_NOP, ATA_PACKET_CMD,
                                   ATA_READ_LOG_DMA_EXT, ATA_READ_LOG_EXT,
                                   ATA_RW_READ, ATA_RW_WRITE, ATA_S_BUSY, ATA_S_DMA, ATA_S_DRQ,
                                   ATA_S_DSC, ATA_S_ERROR, ATA_S_READY, ATA_SATA_SF_AN,
                                   ATA_SECURITY_FREEZE_LOCK, ATA_SEND_FPDMA_QUEUED,
                                   ATA_SENSE_ILLEGAL_REQUEST, ATA_SET_MULTI, ATA_SETFEATURES,
                                   ATA_SF_DIS_RCACHE, ATA_SF_DIS_WCACHE, ATA_SF_ENAB_RCACHE,
                                   ATA_SF_ENAB_SATA_SF, ATA_SF_ENAB_WCACHE, ATA_SF_SETXFER,
                                   ATA_SMART_CMD, ATA_UDMA0, ATA_UDMA6, ATA_WDMA0,
                                   ASC_LBA_OUT_OF_RANGE, CT_ACMD, CT_PRDT, DBCMASK, FIS_C,
                                   FIS_I, FIS_TYPE_PIOSETUP, FIS_TYPE_REGD2H, FIS_TYPE_REGH2D,
                                   FIS_TYPE_SETDEVBITS, MAX_SLOTS, P_CI, P_CLB, P_CLBU, P_CMD,
                                   P_CMD_CCS_MASK, P_CMD_CCS_SHIFT, P_CMD_CLO, P_CMD_CR,
                                   P_CMD_FR, P_CMD_FRE, P_CMD_ICC_MASK, P_CMD_ST,
                                   P_CMD_WRITABLE, P_FB, P_FBU, P_IE, P_IE_MASK, P_IS,
                                   P_IX_DHR, P_IX_PS, P_IX_SDB, P_IX_TFE, P_SACT, P_SCTL,
                                   P_SERR, PORT_REGS, PRDT_ENTRY_SIZE, PXSIG_ATA, PXSIG_ATAPI,
                                   RFIS_PSFIS, RFIS_RFIS, RFIS_SDBFIS, RFIS_SIZE, SC_DET_RESET,
                                   SC_SPD_MASK, SS_DET_NO_DEVICE, SS_DET_PHY_ONLINE,
                                   SS_IPM_ACTIVE, SS_SPD_GEN3)
from bhyvepy.errors import GuestMemoryError
from bhyvepy.snapshot.state import BOOL, U8, U32, U64, Blob, StateError, device_state

if TYPE_CHECKING:
    from bhyvepy.dev.ahci import Ahci

log = logging.getLogger("bhyvepy.ahci")

_HDR = struct.Struct("<HHIQ")          # flags, prdtl, prdbc, ctba
_PRD = struct.Struct("<Q4xI")          # dba, reserved, dbc
_TFD_ABORT = (ATA_E_ABORT << 8) | ATA_S_READY | ATA_S_ERROR
_TFD_OK = ATA_S_READY | ATA_S_DSC
_FIS_LEN = 0x80                        # CFIS + ACMD + reserved, copied per command
_MAX_ROUNDS = MAX_SLOTS * (MAX_SLOTS + 1)


@device_state("ahci-port", version=1)
@dataclass
class AhciPortState:
    """Everything a port keeps between commands (bhyve saves the same).

    ``cmd_lst``/``rfis`` are the command-list and FIS base addresses latched
    when software last set PxCMD.ST / PxCMD.FRE; ``ident`` the IDENTIFY data
    (empty for a port without a device).
    """

    present: BOOL = False
    atapi: BOOL = False
    clb: U32 = 0
    clbu: U32 = 0
    fb: U32 = 0
    fbu: U32 = 0
    is_: U32 = 0
    ie: U32 = 0
    cmd: U32 = 0
    tfd: U32 = 0
    sig: U32 = 0
    ssts: U32 = 0
    sctl: U32 = 0
    serr: U32 = 0
    sact: U32 = 0
    ci: U32 = 0
    sntf: U32 = 0
    fbs: U32 = 0
    cmd_lst: U64 = 0
    rfis: U64 = 0
    ccs: U8 = 0
    reset: BOOL = False
    waitforclear: BOOL = False
    mult_sectors: U8 = 0
    xfermode: U8 = 0
    err_cfis: Annotated[bytes, Blob(exact=20)] = bytes(20)
    sense_key: U8 = 0
    asc: U8 = 0
    ident: Annotated[bytes, Blob(max_len=512)] = b""

    def validate(self) -> None:
        if self.ccs >= MAX_SLOTS:
            raise StateError(f"current command slot {self.ccs} out of range")
        if self.mult_sectors > 128:
            raise StateError(f"multiple count {self.mult_sectors} out of range")
        if self.sense_key > 0xF:
            raise StateError(f"sense key {self.sense_key} out of range")
        if len(self.ident) != (512 if self.present else 0):
            raise StateError(f"IDENTIFY data of {len(self.ident)} bytes")
        if self.atapi and not self.present:
            raise StateError("ATAPI flag on a port without a device")

    @staticmethod
    def hypothesis_strategy():  # type: ignore[no-untyped-def]
        """Valid port states (random registers, consistent device fields)."""
        from hypothesis import strategies as st

        u32 = st.integers(0, 0xFFFFFFFF)
        regs = ("clb", "clbu", "fb", "fbu", "is_", "ie", "cmd", "tfd", "sig", "ssts", "sctl",
                "serr", "sact", "ci", "sntf", "fbs")

        def build(device: int, values: list, rest: tuple) -> "AhciPortState":
            cmd_lst, rfis, ccs, reset, wfc, mult, xfer, err, key, asc, ident = rest
            return AhciPortState(present=device > 0, atapi=device == 2,
                                 **dict(zip(regs, values)), cmd_lst=cmd_lst, rfis=rfis,
                                 ccs=ccs, reset=reset, waitforclear=wfc, mult_sectors=mult,
                                 xfermode=xfer, err_cfis=err, sense_key=key, asc=asc,
                                 ident=ident if device else b"")

        u64 = st.integers(0, 2**64 - 1)
        rest = st.tuples(u64, u64, st.integers(0, MAX_SLOTS - 1), st.booleans(), st.booleans(),
                         st.integers(0, 128), st.integers(0, 255),
                         st.binary(min_size=20, max_size=20), st.integers(0, 15),
                         st.integers(0, 255), st.binary(min_size=512, max_size=512))
        return st.builds(build, st.integers(0, 2), st.lists(u32, min_size=16, max_size=16), rest)


class _Cmd:
    """A command that has been started: its copied command table and progress."""

    __slots__ = ("slot", "hdr_gpa", "cfis", "prdt", "prdtl", "kind", "ncq", "write",
                 "base", "length", "done", "more", "dsm", "req")

    def __init__(self, slot: int, hdr_gpa: int, cfis: bytearray, prdt: bytes, prdtl: int) -> None:
        self.slot = slot
        self.hdr_gpa = hdr_gpa
        self.cfis = cfis
        self.prdt = prdt
        self.prdtl = prdtl
        self.kind = ""          # "rw", "dsm", "flush", "cd"
        self.ncq = False
        self.write = False
        self.base = 0           # byte offset on the medium
        self.length = 0         # bytes the command asks for
        self.done = 0           # bytes handed to the backend so far
        self.more = False
        self.dsm = b""
        self.req: BlockRequest | None = None

    def prd(self, i: int) -> tuple[int, int]:
        dba, dbc = _PRD.unpack_from(self.prdt, i * PRDT_ENTRY_SIZE)
        return dba, (dbc & DBCMASK) + 1


class _NoMemory:
    """Stands in for guest memory when a device is built without any."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kw: Any) -> Any:
            if name == "contains":
                return False
            raise GuestMemoryError("no guest memory")
        return fail


class AhciPort:
    """Port ``index`` of ``hba``, with ``backend`` attached (or no device)."""

    def __init__(self, hba: "Ahci", index: int, backend: BlockBackend | None,
                 atapi: bool = False, ident: bytes = b"") -> None:
        self.hba = hba
        self.index = index
        self.backend = backend
        self.s = AhciPortState(present=backend is not None, atapi=atapi and backend is not None,
                               ident=ident if backend is not None else b"")
        self.pending = 0                        # slots with a block request out
        self.inflight: dict[int, _Cmd] = {}
        self.mem: Any = hba.ctx.mem if hba.ctx.mem is not None else _NoMemory()

    @property
    def bit(self) -> int:
        return 1 << self.index

    # ======================================================================
    # registers
    # ======================================================================
    def read(self, offset: int) -> int:
        idx = offset // 4
        if idx >= len(PORT_REGS) or PORT_REGS[idx] is None:
            return 0
        return getattr(self.s, PORT_REGS[idx])   # type: ignore[arg-type]

    def write(self, offset: int, value: int) -> None:
        s = self.s
        if offset == P_CLB:
            s.clb = value
        elif offset == P_CLBU:
            s.clbu = value
        elif offset == P_FB:
            s.fb = value
        elif offset == P_FBU:
            s.fbu = value
        elif offset == P_IS:
            s.is_ &= ~value
            self.hba.port_intr(self)
        elif offset == P_IE:
            s.ie = value & P_IE_MASK
            self.hba.port_intr(self)
        elif offset == P_CMD:
            self._write_cmd(value)
        elif offset == P_SCTL:
            s.sctl = value
            if not s.cmd & P_CMD_ST and value & SC_DET_RESET:
                self.reset()
        elif offset == P_SERR:
            s.serr &= ~value
        elif offset == P_SACT:
            s.sact |= value
        elif offset == P_CI:
            s.ci |= value
            self.handle_port()
        # TFD, SIG, SSTS are read-only; SNTF and FBS do nothing here.

    def _write_cmd(self, value: int) -> None:
        s = self.s
        s.cmd = (s.cmd & ~P_CMD_WRITABLE) | (value & P_CMD_WRITABLE)
        if not value & P_CMD_ST:
            self.stop()
        else:
            s.cmd |= P_CMD_CR
            s.cmd_lst = s.clbu << 32 | s.clb
        if value & P_CMD_FRE:
            s.cmd |= P_CMD_FR
            s.rfis = s.fbu << 32 | s.fb
        else:
            s.cmd &= ~P_CMD_FR
        if value & P_CMD_CLO:
            s.tfd &= ~(ATA_S_BUSY | ATA_S_DRQ)
            s.cmd &= ~P_CMD_CLO
        if value & P_CMD_ICC_MASK:
            s.cmd &= ~P_CMD_ICC_MASK
        self.handle_port()

    # ======================================================================
    # reset / stop
    # ======================================================================
    def reset(self) -> None:
        """COMRESET: link up, signature and reset FIS (``ahci_port_reset``)."""
        s = self.s
        s.serr = 0
        s.sact = 0
        s.xfermode = ATA_UDMA6
        s.mult_sectors = 128
        if self.backend is None:
            s.ssts = SS_DET_NO_DEVICE
            s.sig = 0xFFFFFFFF
            s.tfd = 0x7F
            return
        s.ssts = SS_DET_PHY_ONLINE | SS_IPM_ACTIVE | (s.sctl & SC_SPD_MASK or SS_SPD_GEN3)
        s.tfd = (1 << 8) | ATA_S_DSC | ATA_S_DMA
        if s.atapi:
            s.sig = PXSIG_ATAPI
        else:
            s.sig = PXSIG_ATA
            s.tfd |= ATA_S_READY
        fis = bytearray(20)
        fis[0] = FIS_TYPE_REGD2H
        fis[3] = 1                  # error: diagnostics passed
        fis[4] = 1                  # sector count / LBA low of the signature
        if s.atapi:
            fis[5], fis[6] = 0x14, 0xEB
        fis[12] = 1
        self._post_fis(FIS_TYPE_REGD2H, fis)

    def hba_reset(self, cmd: int) -> None:
        """The port's part of GHC.HR."""
        s = self.s
        s.ie = 0
        s.is_ = 0
        s.cmd = cmd
        s.sctl = 0
        # bhyve leaves PxCI/PxSACT of a reset HBA alone; AHCI clears them
        # with ST, and so does this model (requests not yet started are
        # dropped, running ones finish into the reset port).
        self.stop()
        self.reset()

    def stop(self) -> None:
        """PxCMD.ST cleared: cancel what has not started (``ahci_port_stop``)."""
        for slot, c in list(self.inflight.items()):
            if c.req is None or self.backend is None or self.backend.cancel(c.req) != 0:
                continue
            if c.cfis[2] in ATA_NCQ:
                self.s.sact &= ~(1 << slot)
            else:
                self.s.ci &= ~(1 << slot)
            self._retire(c)
        self.check_stopped()

    def check_stopped(self) -> None:
        s = self.s
        if not s.cmd & P_CMD_ST and self.pending == 0:
            s.ccs = 0
            s.cmd &= ~(P_CMD_CR | P_CMD_CCS_MASK)
            s.ci = 0
            s.sact = 0
            s.waitforclear = False

    # ======================================================================
    # FIS delivery
    # ======================================================================
    def _post_fis(self, ftype: int, fis: bytes | bytearray) -> None:
        """Copy a FIS into the received-FIS area and raise what it asks for."""
        s = self.s
        if not s.cmd & P_CMD_FRE or not self.mem.contains(s.rfis, RFIS_SIZE):
            return
        if ftype == FIS_TYPE_REGD2H:
            offset, irq = RFIS_RFIS, P_IX_DHR
        elif ftype == FIS_TYPE_SETDEVBITS:
            offset, irq = RFIS_SDBFIS, P_IX_SDB
        else:
            offset, irq = RFIS_PSFIS, P_IX_PS
        if not fis[1] & FIS_I:
            irq = 0
        if fis[2] & ATA_S_ERROR:
            irq |= P_IX_TFE
        self.mem.write(s.rfis + offset, bytes(fis))
        if irq and ~s.is_ & irq:
            s.is_ |= irq
            self.hba.port_intr(self)

    def _note_error(self, first: int, status: int, error: int, cfis: bytes) -> None:
        s = self.s
        s.err_cfis = bytes([first, 0, status, error]) + bytes(cfis[4:20])
        s.waitforclear = True

    def d2h(self, slot: int, cfis: bytes | bytearray, tfd: int) -> None:
        """Finish a non-queued command with a D2H register FIS."""
        error = (tfd >> 8) & 0xFF
        fis = bytearray(20)
        fis[0] = FIS_TYPE_REGD2H
        fis[1] = FIS_I
        fis[2] = tfd & 0xFF
        fis[3] = error
        fis[4:14] = cfis[4:14]
        if fis[2] & ATA_S_ERROR:
            self._note_error(0x80, tfd & 0xFF, error, cfis)
        else:
            self.s.ci &= ~(1 << slot)
        self.s.tfd = tfd
        self._post_fis(FIS_TYPE_REGD2H, fis)

    def sdb(self, slot: int, cfis: bytes | bytearray, tfd: int) -> None:
        """Finish an NCQ command with a Set Device Bits FIS."""
        error = (tfd >> 8) & 0xFF
        status = tfd & 0x77
        fis = bytearray(8)
        fis[0] = FIS_TYPE_SETDEVBITS
        fis[1] = FIS_I
        fis[2] = status
        fis[3] = error
        if status & ATA_S_ERROR:
            self._note_error(slot, status, error, cfis)
        else:
            fis[4:8] = (1 << slot).to_bytes(4, "little")
            self.s.sact &= ~(1 << slot)
        self.s.tfd = (self.s.tfd & ~0x77) | status
        self._post_fis(FIS_TYPE_SETDEVBITS, fis)

    def d2h_ncq(self, slot: int) -> None:
        """An NCQ command was accepted: release the task file, no interrupt."""
        self.s.tfd = ATA_S_READY | ATA_S_DSC
        fis = bytearray(20)
        fis[0] = FIS_TYPE_REGD2H
        fis[2] = self.s.tfd
        self.s.ci &= ~(1 << slot)
        self._post_fis(FIS_TYPE_REGD2H, fis)

    def pio_setup(self) -> None:
        fis = bytearray(20)
        fis[0] = FIS_TYPE_PIOSETUP
        self._post_fis(FIS_TYPE_PIOSETUP, fis)

    # ======================================================================
    # command list
    # ======================================================================
    def handle_port(self) -> None:
        """Start issued commands, round robin from CCS (``ahci_handle_port``)."""
        s = self.s
        if not s.cmd & P_CMD_ST or self.hba.quiesced:
            return
        for _ in range(_MAX_ROUNDS):
            if not s.ci & ~self.pending:
                return
            if s.tfd & (ATA_S_BUSY | ATA_S_DRQ) or s.waitforclear:
                return
            if (s.ci & ~self.pending) >> s.ccs & 1:
                s.cmd = (s.cmd & ~P_CMD_CCS_MASK) | s.ccs << P_CMD_CCS_SHIFT
                self._handle_slot(s.ccs)
            s.ccs = (s.ccs + 1) & (MAX_SLOTS - 1)

    def _handle_slot(self, slot: int) -> None:
        hdr_gpa = self.s.cmd_lst + slot * AHCI_CL_SIZE
        try:
            _flags, prdtl, _prdbc, ctba = _HDR.unpack(self.mem.read(hdr_gpa, _HDR.size))
            cfis = bytearray(self.mem.read(ctba, _FIS_LEN))
            prdt = self.mem.read(ctba + CT_PRDT, prdtl * PRDT_ENTRY_SIZE) if prdtl else b""
        except GuestMemoryError as exc:
            self._complain(f"slot {slot}: command table unreadable: {exc}")
            self.d2h(slot, bytes(_FIS_LEN), _TFD_ABORT)
            return
        if cfis[0] != FIS_TYPE_REGH2D:
            self._complain(f"slot {slot}: not a host-to-device register FIS: {cfis[0]:#04x}")
            self.d2h(slot, cfis, _TFD_ABORT)
            return
        if not cfis[1] & FIS_C:
            # Device control: SRST set then cleared resets the device.
            if cfis[15] & ATA_A_RESET:
                self.s.reset = True
            elif self.s.reset:
                self.s.reset = False
                self.reset()
            self.s.ci &= ~(1 << slot)
            return
        c = _Cmd(slot, hdr_gpa, cfis, prdt, prdtl)
        try:
            self._handle_cmd(c)
        except Exception:                       # a model bug must not kill the vCPU
            log.exception("ahci port %d: command %#04x failed", self.index, cfis[2])
            if c.slot in self.inflight and self.inflight[c.slot] is c:
                self._retire(c)
            self.d2h(slot, cfis, _TFD_ABORT)

    # ======================================================================
    # ATA commands
    # ======================================================================
    def _handle_cmd(self, c: _Cmd) -> None:
        s = self.s
        cfis = c.cfis
        cmd = cfis[2]
        s.tfd |= ATA_S_BUSY
        if cmd == ATA_ATA_IDENTIFY:
            if s.atapi or c.prdtl == 0:
                self.d2h(c.slot, cfis, _TFD_ABORT)
            else:
                self._data_in(c, s.ident, pio=True)
        elif cmd == ATA_SETFEATURES:
            self.d2h(c.slot, cfis, self._set_features(cfis))
        elif cmd == ATA_SET_MULTI:
            n = cfis[12]
            if n != 0 and (n > 128 or n & (n - 1)):
                self.d2h(c.slot, cfis, _TFD_ABORT)
            else:
                s.mult_sectors = n
                self.d2h(c.slot, cfis, _TFD_OK)
        elif cmd in ATA_RW_READ or cmd in ATA_RW_WRITE:
            if s.atapi:
                self.d2h(c.slot, cfis, _TFD_ABORT)
            else:
                self._start_rw(c)
        elif cmd == ATA_FLUSHCACHE or cmd == ATA_FLUSHCACHE48:
            self._start_flush(c)
        elif cmd == ATA_DATA_SET_MANAGEMENT or cmd == ATA_SEND_FPDMA_QUEUED:
            if is_trim(cfis) and not s.atapi:
                self._start_trim(c)
            else:
                self.d2h(c.slot, cfis, _TFD_ABORT)
        elif cmd == ATA_READ_LOG_EXT or cmd == ATA_READ_LOG_DMA_EXT:
            self._read_log(c)
        elif cmd in (ATA_SECURITY_FREEZE_LOCK, ATA_SMART_CMD, ATA_NOP):
            self.d2h(c.slot, cfis, _TFD_ABORT)
        elif cmd == ATA_CHECK_POWER_MODE:
            cfis[12] = 0xFF                     # active or idle
            self.d2h(c.slot, cfis, _TFD_OK)
        elif cmd in ATA_NOOPS:
            self.d2h(c.slot, cfis, _TFD_OK)
        elif cmd == ATA_ATAPI_IDENTIFY:
            if not s.atapi:
                self.d2h(c.slot, cfis, _TFD_ABORT)
            else:
                self._data_in(c, s.ident, pio=True)
        elif cmd == ATA_PACKET_CMD:
            if not s.atapi:
                self.d2h(c.slot, cfis, _TFD_ABORT)
            else:
                self._packet(c)
        else:
            log.debug("ahci port %d: unsupported command %#04x", self.index, cmd)
            self.d2h(c.slot, cfis, _TFD_ABORT)

    def _set_features(self, cfis: bytearray) -> int:
        feature = cfis[3]
        if feature == ATA_SF_ENAB_SATA_SF:
            return _TFD_OK if cfis[12] == ATA_SATA_SF_AN else _TFD_ABORT
        if feature in (ATA_SF_ENAB_WCACHE, ATA_SF_DIS_WCACHE, ATA_SF_ENAB_RCACHE,
                       ATA_SF_DIS_RCACHE):
            return _TFD_OK
        if feature == ATA_SF_SETXFER:
            # PIO modes are accepted and ignored; bhyve keeps only the
            # mode number of a DMA mode.
            if cfis[12] & 0xF8 in (ATA_WDMA0, ATA_UDMA0):
                self.s.xfermode = cfis[12] & 0x7
            return _TFD_OK
        return _TFD_ABORT

    def _read_log(self, c: _Cmd) -> None:
        s = self.s
        page = None
        if not s.atapi and read_log_ok(c.cfis, c.prdtl):
            assert self.backend is not None
            page = log_page(c.cfis[4], s.err_cfis,
                            self.backend.can_delete and not self.backend.read_only)
        if page is None:
            self.d2h(c.slot, c.cfis, _TFD_ABORT)
            return
        self._data_in(c, page, pio=c.cfis[2] == ATA_READ_LOG_EXT)

    def _data_in(self, c: _Cmd, data: bytes, *, pio: bool, tfd: int = _TFD_OK) -> None:
        """A command whose data the device has at hand: copy, then finish."""
        if pio:
            self.pio_setup()
        if not self._write_prdt(c, data):
            self.d2h(c.slot, c.cfis, _TFD_ABORT)
            return
        self.d2h(c.slot, c.cfis, tfd)

    # --- PRDT ----------------------------------------------------------------
    def _write_prdt(self, c: _Cmd, data: bytes) -> bool:
        left = len(data)
        pos = 0
        try:
            for i in range(c.prdtl):
                if not left:
                    break
                dba, size = c.prd(i)
                n = min(left, size)
                self.mem.write(dba, data[pos:pos + n])
                pos += n
                left -= n
        except GuestMemoryError as exc:
            self._complain(f"slot {c.slot}: PRD buffer unusable: {exc}")
            return False
        self._set_prdbc(c, len(data) - left)
        return True

    def _read_prdt(self, c: _Cmd, size: int) -> bytes | None:
        out = bytearray()
        try:
            for i in range(c.prdtl):
                if len(out) >= size:
                    break
                dba, n = c.prd(i)
                out += self.mem.read(dba, min(size - len(out), n))
        except GuestMemoryError as exc:
            self._complain(f"slot {c.slot}: PRD buffer unusable: {exc}")
            return None
        return bytes(out.ljust(size, b"\0"))

    def _set_prdbc(self, c: _Cmd, value: int) -> None:
        try:
            self.mem.write_int(c.hdr_gpa + 4, 4, value & 0xFFFFFFFF)
        except GuestMemoryError:
            pass

    def _build_iov(self, c: _Cmd) -> list[memoryview] | None:
        """Guest buffers for the next chunk of ``c`` (``ahci_build_iov``)."""
        skip = c.done
        left = c.length - c.done
        todo = 0
        views: list[memoryview] = []
        i = 0
        try:
            while i < c.prdtl and len(views) < BLOCKIF_IOV_MAX and left > 0:
                dba, size = c.prd(i)
                i += 1
                if size <= skip:
                    skip -= size
                    continue
                size = min(size - skip, left)
                views.append(self.mem.view(dba + skip, size))
                todo += size
                left -= size
                skip = 0
        except GuestMemoryError as exc:
            self._complain(f"slot {c.slot}: PRD buffer unusable: {exc}")
            return None
        if len(views) == BLOCKIF_IOV_MAX:
            # Whole sectors per chunk; the rest goes with the next one.
            assert self.backend is not None
            extra = todo % self.backend.sector_size
            todo -= extra
            if todo <= 0:
                self._complain(f"slot {c.slot}: {BLOCKIF_IOV_MAX} PRD entries hold less "
                               "than one sector")
                return None
            while extra > 0:
                last = views[-1]
                if len(last) > extra:
                    views[-1] = last[:len(last) - extra]
                    break
                extra -= len(last)
                views.pop()
        c.done += todo
        c.more = c.done < c.length and i < c.prdtl
        return views

    # --- block I/O -------------------------------------------------------------
    def _start(self, c: _Cmd) -> None:
        self.pending |= 1 << c.slot
        self.inflight[c.slot] = c

    def _retire(self, c: _Cmd) -> None:
        self.pending &= ~(1 << c.slot)
        if self.inflight.get(c.slot) is c:
            del self.inflight[c.slot]
        c.req = None
        self.hba.io_retired()

    def _submit(self, c: _Cmd, req: BlockRequest, call: Any) -> None:
        c.req = req
        err = call(req)
        if err:
            self._complain(f"slot {c.slot}: block backend refused the request: "
                           f"{errno.errorcode.get(err, err)}")
            self._complete(c, err)

    def _start_rw(self, c: _Cmd, first: bool = True) -> None:
        assert self.backend is not None
        if first:
            p = rw_params(c.cfis, self.backend.sector_size)
            c.kind, c.ncq, c.write = "rw", p.ncq, p.write
            c.base, c.length = p.offset, p.length
            self._start(c)
            if c.ncq:
                self.d2h_ncq(c.slot)
        offset = c.base + c.done
        views = self._build_iov(c)
        if views is None:
            self._complete(c, errno.EFAULT)
            return
        req = BlockRequest(self._io_done, offset, views, param=c)
        self._submit(c, req, self.backend.write if c.write else self.backend.read)

    def _start_flush(self, c: _Cmd) -> None:
        assert self.backend is not None
        c.kind = "flush"
        self._start(c)
        self._submit(c, BlockRequest(self._io_done, param=c), self.backend.flush)

    def _start_trim(self, c: _Cmd, first: bool = True) -> None:
        """DSM TRIM: one discard per non-empty range, in order."""
        assert self.backend is not None
        if first:
            c.kind = "dsm"
            c.ncq = c.cfis[2] == ATA_SEND_FPDMA_QUEUED
            c.length = dsm_length(c.cfis)
            self._start(c)
            buf = self._read_prdt(c, 512)
            if buf is None:
                if c.ncq:
                    self.d2h_ncq(c.slot)
                self._complete(c, errno.EFAULT)
                return
            c.dsm = buf
        sectsz = self.backend.sector_size
        while True:
            lba, count = dsm_entry(c.dsm, c.done)
            c.done += 8
            if count:
                break
            if c.done >= c.length:
                if c.ncq and first:
                    self.d2h_ncq(c.slot)
                self._complete(c, 0)
                return
        c.more = c.length != c.done
        if c.ncq and first:
            self.d2h_ncq(c.slot)
        req = BlockRequest(self._io_done, lba * sectsz, length=count * sectsz, param=c)
        self._submit(c, req, self.backend.discard)

    def _complete(self, c: _Cmd, err: int) -> None:
        """Post the command's final status and forget it."""
        if c.kind == "cd":
            if err:
                self.s.sense_key, self.s.asc = ATA_SENSE_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE
                tfd = (self.s.sense_key << 12) | ATA_S_READY | ATA_S_ERROR
            else:
                tfd = _TFD_OK
            c.cfis[4] = (c.cfis[4] & ~7) | ATA_I_CMD | ATA_I_IN
            self.d2h(c.slot, c.cfis, tfd)
        else:
            tfd = _TFD_ABORT if err else _TFD_OK
            if c.ncq:
                self.sdb(c.slot, c.cfis, tfd)
            else:
                self.d2h(c.slot, c.cfis, tfd)
        self._retire(c)

    def _io_done(self, req: BlockRequest, err: int) -> None:
        """Block backend completion, on one of its worker threads."""
        with self.hba.lock:
            c = req.param
            if not isinstance(c, _Cmd) or self.inflight.get(c.slot) is not c or c.req is not req:
                return
            try:
                if not err:
                    self._set_prdbc(c, c.done)
                if not err and c.more:
                    if c.kind == "dsm":
                        self._start_trim(c, first=False)
                    elif c.kind == "cd":
                        self._start_cd_read(c, first=False)
                    else:
                        self._start_rw(c, first=False)
                else:
                    self._complete(c, err)
                if self.inflight.get(c.slot) is not c:
                    self.check_stopped()
                    self.handle_port()
            except Exception:                   # a model bug: fail the command, go on
                log.exception("ahci port %d: completion of command %#04x failed",
                              self.index, c.cfis[2])
                if self.inflight.get(c.slot) is c:
                    try:
                        self._complete(c, errno.EIO)
                    except Exception:
                        self._retire(c)

    # ======================================================================
    # ATAPI
    # ======================================================================
    def _packet(self, c: _Cmd) -> None:
        assert self.backend is not None
        s = self.s
        acmd = bytes(c.cfis[CT_ACMD:CT_ACMD + 16])
        out = atapi.execute(acmd, media_size=self.backend.size,
                            sector_size=self.backend.sector_size,
                            sense=(s.sense_key, s.asc))
        if isinstance(out, atapi.Read):
            c.kind, c.base, c.length = "cd", out.offset, out.length
            self._start_cd_read(c)
            return
        c.cfis[4] = (c.cfis[4] & ~7) | ATA_I_CMD | ATA_I_IN
        if isinstance(out, atapi.Fail):
            s.sense_key, s.asc = out.key, out.asc
            self.d2h(c.slot, c.cfis, (out.key << 12) | ATA_S_READY | ATA_S_ERROR)
        elif out.data is None:
            self.d2h(c.slot, c.cfis, _TFD_OK)
        else:
            self._data_in(c, out.data, pio=False)

    def _start_cd_read(self, c: _Cmd, first: bool = True) -> None:
        assert self.backend is not None
        if first:
            self._start(c)
        offset = c.base + c.done
        views = self._build_iov(c)
        if views is None:
            self._complete(c, errno.EFAULT)
            return
        self._submit(c, BlockRequest(self._io_done, offset, views, param=c), self.backend.read)

    # ======================================================================
    def _complain(self, what: str) -> None:
        log.debug("ahci port %d: %s", self.index, what)
