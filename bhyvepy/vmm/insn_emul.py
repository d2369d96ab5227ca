"""Emulation of guest instructions that access MMIO, for the vmm.ko backend.

vmm.ko cannot complete a guest access to a page no RAM backs; it stops the
vCPU with an "instruction emulation" exit (the guest-physical and -linear
address, the paging state, the instruction bytes) and expects userland to
carry out the instruction against the device model.  KVM does this in the
kernel, so only the FreeBSD backend calls this module, but nothing here is
FreeBSD-specific: the vCPU is reached through :class:`CpuAccess` and the
device through :class:`MmioAccess`.

Use::

    insn = decode(bytes, cpu_mode, cs_d)          # insn_decode
    if emulate(insn, gpa, gla, cpu, mmio):
        rip += insn.length                        # the backend does this

Who advances RIP: the backend, never this module.  :func:`emulate` returns
True when the instruction has retired; the backend then moves RIP past it
(``insn.length``, or the exit's ``inst_length``).  It returns False only for
a REP-prefixed MOVS/STOS that still has iterations left: registers then
reflect the iterations done and the backend resumes the guest at the *same*
RIP, so the CPU re-executes the instruction (what vmm.ko's
``vm_restart_instruction`` achieves).  Each call does up to
``max_iterations`` iterations (default :data:`REP_BATCH`), far fewer exits
than vmm.ko's one iteration per exit while still letting interrupts in.

The memory operand of ordinary instructions is the exit's ``gpa``.  String
and stack instructions address their other operand (and, for REP, every
later iteration) themselves: through the segment bases and the guest page
tables (:func:`gla_to_gpa`), then to RAM if ``CpuAccess.read_phys`` /
``write_phys`` accept the address and to the device if they raise
:class:`~bhyvepy.errors.GuestMemoryError`.  So either side of a MOVS may
be MMIO, and a REP run may cross from device to RAM.

Faults the guest would take (#PF from the page-table walk, #GP/#SS for a
non-canonical address, #AC) are raised as :class:`GuestFault` before any
device is touched by the faulting iteration; the backend injects them and
leaves RIP alone.  Problems that are not the guest's (a page table outside
RAM, an instruction lacking the operand its kind needs) raise
:class:`EmulationError`; undecodable bytes raise :class:`DecodeError`.

Known simplifications: segment limits and access rights are not checked for
the operands this module addresses itself (the stack of PUSH/POP, the RAM
side of MOVS/STOS, REP iterations after the first); locked read-modify-write
on MMIO is not atomic with respect to other vCPUs; protection keys are
ignored by the page walker.
"""

from __future__ import annotations

from typing import Protocol

from bhyvepy.errors import GuestMemoryError
from bhyvepy.vmm.insn_decode import (
    CpuMode, DecodeError, Instruction, MemOperand, Op, Rep, Seg, decode,
)
from bhyvepy.vmm.insn_paging import (
    CR0_AM, GPRS, PAGE_SIZE, RFLAGS_AC, SEG_BASES, VEC_AC, VEC_GP, VEC_SS,
    Access, CpuAccess, EmulationError, GuestFault, PagingMode, Reg, gla_to_gpa,
    is_canonical, paging_mode,
)

__all__ = [
    "Access", "CpuAccess", "CpuMode", "DecodeError", "EmulationError", "GuestFault",
    "Instruction", "MemOperand", "MmioAccess", "Op", "PagingMode", "REP_BATCH", "Reg",
    "Rep", "Seg", "decode", "emulate", "gla_to_gpa",
]

#: REP iterations done per call before handing control back to the guest.
REP_BATCH = 1024

CF = 1 << 0
PF = 1 << 2
AF = 1 << 4
ZF = 1 << 6
SF = 1 << 7
DF = 1 << 10
OF = 1 << 11
STATUS_FLAGS = CF | PF | AF | ZF | SF | OF

RAX, RCX, RSP, RSI, RDI = 0, 1, 4, 6, 7


class MmioAccess(Protocol):
    """The device side of an access: little-endian values of 1, 2, 4 or 8 bytes."""

    def read(self, gpa: int, size: int) -> int: ...

    def write(self, gpa: int, size: int, value: int) -> None: ...


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def _sext(value: int, size: int) -> int:
    sign = 1 << (8 * size - 1)
    return (value & (sign - 1)) - (value & sign)


