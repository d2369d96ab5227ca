"""Unit tests of the MMIO instruction decoder, emulator and page walker.

Hand-picked cases with expectations taken from the Intel SDM: the encodings a
guest driver uses, the refusals, page-fault error codes, and the ordering
guarantees (no device access before a fault, REP progress kept across
faults and batches).  Broad agreement with capstone and unicorn is in
test_insn_emul_props.py.
"""

from __future__ import annotations

import pytest

from bhyvepy.errors import GuestMemoryError
from bhyvepy.vmm.insn_decode import CpuMode, DecodeError, Op, Rep, Seg, decode
from bhyvepy.vmm.insn_emul import emulate
from bhyvepy.vmm.insn_paging import (
    GPRS, SEG_BASES, Access, EmulationError, GuestFault, PagingMode, Reg, gla_to_gpa,
    is_canonical, paging_mode,
)

L64, PROT, REAL = CpuMode.LONG64, CpuMode.PROTECTED, CpuMode.REAL
RAM_SIZE = 0x100000
MMIO = 0xFEE00000          # device page (not RAM)

CR0_PE_PG_WP = 0x80010001
CR0_PE_PG = 0x80000001
CR4_PAE, CR4_PSE, CR4_SMAP, CR4_LA57 = 0x20, 0x10, 0x200000, 0x1000
EFER_LMA_LME, EFER_NXE = 0x500, 0x800
P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
CF, PF, AF, ZF, SF, DF, OF = 1, 4, 0x10, 0x40, 0x80, 0x400, 0x800


class Cpu:
    """Registers in a dict and guest RAM in a bytearray."""

    def __init__(self, **regs: int) -> None:
        self.regs: dict[Reg, int] = {r: 0 for r in GPRS}
        self.regs.update({Reg.RFLAGS: 2, Reg.CR0: 1, Reg.CPL: 0, Reg.SS_DB: 1})
        for name, value in regs.items():
            self.regs[Reg(name)] = value
        self.ram = bytearray(RAM_SIZE)

    def get_reg(self, reg: Reg) -> int:
        return self.regs.get(reg, 0)

    def set_reg(self, reg: Reg, value: int) -> None:
        assert 0 <= value < 1 << 64
        self.regs[reg] = value

    def read_phys(self, gpa: int, size: int) -> bytes:
        if gpa + size > RAM_SIZE:
            raise GuestMemoryError(f"{gpa:#x}")
        return bytes(self.ram[gpa:gpa + size])

    def write_phys(self, gpa: int, data: bytes) -> None:
        if gpa + len(data) > RAM_SIZE:
            raise GuestMemoryError(f"{gpa:#x}")
        self.ram[gpa:gpa + len(data)] = data

    def q(self, gpa: int) -> int:
        return int.from_bytes(self.ram[gpa:gpa + 8], "little")


class Device:
    """A device register file at MMIO; logs accesses."""

    def __init__(self, base: int = MMIO, size: int = 0x1000) -> None:
        self.base = base
        self.data = bytearray(size)
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, gpa: int, size: int) -> int:
        off = gpa - self.base
        assert 0 <= off <= len(self.data) - size, f"read {gpa:#x} outside device"
        value = int.from_bytes(self.data[off:off + size], "little")
        self.log.append(("R", gpa, size, value))
        return value

    def write(self, gpa: int, size: int, value: int) -> None:
        off = gpa - self.base
        assert 0 <= off <= len(self.data) - size, f"write {gpa:#x} outside device"
        self.data[off:off + size] = value.to_bytes(size, "little")
        self.log.append(("W", gpa, size, value))

    def set(self, off: int, value: int, size: int) -> None:
        self.data[off:off + size] = value.to_bytes(size, "little")


