"""Decoder for the x86 instructions that can touch emulated MMIO.

vmm.ko reports an access to a guest-physical page that no RAM backs as an
"instruction emulation" exit: it hands userland the raw instruction bytes and
leaves decoding to it.  Only the few instructions that guest drivers use on
device registers need to be understood, so this is a table-driven decoder for
that set and nothing else; anything outside it is refused with
:class:`DecodeError` rather than guessed at, because a wrong guess would
silently corrupt guest or device state.

The result, :class:`Instruction`, is plain data.  It describes the operation
(:class:`Op`), the operand sizes, the register / immediate operand and the
memory operand as the CPU would compute it, so that the emulator
(``insn_emul``) never has to look at bytes again.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

MAX_INSN_LEN = 15


class DecodeError(Exception):
    """The bytes are truncated, malformed, or not an instruction we emulate."""


class CpuMode(enum.IntEnum):
    """Processor mode; the values are those of vmm.ko's ``enum vm_cpu_mode``."""

    REAL = 0
    PROTECTED = 1
    COMPATIBILITY = 2   # IA-32e with CS.L = 0
    LONG64 = 3          # IA-32e with CS.L = 1


class Seg(enum.IntEnum):
    """Segment registers, numbered as in the ModRM sreg field."""

    ES = 0
    CS = 1
    SS = 2
    DS = 3
    FS = 4
    GS = 5


class Op(enum.Enum):
    """What an instruction does with its operands."""

    MOV = "mov"
    MOVZX = "movzx"
    MOVSX = "movsx"     # also MOVSXD (63 /r)
    ADD = "add"
    OR = "or"
    ADC = "adc"
    SBB = "sbb"
    AND = "and"
    SUB = "sub"
    XOR = "xor"
    CMP = "cmp"
    TEST = "test"
    BT = "bt"
    PUSH = "push"
    POP = "pop"
    MOVS = "movs"
    STOS = "stos"


#: Arithmetic/logic operations selected by the ModRM reg field of group 1
#: (80/81/83) and by bits 5:3 of the one-byte ALU opcodes 00..3B.
ALU_BY_INDEX = (Op.ADD, Op.OR, Op.ADC, Op.SBB, Op.AND, Op.SUB, Op.XOR, Op.CMP)

#: Operations whose memory-destination form accepts a LOCK prefix.
LOCKABLE = frozenset({Op.ADD, Op.OR, Op.ADC, Op.SBB, Op.AND, Op.SUB, Op.XOR})


class Rep(enum.IntEnum):
    """Repeat prefix in effect (the last F2/F3 byte wins)."""

    NONE = 0
    REPNE = 0xF2
    REP = 0xF3


# GPR numbers, as encoded in ModRM/SIB (with REX extension bits).
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)