# --- registers -------------------------------------------------------------

def _get_gpr(cpu: CpuAccess, n: int, size: int, high8: bool = False) -> int:
    value = cpu.get_reg(GPRS[n])
    if high8:
        return (value >> 8) & 0xFF
    return value & _mask(size)


def _set_gpr(cpu: CpuAccess, n: int, size: int, value: int, high8: bool = False) -> None:
    """Write the low ``size`` bytes the way the CPU does.

    8- and 16-bit writes keep the rest of the register; 32-bit writes clear
    bits 63:32.
    """
    if high8:
        old = cpu.get_reg(GPRS[n])
        cpu.set_reg(GPRS[n], (old & ~0xFF00) | ((value & 0xFF) << 8))
    elif size in (1, 2):
        old = cpu.get_reg(GPRS[n])
        cpu.set_reg(GPRS[n], (old & ~_mask(size)) | (value & _mask(size)))
    else:
        cpu.set_reg(GPRS[n], value & _mask(size))


# --- flags -----------------------------------------------------------------

def _szp(result: int, size: int) -> int:
    flags = 0
    if result == 0:
        flags |= ZF
    if result >> (8 * size - 1):
        flags |= SF
    if bin(result & 0xFF).count("1") % 2 == 0:
        flags |= PF
    return flags


def alu(op: Op, a: int, b: int, rflags: int, size: int) -> tuple[int, int]:
    """Result and new RFLAGS of ``a op b`` on ``size``-byte operands.

    AF is left clear by the logical operations (architecturally undefined;
    vmm.ko and QEMU clear it too).
    """
    mask = _mask(size)
    sign = 1 << (8 * size - 1)
    a &= mask
    b &= mask
    flags = 0
    if op in (Op.ADD, Op.ADC):
        carry_in = 1 if op == Op.ADC and rflags & CF else 0
        full = a + b + carry_in
        result = full & mask
        if full > mask:
            flags |= CF
        if (a ^ result) & (b ^ result) & sign:
            flags |= OF
        if (a ^ b ^ result) & 0x10:
            flags |= AF
    elif op in (Op.SUB, Op.SBB, Op.CMP):
        borrow_in = 1 if op == Op.SBB and rflags & CF else 0
        full = a - b - borrow_in
        result = full & mask
        if full < 0:
            flags |= CF
        if (a ^ b) & (a ^ result) & sign:
            flags |= OF
        if (a ^ b ^ result) & 0x10:
            flags |= AF
    elif op in (Op.AND, Op.TEST):
        result = a & b
    elif op == Op.OR:
        result = a | b
    elif op == Op.XOR:
        result = a ^ b
    else:
        raise EmulationError(f"{op.value} is not an arithmetic operation")
    flags |= _szp(result, size)
    return result, (rflags & ~STATUS_FLAGS) | flags


# --- linear addresses and RAM/MMIO access ------------------------------------