class Tables:
    """Builds 4-level (or 5-level) page tables in a Cpu's RAM."""

    def __init__(self, cpu: Cpu, levels: int = 4, at: int = 0x10000) -> None:
        self.cpu = cpu
        self.levels = levels
        self.next = at
        self.root = self._page()
        cpu.regs.update({Reg.CR3: self.root, Reg.CR0: CR0_PE_PG_WP,
                         Reg.CR4: CR4_PAE | (CR4_LA57 if levels == 5 else 0),
                         Reg.EFER: EFER_LMA_LME | EFER_NXE})

    def _page(self) -> int:
        self.next += 0x1000
        return self.next - 0x1000

    def map(self, gla: int, gpa: int, leaf: int = P | RW, upper: int = P | RW | US) -> int:
        """Map one 4 KiB page; returns the gpa of its PTE."""
        table = self.root
        for level in range(self.levels, 1, -1):
            slot = table + ((gla >> (12 + 9 * (level - 1))) & 0x1FF) * 8
            entry = self.cpu.q(slot)
            if not entry & P:
                entry = self._page() | upper
                self.cpu.write_phys(slot, entry.to_bytes(8, "little"))
            table = entry & 0x000F_FFFF_FFFF_F000
        slot = table + ((gla >> 12) & 0x1FF) * 8
        self.cpu.write_phys(slot, (gpa | leaf).to_bytes(8, "little"))
        return slot


# --- decoding -----------------------------------------------------------------

def test_decode_typical_driver_accesses() -> None:
    # mov eax, [rdi+0x10]  (readl)
    i = decode(bytes.fromhex("8b4710"), L64, False)
    assert (i.op, i.opsize, i.reg, i.mem_is_dst, i.length) == (Op.MOV, 4, 0, False, 3)
    assert (i.mem.base, i.mem.disp, i.addrsize) == (7, 0x10, 8)
    # mov [r12+rax*4-8], r9d
    i = decode(bytes.fromhex("45894c84f8"), L64, False)
    assert (i.reg, i.mem.base, i.mem.index, i.mem.scale, i.mem.disp) == (9, 12, 0, 4, -8)
    assert i.writes_memory
    # mov rax, [rip+0x100]: RIP-relative in 64-bit mode only
    i = decode(bytes.fromhex("488b0500010000"), L64, False)
    assert i.mem.rip_relative and i.mem.base is None and i.opsize == 8
    i = decode(bytes.fromhex("8b0500010000"), PROT, True)
    assert not i.mem.rip_relative and i.mem.disp == 0x100
    # movzx ecx, word [rsi]
    i = decode(bytes.fromhex("0fb70e"), L64, False)
    assert (i.op, i.opsize, i.memsize, i.reg) == (Op.MOVZX, 4, 2, 1)
    # movsxd rdx, dword [rbx]
    i = decode(bytes.fromhex("486313"), L64, False)
    assert (i.op, i.opsize, i.memsize) == (Op.MOVSX, 8, 4)


def test_decode_sizes_follow_prefixes_and_mode() -> None:
    assert decode(b"\x89\x07", REAL, False).opsize == 2
    assert decode(b"\x66\x89\x07", REAL, False).opsize == 4
    assert decode(b"\x66\x89\x07", PROT, True).opsize == 2
    assert decode(b"\x66\x48\x89\x07", L64, False).opsize == 8      # REX.W wins
    assert decode(b"\x67\x89\x07", L64, False).addrsize == 4
    assert decode(b"\x67\x89\x07", PROT, True).addrsize == 2
    assert decode(b"\x67\x66\x89\x07", REAL, False).addrsize == 4
    # moffs is address-sized: 8 bytes in 64-bit mode
    i = decode(bytes.fromhex("48a1f0debc9a78563412"), L64, False)
    assert (i.length, i.mem.disp, i.opsize) == (10, 0x123456789ABCDEF0, 8)
    # PUSH/POP r/m: 64-bit by default in 64-bit mode, 16 with 66
    assert decode(b"\xff\x30", L64, False).opsize == 8
    assert decode(b"\x66\xff\x30", L64, False).opsize == 2
    # C7 with REX.W: imm32 sign-extended to 64 bits
    i = decode(bytes.fromhex("48c70780000080"), L64, False)
    assert i.imm == 0xFFFF_FFFF_8000_0080
    # 83: imm8 sign-extended to the operand size
    assert decode(bytes.fromhex("6683 07 ff".replace(" ", "")), PROT, True).imm == 0xFFFF


