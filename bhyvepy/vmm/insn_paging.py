"""Guest-linear to guest-physical translation for the instruction emulator.

When vmm.ko hands an MMIO access to userland it translates only the operand
that faulted.  A string move or a PUSH/POP has a second operand in guest RAM
that the emulator must reach itself, so it walks the guest's page tables the
way the CPU would: same permission checks, same fault error code, same
accessed/dirty updates.  Everything here talks to the vCPU through the small
:class:`CpuAccess` protocol so that the walker is backend-neutral and can be
tested on Linux against an independent CPU model.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol

from bhyvepy.errors import GuestMemoryError


class Reg(str, enum.Enum):
    """Names of the vCPU state the emulator reads or writes."""

    RAX = "rax"
    RCX = "rcx"
    RDX = "rdx"
    RBX = "rbx"
    RSP = "rsp"
    RBP = "rbp"
    RSI = "rsi"
    RDI = "rdi"
    R8 = "r8"
    R9 = "r9"
    R10 = "r10"
    R11 = "r11"
    R12 = "r12"
    R13 = "r13"
    R14 = "r14"
    R15 = "r15"
    RIP = "rip"
    RFLAGS = "rflags"
    CR0 = "cr0"
    CR3 = "cr3"
    CR4 = "cr4"
    EFER = "efer"
    CPL = "cpl"
    ES_BASE = "es_base"
    CS_BASE = "cs_base"
    SS_BASE = "ss_base"
    DS_BASE = "ds_base"
    FS_BASE = "fs_base"
    GS_BASE = "gs_base"
    #: B flag of the SS descriptor: 1 means a 32-bit stack pointer outside
    #: 64-bit mode (0 in real mode and for 16-bit stacks).
    SS_DB = "ss_db"


#: GPRs in ModRM/SIB numbering.
GPRS: tuple[Reg, ...] = (Reg.RAX, Reg.RCX, Reg.RDX, Reg.RBX, Reg.RSP, Reg.RBP,
                         Reg.RSI, Reg.RDI, Reg.R8, Reg.R9, Reg.R10, Reg.R11,
                         Reg.R12, Reg.R13, Reg.R14, Reg.R15)

#: Segment base registers in ModRM sreg numbering (ES CS SS DS FS GS).
SEG_BASES: tuple[Reg, ...] = (Reg.ES_BASE, Reg.CS_BASE, Reg.SS_BASE, Reg.DS_BASE,
                              Reg.FS_BASE, Reg.GS_BASE)


class CpuAccess(Protocol):
    """What the emulator needs from a vCPU and its guest RAM.

    ``read_phys``/``write_phys`` reach guest RAM only; they raise
    :class:`bhyvepy.errors.GuestMemoryError` for any byte that is not RAM
    (the emulator relies on that to tell RAM from MMIO).
    """

    def get_reg(self, reg: Reg) -> int: ...

    def set_reg(self, reg: Reg, value: int) -> None: ...

    def read_phys(self, gpa: int, size: int) -> bytes: ...

    def write_phys(self, gpa: int, data: bytes) -> None: ...


class EmulationError(Exception):
    """The access cannot be emulated (a host-side problem, not a guest fault).

    The backend treats it like bhyve's "Failed to emulate instruction":
    report and stop the VM; it is never turned into a guest exception.
    """


# Exception vectors the emulator may ask the backend to inject.
VEC_UD = 6
VEC_SS = 12
VEC_GP = 13
VEC_PF = 14
VEC_AC = 17


class GuestFault(Exception):
    """An exception the guest would take; the backend injects it.

    The instruction must not retire: the backend leaves RIP unchanged (the
    guest handler re-executes it) and, for #PF, loads ``cr2``.
    """

    def __init__(self, vector: int, error_code: int | None = 0,
                 cr2: int | None = None) -> None:
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2
        detail = f" at {cr2:#x}" if cr2 is not None else ""
        super().__init__(f"guest fault vector {vector} error code {error_code}{detail}")


class PagingMode(enum.IntEnum):
    """Values of vmm.ko's ``enum vm_paging_mode``."""

    FLAT = 0
    BITS32 = 1
    PAE = 2
    LONG4 = 3
    LONG5 = 4


class Access(enum.IntFlag):
    """Kind of access being translated."""

    READ = 0
    WRITE = 1
    EXEC = 2


# Control-register and paging-entry bits used below.
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_AC = 1 << 18

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_NX = 1 << 63

