"""The FreeBSD backend's exit translation and error handling, on Linux.

Driven by :class:`vmmapi_fake.FakeLibvmmapi`, a recorded-call test double
of the cffi ``lib`` (the ``ffi`` is a real cffi FFI with the binding's
types).  Each test scripts what libvmmapi returns and asserts the calls the
backend makes and the VmExit or exception it produces.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import pytest

from bhyvepy.errors import BhyveExit, ExitStatus
from bhyvepy.vmm import BOOTROM_SEG_SIZE, HIGHMEM_BASE, KERNEL_SECTIONS, Topology
from bhyvepy.vmm.exits import ExitReason, SuspendHow
from bhyvepy.vmm.vmmapi import (
    SNAPSHOT_BUFFER_SIZE, STRING_IO_BATCH, SnapshotUnsupported, VmmapiBackend, read_sysctl,
)
from conftest_vmm import FREEBSD_VMM_REASON, freebsd_vmm_status, vmm_backend  # noqa: F401 (fixture)
from vmmapi_fake import REAL_VALUES as V
from vmmapi_fake import FakeLibvmmapi, FakeScriptExhausted, make_fake_ffi

R = {n[len("VM_REG_GUEST_"):]: v for n, v in V.items() if n.startswith("VM_REG_GUEST_")}
FFI = {f: make_fake_ffi(f) for f in ("14", "15")}


class FakeIo:
    """IoHandler that records accesses and answers reads from a table."""

    def __init__(self, reads: dict[tuple[str, int], int] | None = None) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.reads = reads or {}

    def pio_in(self, vcpu: int, port: int, size: int) -> int:
        self.log.append(("in", vcpu, port, size))
        return self.reads.get(("pio", port), 0xFFFFFFFF)

    def pio_out(self, vcpu: int, port: int, size: int, value: int) -> None:
        self.log.append(("out", vcpu, port, size, value))

    def mmio_read(self, vcpu: int, gpa: int, size: int) -> int:
        self.log.append(("mmio_read", vcpu, gpa, size))
        return self.reads.get(("mmio", gpa), 0)

    def mmio_write(self, vcpu: int, gpa: int, size: int, value: int) -> None:
        self.log.append(("mmio_write", vcpu, gpa, size, value))


def fake(flavour: str = "15", **kw: Any) -> tuple[VmmapiBackend, FakeLibvmmapi]:
    lib = FakeLibvmmapi(FFI[flavour], flavour=flavour, **kw)
    return VmmapiBackend(ffi=FFI[flavour], lib=lib), lib


def running_vm(ncpus: int = 1, mem: int = 1 << 20, **kw: Any):
    """A created VM with memory and vCPUs, call log cleared."""
    backend, lib = fake(**kw)
    vm = backend.create_vm("guest0")
    vm.set_topology(Topology(cpus=ncpus, sockets=ncpus))
    vm.setup_memory(mem)
    vcpus = [vm.create_vcpu(i) for i in range(ncpus)]
    lib.calls.clear()
    return vm, vcpus, lib


def end_with(lib: FakeLibvmmapi, how: str = "POWEROFF") -> None:
    lib.queue_exit("SUSPENDED", suspended={"how": V["VM_SUSPEND_" + how]})


# --- availability / sysctl -------------------------------------------------------------

@pytest.mark.skipif(sys.platform.startswith("freebsd"), reason="checks the non-FreeBSD answer")
def test_unavailable_off_freebsd() -> None:
    ok, why = VmmapiBackend.available()
    assert not ok and "FreeBSD" in why
    assert read_sysctl("kern.osreldate") is None


# --- open / create (bhyve's do_open) -----------------------------------------------------

def test_15_create_reinit_then_create_on_enoent() -> None:
    b, lib = fake("15")
    lib.fail("vm_openf", errno.ENOENT)
    vm = b.create_vm("guest0")
    assert lib.calls == [("vm_openf", "guest0", V["VMMAPI_OPEN_REINIT"]),
                         ("vm_openf", "guest0", V["VMMAPI_OPEN_CREATE"])]
    assert vm.name == "guest0" and vm.kernel_emulates_platform


def test_15_create_existing_is_reinitialised_in_one_call() -> None:
    b, lib = fake("15")
    b.create_vm("guest0")
    assert lib.calls == [("vm_openf", "guest0", V["VMMAPI_OPEN_REINIT"])]


@pytest.mark.parametrize("err,text", [(errno.EACCES, "Permission denied"), (errno.EINVAL, "Invalid argument")])
def test_15_create_other_errno_exits_4(err: int, text: str) -> None:
    b, lib = fake("15")
    lib.fail("vm_openf", err)
    with pytest.raises(BhyveExit) as ei:
        b.create_vm("guest0")
    assert ei.value.message == f"vm_openf: {text}" and ei.value.status == 4
    assert len(lib.calls) == 1


def test_15_create_fails_after_enoent() -> None:
    b, lib = fake("15")
    lib.fail("vm_openf", errno.ENOENT)
    lib.fail("vm_openf", errno.EEXIST)
    with pytest.raises(BhyveExit, match="^vm_openf: File exists$"):
        b.create_vm("guest0")


def test_15_open_without_bootrom_enoent() -> None:
    b, lib = fake("15")
    lib.fail("vm_openf", errno.ENOENT)
    with pytest.raises(BhyveExit) as ei:
        b.open_vm("guest0")
    assert (ei.value.message, ei.value.status) == ("no bootrom was configured", 4)
    assert lib.calls == [("vm_openf", "guest0", 0)]


def test_15_open_eacces() -> None:
    b, lib = fake("15")
    lib.fail("vm_openf", errno.EACCES)
    with pytest.raises(BhyveExit, match="^vm_openf: Permission denied$"):
        b.open_vm("guest0")


def test_14_create_eexist_reinits() -> None:
    b, lib = fake("14")
    lib.fail("vm_create", errno.EEXIST)
    b.create_vm("guest0")
    assert lib.calls == [("vm_create", "guest0"), ("vm_open", "guest0"), ("vm_reinit",)]


def test_14_create_new_vm_no_reinit() -> None:
    b, lib = fake("14")
    b.create_vm("guest0")
    assert lib.names() == ["vm_create", "vm_open"]


def test_14_reinit_failure() -> None:
    b, lib = fake("14")
    lib.fail("vm_create", errno.EEXIST)
    lib.fail("vm_reinit", errno.EBUSY)
    with pytest.raises(BhyveExit, match=f"^vm_reinit: {os.strerror(errno.EBUSY)}$"):
        b.create_vm("guest0")
    assert lib.names()[-1] == "vm_close"


def test_14_open_eexist_uses_bhyveload_vm() -> None:
    b, lib = fake("14")
    lib.fail("vm_create", errno.EEXIST)
    b.open_vm("guest0")
    assert lib.names() == ["vm_create", "vm_open"]


def test_14_open_new_vm_cannot_be_booted_and_is_removed() -> None:
    b, lib = fake("14")
    with pytest.raises(BhyveExit) as ei:
        b.open_vm("guest0")
    assert (ei.value.message, ei.value.status) == ("virtual machine cannot be booted", 4)
    assert lib.names() == ["vm_create", "vm_open", "vm_destroy"]


@pytest.mark.parametrize("func,msg", [("vm_create", "vm_create: Permission denied"),
                                      ("vm_open", "vm_open: Permission denied")])
def test_14_errors(func: str, msg: str) -> None:
    b, lib = fake("14")
    if func == "vm_open":
        lib.fail("vm_create", errno.EEXIST)
    lib.fail(func, errno.EACCES)
    with pytest.raises(BhyveExit) as ei:
        b.open_vm("guest0")
    assert (ei.value.message, ei.value.status) == (msg, 4)


def test_bad_vm_name() -> None:
    b, lib = fake()
    with pytest.raises(BhyveExit, match="invalid VM name"):
        b.create_vm("a/b")
    assert lib.calls == []


# --- topology, memory, devmem ----------------------------------------------------------------

def test_topology_failure_is_ex_oserr() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    lib.fail("vm_set_topology", errno.EINVAL)
    with pytest.raises(BhyveExit) as ei:
        vm.set_topology(Topology(cpus=2, sockets=2))
    assert (ei.value.message, ei.value.status) == ("vm_set_topology", ExitStatus.EX_OSERR)


def test_topology_vcpu_limit() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    lib.topology = (1, 1, 1, 2)
    with pytest.raises(BhyveExit) as ei:
        vm.set_topology(Topology(cpus=3, sockets=3))
    assert (ei.value.message, ei.value.status) == ("3 vCPUs requested but only 2 available", 4)
    assert ("vm_set_topology", 3, 1, 1, 0) in lib.calls


def test_topology_without_unrestricted_guest_allows_one() -> None:
    b, lib = fake()
    lib.caps_supported.discard(V["VM_CAP_UNRESTRICTED_GUEST"])
    vm = b.create_vm("g")
    vm.set_topology(Topology(cpus=1))
    with pytest.raises(BhyveExit, match="2 vCPUs requested but only 1 available"):
        vm.set_topology(Topology(cpus=2, sockets=2))


def test_memory_flags_and_host_buffer() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    regions = vm.setup_memory(2 << 20, wired=True, in_core=True)
    assert ("vm_set_memflags", V["VM_MEM_F_WIRED"] | V["VM_MEM_F_INCORE"]) in lib.calls
    assert ("vm_setup_memory", 2 << 20, V["VM_MMAP_ALL"]) in lib.calls
    assert [(r.name, r.gpa, r.size, r.is_ram) for r in regions] == [("lowmem", 0, 2 << 20, True)]
    memoryview(regions[0].buf)[0x1000:0x1004] = b"\x01\x02\x03\x04"
    assert bytes(lib._ram[0x1000:0x1004]) == b"\x01\x02\x03\x04"


def test_highmem_region_at_4g() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    lib.mem_layout = (1 << 20, 2 << 20)
    regions = vm.setup_memory((3 << 30) + (2 << 20))
    assert [(r.name, r.gpa, r.size) for r in regions] == [("lowmem", 0, 1 << 20),
                                                          ("highmem", HIGHMEM_BASE, 2 << 20)]
    assert lib.calls_to("vm_map_gpa") == [(0, 1 << 20), (HIGHMEM_BASE, 2 << 20)]
    memoryview(regions[1].buf)[5] = 0x77
    assert lib._high[5] == 0x77


def test_memory_setup_failure() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    lib.fail("vm_setup_memory", errno.ENOMEM)
    with pytest.raises(BhyveExit) as ei:
        vm.setup_memory(1 << 20)
    assert (ei.value.message, ei.value.status) == (f"Unable to setup memory ({errno.ENOMEM})", 4)


def test_bootrom_and_vars_share_the_bootrom_segment() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    rom = vm.map_devmem("bootrom", HIGHMEM_BASE - 0x10000, 0x10000, readonly=True)
    var = vm.map_devmem("bootvars", HIGHMEM_BASE - 0x12000, 0x2000, readonly=False)
    assert lib.calls_to("vm_create_devmem") == [(V["VM_BOOTROM"], "bootrom", BOOTROM_SEG_SIZE)]
    ro, rw = V["PROT_READ"] | V["PROT_EXEC"], V["PROT_READ"] | V["PROT_EXEC"] | V["PROT_WRITE"]
    assert lib.calls_to("vm_mmap_memseg") == [
        (HIGHMEM_BASE - 0x10000, V["VM_BOOTROM"], BOOTROM_SEG_SIZE - 0x10000, 0x10000, ro),
        (HIGHMEM_BASE - 0x12000, V["VM_BOOTROM"], BOOTROM_SEG_SIZE - 0x12000, 0x2000, rw)]
    memoryview(rom.buf)[-1] = 0xAA
    memoryview(var.buf)[0] = 0x55
    seg = lib._keep[0]
    assert seg[BOOTROM_SEG_SIZE - 1] == 0xAA and seg[BOOTROM_SEG_SIZE - 0x12000] == 0x55
    assert not rom.is_ram and rom.readonly and not var.readonly
    assert {r.name for r in vm.memory_regions()} == {"bootrom", "bootvars"}


def test_framebuffer_remap_moves_the_mapping() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    vm.map_devmem("framebuffer", 0xC0000000, 0x100000, readonly=False)
    vm.map_devmem("framebuffer", 0xD0000000, 0x100000, readonly=False)
    assert lib.calls_to("vm_create_devmem") == [(V["VM_FRAMEBUFFER"], "framebuffer", 0x100000)]
    assert lib.calls_to("vm_munmap_memseg") == [(0xC0000000, 0x100000)]
    assert [c[0] for c in lib.calls_to("vm_mmap_memseg")] == [0xC0000000, 0xD0000000]


def test_devmem_errors() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    lib.fail("vm_create_devmem", errno.ENOMEM)
    with pytest.raises(BhyveExit, match="^bootrom: vm_create_devmem: Cannot allocate memory$"):
        vm.map_devmem("bootrom", HIGHMEM_BASE - 0x1000, 0x1000, readonly=True)
    with pytest.raises(BhyveExit, match="No room"):
        vm.map_devmem("bootrom", HIGHMEM_BASE - BOOTROM_SEG_SIZE - 0x1000, 0x2000, readonly=True)
    with pytest.raises(ValueError):
        vm.map_devmem("framebuffer", 0xC0000000, 100, readonly=False)


# --- vCPU creation / capabilities / registers -------------------------------------------------

def test_create_vcpu_sequence() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    vm.create_vcpu(0)
    vm.create_vcpu(1)
    bsp = [c for c in lib.calls if c[0] != "vm_vcpu_open" and c[1] == 0]
    ap = [c for c in lib.calls if c[0] != "vm_vcpu_open" and c[1] == 1]
    assert bsp == [("vm_set_x2apic_state", 0, V["X2APIC_DISABLED"]),
                   ("vm_set_capability", 0, V["VM_CAP_ENABLE_INVPCID"], 1),
                   ("vm_set_capability", 0, V["VM_CAP_IPI_EXIT"], 1),
                   ("vm_activate_cpu", 0), ("vm_suspend_cpu", 0)]
    assert ("vm_set_capability", 1, V["VM_CAP_UNRESTRICTED_GUEST"], 1) in ap
    assert ap[-2:] == [("vm_activate_cpu", 1), ("vm_suspend_cpu", 1)]
    with pytest.raises(ValueError):
        vm.create_vcpu(1)


def test_create_vcpu_errors() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    lib.fail("vm_set_x2apic_state", errno.EINVAL)
    with pytest.raises(BhyveExit, match=r"^Unable to set x2apic state \(-1\)$"):
        vm.create_vcpu(0)
    lib.fail("vm_activate_cpu", errno.EBUSY)
    with pytest.raises(BhyveExit) as ei:
        vm.create_vcpu(0)
    assert (ei.value.message, ei.value.status) == (f"could not activate CPU 0: {os.strerror(errno.EBUSY)}", 71)


def test_capabilities_are_probed_remembered_and_applied() -> None:
    b, lib = fake()
    vm = b.create_vm("g")
    assert vm.set_capability("hlt_exit", True)
    assert ("vm_get_capability", 0, V["VM_CAP_HALT_EXIT"]) in lib.calls
    assert vm.set_capability("x2apic", True)
    lib.caps_supported.discard(V["VM_CAP_PAUSE_EXIT"])
    assert not vm.set_capability("pause_exit", True)
    assert not vm.set_capability("no_such_cap", True)
    lib.calls.clear()
    vm.create_vcpu(0)
    assert ("vm_set_capability", 0, V["VM_CAP_HALT_EXIT"], 1) in lib.calls
    assert ("vm_set_x2apic_state", 0, V["X2APIC_ENABLED"]) in lib.calls
    assert not any(c[:3] == ("vm_set_capability", 0, V["VM_CAP_PAUSE_EXIT"]) for c in lib.calls)


def test_registers_round_trip() -> None:
    vm, (v,), lib = running_vm()
    lib.descs[0][R["CS"]] = (0xF0000, 0xFFFF, 0x9B)
    v.set_registers({"rax": 7, "rip": 0xFFF0, "cs": 0xF000, "cs_base": 0xFFFF0000, "gdt_limit": 0x27})
    (sets,) = lib.calls_to("vm_set_register_set")
    assert sets == (0, {R["RAX"]: 7, R["RIP"]: 0xFFF0, R["CS"]: 0xF000})
    assert (0, R["CS"], 0xFFFF0000, 0xFFFF, 0x9B) in lib.calls_to("vm_set_desc")
    regs = v.get_registers()
    assert (regs["rax"], regs["rip"], regs["cs"], regs["cs_base"], regs["cs_access"]) == \
        (7, 0xFFF0, 0xF000, 0xFFFF0000, 0x9B)
    assert regs["gdt_limit"] == 0x27
    with pytest.raises(KeyError):
        v.set_registers({"xmm0": 1})


def test_reset_vector_needs_unrestricted_guest() -> None:
    vm, (v,), lib = running_vm()
    v.reset_to_reset_vector()
    assert lib.calls == [("vm_set_capability", 0, V["VM_CAP_UNRESTRICTED_GUEST"], 1), ("vcpu_reset", 0)]
    lib.caps_supported.discard(V["VM_CAP_UNRESTRICTED_GUEST"])
    with pytest.raises(BhyveExit) as ei:
        v.reset_to_reset_vector()
    assert ei.value.status == 4
    assert ei.value.message.startswith("ROM boot failed: unrestricted guest capability not available")


# --- interrupts, RTC, suspend, destroy -------------------------------------------------------------

def test_interrupt_and_rtc_calls() -> None:
    vm, _, lib = running_vm()
    vm.ioapic_assert(16)
    vm.ioapic_deassert(16)
    vm.ioapic_pulse(17)
    vm.isa_assert(4, 4)
    vm.isa_deassert(4, 4)
    vm.isa_pulse(1, -1)
    vm.lapic_msi(0xFEE00000, 0x4041)
    vm.inject_nmi(0)
    vm.rtc_write(0x34, 0x1FF)
    assert vm.rtc_read(0x34) == 0xFF
    vm.rtc_settime(1_700_000_000)
    assert lib.calls == [
        ("vm_ioapic_assert_irq", 16), ("vm_ioapic_deassert_irq", 16), ("vm_ioapic_pulse_irq", 17),
        ("vm_isa_assert_irq", 4, 4), ("vm_isa_deassert_irq", 4, 4), ("vm_isa_pulse_irq", 1, -1),
        ("vm_lapic_msi", 0xFEE00000, 0x4041), ("vm_inject_nmi", 0), ("vm_rtc_write", 0x34, 0xFF),
        ("vm_rtc_read", 0x34), ("vm_rtc_settime", 1_700_000_000)]
    lib.fail("vm_ioapic_assert_irq", errno.EINVAL)
    with pytest.raises(OSError, match="vm_ioapic_assert_irq: Invalid argument"):
        vm.ioapic_assert(99)


@pytest.mark.parametrize("how", list(SuspendHow))
def test_suspend_maps_reasons(how: SuspendHow) -> None:
    vm, _, lib = running_vm()
    vm.suspend(how)
    assert lib.calls == [("vm_suspend", V["VM_SUSPEND_" + how.name])]


def test_destroy_releases_handles() -> None:
    vm, vcpus, lib = running_vm(ncpus=2)
    vm.destroy()
    assert lib.names() == ["vm_vcpu_close", "vm_vcpu_close", "vm_destroy"]
    with pytest.raises(RuntimeError, match="destroyed"):
        vm.ioapic_assert(1)
    vm.destroy()
    vcpus[0].kick()                         # a late kick must not touch the freed handle
    assert vcpus[1].run(FakeIo()).reason is ExitReason.UNHANDLED
    assert lib.names() == ["vm_vcpu_close", "vm_vcpu_close", "vm_destroy"]


# --- run: port I/O ---------------------------------------------------------------------------------

def test_first_run_resumes_bsp_and_out_goes_to_device() -> None:
    vm, (v,), lib = running_vm()
    io = FakeIo()
    lib.queue_exit("INOUT", inst_length=1, inout={"bytes": 1, "in": 0, "port": 0x3F8, "eax": 0x1241})
    end_with(lib)
    ex = v.run(io)
    assert (ex.reason, ex.how) == (ExitReason.SUSPENDED, SuspendHow.POWEROFF)
    assert io.log == [("out", 0, 0x3F8, 1, 0x41)]
    assert lib.names() == ["vm_resume_cpu", "vm_run", "vm_run"]     # the kernel advances RIP


@pytest.mark.parametrize("size,expect", [(1, 0x123456CD), (2, 0x1234ABCD), (4, 0x9876ABCD)])
def test_in_merges_into_eax_and_writes_rax(size: int, expect: int) -> None:
    vm, (v,), lib = running_vm()
    io = FakeIo({("pio", 0x71): 0x9876ABCD & ((1 << 8 * size) - 1)})
    lib.queue_exit("INOUT", inout={"bytes": size, "in": 1, "port": 0x71, "eax": 0x12345678})
    end_with(lib)
    v.run(io)
    assert io.log == [("in", 0, 0x71, size)]
    assert lib.calls_to("vm_set_register") == [(0, R["RAX"], expect)]


def _outs_exit(lib: FakeLibvmmapi, *, count: int, index: int, rep: int = 1, rflags: int = 0x2,
               is_in: int = 0, size: int = 1, mode: str = "64BIT", seg: str = "DS",
               seg_desc: tuple[int, int, int] = (0, 0xFFFFFFFF, 0xC093)) -> None:
    lib.queue_exit("INOUT_STR", inst_length=2, inout_str={
        "inout": {"bytes": size, "in": is_in, "string": 1, "rep": rep, "port": 0xE9, "eax": 0},
        "paging": {"cr3": 0, "cpl": 0, "cpu_mode": V["CPU_MODE_" + mode],
                   "paging_mode": V["PAGING_MODE_FLAT"]},
        "rflags": rflags, "cr0": 0x11, "index": index, "count": count, "addrsize": 8 if mode == "64BIT" else 4,
        "seg_name": R[seg], "seg_desc": {"base": seg_desc[0], "limit": seg_desc[1], "access": seg_desc[2]}})


def test_rep_outsb_walks_guest_memory() -> None:
    vm, (v,), lib = running_vm()
    memoryview(vm.memory_regions()[0].buf)[0x2000:0x2003] = b"abc"
    io = FakeIo()
    _outs_exit(lib, count=3, index=0x2000)
    end_with(lib)
    v.run(io)
    assert io.log == [("out", 0, 0xE9, 1, c) for c in b"abc"]
    assert lib.calls_to("vm_set_register") == [(0, R["RSI"], 0x2003), (0, R["RCX"], 0)]
    assert "vm_restart_instruction" not in lib.names()


def test_rep_insw_backwards_into_memory() -> None:
    vm, (v,), lib = running_vm()
    io = FakeIo({("pio", 0xE9): 0xBEEF})
    _outs_exit(lib, count=2, index=0x3002, is_in=1, size=2, rflags=0x2 | 1 << 10, seg="ES")
    end_with(lib)
    v.run(io)
    assert bytes(memoryview(vm.memory_regions()[0].buf)[0x3000:0x3004]) == b"\xef\xbe\xef\xbe"
    assert lib.calls_to("vm_set_register") == [(0, R["RDI"], 0x2FFE), (0, R["RCX"], 0)]


def test_long_rep_string_io_restarts_the_instruction() -> None:
    vm, (v,), lib = running_vm()
    _outs_exit(lib, count=STRING_IO_BATCH + 44, index=0x1000)
    end_with(lib)
    v.run(FakeIo())
    assert lib.calls_to("vm_set_register")[-1] == (0, R["RCX"], 44)
    assert lib.calls_to("vm_restart_instruction") == [(0,)]


def test_string_io_segment_fault_injects_gp() -> None:
    vm, (v,), lib = running_vm()
    io = FakeIo()
    _outs_exit(lib, count=1, index=0x2000, rep=0, mode="PROTECTED", seg_desc=(0, 0xFFF, 0x4093))
    end_with(lib)
    v.run(io)
    assert io.log == []
    assert lib.calls_to("vm_inject_exception") == [(0, 13, 1, 0, 1)]


def test_string_io_to_non_ram_is_reported() -> None:
    vm, (v,), lib = running_vm()
    _outs_exit(lib, count=1, index=0xE0000000, rep=0)
    ex = v.run(FakeIo())
    assert ex.reason is ExitReason.UNHANDLED and "not guest RAM" in ex.detail


# --- run: MMIO -----------------------------------------------------------------------------------

def _mmio_exit(lib: FakeLibvmmapi, code: bytes, *, gpa: int = 0xFEB00000, decoded: int = 0,
               inst_length: int = 0, rip: int = 0x1000) -> None:
    lib.queue_exit("INST_EMUL", rip=rip, inst_length=inst_length, inst_emul={
        "gpa": gpa, "gla": gpa, "cs_base": 0, "cs_d": 0,
        "paging": {"cr3": 0, "cpl": 0, "cpu_mode": V["CPU_MODE_64BIT"], "paging_mode": V["PAGING_MODE_64"]},
        "vie": {"inst": list(code) + [0x90] * (15 - len(code)), "num_valid": 15, "decoded": decoded}})


def test_mmio_store_and_rip_advance() -> None:
    vm, (v,), lib = running_vm()
    lib.regs[0][R["RAX"]] = 0xFFFF_FFFF_DEADBEEF
    io = FakeIo()
    _mmio_exit(lib, bytes([0x89, 0x03]))            # mov [rbx], eax
    end_with(lib)
    v.run(io)
    assert io.log == [("mmio_write", 0, 0xFEB00000, 4, 0xDEADBEEF)]
    assert lib.calls_to("vm_set_register") == [(0, R["RIP"], 0x1002)]


def test_mmio_load_when_kernel_decoded() -> None:
    vm, (v,), lib = running_vm()
    lib.regs[0][R["RAX"]] = 0xFFFF_FFFF_0000_0000
    io = FakeIo({("mmio", 0xFEB00010): 0x1234})
    _mmio_exit(lib, bytes([0x8B, 0x03]), gpa=0xFEB00010, decoded=1, inst_length=2)   # mov eax, [rbx]
    end_with(lib)
    v.run(io)
    assert io.log == [("mmio_read", 0, 0xFEB00010, 4)]
    assert lib.calls_to("vm_set_register") == [(0, R["RAX"], 0x1234)]     # RIP left to the kernel


def test_mmio_undecodable_instruction() -> None:
    vm, (v,), lib = running_vm()
    _mmio_exit(lib, bytes([0x0F, 0x0B]))            # ud2
    ex = v.run(FakeIo())
    assert ex.reason is ExitReason.UNHANDLED
    assert ex.detail.startswith("Failed to emulate instruction sequence [ 0f0b")
    assert "at 0x1000" in ex.detail and ex.info["gpa"] == 0xFEB00000


def test_mmio_guest_fault_is_injected() -> None:
    vm, (v,), lib = running_vm()
    lib.regs[0][R["RDI"]] = 0x0000_8000_0000_0000   # not canonical
    io = FakeIo()
    _mmio_exit(lib, bytes([0xAA]))                  # stosb
    end_with(lib)
    v.run(io)
    assert io.log == []
    assert lib.calls_to("vm_inject_exception") == [(0, 13, 1, 0, 1)]
    assert (0, R["RIP"], 0x1001) not in lib.calls_to("vm_set_register")


# --- run: lifecycle exits --------------------------------------------------------------------------

@pytest.mark.parametrize("how", list(SuspendHow))
def test_suspended_reasons(how: SuspendHow) -> None:
    vm, (v,), lib = running_vm()
    end_with(lib, how.name)
    ex = v.run(FakeIo())
    assert (ex.reason, ex.how) == (ExitReason.SUSPENDED, how)


def test_suspended_destroy_and_invalid() -> None:
    vm, (v,), lib = running_vm()
    lib.queue_exit("SUSPENDED", suspended={"how": V["VM_SUSPEND_DESTROY"]})
    ex = v.run(FakeIo())
    assert ex.reason is ExitReason.UNHANDLED and ex.info["status"] == 4
    lib.queue_exit("SUSPENDED", suspended={"how": 77})
    ex = v.run(FakeIo())
    assert ex.detail == "vmexit_suspend: invalid reason 77" and ex.info["status"] == 100


@pytest.mark.parametrize("code", ["BOGUS", "REQIDLE", "RENDEZVOUS", "HLT", "PAUSE", "MTRAP"])
def test_exits_that_just_continue(code: str) -> None:
    vm, (v,), lib = running_vm()
    lib.queue_exit(code)
    lib.queue_exit(code)
    end_with(lib, "RESET")
    ex = v.run(FakeIo())
    assert ex.how is SuspendHow.RESET
    assert lib.names().count("vm_run") == 3


def test_debug_exit_returns_debug_unless_kicked() -> None:
    vm, (v,), lib = running_vm()
    lib.queue_exit("DEBUG")
    assert v.run(FakeIo()).reason is ExitReason.DEBUG


def test_kick_during_vm_run_interrupts_and_next_run_resumes() -> None:
    vm, (v,), lib = running_vm()
    lib.queue_exit("HLT")
    lib.queue_exit("DEBUG", during=v.kick)
    assert v.run(FakeIo()).reason is ExitReason.INTERRUPTED
    assert lib.names() == ["vm_resume_cpu", "vm_run", "vm_run", "vm_suspend_cpu"]
    lib.calls.clear()
    end_with(lib)
    assert v.run(FakeIo()).reason is ExitReason.SUSPENDED
    assert lib.names() == ["vm_resume_cpu", "vm_run"]


def test_kick_before_run_returns_without_entering() -> None:
    vm, (v,), lib = running_vm()
    v.kick()
    assert v.run(FakeIo()).reason is ExitReason.INTERRUPTED
    assert "vm_run" not in lib.names()


def test_vmx_failure_details() -> None:
    vm, (v,), lib = running_vm()
    lib.queue_exit("VMX", rip=0xFFF0, inst_length=3, vmx={
        "status": 0, "exit_reason": 33, "exit_qualification": 0x55, "inst_type": 1, "inst_error": 7})
    ex = v.run(FakeIo())
    assert ex.reason is ExitReason.UNHANDLED
    assert {k: ex.info[k] for k in ("status", "exit_reason", "qualification", "inst_type", "inst_error", "rip")} \
        == {"status": 0, "exit_reason": 33, "qualification": 0x55, "inst_type": 1, "inst_error": 7, "rip": 0xFFF0}
    assert "invalid guest state" in ex.detail and "qualification 0x0000000000000055" in ex.detail


def test_svm_failure_details() -> None:
    vm, (v,), lib = running_vm()
    lib.queue_exit("SVM", svm={"exitcode": 0x400, "exitinfo1": 0x11, "exitinfo2": 0xFEE00000})
    ex = v.run(FakeIo())
    assert (ex.info["exitcode"], ex.info["exitinfo1"], ex.info["exitinfo2"]) == (0x400, 0x11, 0xFEE00000)
    assert "reason SVM" in ex.detail


@pytest.mark.parametrize("code", [V["VM_EXITCODE_TASK_SWITCH"], 99])
def test_unknown_exit_code(code: int) -> None:
    vm, (v,), lib = running_vm()
    lib.queue_exit(code)
    ex = v.run(FakeIo())
    assert ex.reason is ExitReason.UNHANDLED
    assert ex.detail == f"vm_loop: unexpected exitcode {code:#x}" and ex.info["status"] == 4


def test_vm_run_errors() -> None:
    vm, (v,), lib = running_vm()
    lib.fail("vm_run", errno.EINTR)
    end_with(lib)
    assert v.run(FakeIo()).reason is ExitReason.SUSPENDED
    lib.fail("vm_run", errno.ENXIO)
    ex = v.run(FakeIo())
    assert ex.reason is ExitReason.UNHANDLED and ex.info["errno"] == errno.ENXIO


# --- run: MSRs ---------------------------------------------------------------------------------------

def test_rdmsr_table_strict_and_lenient() -> None:
    vm, (v,), lib = running_vm()
    lib.queue_exit("RDMSR", msr={"code": 0x3A})           # Intel feature control: locked
    lib.queue_exit("RDMSR", msr={"code": 0x12345})        # unknown: strictmsr injects #GP
    end_with(lib)
    v.run(FakeIo())
    assert lib.calls_to("vm_set_register") == [(0, R["RAX"], 1), (0, R["RDX"], 0)]
    assert lib.calls_to("vm_inject_exception") == [(0, 13, 1, 0, 1)]

    b, lib = fake()
    vm = b.create_vm("g", strict_msr=False)
    v = vm.create_vcpu(0)
    lib.calls.clear()
    lib.queue_exit("RDMSR", msr={"code": 0x12345})
    lib.queue_exit("WRMSR", msr={"code": 0x12345, "wval": 5})
    end_with(lib)
    v.run(FakeIo())
    assert lib.calls_to("vm_set_register") == [(0, R["RAX"], 0), (0, R["RDX"], 0)]
    assert lib.calls_to("vm_inject_exception") == []


def test_wrmsr_strict_and_amd_table() -> None:
    vm, (v,), lib = running_vm(vendor=b"AuthenticAMD")
    lib.queue_exit("WRMSR", msr={"code": 0xC0010015, "wval": 1})    # HWCR: ignored
    lib.queue_exit("WRMSR", msr={"code": 0x3A, "wval": 1})          # Intel-only: #GP on AMD
    lib.queue_exit("RDMSR", msr={"code": 0xC0010114})               # VM_CR: SVM disabled
    end_with(lib)
    v.run(FakeIo())
    assert lib.calls_to("vm_inject_exception") == [(0, 13, 1, 0, 1)]
    assert lib.calls_to("vm_set_register") == [(0, R["RAX"], 0x10), (0, R["RDX"], 0)]


# --- run: INIT / SIPI -------------------------------------------------------------------------------------

def test_init_sipi_starts_the_ap_in_real_mode() -> None:
    vm, (bsp, ap), lib = running_vm(ncpus=2)
    lib.descs[1][R["CS"]] = (0xFFFF0000, 0xFFFF, 0x9B)
    lib.queue_exit("IPI", cpuset=(1,), ipi={"mode": V["APIC_DELMODE_INIT"], "vector": 0})
    lib.queue_exit("IPI", cpuset=(1,), ipi={"mode": V["APIC_DELMODE_STARTUP"], "vector": 0x9F})
    lib.queue_exit("IPI", cpuset=(1,), ipi={"mode": V["APIC_DELMODE_STARTUP"], "vector": 0x9F})
    end_with(lib)
    bsp.run(FakeIo())
    ap_calls = [c for c in lib.calls if len(c) > 1 and c[1] == 1]
    assert ap_calls == [("vcpu_reset", 1), ("vm_set_register", 1, R["RIP"], 0), ("vm_get_desc", 1, R["CS"]),
                        ("vm_set_desc", 1, R["CS"], 0x9F000, 0xFFFF, 0x9B),
                        ("vm_set_register", 1, R["CS"], 0x9F00), ("vm_resume_cpu", 1)]


def test_ap_waits_for_sipi_and_init_parks_it_again() -> None:
    vm, (bsp, ap), lib = running_vm(ncpus=2)
    lib.queue_exit("DEBUG")
    assert ap.run(FakeIo()).reason is ExitReason.DEBUG
    assert lib.names() == ["vm_run"]                       # not resumed: no SIPI yet
    assert ap.spinup(0x8000) is None
    lib.calls.clear()
    lib.queue_exit("IPI", cpuset=(1,), ipi={"mode": V["APIC_DELMODE_INIT"], "vector": 0})
    end_with(lib)
    bsp.run(FakeIo())
    assert ("vm_suspend_cpu", 1) in lib.calls and ap.waiting_for_sipi


def test_spinup_ap_exit_for_old_kernels() -> None:
    vm, (bsp, ap), lib = running_vm(ncpus=2)
    lib.queue_exit("SPINUP_AP", spinup_ap={"vcpu": 1, "rip": 0x10000})
    end_with(lib)
    bsp.run(FakeIo())
    assert ("vm_set_desc", 1, R["CS"], 0x10000, 0xFFFF, 0x93) in lib.calls
    assert ("vm_resume_cpu", 1) in lib.calls


# --- snapshots --------------------------------------------------------------------------------------------

def test_save_kernel_sections() -> None:
    vm, _, lib = running_vm()
    lib.kernel_state = {V["STRUCT_VHPET"]: b"hpet" * 10, V["STRUCT_VM"]: b"\x01" * 300}
    assert vm.save_kernel_section("vhpet") == b"hpet" * 10
    assert vm.save_kernel_section("vm") == b"\x01" * 300
    assert vm.save_kernel_section("vrtc") == b""
    assert lib.calls == [
        ("vm_snapshot_req", "vhpet", V["STRUCT_VHPET"], V["VM_SNAPSHOT_SAVE"], SNAPSHOT_BUFFER_SIZE),
        ("vm_snapshot_req", "vm", V["STRUCT_VM"], V["VM_SNAPSHOT_SAVE"], SNAPSHOT_BUFFER_SIZE),
        ("vm_snapshot_req", "vrtc", V["STRUCT_VRTC"], V["VM_SNAPSHOT_SAVE"], SNAPSHOT_BUFFER_SIZE)]
    with pytest.raises(ValueError):
        vm.save_kernel_section("vmx")


def test_every_kernel_section_has_a_request() -> None:
    vm, _, lib = running_vm()
    for name in KERNEL_SECTIONS:
        vm.save_kernel_section(name)
    assert [c[0] for c in lib.calls_to("vm_snapshot_req")] == list(KERNEL_SECTIONS)


@pytest.mark.parametrize("mode", ["enotty", "absent", "weak-null"])
def test_snapshot_unsupported_is_explained(mode: str) -> None:
    vm, _, lib = running_vm(snapshot=mode)
    with pytest.raises(SnapshotUnsupported) as ei:
        vm.save_kernel_section("vhpet")
    msg = str(ei.value)
    assert "WITH_BHYVE_SNAPSHOT" in msg and "options BHYVE_SNAPSHOT" in msg
    assert msg.startswith("Failed to snapshot struct vhpet")
    with pytest.raises(BhyveExit) as ei2:
        vm.restore_kernel_section("vhpet", b"x")
    assert ei2.value.status == ExitStatus.EX_DATAERR and "BHYVE_SNAPSHOT" in (ei2.value.message or "")


def test_restore_sections_and_time_make_all_vcpus_runnable() -> None:
    vm, (bsp, ap), lib = running_vm(ncpus=2)
    vm.restore_kernel_section("vlapic", b"\x07" * 64)
    assert lib.restored == {V["STRUCT_VLAPIC"]: b"\x07" * 64}
    assert lib.calls_to("vm_snapshot_req") == [("vlapic", V["STRUCT_VLAPIC"], V["VM_SNAPSHOT_RESTORE"], 64)]
    vm.restore_time()
    assert "vm_restore_time" in lib.names()
    lib.calls.clear()
    lib.queue_exit("HLT")
    with pytest.raises(FakeScriptExhausted):
        ap.run(FakeIo())
    assert lib.names()[:2] == ["vm_resume_cpu", "vm_run"]


def test_restore_errors() -> None:
    vm, _, lib = running_vm()
    lib.fail("vm_snapshot_req", errno.EINVAL)
    with pytest.raises(BhyveExit) as ei:
        vm.restore_kernel_section("vm", b"abc")
    assert (ei.value.message, ei.value.status) == ("Failed to restore vm: Invalid argument", 65)
    lib.fail("vm_restore_time", errno.EINVAL)
    with pytest.raises(BhyveExit) as ei:
        vm.restore_time()
    assert (ei.value.message, ei.value.status) == ("Unable to restore time: Invalid argument", 71)


# --- on a real FreeBSD host ----------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform.startswith("freebsd"), reason="checks the non-FreeBSD answer")
def test_freebsd_vmm_skip_reason_off_freebsd() -> None:
    assert freebsd_vmm_status() == (False, FREEBSD_VMM_REASON)


@pytest.mark.freebsd_vmm
def test_real_vmm_runs_a_reset_vector_program(vmm_backend: VmmapiBackend) -> None:
    """Boot 8 bytes at the reset vector: ``mov al, 'A'; out 0xe9, al; jmp $``."""
    vm = vmm_backend.create_vm(f"bhyvepy-test-{os.getpid()}")
    try:
        vm.set_topology(Topology(cpus=1))
        ram = vm.setup_memory(16 << 20)
        assert ram[0].size == 16 << 20
        rom = vm.map_devmem("bootrom", HIGHMEM_BASE - 0x1000, 0x1000, readonly=True)
        memoryview(rom.buf)[0xFF0:0xFF6] = bytes([0xB0, 0x41, 0xE6, 0xE9, 0xEB, 0xFE])
        v = vm.create_vcpu(0)
        v.reset_to_reset_vector()

        class KickOnOut(FakeIo):
            def pio_out(self, vcpu: int, port: int, size: int, value: int) -> None:
                super().pio_out(vcpu, port, size, value)
                v.kick()

        io = KickOnOut()
        assert v.run(io).reason is ExitReason.INTERRUPTED
        assert io.log == [("out", 0, 0xE9, 1, 0x41)]
        vm.suspend(SuspendHow.POWEROFF)
        ex = v.run(io)
        assert (ex.reason, ex.how) == (ExitReason.SUSPENDED, SuspendHow.POWEROFF)
    finally:
        vm.destroy()
