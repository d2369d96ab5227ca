"""The KVM backend against real tiny guests on /dev/kvm.

Each guest is a few hand-assembled real-mode instructions placed in a
read-only ROM slot at the x86 reset vector, exactly where firmware would be.
The guests talk to a recording IoHandler; port 0xF4 is this file's "stop"
port: the handler kicks the writing vCPU there, so ``run()`` comes back with
INTERRUPTED right after that OUT retires.

KVM here runs guest code through the kernel's instruction emulator (roughly a
million instructions a second), so the guests are a few dozen instructions and
every run has a watchdog timeout instead of a speed expectation.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from bhyvepy.vmm import KERNEL_SECTIONS, ExitReason, SuspendHow, Topology
from bhyvepy.vmm import kvm as kvmmod

_ok, _why = kvmmod.KvmBackend.available()
if not _ok:
    pytest.skip(f"KVM backend not usable here: {_why}", allow_module_level=True)

from bhyvepy.snapshot.state import StateError  # noqa: E402
from bhyvepy.vmm.kvm import KvmBackend, KvmError, build_cpuid, ffi, lib  # noqa: E402

ROM_BASE, ROM_SIZE = 0xFFFF0000, 0x10000
LOWMEM = 0x80000          # 512 KiB: [0x80000, 1 MiB) stays unmapped (MMIO)
STOP = 0xF4
RAM_CODE = 0x7000
RUN_TIMEOUT = 20.0

_names = itertools.count()


def asm(*parts: str) -> bytes:
    """Hex strings (spaces allowed) to bytes; one string per instruction."""
    return bytes.fromhex("".join(parts).replace(" ", ""))


class Recorder:
    """An IoHandler that logs every access and answers from tables."""

    def __init__(self, vm=None, in_values=None, mmio_values=None, stop_ports=(STOP,),
                 stop_after: dict[int, int] | None = None) -> None:
        self.vm = vm
        self.events: list[tuple] = []
        self.in_values = in_values or {}
        self.mmio_values = mmio_values or {}
        self.stop_ports = set(stop_ports)
        self.stop_after = dict(stop_after or {})
        self.counts: dict[int, int] = {}
        self.lock = threading.Lock()

    def _stop(self, vcpu: int) -> None:
        self.vm.vcpus()[vcpu].kick()

    def pio_in(self, vcpu, port, size):
        with self.lock:
            self.events.append(("in", vcpu, port, size))
        v = self.in_values.get((port, size), self.in_values.get(port, 0xFF))
        return next(v) if hasattr(v, "__next__") else v

    def pio_out(self, vcpu, port, size, value):
        with self.lock:
            self.events.append(("out", vcpu, port, size, value))
            n = self.counts[port] = self.counts.get(port, 0) + 1
        if port in self.stop_ports or self.stop_after.get(port) == n:
            self._stop(vcpu)

    def mmio_read(self, vcpu, gpa, size):
        with self.lock:
            self.events.append(("mmio_read", vcpu, gpa, size))
        return self.mmio_values.get(gpa, 0)

    def mmio_write(self, vcpu, gpa, size, value):
        with self.lock:
            self.events.append(("mmio_write", vcpu, gpa, size, value))

    def outs(self, vcpu=None, port=None):
        return [e[2:] for e in self.events if e[0] == "out" and (vcpu is None or e[1] == vcpu)
                and (port is None or e[2] == port)]


@pytest.fixture(scope="module")
def backend():
    b = KvmBackend()
    yield b
    b.close()


@pytest.fixture
def make_vm(backend):
    made = []

    def make(code: bytes, *, ncpus: int = 1, ram: dict[int, bytes] | None = None,
             x2apic: bool = False, rom_extra: dict[int, bytes] | None = None, in_ram: bool = False):
        """A VM whose BSP starts ``code`` from the reset vector: in the ROM at
        CS base 0xFFFF0000, or, with ``in_ram``, copied to RAM_CODE and entered
        with a far jump (code that takes interrupts must, since IRET reloads
        CS as a real-mode segment and 0xF0000 is not mapped here)."""
        vm = backend.create_vm(f"kvm-test-{next(_names)}")
        made.append(vm)
        vm.set_topology(Topology(cpus=ncpus, sockets=ncpus))
        (low,) = vm.setup_memory(LOWMEM)
        rom = vm.map_devmem("bootrom", ROM_BASE, ROM_SIZE, readonly=True)
        if in_ram:
            ram = {**(ram or {}), RAM_CODE: code}
            code = b"\xEA" + RAM_CODE.to_bytes(2, "little") + b"\0\0"   # jmp far 0000:RAM_CODE
        rom.buf[0:len(code)] = code
        for off, data in (rom_extra or {}).items():
            rom.buf[off:off + len(data)] = data
        # reset vector (CS base 0xFFFF0000, IP 0xFFF0): jmp near to CS:0000
        rom.buf[0xFFF0:0xFFF3] = b"\xE9" + ((0 - 0xFFF3) & 0xFFFF).to_bytes(2, "little")
        for gpa, data in (ram or {}).items():
            low.buf[gpa:gpa + len(data)] = data
        if x2apic:
            assert vm.set_capability("x2apic", True)
        for i in range(ncpus):
            vm.create_vcpu(i).reset_to_reset_vector()
        vm.low, vm.rom = low, rom
        return vm

    yield make
    for vm in made:
        vm.destroy()


def run(vcpu, io, timeout: float = RUN_TIMEOUT):
    """vcpu.run(io) with a deadline, so a wrong guest fails instead of hanging."""
    result: list = []

    def body() -> None:
        try:
            result.append(vcpu.run(io))
        except BaseException as e:  # pragma: no cover - reported below
            result.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        vcpu.kick()
        t.join(5)
        pytest.fail(f"vCPU {vcpu.id} did not come back within {timeout}s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def interrupted(ex) -> bool:
    return ex.reason is ExitReason.INTERRUPTED


# ----------------------------------------------------------------------------
# port I/O
# ----------------------------------------------------------------------------

OUT_LOOP = asm(
    "31 C9",                 # 0000 xor cx, cx
    "BA F8 03",              # 0002 mov dx, 0x3f8
    "88 C8",                 # 0005 L: mov al, cl
    "EE",                    # 0007 out dx, al
    "41",                    # 0008 inc cx
    "83 F9 0A",              # 0009 cmp cx, 10
    "75 F7",                 # 000C jne L
    "66 B8 44 33 22 11",     # 000E mov eax, 0x11223344
    "BA 00 05",              # 0014 mov dx, 0x500
    "EF",                    # 0017 out dx, ax
    "66 EF",                 # 0018 out dx, eax
    "E6 F4",                 # 001A out 0xf4, al
    "EB FE",                 # 001C jmp $
)


def test_out_loop_reaches_handler_in_order(make_vm):
    vm = make_vm(OUT_LOOP)
    io = Recorder(vm)
    ex = run(vm.vcpus()[0], io)
    assert interrupted(ex)
    assert io.outs() == [(0x3F8, 1, i) for i in range(10)] + [
        (0x500, 2, 0x3344), (0x500, 4, 0x11223344), (STOP, 1, 0x44)]


IN_PROG = asm(
    "E4 60",                 # in al, 0x60
    "A2 00 10",              # mov [0x1000], al
    "BA 34 12",              # mov dx, 0x1234
    "ED",                    # in ax, dx
    "A3 02 10",              # mov [0x1002], ax
    "66 ED",                 # in eax, dx
    "66 A3 04 10",           # mov [0x1004], eax
    "E6 F4",                 # out 0xf4, al
    "EB FE",                 # jmp $
)


def test_in_values_reach_registers_and_memory(make_vm):
    vm = make_vm(IN_PROG)
    io = Recorder(vm, in_values={(0x60, 1): 0x5A, (0x1234, 2): 0xBEEF, (0x1234, 4): 0xCAFEF00D})
    assert interrupted(run(vm.vcpus()[0], io))
    assert [e for e in io.events if e[0] == "in"] == [
        ("in", 0, 0x60, 1), ("in", 0, 0x1234, 2), ("in", 0, 0x1234, 4)]
    assert bytes(vm.low.buf[0x1000:0x1008]) == bytes.fromhex("5A00EFBE0DF0FECA")
    assert vm.vcpus()[0].get_registers()["rax"] & 0xFFFFFFFF == 0xCAFEF00D
    assert io.outs(port=STOP) == [(STOP, 1, 0x0D)]


def test_in_value_wider_than_port_is_truncated(make_vm):
    vm = make_vm(IN_PROG)
    io = Recorder(vm, in_values={(0x60, 1): 0x1A5, (0x1234, 2): 0x12345, (0x1234, 4): 0x1_0000_0001})
    assert interrupted(run(vm.vcpus()[0], io))
    assert bytes(vm.low.buf[0x1000:0x1008]) == bytes.fromhex("A5004523" "01000000")


STRING_PROG = asm(
    "FC",                    # cld
    "BE 00 20",              # mov si, 0x2000
    "B9 05 00",              # mov cx, 5
    "BA F8 03",              # mov dx, 0x3f8
    "F3 6E",                 # rep outsb
    "BE 00 21",              # mov si, 0x2100
    "B9 02 00",              # mov cx, 2
    "F3 6F",                 # rep outsw
    "BF 00 30",              # mov di, 0x3000
    "B9 04 00",              # mov cx, 4
    "F3 6C",                 # rep insb
    "E6 F4",                 # out 0xf4, al
    "EB FE",                 # jmp $
)


def test_string_io(make_vm):
    vm = make_vm(STRING_PROG, ram={0x2000: b"hello", 0x2100: bytes([1, 2, 3, 4])})
    io = Recorder(vm, in_values={(0x3F8, 1): iter(range(0x10, 0x20))})
    assert interrupted(run(vm.vcpus()[0], io))
    assert io.outs(port=0x3F8) == [(0x3F8, 1, b) for b in b"hello"] + [(0x3F8, 2, 0x0201), (0x3F8, 2, 0x0403)]
    assert [e for e in io.events if e[0] == "in"] == [("in", 0, 0x3F8, 1)] * 4
    assert bytes(vm.low.buf[0x3000:0x3004]) == bytes([0x10, 0x11, 0x12, 0x13])
    assert vm.vcpus()[0].get_registers()["rcx"] & 0xFFFF == 0


# ----------------------------------------------------------------------------
# MMIO and ROM
# ----------------------------------------------------------------------------

MMIO_PROG = asm(
    "B8 00 A0",              # mov ax, 0xA000
    "8E D8",                 # mov ds, ax
    "C7 06 10 00 EF BE",     # mov word [0x10], 0xBEEF     -> MMIO write 0xA0010
    "A1 20 00",              # mov ax, [0x20]              -> MMIO read 0xA0020
    "31 DB",                 # xor bx, bx
    "8E DB",                 # mov ds, bx
    "A3 00 10",              # mov [0x1000], ax
    "2E A2 00 01",           # mov [cs:0x100], al          -> ROM write, dropped
    "2E A0 00 01",           # mov al, [cs:0x100]          -> ROM read
    "A2 02 10",              # mov [0x1002], al
    "E6 F4",                 # out 0xf4, al
    "EB FE",                 # jmp $
)


def test_mmio_to_unmapped_address_and_rom_write_dropped(make_vm):
    vm = make_vm(MMIO_PROG, rom_extra={0x100: b"\x77"})
    io = Recorder(vm, mmio_values={0xA0020: 0x1234})
    assert interrupted(run(vm.vcpus()[0], io))
    mmio = [e for e in io.events if e[0].startswith("mmio")]
    assert mmio == [("mmio_write", 0, 0xA0010, 2, 0xBEEF), ("mmio_read", 0, 0xA0020, 2)]
    assert bytes(vm.low.buf[0x1000:0x1003]) == b"\x34\x12\x77"
    assert vm.rom.buf[0x100] == 0x77


# ----------------------------------------------------------------------------
# halts, faults, kicks, suspend
# ----------------------------------------------------------------------------

def test_hlt_with_interrupts_disabled_is_reported(make_vm):
    vm = make_vm(asm("FA", "F4", "EB FD"))      # cli; hlt; jmp hlt
    t0 = time.monotonic()
    ex = run(vm.vcpus()[0], Recorder(vm))
    assert ex.reason is ExitReason.HLT
    assert ex.info.get("intr_disabled") is True
    assert time.monotonic() - t0 < 20 * kvmmod.WATCHDOG_PERIOD
    assert vm.vcpus()[0].get_registers()["rflags"] & 0x200 == 0


def test_hlt_with_interrupts_enabled_is_not_reported(make_vm):
    vm = make_vm(asm("FB", "F4", "EB FD"))      # sti; hlt; jmp hlt
    v = vm.vcpus()[0]
    threading.Timer(4 * kvmmod.WATCHDOG_PERIOD, v.kick).start()
    ex = run(v, Recorder(vm))
    assert interrupted(ex)                     # only the outside kick ends run()


def test_triple_fault(make_vm):
    # An empty IDT (lidt [0x1000] loads limit 0 from zeroed RAM), protected
    # mode, then divide by zero: #DE cannot be delivered, nor the #GP and #DF
    # that follow.  (Real mode would not do: KVM's emulator does not check the
    # IVT limit there, and it cannot emulate int3/ud2 outside real mode.)
    vm = make_vm(asm(
        "0F 01 1E 00 10",    # lidt [0x1000]
        "0F 20 C0",          # mov eax, cr0
        "0C 01",             # or al, 1 (PE)
        "0F 22 C0",          # mov cr0, eax
        "31 C9",             # xor cx, cx
        "F7 F1",             # div cx
        "EB FE",             # jmp $
    ))
    ex = run(vm.vcpus()[0], Recorder(vm))
    assert ex.reason is ExitReason.SUSPENDED and ex.how is SuspendHow.TRIPLEFAULT
    again = run(vm.vcpus()[0], Recorder(vm))
    assert again.reason is ExitReason.SUSPENDED and again.how is SuspendHow.TRIPLEFAULT


def test_kick_from_another_thread(make_vm):
    vm = make_vm(asm("EB FE"))                  # jmp $
    v = vm.vcpus()[0]
    for _ in range(2):                           # and the vCPU can go on afterwards
        threading.Timer(0.05, v.kick).start()
        assert interrupted(run(v, Recorder(vm)))
    assert v.get_registers()["rip"] == 0


def test_kick_before_run_is_not_lost(make_vm):
    vm = make_vm(asm("EB FE"))
    v = vm.vcpus()[0]
    v.kick()
    assert interrupted(run(v, Recorder(vm), timeout=5))


def test_suspend_stops_running_vcpu(make_vm):
    vm = make_vm(asm("EB FE"))
    threading.Timer(0.05, vm.suspend, args=(SuspendHow.POWEROFF,)).start()
    ex = run(vm.vcpus()[0], Recorder(vm))
    assert ex.reason is ExitReason.SUSPENDED and ex.how is SuspendHow.POWEROFF


def test_tight_out_loop_can_be_measured(make_vm):
    vm = make_vm(asm("E6 80", "EB FC"))        # out 0x80, al; jmp back
    io = Recorder(vm, stop_ports=(), stop_after={0x80: 2000})
    assert interrupted(run(vm.vcpus()[0], io))
    assert io.counts[0x80] == 2000


# ----------------------------------------------------------------------------
# several vCPUs: INIT/SIPI in the kernel LAPIC
# ----------------------------------------------------------------------------

X2APIC_ON = (
    "66 B9 1B 00 00 00",     # mov ecx, 0x1b (IA32_APIC_BASE)
    "0F 32",                 # rdmsr
    "66 0D 00 0C 00 00",     # or eax, 0xc00 (EN | EXTD)
    "0F 30",                 # wrmsr
)

BSP_STARTS_AP = asm(
    *X2APIC_ON,
    "66 B9 30 08 00 00",     # mov ecx, 0x830 (x2APIC ICR)
    "66 BA 01 00 00 00",     # mov edx, 1 (destination APIC ID 1)
    "66 B8 00 45 00 00",     # mov eax, 0x4500 (INIT, assert)
    "0F 30",                 # wrmsr
    "66 B8 10 46 00 00",     # mov eax, 0x4610 (SIPI, vector 0x10 -> 0x10000)
    "0F 30",                 # wrmsr
    "B0 BB",                 # mov al, 0xbb
    "E6 F4",                 # out 0xf4, al
    "EB FE",                 # jmp $
)
AP_CODE = asm("B0 AA", "E6 F4", "FA", "F4")   # mov al, 0xaa; out 0xf4, al; cli; hlt


def test_ap_waits_for_sipi_from_bsp(make_vm):
    vm = make_vm(BSP_STARTS_AP, ncpus=2, x2apic=True, ram={0x10000: AP_CODE})
    bsp, ap = vm.vcpus()
    io = Recorder(vm)
    result: list = []
    t = threading.Thread(target=lambda: result.append(ap.run(io)), daemon=True)
    t.start()
    time.sleep(3 * kvmmod.WATCHDOG_PERIOD)       # watchdog kicks it meanwhile, invisibly
    assert t.is_alive() and io.outs(vcpu=1) == []
    assert interrupted(run(bsp, io))
    t.join(RUN_TIMEOUT)
    assert not t.is_alive(), "AP never started"
    assert interrupted(result[0])
    assert io.outs(vcpu=0) == [(STOP, 1, 0xBB)]
    assert io.outs(vcpu=1) == [(STOP, 1, 0xAA)]
    assert ap.get_registers()["cs"] == 0x1000


CPUID_PROG = asm("66 B8 01 00 00 00", "0F A2", "E6 F4", "EB FE")   # mov eax,1; cpuid; out


@pytest.mark.parametrize("x2apic", [False, True])
def test_guest_cpuid_apic_id_and_bits(make_vm, x2apic):
    vm = make_vm(CPUID_PROG, x2apic=x2apic)
    assert interrupted(run(vm.vcpus()[0], Recorder(vm)))
    r = vm.vcpus()[0].get_registers()
    assert r["rbx"] >> 24 & 0xFF == 0
    assert r["rcx"] >> 31 & 1 == 1                 # hypervisor present
    assert bool(r["rcx"] >> 21 & 1) is x2apic


def test_build_cpuid_topology():
    supported = [(0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65),
                 (1, 0, 0, 0x00A00F11, 0x00000800, 0x00200000, 0x078BFBFF),
                 (0xB, 0, 1, 9, 9, 9, 9), (0x1F, 0, 1, 9, 9, 9, 9)]
    topo = Topology(cpus=8, sockets=2, cores=2, threads=2)
    out = build_cpuid(supported, 3, topo, x2apic=False)
    leaf = {(f, i): (a, b, c, d) for f, i, _fl, a, b, c, d in out}
    assert leaf[(1, 0)][1] >> 24 == 3                 # APIC ID
    assert leaf[(1, 0)][1] >> 16 & 0xFF == 4          # addressable IDs per package
    assert leaf[(1, 0)][3] >> 28 & 1 == 1             # HTT
    assert not leaf[(1, 0)][2] >> 21 & 1              # x2APIC off unless asked
    assert leaf[(0xB, 0)] == (1, 2, 0x100, 3)
    assert leaf[(0xB, 1)] == (2, 4, 0x201, 3)
    assert leaf[(0xB, 2)][2] == 2
    assert (0x1F, 0) not in leaf


# ----------------------------------------------------------------------------
# interrupts
# ----------------------------------------------------------------------------

def _irr(vm, chip: int) -> int:
    p = kvmmod._from_raw("struct kvm_irqchip", vm._get_chip(chip))
    return p.chip.ioapic.irr if chip == lib.KVM_IRQCHIP_IOAPIC else p.chip.pic.irr


def test_gsi_routing_reaches_the_right_pins(make_vm):
    vm = make_vm(asm("EB FE"))
    ioapic, master = lib.KVM_IRQCHIP_IOAPIC, lib.KVM_IRQCHIP_PIC_MASTER
    vm.isa_assert(0, 2)                      # ISA IRQ 0 is IOAPIC pin 2 (MADT override)
    assert _irr(vm, ioapic) & (1 << 2) and not _irr(vm, ioapic) & 1
    assert _irr(vm, master) & 1
    vm.isa_deassert(0, 2)
    assert not _irr(vm, ioapic) & (1 << 2)
    vm.isa_assert(4, 4)
    assert _irr(vm, ioapic) & (1 << 4) and _irr(vm, master) & (1 << 4)
    vm.isa_deassert(4, 4)
    assert not _irr(vm, ioapic) & (1 << 4)
    for pin in (5, 16, 23):                  # IOAPIC only, pins 16..23 usable
        before = _irr(vm, master)
        vm.ioapic_assert(pin)
        assert _irr(vm, ioapic) & (1 << pin)
        assert _irr(vm, master) == before
        vm.ioapic_deassert(pin)
        assert not _irr(vm, ioapic) & (1 << pin)
    vm.ioapic_pulse(17)
    vm.isa_pulse(3, 3)
    vm.isa_pulse(1, -1)                      # 8259 only
    vm.lapic_msi(0xFEE00000, 0x41)
    vm.inject_nmi(0)
    with pytest.raises(ValueError):
        vm.ioapic_assert(24)
    with pytest.raises(ValueError):
        vm.isa_assert(16, 16)
    with pytest.raises(ValueError):
        vm.inject_nmi(5)


def _ivt(vector: int, seg: int, off: int = 0) -> dict[int, bytes]:
    return {vector * 4: off.to_bytes(2, "little") + seg.to_bytes(2, "little")}


def test_interrupts_are_delivered_to_a_real_mode_guest(make_vm):
    """The 8259 path (isa_pulse), MSI (lapic_msi) and NMI each run their IVT
    handler, which reports on a port."""
    prog = asm(
        *X2APIC_ON,
        "66 B9 0F 08 00 00",  # mov ecx, 0x80f (x2APIC SVR)
        "66 B8 FF 01 00 00",  # mov eax, 0x1ff (software enable)
        "66 31 D2",           # xor edx, edx
        "0F 30",              # wrmsr
        "B0 11", "E6 20",     # ICW1
        "B0 08", "E6 21",     # ICW2: vectors 8..15
        "B0 04", "E6 21",     # ICW3
        "B0 01", "E6 21",     # ICW4
        "B0 EF", "E6 21",     # mask all but IRQ 4
        "E6 F4",              # ready
        "FB",                 # sti
        "F4",                 # L: hlt
        "EB FD",              # jmp L
    )

    def handler(tag: int, eoi: str) -> bytes:
        return asm("B0", f"{tag:02X}", "E6 F5", eoi, "CF")    # report; EOI; iret

    pic_eoi = "B0 20 E6 20"                                      # mov al,0x20; out 0x20,al
    lapic_eoi = "66 B9 0B 08 00 00 66 31 C0 66 31 D2 0F 30"      # wrmsr(0x80b, 0)
    ram = {0x5000: handler(0xC4, pic_eoi), 0x5100: handler(0x41, lapic_eoi), 0x5200: handler(0x02, "")}
    ram.update(_ivt(0x0C, 0x500))
    ram.update(_ivt(0x41, 0x510))
    ram.update(_ivt(0x02, 0x520))
    vm = make_vm(prog, x2apic=True, ram=ram, in_ram=True)
    v = vm.vcpus()[0]
    io = Recorder(vm, stop_ports=(STOP, 0xF5))
    assert interrupted(run(v, io))
    for raise_it, tag in ((lambda: vm.isa_pulse(4, 4), 0xC4),
                          (lambda: vm.lapic_msi(0xFEE00000, 0x41), 0x41),
                          (lambda: vm.inject_nmi(0), 0x02)):
        raise_it()
        assert interrupted(run(v, io))
        assert io.outs(port=0xF5)[-1] == (0xF5, 1, tag)
    assert [o[2] for o in io.outs(port=0xF5)] == [0xC4, 0x41, 0x02]


# ----------------------------------------------------------------------------
# kernel state sections
# ----------------------------------------------------------------------------

COUNTER = asm(
    "66 31 DB",              # 0000 xor ebx, ebx
    "66 43",                 # 0003 L: inc ebx
    "88 D8",                 # 0005 mov al, bl
    "E6 80",                 # 0007 out 0x80, al
    "EB F8",                 # 0009 jmp L
)


def _sections(vm) -> tuple[str, ...]:
    missing = set(vm.platform.errors)
    return tuple(s for s in KERNEL_SECTIONS if s not in missing)


def test_save_restore_round_trip_continues_the_guest(make_vm):
    src = make_vm(COUNTER, ncpus=2)
    io = Recorder(src, stop_ports=(), stop_after={0x80: 20})
    assert interrupted(run(src.vcpus()[0], io))
    assert src.vcpus()[0].get_registers()["rbx"] == 20
    src.rtc_write(0x34, 0x5A)
    saved = {s: src.save_kernel_section(s) for s in _sections(src)}
    assert set(saved) >= {"vm", "vioapic", "vlapic", "vmcx", "vatpit", "vatpic"}

    dst = make_vm(b"\xF4", ncpus=2)                # different code: state must win
    dst.low.buf[:] = src.low.buf[:]
    dst.rom.buf[:] = src.rom.buf[:]
    for s in KERNEL_SECTIONS:
        if s in saved:
            dst.restore_kernel_section(s, saved[s])
    dst.restore_time()
    v = dst.vcpus()[0]
    assert v.get_registers()["rbx"] == 20
    io2 = Recorder(dst, stop_ports=(), stop_after={0x80: 5})
    assert interrupted(run(v, io2))
    assert [o[2] for o in io2.outs(port=0x80)] == [21, 22, 23, 24, 25]
    assert v.get_registers()["rbx"] == 25
    for s in ("vioapic", "vatpic"):                # deterministic: identical on re-save
        assert dst.save_kernel_section(s) == saved[s]
    assert dst.vcpus()[1]._get_mp_state() == lib.KVM_MP_STATE_INIT_RECEIVED
    if "vrtc" in saved:
        assert dst.rtc_read(0x34) == 0x5A


def test_restore_refuses_bad_state(make_vm):
    two = make_vm(b"\xF4", ncpus=2)
    one = make_vm(b"\xF4", ncpus=1)
    for s in ("vlapic", "vmcx", "vm"):
        with pytest.raises(StateError, match="vCPU"):
            one.restore_kernel_section(s, two.save_kernel_section(s))
    good = one.save_kernel_section("vioapic")
    with pytest.raises(StateError):
        one.restore_kernel_section("vioapic", good[:-1])
    with pytest.raises(StateError):
        one.restore_kernel_section("vatpic", one.save_kernel_section("vatpic")[::-1])
    with pytest.raises(ValueError):
        one.save_kernel_section("vmx")
    assert one.save_kernel_section("vioapic") == good     # nothing changed


def test_state_calls_refused_while_vcpu_runs(make_vm):
    vm = make_vm(asm("EB FE"))
    v = vm.vcpus()[0]
    t = threading.Thread(target=lambda: v.run(Recorder(vm)), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not v._c.has_thread and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="running"):
        vm.save_kernel_section("vmcx")
    v.kick()
    t.join(5)
    assert not t.is_alive()


# ----------------------------------------------------------------------------
# errors, memory, capabilities
# ----------------------------------------------------------------------------

def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(kvmmod, "KVM_DEVICE", "/nonexistent/kvm")
    ok, why = KvmBackend.available()
    assert not ok and "/nonexistent/kvm does not exist" in why
    monkeypatch.setattr(kvmmod, "KVM_DEVICE", "/dev/null")
    ok, why = KvmBackend.available()
    assert not ok and "not a KVM device" in why


def test_ioctl_errors_name_the_ioctl():
    with pytest.raises(KvmError) as ei:
        kvmmod._ioctl(-1, "KVM_GET_REGS", ffi.new("struct kvm_regs *"))
    assert str(ei.value) == "KVM_GET_REGS: Bad file descriptor"


def test_memory_layout_and_overlaps(backend):
    vm = backend.create_vm(f"kvm-test-{next(_names)}")
    try:
        regs = vm.setup_memory((3 << 30) + (64 << 20))
        assert [(r.name, r.gpa, r.size) for r in regs] == [
            ("lowmem", 0, 3 << 30), ("highmem", 4 << 30, 64 << 20)]
        with pytest.raises(ValueError, match="overlaps"):
            vm.map_devmem("fb", (4 << 30) + 4096, 4096, readonly=False)
        with pytest.raises(ValueError, match="page-aligned"):
            vm.map_devmem("fb", 0xD0000001, 4096, readonly=False)
        fb = vm.map_devmem("fb", 0xD0000000, 1 << 20, readonly=False)
        assert not fb.is_ram and len(vm.memory_regions()) == 3
    finally:
        vm.destroy()


def test_capabilities_and_open(backend):
    vm = backend.create_vm(f"kvm-test-{next(_names)}")
    try:
        # KVM already idles a halted vCPU in the kernel: -H/-P are accepted.
        assert vm.set_capability("hlt_exit", True) is True
        assert vm.set_capability("pause_exit", True) is True
        assert vm.set_capability("no_such_capability", True) is False
        assert vm.set_capability("x2apic", True) is True
        assert vm.kernel_emulates_platform is False
        assert backend.open_vm(vm.name) is vm
    finally:
        vm.destroy()
    from bhyvepy.errors import BhyveExit
    with pytest.raises(BhyveExit, match="no bootrom was configured"):
        backend.open_vm(vm.name)


def test_restore_checks_msrs_and_mp_state_before_changing_anything(make_vm):
    from bhyvepy.snapshot.state import decode, encode
    from bhyvepy.vmm.kvm import KvmMsr, KvmVmcxState

    vm = make_vm(b"\xF4")
    good = vm.save_kernel_section("vmcx")
    st = decode(KvmVmcxState, good)
    st.cpus[0].msrs.append(KvmMsr(index=0xDEAD0001, value=1))
    with pytest.raises(StateError, match="0xdead0001"):
        vm.restore_kernel_section("vmcx", encode(st))
    st = decode(KvmVmcxState, good)
    st.cpus[0].mp_state = 9
    with pytest.raises(StateError, match="MP state"):
        vm.check_kernel_section("vmcx", encode(st))
    after = decode(KvmVmcxState, vm.save_kernel_section("vmcx")).cpus[0]
    before = decode(KvmVmcxState, good).cpus[0]
    assert (after.regs, after.sregs, after.mp_state) == (before.regs, before.sregs, before.mp_state)
    assert [m.index for m in after.msrs] == [m.index for m in before.msrs]


def test_reset_state_and_register_access(make_vm):
    vm = make_vm(asm("EB FE"))
    v = vm.vcpus()[0]
    r = v.get_registers()
    assert (r["cs"], r["cs_base"], r["rip"], r["cr0"]) == (0xF000, 0xFFFF0000, 0xFFF0, 0x60000010)
    assert r["rflags"] == 2 and r["efer"] == 0
    v.set_registers({"rbx": 0x1234, "ds": 0x40, "ds_base": 0x400, "idt_limit": 0x3FF})
    r2 = v.get_registers()
    assert (r2["rbx"], r2["ds"], r2["ds_base"], r2["idt_limit"]) == (0x1234, 0x40, 0x400, 0x3FF)
    assert r2["rip"] == r["rip"]
    with pytest.raises(KeyError):
        v.set_registers({"xmm0": 1})


PLATFORM_PROG = asm(
    "B0 34", "E6 70",        # mov al, 0x34; out 0x70, al   (CMOS index)
    "E4 71",                 # in al, 0x71
    "A2 00 10",              # mov [0x1000], al
    "BA 08 04",              # mov dx, 0x408                (ACPI PM timer)
    "66 ED",                 # in eax, dx
    "66 A3 04 10",           # mov [0x1004], eax
    "66 ED",                 # in eax, dx
    "66 A3 08 10",           # mov [0x1008], eax
    "E6 F4",                 # out 0xf4, al
    "EB FE",                 # jmp $
)


def test_platform_devices_are_served_inside_the_backend(make_vm):
    vm = make_vm(PLATFORM_PROG)
    if vm.platform.errors:
        pytest.skip(f"platform models missing: {vm.platform.errors}")
    vm.rtc_write(0x34, 0xA7)
    io = Recorder(vm)
    assert interrupted(run(vm.vcpus()[0], io))
    assert [e for e in io.events if e[2] in (0x70, 0x71, 0x408)] == []
    assert vm.low.buf[0x1000] == 0xA7
    t1 = int.from_bytes(vm.low.buf[0x1004:0x1008], "little")
    t2 = int.from_bytes(vm.low.buf[0x1008:0x100C], "little")
    assert t1 != 0xFFFFFFFF and (t2 - t1) & 0xFFFFFFFF < 3_579_545     # counting, < 1 s apart
    assert set(vm.platform_devices()) == {"vrtc", "vpmtmr", "vhpet"}


def test_destroy_while_a_vcpu_runs(backend):
    vm = backend.create_vm(f"kvm-test-{next(_names)}")
    vm.setup_memory(LOWMEM)
    rom = vm.map_devmem("bootrom", ROM_BASE, ROM_SIZE, readonly=True)
    rom.buf[0xFFF0:0xFFF2] = b"\xEB\xFE"
    v = vm.create_vcpu(0)
    v.reset_to_reset_vector()
    result: list = []
    t = threading.Thread(target=lambda: result.append(v.run(Recorder(vm))), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not v._c.has_thread and time.monotonic() < deadline:
        time.sleep(0.01)
    vm.destroy()
    t.join(5)
    assert not t.is_alive() and result and result[0].reason is ExitReason.SUSPENDED
    v.kick()                                    # a late kick on a closed vCPU is harmless


FB_PROG = asm(
    "B8 00 80", "8E D8",     # mov ax, 0x8000; mov ds, ax
    "A0 00 00",              # mov al, [0]          (gpa 0x80000)
    "BB 00 90", "8E DB",     # mov bx, 0x9000; mov ds, bx
    "8A 26 00 00",           # mov ah, [0]          (gpa 0x90000)
    "31 DB", "8E DB",        # xor bx, bx; mov ds, bx
    "A3 00 10",              # mov [0x1000], ax
    "E6 F4",                 # out 0xf4, al
    "EB FE",                 # jmp $
)


def test_devmem_moves_with_its_contents(make_vm):
    vm = make_vm(FB_PROG)
    fb = vm.map_devmem("framebuffer", 0x80000, 0x10000, readonly=False)
    fb.buf[0] = 0x42
    v = vm.vcpus()[0]
    io = Recorder(vm, mmio_values={0x80000: 0x11, 0x90000: 0x99})
    assert interrupted(run(v, io))
    assert bytes(vm.low.buf[0x1000:0x1002]) == b"\x42\x99"        # fb at 0x80000, MMIO at 0x90000
    moved = vm.map_devmem("framebuffer", 0x90000, 0x10000, readonly=False)
    assert moved.buf[0] == 0x42 and moved.gpa == 0x90000
    v.reset_to_reset_vector()
    assert interrupted(run(v, io))
    assert bytes(vm.low.buf[0x1000:0x1002]) == b"\x11\x42"        # and now the other way round
    vm.unmap_devmem("framebuffer")
    assert "framebuffer" not in [r.name for r in vm.memory_regions()]
    with pytest.raises(ValueError, match="TSS"):
        vm.map_devmem("oprom", kvmmod.TSS_ADDR, 0x1000, readonly=True)


def test_kick_during_in_leaves_a_consistent_state(make_vm):
    """A kick that lands while the handler answers an IN: run() returns only
    after KVM has completed the instruction, so registers are consistent for a
    checkpoint taken right then."""
    vm = make_vm(IN_PROG)
    v = vm.vcpus()[0]

    class KickOnIn(Recorder):
        def pio_in(self, vcpu, port, size):
            value = super().pio_in(vcpu, port, size)
            if port == 0x60:
                v.kick()
            return value

    io = KickOnIn(vm, in_values={(0x60, 1): 0x5A})
    assert interrupted(run(v, io))
    r = v.get_registers()
    assert r["rax"] & 0xFF == 0x5A and r["rip"] == 2        # IN retired, nothing after it ran
    assert io.outs() == []


def test_backend_reports_a_missing_binding():
    import subprocess
    import sys
    code = ("import sys; sys.modules['bhyvepy.vmm._kvm_ffi'] = None\n"
            "from bhyvepy.vmm.kvm import KvmBackend\n"
            "ok, why = KvmBackend.available(); print(ok); print(why)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ok, why = out.stdout.splitlines()[:2]
    assert ok == "False" and "kvm_build.py" in why


def memfds(vmname: str) -> list[str]:
    """This process's open memfds holding guest RAM of VM ``vmname``."""
    import os

    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/memfd:bhyvepy:{vmname}:"):
            out.append(target)
    return out