PFERR_P = 1 << 0
PFERR_W = 1 << 1
PFERR_U = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_I = 1 << 4

_ADDR_MASK = 0x000F_FFFF_FFFF_F000      # bits 51:12 of a PAE / long-mode entry
PAGE_SIZE = 4096


def paging_mode(cpu: CpuAccess) -> PagingMode:
    """The paging mode implied by CR0, CR4 and EFER."""
    if not cpu.get_reg(Reg.CR0) & CR0_PG:
        return PagingMode.FLAT
    cr4 = cpu.get_reg(Reg.CR4)
    if cpu.get_reg(Reg.EFER) & EFER_LMA:
        return PagingMode.LONG5 if cr4 & CR4_LA57 else PagingMode.LONG4
    return PagingMode.PAE if cr4 & CR4_PAE else PagingMode.BITS32


def is_canonical(gla: int, mode: PagingMode = PagingMode.LONG4) -> bool:
    """Whether ``gla`` is canonical for 4-level (48-bit) or 5-level (57-bit) paging."""
    bits = 57 if mode == PagingMode.LONG5 else 48
    top = gla >> (bits - 1)
    return top in (0, (1 << (65 - bits)) - 1)


@dataclasses.dataclass(frozen=True)
class _Level:
    """One level of a paging hierarchy."""

    shift: int          # lowest linear-address bit this level indexes
    bits: int           # number of index bits
    entry_size: int     # 4 (32-bit paging) or 8
    large: bool         # PS=1 maps a page here
    ps_reserved: bool   # PS=1 here is a reserved-bit violation


_LEVELS_32 = (_Level(22, 10, 4, True, False), _Level(12, 10, 4, False, False))
_LEVELS_PAE = (_Level(21, 9, 8, True, False), _Level(12, 9, 8, False, False))
_LEVELS_LONG = (_Level(39, 9, 8, False, True), _Level(30, 9, 8, True, False),
                _Level(21, 9, 8, True, False), _Level(12, 9, 8, False, False))
_LEVEL_PML5 = _Level(48, 9, 8, False, True)


class _Walker:
    """One translation: descends the tables and folds in their permissions."""

    def __init__(self, cpu: CpuAccess, gla: int, access: Access) -> None:
        self.cpu = cpu
        self.gla = gla
        self.access = access
        self.user = cpu.get_reg(Reg.CPL) == 3
        self.cr4 = cpu.get_reg(Reg.CR4)
        self.nxe = bool(cpu.get_reg(Reg.EFER) & EFER_NXE)
        self.rw = self.us = True
        self.nx = False

    def fault(self, present: bool, rsvd: bool = False) -> GuestFault:
        code = PFERR_P if present or rsvd else 0
        if self.access & Access.WRITE:
            code |= PFERR_W
        if self.user:
            code |= PFERR_U
        if rsvd:
            code |= PFERR_RSVD
        if self.access & Access.EXEC and (
                (self.nxe and self.cr4 & CR4_PAE) or self.cr4 & CR4_SMEP):
            code |= PFERR_I
        return GuestFault(VEC_PF, code, self.gla)

    def read_entry(self, gpa: int, size: int) -> int:
        try:
            raw = self.cpu.read_phys(gpa, size)
        except GuestMemoryError as exc:
            raise EmulationError(
                f"guest page table entry at gpa {gpa:#x} is not in guest memory") from exc
        return int.from_bytes(raw, "little")

    def write_entry(self, gpa: int, size: int, entry: int) -> None:
        self.cpu.write_phys(gpa, entry.to_bytes(size, "little"))

    def descend(self, table: int, levels: tuple[_Level, ...], large_ok: bool = True) -> int:
        """Walk ``levels`` from the table at ``table``; return the gpa.

        Entries above the leaf get their accessed bit as soon as they are
        used (so even when a lower level then faults, as the CPU does); the
        leaf gets accessed/dirty only once the access is known to be allowed.
        """
        reserved = PTE_NX if not self.nxe else 0
        for i, level in enumerate(levels):
            size = level.entry_size
            entry_gpa = table + ((self.gla >> level.shift) & ((1 << level.bits) - 1)) * size
            entry = self.read_entry(entry_gpa, size)
            if not entry & PTE_P:
                raise self.fault(present=False)
            if size == 8 and entry & reserved:
                raise self.fault(present=True, rsvd=True)
            big = bool(entry & PTE_PS) and level.large and large_ok
            if entry & PTE_PS and level.ps_reserved:
                raise self.fault(present=True, rsvd=True)
            page_mask = (1 << level.shift) - 1
            if big:
                if size == 4:
                    # 4 MiB page: bits 20:13 carry physical bits 39:32, 21 is reserved.
                    if entry & (1 << 21):
                        raise self.fault(present=True, rsvd=True)
                    frame = (entry & 0xFFC0_0000) | (((entry >> 13) & 0xFF) << 32)
                else:
                    # Bits between the PAT bit (12) and the frame are reserved.
                    if entry & _ADDR_MASK & page_mask & ~0x1000:
                        raise self.fault(present=True, rsvd=True)
                    frame = entry & _ADDR_MASK & ~page_mask
            addr_mask = 0xFFFF_F000 if size == 4 else _ADDR_MASK
            self.rw = self.rw and bool(entry & PTE_RW)
            self.us = self.us and bool(entry & PTE_US)
            if size == 8 and entry & PTE_NX:
                self.nx = True
            if big or i == len(levels) - 1:
                if not big:
                    frame = entry & addr_mask
                self.check_permissions()
                new = entry | PTE_A | (PTE_D if self.access & Access.WRITE else 0)
                if new != entry:
                    self.write_entry(entry_gpa, size, new)
                return frame | (self.gla & page_mask)
            if not entry & PTE_A:
                self.write_entry(entry_gpa, size, entry | PTE_A)
            table = entry & addr_mask
        raise AssertionError("unreachable")

    def check_permissions(self) -> None:
        if self.access & Access.EXEC:
            if self.nxe and self.nx:
                raise self.fault(present=True)
            if self.user:
                if not self.us:
                    raise self.fault(present=True)
            elif self.us and self.cr4 & CR4_SMEP:
                raise self.fault(present=True)
            return
        write = bool(self.access & Access.WRITE)
        if self.user:
            if not self.us or (write and not self.rw):
                raise self.fault(present=True)
            return
        if write and not self.rw and self.cpu.get_reg(Reg.CR0) & CR0_WP:
            raise self.fault(present=True)
        if (self.us and self.cr4 & CR4_SMAP
                and not self.cpu.get_reg(Reg.RFLAGS) & RFLAGS_AC):
            raise self.fault(present=True)