@dataclasses.dataclass(frozen=True)
class MemOperand:
    """A memory operand as the addressing form encodes it.

    ``base``/``index`` are GPR numbers (0-15) or None.  ``disp`` is the
    displacement sign-extended to a Python int (for moffs forms it is the
    unsigned offset).  ``seg`` is the segment the CPU uses, after default
    rules and overrides; in 64-bit mode only FS and GS have a base.
    """

    seg: Seg
    base: int | None
    index: int | None
    scale: int
    disp: int
    rip_relative: bool = False

    def effective_address(self, regs: Callable[[int], int], next_rip: int,
                          addrsize: int) -> int:
        """Offset within the segment, wrapped to the address size."""
        ea = self.disp
        if self.rip_relative:
            ea += next_rip
        if self.base is not None:
            ea += regs(self.base)
        if self.index is not None:
            ea += regs(self.index) * self.scale
        return ea & ((1 << (8 * addrsize)) - 1)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One decoded instruction.

    Sizes are in bytes.  ``opsize`` is the size of the operation (and of the
    destination); ``memsize`` is the size of the memory access (differs only
    for MOVZX/MOVSX).  ``reg`` is the GPR number of the register operand, if
    any; ``reg_high8`` means the legacy AH/CH/DH/BH byte (``reg`` is then
    0-3 and names the register holding it).  ``imm`` is the immediate,
    sign-extended as the encoding says and truncated to ``opsize``.
    ``mem_is_dst`` says whether the memory operand is the first (destination)
    operand in Intel syntax; whether it is actually written is
    :attr:`writes_memory` (CMP, TEST and BT only read it).
    """

    op: Op
    opcode: int           # one-byte opcode, or 0x0Fxx for two-byte ones
    length: int
    mode: CpuMode
    opsize: int
    memsize: int
    addrsize: int
    mem: MemOperand | None    # None for MOVS/STOS (implicit rSI/rDI)
    mem_is_dst: bool
    reg: int | None = None
    reg_high8: bool = False
    imm: int | None = None
    rep: Rep = Rep.NONE
    lock: bool = False
    seg_override: Seg | None = None

    @property
    def writes_memory(self) -> bool:
        return self.mem_is_dst and self.op not in (Op.CMP, Op.TEST, Op.BT)


_SEG_PREFIX = {0x26: Seg.ES, 0x2E: Seg.CS, 0x36: Seg.SS, 0x3E: Seg.DS,
               0x64: Seg.FS, 0x65: Seg.GS}

# 16-bit ModRM r/m -> (base, index); rm 6 with mod 0 is a bare disp16.
_RM16 = ((RBX, RSI), (RBX, RDI), (RBP, RSI), (RBP, RDI),
         (RSI, None), (RDI, None), (RBP, None), (RBX, None))


class _Form(enum.Enum):
    """Operand layout of an opcode (Intel's abbreviations)."""

    EB_GB = 1     # r/m8 <- r8       (memory destination)
    EV_GV = 2     # r/m  <- r
    GB_EB = 3     # r8   <- r/m8
    GV_EV = 4     # r    <- r/m
    EB_IB = 5     # r/m8 <- imm8
    EV_IZ = 6     # r/m  <- imm16/32
    EV_IB = 7     # r/m  <- imm8 sign-extended
    EV_IB_BIT = 8  # r/m, imm8 bit offset (BT)
    AL_OB = 9     # AL  <- moffs8
    AX_OV = 10    # rAX <- moffs
    OB_AL = 11    # moffs8 <- AL
    OV_AX = 12    # moffs  <- rAX
    GV_EB = 13    # MOVZX/MOVSX from byte
    GV_EW = 14    # MOVZX/MOVSX from word
    GV_ED = 15    # MOVSXD
    EV = 16       # PUSH/POP r/m
    STRING_B = 17
    STRING_V = 18


def _opcode_table() -> dict[int, tuple[Op | None, _Form]]:
    """One-byte and 0F-prefixed opcodes; Op None means 'chosen by ModRM.reg'."""
    table: dict[int, tuple[Op | None, _Form]] = {}
    for i, op in enumerate(ALU_BY_INDEX):
        base = i << 3
        table[base + 0] = (op, _Form.EB_GB)
        table[base + 1] = (op, _Form.EV_GV)
        table[base + 2] = (op, _Form.GB_EB)
        table[base + 3] = (op, _Form.GV_EV)
    table.update({
        0x63: (Op.MOVSX, _Form.GV_ED),
        0x80: (None, _Form.EB_IB),
        0x81: (None, _Form.EV_IZ),
        0x82: (None, _Form.EB_IB),     # legacy alias of 80, #UD in 64-bit mode
        0x83: (None, _Form.EV_IB),
        0x84: (Op.TEST, _Form.EB_GB),
        0x85: (Op.TEST, _Form.EV_GV),
        0x88: (Op.MOV, _Form.EB_GB),
        0x89: (Op.MOV, _Form.EV_GV),
        0x8A: (Op.MOV, _Form.GB_EB),
        0x8B: (Op.MOV, _Form.GV_EV),
        0x8F: (Op.POP, _Form.EV),
        0xA0: (Op.MOV, _Form.AL_OB),
        0xA1: (Op.MOV, _Form.AX_OV),
        0xA2: (Op.MOV, _Form.OB_AL),
        0xA3: (Op.MOV, _Form.OV_AX),
        0xA4: (Op.MOVS, _Form.STRING_B),
        0xA5: (Op.MOVS, _Form.STRING_V),
        0xAA: (Op.STOS, _Form.STRING_B),
        0xAB: (Op.STOS, _Form.STRING_V),
        0xC6: (Op.MOV, _Form.EB_IB),
        0xC7: (Op.MOV, _Form.EV_IZ),
        0xF6: (Op.TEST, _Form.EB_IB),
        0xF7: (Op.TEST, _Form.EV_IZ),
        0xFF: (Op.PUSH, _Form.EV),
        0x0FB6: (Op.MOVZX, _Form.GV_EB),
        0x0FB7: (Op.MOVZX, _Form.GV_EW),
        0x0FBA: (Op.BT, _Form.EV_IB_BIT),
        0x0FBE: (Op.MOVSX, _Form.GV_EB),
        0x0FBF: (Op.MOVSX, _Form.GV_EW),
    })
    return table


_OPCODES = _opcode_table()

# Opcodes whose ModRM.reg is an opcode extension, and the values accepted.
# F6/F7 /1 is left out: AMD documents it as TEST, Intel does not, QEMU #UDs.
_GROUP_REG = {0x8F: {0}, 0xC6: {0}, 0xC7: {0}, 0xF6: {0}, 0xF7: {0},
              0xFF: {6}, 0x0FBA: {4}}

_MEM_SRC_FORMS = {_Form.GB_EB, _Form.GV_EV, _Form.AL_OB, _Form.AX_OV,
                  _Form.GV_EB, _Form.GV_EW, _Form.GV_ED}


class _Cursor:
    """Reads instruction bytes, refusing to run past the end or 15 bytes."""

    def __init__(self, code: bytes) -> None:
        self.code = bytes(code[:MAX_INSN_LEN])
        self.pos = 0
        self._over_limit = len(code) > MAX_INSN_LEN

    def take(self, n: int = 1) -> int:
        if self.pos + n > len(self.code):
            if self._over_limit or self.pos + n > MAX_INSN_LEN:
                raise DecodeError("instruction longer than 15 bytes")
            raise DecodeError(
                f"truncated instruction: need {self.pos + n} bytes, have {len(self.code)}")
        value = int.from_bytes(self.code[self.pos:self.pos + n], "little")
        self.pos += n
        return value

    def peek(self) -> int:
        if self.pos >= len(self.code):
            self.take()          # raises the right error
        return self.code[self.pos]


def _sext(value: int, bits: int) -> int:
    sign = 1 << (bits - 1)
    return (value & (sign - 1)) - (value & sign)


def decode(code: bytes, mode: CpuMode, cs_d: bool) -> Instruction:
    """Decode one instruction from ``code`` (at most 15 bytes are looked at).

    ``cs_d`` is the D bit of the code segment; it sets the default operand and
    address size outside 64-bit mode (pass False in real mode).  Raises
    :class:`DecodeError` for anything not emulated or not well formed.
    """
    mode = CpuMode(mode)
    long64 = mode == CpuMode.LONG64
    if long64:
        def_opsize, def_addrsize = 4, 8
    elif cs_d and mode != CpuMode.REAL:
        def_opsize, def_addrsize = 4, 4
    else:
        def_opsize, def_addrsize = 2, 2

    cur = _Cursor(code)
    opsize_prefix = addrsize_prefix = lock = False
    rep = Rep.NONE
    seg_override: Seg | None = None
    rex = 0
    while True:
        b = cur.peek()
        if b == 0x66:
            opsize_prefix = True
        elif b == 0x67:
            addrsize_prefix = True
        elif b == 0xF0:
            lock = True
        elif b in (0xF2, 0xF3):
            rep = Rep(b)
        elif b in _SEG_PREFIX:
            seg_override = _SEG_PREFIX[b]
        elif long64 and 0x40 <= b <= 0x4F:
            # A REX prefix counts only right before the opcode: a legacy
            # prefix after it cancels it.
            rex = b
            cur.take()
            continue
        else:
            break
        rex = 0
        cur.take()

    rex_w, rex_r, rex_x, rex_b = (bool(rex & 8), bool(rex & 4), bool(rex & 2), bool(rex & 1))

    opcode = cur.take()
    if opcode == 0x0F:
        opcode = 0x0F00 | cur.take()
    if opcode in (0xC4, 0xC5, 0x62) and long64:
        raise DecodeError(f"VEX/EVEX-encoded instruction (0x{opcode:02x}) is not emulated")
    if opcode > 0xFF and rep != Rep.NONE:
        # F2/F3 select other instructions in the 0F map (POPCNT, TZCNT...);
        # none exists for the opcodes we emulate, but refuse rather than guess.
        raise DecodeError(f"F2/F3 prefix with opcode {_opname(opcode)} is not emulated")
    entry = _OPCODES.get(opcode)
    # 63 is MOVSXD only in 64-bit mode (ARPL elsewhere); 82 is #UD there.
    only_64, not_64 = opcode == 0x63, opcode == 0x82
    if entry is None or (only_64 and not long64) or (not_64 and long64):
        raise DecodeError(f"opcode {_opname(opcode)} is not emulated in {mode.name} mode")
    op, form = entry

    if rex_w:
        opsize = 8
    elif opsize_prefix:
        opsize = 6 - def_opsize          # 4 <-> 2
    else:
        opsize = def_opsize
    if long64 and form == _Form.EV:
        # PUSH/POP default to 64-bit operands; 32-bit ones do not exist.
        if opsize_prefix and rex_w:
            # Decoders disagree on which prefix wins here; refuse rather
            # than guess the stack slot size.
            raise DecodeError("PUSH/POP with both 66 and REX.W prefixes is not emulated")
        opsize = 2 if opsize_prefix else 8
    if form == _Form.GV_ED and not rex_w:
        # MOVSXD without REX.W is a discouraged encoding whose load size
        # implementations disagree on; compilers never emit it.
        raise DecodeError("MOVSXD without REX.W is not emulated")
    if addrsize_prefix:
        addrsize = 4 if def_addrsize in (2, 8) else 2
    else:
        addrsize = def_addrsize
    byte_form = form in (_Form.EB_GB, _Form.GB_EB, _Form.EB_IB, _Form.AL_OB,
                         _Form.OB_AL, _Form.STRING_B)
    if byte_form:
        opsize = 1

    memsize = opsize
    reg: int | None = None
    reg_high8 = False
    imm: int | None = None
    mem: MemOperand | None = None

    if form in (_Form.STRING_B, _Form.STRING_V):
        assert op is not None
        if lock:
            raise DecodeError("LOCK prefix on a string instruction")
        return Instruction(op=op, opcode=opcode, length=cur.pos, mode=mode,
                           opsize=opsize, memsize=opsize, addrsize=addrsize, mem=None,
                           mem_is_dst=True, reg=RAX if op == Op.STOS else None,
                           rep=rep, lock=False, seg_override=seg_override)

    if form in (_Form.AL_OB, _Form.AX_OV, _Form.OB_AL, _Form.OV_AX):
        offset = cur.take(addrsize)
        mem = MemOperand(seg=_effective_seg(seg_override, Seg.DS), base=None,
                         index=None, scale=1, disp=offset)
        reg = RAX
        mem_is_dst = form in (_Form.OB_AL, _Form.OV_AX)
    else:
        modrm = cur.take()
        mod, regfield, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
        if mod == 3:
            raise DecodeError("register-only operand: no memory access to emulate")
        if op is None:
            op = ALU_BY_INDEX[regfield]
        elif opcode in _GROUP_REG and regfield not in _GROUP_REG[opcode]:
            raise DecodeError(f"opcode {_opname(opcode)} /{regfield} is not emulated")
        if addrsize == 2:
            mem = _modrm16(cur, mod, rm, seg_override)
        else:
            mem = _modrm32(cur, mod, rm, seg_override, addrsize, long64,
                           rex_x, rex_b)
        mem_is_dst = form not in _MEM_SRC_FORMS
        if opcode not in _GROUP_REG and form not in (_Form.EB_IB, _Form.EV_IZ,
                                                     _Form.EV_IB):
            reg = regfield | (rex_r << 3)
            if form in (_Form.EB_GB, _Form.GB_EB) and not rex and reg >= 4:
                reg, reg_high8 = reg - 4, True
        if form == _Form.GV_EB:
            memsize = 1
        elif form == _Form.GV_EW:
            memsize = 2
        elif form == _Form.GV_ED:
            memsize = 4

    if form in (_Form.EB_IB, _Form.EV_IB, _Form.EV_IB_BIT):
        raw = cur.take(1)
        imm = raw if form == _Form.EV_IB_BIT else _sext(raw, 8) & _mask(opsize)
    elif form == _Form.EV_IZ:
        n = 2 if opsize == 2 else 4
        imm = _sext(cur.take(n), 8 * n) & _mask(opsize)

    assert op is not None
    if lock and not (op in LOCKABLE and mem_is_dst):
        raise DecodeError(f"LOCK prefix is not allowed with {op.value}")

    return Instruction(op=op, opcode=opcode, length=cur.pos, mode=mode,
                       opsize=opsize, memsize=memsize, addrsize=addrsize, mem=mem,
                       mem_is_dst=mem_is_dst, reg=reg, reg_high8=reg_high8, imm=imm,
                       rep=rep, lock=lock, seg_override=seg_override)


def _opname(opcode: int) -> str:
    return f"0x0f{opcode & 0xFF:02x}" if opcode > 0xFF else f"0x{opcode:02x}"


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def _effective_seg(override: Seg | None, default: Seg) -> Seg:
    return default if override is None else override


def _modrm16(cur: _Cursor, mod: int, rm: int, override: Seg | None) -> MemOperand:
    if mod == 0 and rm == 6:
        return MemOperand(seg=_effective_seg(override, Seg.DS), base=None, index=None,
                          scale=1, disp=cur.take(2))
    base, index = _RM16[rm]
    disp = 0
    if mod == 1:
        disp = _sext(cur.take(1), 8)
    elif mod == 2:
        disp = _sext(cur.take(2), 16)
    default = Seg.SS if base == RBP else Seg.DS
    return MemOperand(seg=_effective_seg(override, default), base=base, index=index,
                      scale=1, disp=disp)


def _modrm32(cur: _Cursor, mod: int, rm: int, override: Seg | None, addrsize: int,
             long64: bool, rex_x: bool, rex_b: bool) -> MemOperand:
    base: int | None
    index: int | None = None
    scale = 1
    rip_relative = False
    if rm == 4:
        sib = cur.take()
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | (rex_x << 3)
        index = None if idx == 4 else idx
        low_base = sib & 7
        if low_base == 5 and mod == 0:
            base = None
            disp_bytes = 4
        else:
            base = low_base | (rex_b << 3)
            disp_bytes = (0, 1, 4)[mod]
    elif rm == 5 and mod == 0:
        base = None
        rip_relative = long64
        disp_bytes = 4
    else:
        base = rm | (rex_b << 3)
        disp_bytes = (0, 1, 4)[mod]
    disp = _sext(cur.take(disp_bytes), 8 * disp_bytes) if disp_bytes else 0
    default = Seg.SS if base in (RSP, RBP) else Seg.DS
    return MemOperand(seg=_effective_seg(override, default), base=base, index=index,
                      scale=scale, disp=disp, rip_relative=rip_relative)