def test_guest_ram_reports_untouched_memory_as_holes(backend):
    """RAM is a memfd: pages never touched are holes (found without touching
    them), written ones are data, highmem included; device memory cannot tell."""
    PAGE = 4096
    vm = backend.create_vm(f"kvm-test-{next(_names)}")
    try:
        low, high = vm.setup_memory((3 << 30) + (16 << 20))
        assert low.data_extents() == [] and high.data_extents() == []
        low.buf[5 * PAGE + 7] = 1
        low.buf[(2 << 30) - 1] = 2
        high.buf[0:3] = b"abc"
        assert low.data_extents() == [(5 * PAGE, PAGE), ((2 << 30) - PAGE, PAGE)]
        assert high.data_extents() == [(0, PAGE)]
        low.buf[5 * PAGE + 7] = 0            # zeroed by the guest: still data (the scan's job)
        assert low.data_extents()[0] == (5 * PAGE, PAGE)
        fb = vm.map_devmem("fb", 0xD0000000, 1 << 20, readonly=False)
        assert fb.data_extents() is None
        assert len({t.split(":")[-1] for t in memfds(vm.name)}) == 2    # lowmem, highmem
    finally:
        vm.destroy()
    assert memfds(vm.name) == []                  # destroying the VM frees its RAM
    with pytest.raises(ValueError):
        low.data_extents()