def gla_to_gpa(cpu: CpuAccess, gla: int, access: Access,
               mode: PagingMode | None = None) -> int:
    """Translate a guest-linear address as the CPU would for a data access.

    ``mode`` defaults to the one the control registers imply (vmm.ko also
    reports it in the exit).  The privilege of the access is the CPL's
    (CPL 3 = user).  Raises :class:`GuestFault` (#PF with the architectural
    error code and CR2, or #GP(0) for a non-canonical address in long mode)
    and :class:`EmulationError` if a paging structure is not in guest RAM.
    Accessed and dirty bits are set as the CPU sets them, with plain
    read-modify-write: another vCPU racing on the same entry could lose an
    update the CPU would have made atomically.
    """
    if mode is None:
        mode = paging_mode(cpu)
    if mode == PagingMode.FLAT:
        return gla & 0xFFFF_FFFF_FFFF_FFFF
    cr3 = cpu.get_reg(Reg.CR3)
    if mode in (PagingMode.LONG4, PagingMode.LONG5):
        if not is_canonical(gla, mode):
            raise GuestFault(VEC_GP, 0)
        levels = _LEVELS_LONG if mode == PagingMode.LONG4 else (_LEVEL_PML5, *_LEVELS_LONG)
        return _Walker(cpu, gla, access).descend(cr3 & _ADDR_MASK, levels)
    walker = _Walker(cpu, gla & 0xFFFF_FFFF, access)
    if mode == PagingMode.BITS32:
        return walker.descend(cr3 & 0xFFFF_F000, _LEVELS_32,
                              large_ok=bool(walker.cr4 & CR4_PSE))
    # PAE: the four PDPTEs carry no permissions and no accessed bit.  The
    # CPU checks their reserved bits when CR3 is loaded, so a running guest
    # cannot have them set; only NX is checked here.
    pdpte_gpa = (cr3 & 0xFFFF_FFE0) + ((walker.gla >> 30) & 3) * 8
    pdpte = walker.read_entry(pdpte_gpa, 8)
    if not pdpte & PTE_P:
        raise walker.fault(present=False)
    if pdpte & PTE_NX:
        raise walker.fault(present=True, rsvd=True)
    return walker.descend(pdpte & _ADDR_MASK, _LEVELS_PAE)