def test_decode_segments_and_byte_registers() -> None:
    # [bp+si] defaults to SS in 16-bit addressing; [bx+si] to DS
    assert decode(b"\x8b\x02", REAL, False).mem.seg == Seg.SS
    assert decode(b"\x8b\x00", REAL, False).mem.seg == Seg.DS
    assert decode(b"\x8b\x45\x00", PROT, True).mem.seg == Seg.SS     # [ebp+0]
    assert decode(b"\x26\x8b\x45\x00", PROT, True).mem.seg == Seg.ES
    assert decode(b"\x64\x8b\x00", L64, False).seg_override == Seg.FS
    # AH without REX, SPL with an (empty) REX
    i = decode(b"\x88\x20", L64, False)
    assert (i.reg, i.reg_high8) == (0, True)
    i = decode(b"\x40\x88\x20", L64, False)
    assert (i.reg, i.reg_high8) == (4, False)
    # a legacy prefix after REX cancels the REX
    assert decode(b"\x48\x66\x89\x07", L64, False).opsize == 2
    # last segment override and last F2/F3 win
    i = decode(b"\x26\x2e\xf3\xf2\xa4", PROT, True)
    assert (i.seg_override, i.rep) == (Seg.CS, Rep.REPNE)


@pytest.mark.parametrize("code, mode, why", [
    ("8bc0", L64, "register-only"),          # mov eax, eax
    ("f08907", L64, "LOCK"),                 # lock mov
    ("f03907", L64, "LOCK"),                 # lock cmp
    ("f0a4", PROT, "LOCK"),
    ("ff07", L64, "/0"),                     # inc
    ("f71f", L64, "/3"),                     # neg
    ("0fbb07", L64, "0x0fbb"),               # btc
    ("c5f877", L64, "VEX"),
    ("6307", PROT, "0x63"),                  # arpl
    ("6307", L64, "REX.W"),                  # movsxd without REX.W
    ("820701", L64, "0x82"),
    ("f30fb607", L64, "F2/F3"),
    ("6648ff30", L64, "66 and REX.W"),       # push: decoders disagree on the size
    ("c60f01", L64, "/1"),
])
def test_decode_refuses_cleanly(code: str, mode: CpuMode, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        decode(bytes.fromhex(code), mode, mode != REAL)


def test_decode_truncation_and_length_limit() -> None:
    with pytest.raises(DecodeError, match="truncated"):
        decode(bytes.fromhex("8b8010"), L64, False)
    with pytest.raises(DecodeError, match="truncated"):
        decode(b"", L64, False)
    with pytest.raises(DecodeError, match="truncated"):
        decode(b"\x66\x66", L64, False)
    # 14 prefixes + opcode + modrm = 16 bytes: over the architectural limit
    with pytest.raises(DecodeError, match="15 bytes"):
        decode(b"\x66" * 14 + b"\x8b\x07", L64, False)
    assert decode(b"\x66" * 13 + b"\x8b\x07", L64, False).length == 15


# --- emulation ----------------------------------------------------------------

def run(code: str, mode: CpuMode, cpu: Cpu, dev: Device, gpa: int = MMIO, **kw) -> bool:
    insn = decode(bytes.fromhex(code), mode, mode != REAL)
    return emulate(insn, gpa, 0, cpu, dev, **kw)


def test_mov_read_write_and_zero_extension() -> None:
    cpu, dev = Cpu(rax=0xFFFF_FFFF_FFFF_FFFF, rbx=0x1122_3344_5566_7788), Device()
    dev.set(0, 0x8899AABB, 4)
    assert run("8b07", L64, cpu, dev)                       # mov eax, [rdi]
    assert cpu.regs[Reg.RAX] == 0x8899AABB                  # upper half cleared
    assert run("66891f", L64, cpu, dev)                     # mov [rdi], bx
    assert dev.log[-1] == ("W", MMIO, 2, 0x7788)
    assert run("883f", L64, cpu, dev)                       # mov [rdi], bh
    assert dev.log[-1] == ("W", MMIO, 1, 0x77)
    dev.set(0, 0x5A, 1)
    assert run("8a27", L64, cpu, dev)                       # mov ah, [rdi]
    assert cpu.regs[Reg.RAX] == 0x88995ABB


def test_alu_flags_and_writeback() -> None:
    cpu, dev = Cpu(rflags=2 | CF), Device()
    dev.set(0, 0, 4)
    assert run("832f01", L64, cpu, dev)                     # sub dword [rdi], 1
    assert dev.log[-1] == ("W", MMIO, 4, 0xFFFFFFFF)
    assert cpu.regs[Reg.RFLAGS] & (CF | PF | AF | ZF | SF | OF) == CF | PF | AF | SF
    dev.log.clear()
    assert run("833f00", L64, cpu, dev)                     # cmp dword [rdi], 0: no write
    assert [k for k, *_ in dev.log] == ["R"]
    assert cpu.regs[Reg.RFLAGS] & (CF | ZF | SF) == SF
    dev.set(0, 0x80, 1)
    assert run("f60780", L64, cpu, dev)                     # test byte [rdi], 0x80
    assert cpu.regs[Reg.RFLAGS] & (CF | ZF | SF | OF) == SF
    dev.set(0, 0x7FFFFFFF, 4)
    cpu.regs[Reg.RCX] = 1
    assert run("010f", L64, cpu, dev)                       # add [rdi], ecx: overflow
    assert cpu.regs[Reg.RFLAGS] & (OF | SF | CF) == OF | SF
    cpu.regs[Reg.RDX] = 0xFFFF_FFFF_0000_00F0
    dev.set(0, 0x0F, 4)
    assert run("0b17", L64, cpu, dev)                       # or edx, [rdi]
    assert cpu.regs[Reg.RDX] == 0xFF


def test_bt_sets_only_cf() -> None:
    cpu, dev = Cpu(rflags=2 | ZF | SF), Device()
    dev.set(0, 1 << 35, 8)
    assert run("480fba2723", L64, cpu, dev)                 # bt qword [rdi], 35
    assert cpu.regs[Reg.RFLAGS] == 2 | ZF | SF | CF
    assert run("0fba2723", L64, cpu, dev)                   # bt dword [rdi], 35 -> bit 3
    assert cpu.regs[Reg.RFLAGS] == 2 | ZF | SF


def test_push_pop_memory_use_the_stack() -> None:
    cpu, dev = Cpu(rsp=0x8000, cr0=1, efer=EFER_LMA_LME), Device()
    dev.set(0, 0x1122334455667788, 8)
    assert run("ff37", L64, cpu, dev)                       # push qword [rdi]
    assert cpu.regs[Reg.RSP] == 0x7FF8 and cpu.q(0x7FF8) == 0x1122334455667788
    cpu.write_phys(0x7FF8, (0xCAFE).to_bytes(8, "little"))
    assert run("8f07", L64, cpu, dev)                       # pop qword [rdi]
    assert cpu.regs[Reg.RSP] == 0x8000 and dev.log[-1] == ("W", MMIO, 8, 0xCAFE)


def test_push_on_16_bit_stack_wraps_sp_only() -> None:
    cpu = Cpu(rsp=0xABCD_0000, ss_base=0x20000, ss_db=0)
    dev = Device()
    dev.set(0, 0xBEEF, 2)
    assert run("66ff37", PROT, cpu, dev)                    # push word [edi]
    assert cpu.regs[Reg.RSP] == 0xABCD_FFFE
    assert cpu.ram[0x2FFFE:0x30000] == b"\xef\xbe"


def test_rep_movs_batches_and_keeps_rip_for_the_backend() -> None:
    cpu, dev = Cpu(rsi=MMIO, rdi=0x3000, rcx=10), Device()
    for i in range(10):
        dev.set(4 * i, 0x100 + i, 4)
    done = []
    for _ in range(3):
        done.append(run("f3a5", PROT, cpu, dev, max_iterations=4))   # rep movsd
        assert cpu.get_reg(Reg.RIP) == 0                    # never touched here
    assert done == [False, False, True]
    assert cpu.regs[Reg.RCX] == 0
    assert (cpu.regs[Reg.RSI], cpu.regs[Reg.RDI]) == (MMIO + 40, 0x3028)
    assert [int.from_bytes(cpu.ram[0x3000 + 4 * i:0x3004 + 4 * i], "little")
            for i in range(10)] == [0x100 + i for i in range(10)]


def test_rep_stos_backwards_and_zero_count() -> None:
    cpu, dev = Cpu(rax=0xAB, rdi=MMIO + 0x10, rcx=3, rflags=2 | DF), Device()
    assert run("f3aa", PROT, cpu, dev)
    assert [(k, a) for k, a, *_ in dev.log] == [("W", MMIO + 0x10), ("W", MMIO + 0xF),
                                               ("W", MMIO + 0xE)]
    assert (cpu.regs[Reg.RDI], cpu.regs[Reg.RCX]) == (MMIO + 0xD, 0)
    dev.log.clear()
    assert run("f3aa", PROT, cpu, dev)                      # RCX == 0: nothing at all
    assert dev.log == [] and cpu.regs[Reg.RDI] == MMIO + 0xD


def test_rep_uses_cx_only_with_16_bit_addresses() -> None:
    cpu, dev = Cpu(rax=1, rdi=0xFFFF_0000 | 0x10, rcx=0xFFFF_0002, es_base=MMIO), Device()
    assert run("67f3aa", PROT, cpu, dev)                    # a16 rep stosb
    assert cpu.regs[Reg.RCX] == 0xFFFF_0000
    assert cpu.regs[Reg.RDI] == 0xFFFF_0012
    assert [a for _, a, *_ in dev.log] == [MMIO + 0x10, MMIO + 0x11]


def test_rep_16_bit_offsets_wrap_within_the_segment() -> None:
    # rep movsb with SI running over 0xFFFF: the source wraps to DS:0000
    cpu = Cpu(rsi=0xFFFE, rdi=0x10, rcx=4, ds_base=MMIO - 0xFFFE, es_base=0x1000, cr0=0)
    dev = Device(base=MMIO - 0xFFFE, size=0x10000)
    for off, byte in ((0xFFFE, 1), (0xFFFF, 2), (0, 3), (1, 4)):
        dev.data[off] = byte
    assert run("f3a4", REAL, cpu, dev)
    assert [a - dev.base for _, a, *_ in dev.log] == [0xFFFE, 0xFFFF, 0, 1]
    assert bytes(cpu.ram[0x1010:0x1014]) == b"\x01\x02\x03\x04"
    assert (cpu.regs[Reg.RSI], cpu.regs[Reg.RDI], cpu.regs[Reg.RCX]) == (2, 0x14, 0)


# --- faults -------------------------------------------------------------------

def test_page_fault_error_codes() -> None:
    cpu = Cpu()
    t = Tables(cpu)
    t.map(0x400000, 0x5000, leaf=P)                              # read-only, supervisor
    t.map(0x401000, 0x6000, leaf=P | RW | US)                    # user RW
    t.map(0x402000, 0x7000, leaf=P | US)                         # user RO
    t.map(0x403000, 0x8000, leaf=P | RW | (1 << 63))             # NX

    def fault(gla: int, access: Access, cpl: int = 0) -> tuple[int, int | None, int | None]:
        cpu.regs[Reg.CPL] = cpl
        with pytest.raises(GuestFault) as exc:
            gla_to_gpa(cpu, gla, access)
        return exc.value.vector, exc.value.error_code, exc.value.cr2

    assert fault(0x404000, Access.READ) == (14, 0, 0x404000)        # not present
    assert fault(0x404000, Access.WRITE, cpl=3) == (14, 6, 0x404000)
    assert fault(0x400000, Access.WRITE) == (14, 3, 0x400000)       # WP
    assert fault(0x400010, Access.READ, cpl=3) == (14, 5, 0x400010)  # supervisor page
    assert fault(0x402000, Access.WRITE, cpl=3) == (14, 7, 0x402000)
    assert fault(0x403000, Access.EXEC) == (14, 0x11, 0x403000)     # NX fetch
    assert fault(0x0000_8000_0000_0000, Access.READ) == (13, 0, None)   # non-canonical
    cpu.regs[Reg.CR4] |= CR4_SMAP
    assert fault(0x401000, Access.READ) == (14, 1, 0x401000)        # SMAP
    cpu.regs[Reg.RFLAGS] |= 1 << 18                                  # AC lifts SMAP
    cpu.regs[Reg.CPL] = 0
    assert gla_to_gpa(cpu, 0x401234, Access.READ) == 0x6234
    cpu.regs[Reg.CR0] &= ~0x10000                                    # WP off
    assert gla_to_gpa(cpu, 0x400008, Access.WRITE) == 0x5008
    cpu.regs[Reg.EFER] &= ~EFER_NXE                                  # NX now reserved
    assert fault(0x403000, Access.READ) == (14, 9, 0x403000)


def test_walk_sets_accessed_and_dirty_bits() -> None:
    cpu = Cpu()
    t = Tables(cpu)
    pte = t.map(0x7000_0000, 0x9000)
    assert gla_to_gpa(cpu, 0x7000_0123, Access.READ) == 0x9123
    assert cpu.q(pte) & (A | D) == A
    assert gla_to_gpa(cpu, 0x7000_0123, Access.WRITE) == 0x9123
    assert cpu.q(pte) & (A | D) == A | D
    assert cpu.q(t.root) & A                                     # upper levels too


def test_walk_32_bit_and_pae_large_pages() -> None:
    cpu = Cpu(cr0=CR0_PE_PG, cr3=0x1000, cr4=CR4_PSE)
    # 4 MiB page at physical 0x1_0040_0000 (PSE-36 bits 39:32 in PDE bits 20:13)
    pde = 0x0040_0000 | (0x1 << 13) | P | RW | PS
    cpu.write_phys(0x1000 + 4 * 3, pde.to_bytes(4, "little"))
    assert paging_mode(cpu) == PagingMode.BITS32
    assert gla_to_gpa(cpu, 0x00C1_2345, Access.READ) == 0x1_0041_2345
    cpu.write_phys(0x1000 + 4 * 3, (pde | (1 << 21)).to_bytes(4, "little"))
    with pytest.raises(GuestFault) as exc:
        gla_to_gpa(cpu, 0x00C1_2345, Access.READ)
    assert exc.value.error_code == 9                             # reserved bit
    # PAE: PDPTE 1 -> PD at 0x3000, PDE 2 is a 2 MiB page at 0x60_0000
    cpu.regs.update({Reg.CR4: CR4_PAE, Reg.CR3: 0x2000})
    cpu.write_phys(0x2008, (0x3000 | P).to_bytes(8, "little"))
    cpu.write_phys(0x3010, (0x60_0000 | P | RW | PS).to_bytes(8, "little"))
    assert paging_mode(cpu) == PagingMode.PAE
    assert gla_to_gpa(cpu, 0x4040_0010, Access.WRITE) == 0x60_0010
    assert cpu.q(0x3010) & (A | D) == A | D
    assert cpu.q(0x2008) == 0x3000 | P                           # PDPTE has no A bit


def test_five_level_paging_and_canonical_limits() -> None:
    cpu = Cpu()
    t = Tables(cpu, levels=5)
    assert paging_mode(cpu) == PagingMode.LONG5
    gla = 0xFF12_3456_7800_0000              # canonical for 57 bits, not for 48
    t.map(gla, 0xA000)
    assert not is_canonical(gla, PagingMode.LONG4)
    assert gla_to_gpa(cpu, gla | 0x42, Access.READ) == 0xA042
    with pytest.raises(GuestFault) as exc:
        gla_to_gpa(cpu, 0x0100_0000_0000_0000, Access.READ)
    assert exc.value.vector == 13


def test_page_table_outside_ram_is_an_emulation_error() -> None:
    cpu = Cpu(cr0=CR0_PE_PG, cr3=0x1000, cr4=CR4_PAE, efer=EFER_LMA_LME)
    cpu.write_phys(0x1000, (0xF000_0000 | P | RW).to_bytes(8, "little"))
    with pytest.raises(EmulationError, match="not in guest memory"):
        gla_to_gpa(cpu, 0x10, Access.READ)


def test_fault_comes_before_any_device_access() -> None:
    cpu = Cpu()
    t = Tables(cpu)
    t.map(0x1000_0000, MMIO)                 # device page mapped
    t.map(0x2000_0000, 0x9000)               # RAM page; the next page is unmapped
    dev = Device()
    # movsd from MMIO to RAM: 2nd iteration's RAM side is unmapped
    cpu.regs.update({Reg.RSI: 0x1000_0000, Reg.RDI: 0x2000_0FFC, Reg.RCX: 5})
    with pytest.raises(GuestFault) as exc:
        run("f3a5", L64, cpu, dev)
    assert exc.value.vector == 14 and exc.value.cr2 == 0x2000_1000
    # the first iteration retired; the faulting one touched nothing
    assert [k for k, *_ in dev.log] == ["R"]
    assert (cpu.regs[Reg.RCX], cpu.regs[Reg.RSI], cpu.regs[Reg.RDI]) == (
        4, 0x1000_0004, 0x2000_1000)
    # push [mmio] with an unmapped stack: no device read (reads can have side effects)
    dev.log.clear()
    cpu.regs[Reg.RSP] = 0x3000_0000
    with pytest.raises(GuestFault):
        run("ff37", L64, cpu, dev)
    assert dev.log == [] and cpu.regs[Reg.RSP] == 0x3000_0000


def test_non_canonical_stack_is_ss_fault_and_others_gp() -> None:
    cpu = Cpu(rsp=0x0000_8000_0000_0008, efer=EFER_LMA_LME)
    dev = Device()
    with pytest.raises(GuestFault) as exc:
        run("ff37", L64, cpu, dev)
    assert (exc.value.vector, exc.value.error_code) == (12, 0)
    cpu.regs.update({Reg.RDI: 0x0000_8000_0000_0000, Reg.RCX: 1})
    with pytest.raises(GuestFault) as exc:
        run("aa", L64, cpu, dev)
    assert (exc.value.vector, exc.value.error_code) == (13, 0)
    assert dev.log == []


def test_alignment_check_at_cpl3() -> None:
    cpu = Cpu(cr0=0x40001, cpl=3, rflags=2 | (1 << 18), rdi=MMIO + 2, es_base=0)
    dev = Device()
    with pytest.raises(GuestFault) as exc:
        run("ab", PROT, cpu, dev)                            # stosd to a misaligned address
    assert exc.value.vector == 17 and dev.log == []
    cpu.regs[Reg.RFLAGS] = 2                                 # AC clear: allowed
    assert run("ab", PROT, cpu, dev)


def test_segment_bases_apply_to_string_operands() -> None:
    cpu = Cpu(rsi=0x10, rdi=0x20, rcx=1, ds_base=0x4000, es_base=MMIO, fs_base=0x8000)
    dev = Device()
    cpu.ram[0x8010] = 0x5A
    cpu.ram[0x4010] = 0xA5
    assert run("64a4", PROT, cpu, dev)                       # movsb es:[edi], fs:[esi]
    assert dev.log == [("W", MMIO + 0x20, 1, 0x5A)]
    # in 64-bit mode DS/ES bases are ignored, FS still counts
    cpu = Cpu(rsi=0x4010, rdi=MMIO, ds_base=0x1000, es_base=0x2000, fs_base=0x4000)
    cpu.ram[0x4010] = 0x11
    cpu.ram[0x8010] = 0x22
    assert run("a4", L64, cpu, dev)
    assert dev.log[-1] == ("W", MMIO, 1, 0x11)
    cpu.regs.update({Reg.RSI: 0x4010, Reg.RDI: MMIO})
    assert run("64a4", L64, cpu, dev)
    assert dev.log[-1] == ("W", MMIO, 1, 0x22)


def test_seg_bases_table_matches_sreg_numbering() -> None:
    assert [SEG_BASES[s] for s in (Seg.ES, Seg.SS, Seg.FS)] == [
        Reg.ES_BASE, Reg.SS_BASE, Reg.FS_BASE]