def test_guest_written_pages_are_data_and_a_snapshot_leaves_holes_alone(make_vm, tmp_path):
    """A page written by the guest itself (through KVM, not the host mapping)
    is reported; writing a snapshot with the extents allocates no hole."""
    from bhyvepy.snapshot.fileformat import MemRegion, read_snapshot, write_snapshot

    code = asm("B8 00 30", "8E D8",        # mov ax, 0x3000 ; mov ds, ax
               "C6 06 10 00 5A",           # mov byte [0x10], 0x5A  -> gpa 0x30010
               "E6 F4")                    # out 0xF4, al (stop)
    vm = make_vm(code)
    assert vm.low.data_extents() == []
    assert interrupted(run(vm.vcpus()[0], Recorder(vm)))
    extents = vm.low.data_extents()
    assert extents == [(0x30000, 4096)]
    meta = {"basic metadata": {"ncpus": 1, "vmname": "t", "memflags": 0}, "backend": "kvm",
            "host": {}, "config": {}}
    path = tmp_path / "g.ckp"
    write_snapshot(path, metadata=meta, kern_structs=[], devices=[],
                   memory=[MemRegion(vm.low.gpa, vm.low.buf, extents)])
    assert vm.low.data_extents() == extents
    with read_snapshot(path) as s:
        assert s.memory[0].extents == ((0x30000, 4096),)