class _Context:
    """Per-call view of the vCPU that string and stack operations need."""

    def __init__(self, insn: Instruction, cpu: CpuAccess, mmio: MmioAccess,
                 paging: PagingMode | None) -> None:
        self.insn = insn
        self.cpu = cpu
        self.mmio = mmio
        self.long64 = insn.mode == CpuMode.LONG64
        self.pmode = paging_mode(cpu) if paging is None else paging
        self.wrap = 0xFFFF_FFFF_FFFF_FFFF if self.long64 else 0xFFFF_FFFF
        cr0 = cpu.get_reg(Reg.CR0)
        self.align_check = bool(cr0 & CR0_AM and cpu.get_reg(Reg.RFLAGS) & RFLAGS_AC
                                and cpu.get_reg(Reg.CPL) == 3)

    def linear(self, seg: Seg, offset: int, size: int) -> int:
        """Guest-linear address of ``seg:offset``, with the checks the CPU makes."""
        if self.long64:
            base = self.cpu.get_reg(SEG_BASES[seg]) if seg in (Seg.FS, Seg.GS) else 0
            gla = (base + offset) & self.wrap
            if not is_canonical(gla, self.pmode):
                raise GuestFault(VEC_SS if seg == Seg.SS else VEC_GP, 0)
        else:
            gla = (self.cpu.get_reg(SEG_BASES[seg]) + offset) & self.wrap
        if self.align_check and gla & (size - 1):
            raise GuestFault(VEC_AC, 0)
        return gla

    def translate(self, gla: int, size: int, access: Access) -> list[tuple[int, int]]:
        """(gpa, length) pieces of an access, split where it crosses a page."""
        pieces = []
        while size:
            n = min(size, PAGE_SIZE - (gla & (PAGE_SIZE - 1)))
            pieces.append((gla_to_gpa(self.cpu, gla, access, self.pmode), n))
            gla = (gla + n) & self.wrap
            size -= n
        return pieces

    def load(self, pieces: list[tuple[int, int]]) -> int:
        """Read from RAM where there is RAM, otherwise from the device."""
        value = shift = 0
        for gpa, n in pieces:
            try:
                part = int.from_bytes(self.cpu.read_phys(gpa, n), "little")
            except GuestMemoryError:
                part = self.mmio.read(gpa, n) & _mask(n)
            value |= part << shift
            shift += 8 * n
        return value

    def store(self, pieces: list[tuple[int, int]], value: int) -> None:
        for gpa, n in pieces:
            part = value & _mask(n)
            value >>= 8 * n
            try:
                self.cpu.write_phys(gpa, part.to_bytes(n, "little"))
            except GuestMemoryError:
                self.mmio.write(gpa, n, part)


# --- the operations ----------------------------------------------------------

def emulate(insn: Instruction, gpa: int, gla: int, cpu: CpuAccess, mmio: MmioAccess,
            *, max_iterations: int = REP_BATCH, paging: PagingMode | None = None) -> bool:
    """Carry out ``insn``, whose memory operand is the MMIO address ``gpa``.

    ``gla`` is the guest-linear address the exit reported; it only serves
    diagnostics, since the operands this module addresses itself (string
    and stack operands) are recomputed from the registers.  ``paging`` is
    the exit's paging mode; by default it is derived from CR0/CR4/EFER.
    Returns True if the instruction retired (the caller advances RIP),
    False if a REP string instruction must be re-entered at the same RIP.
    Raises
    :class:`GuestFault` or :class:`EmulationError`; registers and memory are
    then left as the CPU would leave them (completed REP iterations stay
    done, the faulting one has no effect).
    """
    op = insn.op
    if op in (Op.MOVS, Op.STOS):
        if max_iterations < 1:
            raise ValueError("max_iterations must be at least 1")
        return _emulate_string(_Context(insn, cpu, mmio, paging), max_iterations)
    if insn.mem is None:
        raise EmulationError(f"{op.value} at gla {gla:#x}: no memory operand")
    if op in (Op.PUSH, Op.POP):
        _emulate_stack(_Context(insn, cpu, mmio, paging), gpa)
    elif op == Op.MOV:
        _emulate_mov(insn, gpa, cpu, mmio)
    elif op in (Op.MOVZX, Op.MOVSX):
        value = mmio.read(gpa, insn.memsize) & _mask(insn.memsize)
        if op == Op.MOVSX:
            value = _sext(value, insn.memsize)
        _set_gpr(cpu, _reg(insn), insn.opsize, value & _mask(insn.opsize))
    elif op == Op.BT:
        if insn.imm is None:
            raise EmulationError("bt: no bit offset")
        value = mmio.read(gpa, insn.opsize)
        bit = insn.imm & (8 * insn.opsize - 1)
        rflags = cpu.get_reg(Reg.RFLAGS)
        rflags = (rflags & ~CF) | ((value >> bit) & 1)
        cpu.set_reg(Reg.RFLAGS, rflags)
    else:
        _emulate_alu(insn, gpa, cpu, mmio)
    return True


def _reg(insn: Instruction) -> int:
    if insn.reg is None:
        raise EmulationError(f"{insn.op.value}: no register operand")
    return insn.reg


def _source_value(insn: Instruction, cpu: CpuAccess) -> int:
    """The immediate, or the register operand, at operand size."""
    if insn.imm is not None:
        return insn.imm
    return _get_gpr(cpu, _reg(insn), insn.opsize, insn.reg_high8)


def _emulate_mov(insn: Instruction, gpa: int, cpu: CpuAccess, mmio: MmioAccess) -> None:
    size = insn.opsize
    if insn.mem_is_dst:
        mmio.write(gpa, size, _source_value(insn, cpu) & _mask(size))
    else:
        value = mmio.read(gpa, size) & _mask(size)
        _set_gpr(cpu, _reg(insn), size, value, insn.reg_high8)


def _emulate_alu(insn: Instruction, gpa: int, cpu: CpuAccess, mmio: MmioAccess) -> None:
    size = insn.opsize
    mem_value = mmio.read(gpa, size) & _mask(size)
    other = _source_value(insn, cpu)
    if insn.mem_is_dst:
        a, b = mem_value, other
    else:
        a, b = other, mem_value
    result, rflags = alu(insn.op, a, b, cpu.get_reg(Reg.RFLAGS), size)
    if insn.op not in (Op.CMP, Op.TEST):
        if insn.mem_is_dst:
            mmio.write(gpa, size, result)
        else:
            _set_gpr(cpu, _reg(insn), size, result, insn.reg_high8)
    cpu.set_reg(Reg.RFLAGS, rflags)


def _stack_size(ctx: _Context) -> int:
    if ctx.long64:
        return 8
    return 4 if ctx.cpu.get_reg(Reg.SS_DB) else 2


def _emulate_stack(ctx: _Context, gpa: int) -> None:
    """PUSH r/m from MMIO onto the stack, or POP from the stack into MMIO.

    The stack slot is translated first so that a #PF on it happens before
    the device sees an access (a device read can have side effects).
    """
    insn, cpu = ctx.insn, ctx.cpu
    size = insn.opsize
    ss = _stack_size(ctx)
    sp = _get_gpr(cpu, RSP, ss)
    if insn.op == Op.PUSH:
        new_sp = (sp - size) & _mask(ss)
        slot = ctx.translate(ctx.linear(Seg.SS, new_sp, size), size, Access.WRITE)
        value = ctx.mmio.read(gpa, size) & _mask(size)
        ctx.store(slot, value)
    else:
        new_sp = (sp + size) & _mask(ss)
        slot = ctx.translate(ctx.linear(Seg.SS, sp, size), size, Access.READ)
        value = ctx.load(slot)
        ctx.mmio.write(gpa, size, value)
    _set_gpr(cpu, RSP, ss, new_sp)


def _emulate_string(ctx: _Context, max_iterations: int) -> bool:
    """MOVS/STOS: each iteration addresses both sides itself, so either side
    (or both) may be MMIO; RAM and MMIO are told apart per access."""
    insn, cpu = ctx.insn, ctx.cpu
    size = insn.opsize
    asz = insn.addrsize
    amask = _mask(asz)
    rep = insn.rep != Rep.NONE
    step = -size if cpu.get_reg(Reg.RFLAGS) & DF else size
    count = _get_gpr(cpu, RCX, asz) if rep else 1
    if count == 0:
        return True
    movs = insn.op == Op.MOVS
    src_seg = insn.seg_override if insn.seg_override is not None else Seg.DS
    rsi = _get_gpr(cpu, RSI, asz)
    rdi = _get_gpr(cpu, RDI, asz)
    value = _get_gpr(cpu, RAX, size)
    done = 0
    try:
        while count and done < max_iterations:
            src = None
            if movs:
                src = ctx.translate(ctx.linear(src_seg, rsi, size), size, Access.READ)
            dst = ctx.translate(ctx.linear(Seg.ES, rdi, size), size, Access.WRITE)
            if src is not None:
                value = ctx.load(src)
            ctx.store(dst, value)
            rsi = (rsi + step) & amask
            rdi = (rdi + step) & amask
            count -= 1
            done += 1
    finally:
        if done:
            if movs:
                _set_gpr(cpu, RSI, asz, rsi)
            _set_gpr(cpu, RDI, asz, rdi)
            if rep:
                _set_gpr(cpu, RCX, asz, count)
    return count == 0
