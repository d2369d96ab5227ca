"""Test double of the compiled libvmmapi binding, for running the FreeBSD
backend's logic on Linux.

:class:`FakeLibvmmapi` stands in for the cffi ``lib`` of
``bhyvepy.vmm._vmmapi_ffi``: every libvmmapi function the backend calls is a
method that records the call in :attr:`FakeLibvmmapi.calls`, can be told to
fail with an errno, and answers from a small scripted model (registers,
descriptors, scripted ``vm_run`` exits, memory, snapshot records).  It is
*not* a model of vmm.ko; it only lets tests assert which calls the backend
makes and what it returns for each exit and error.

:func:`make_fake_ffi` is the matching ``ffi``: a real cffi ``FFI`` in ABI
mode whose types are the builder's cdef made concrete (``...`` removed,
constants given the values of the FreeBSD 14 headers), so the backend
reads and writes real cdata structures exactly as it would on FreeBSD.
"""

from __future__ import annotations

import errno
import importlib.util
import re
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import cffi

ROOT = Path(__file__).resolve().parents[2]


def load_builder() -> Any:
    """``libvmmapi_ffi/vmmapi_build.py`` as a module (it is not a package)."""
    path = ROOT / "libvmmapi_ffi" / "vmmapi_build.py"
    spec = importlib.util.spec_from_file_location("bhyvepy_vmmapi_build", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seq(names: str, start: int = 0) -> dict[str, int]:
    return {n: i for i, n in enumerate(names.split(), start)}


#: Values of every constant and enumerator the cdef names, as the FreeBSD
#: 14.x headers define them (x86_64).  test_vmmapi_crosscheck checks this
#: table against the compiler.  Values that live in <vmmapi.h> itself
#: (segment ids, VM_MEM_F_*, VMMAPI_OPEN_*) are the 14.x/15.x header facts.
REAL_VALUES: dict[str, int] = {
    "PROT_READ": 1, "PROT_WRITE": 2, "PROT_EXEC": 4,
    "VM_MEM_F_INCORE": 1, "VM_MEM_F_WIRED": 2,
    "VM_SYSMEM": 0, "VM_BOOTROM": 1, "VM_FRAMEBUFFER": 2, "VM_PCIROM": 3,
    "VM_MAX_NAMELEN": 229, "VM_MIN_NAMELEN": 6, "VIE_INST_SIZE": 15,
    "APIC_DELMODE_INIT": 0x500, "APIC_DELMODE_STARTUP": 0x600,
    "VMMAPI_OPEN_CREATE": 1, "VMMAPI_OPEN_REINIT": 2,
    "VM_SUSPEND_DESTROY": 5,
    "BHYVEPY_MISSING_SNAPSHOT_REQ": 1, "BHYVEPY_MISSING_RESTORE_TIME": 2,
    "BHYVEPY_MISSING_RESTART_INSTRUCTION": 4,
    **_seq("VM_MMAP_NONE VM_MMAP_ALL VM_MMAP_SPARSE"),
    **_seq("VM_SUSPEND_NONE VM_SUSPEND_RESET VM_SUSPEND_POWEROFF VM_SUSPEND_HALT "
           "VM_SUSPEND_TRIPLEFAULT"),
    **{"VM_REG_GUEST_" + n: i for i, n in enumerate(
        "RAX RBX RCX RDX RSI RDI RBP R8 R9 R10 R11 R12 R13 R14 R15 CR0 CR3 CR4 DR7 RSP RIP "
        "RFLAGS ES CS SS DS FS GS LDTR TR IDTR GDTR EFER CR2 PDPTE0 PDPTE1 PDPTE2 PDPTE3 "
        "INTR_SHADOW".split())},
    "VM_REG_LAST": 49,
    **_seq("X2APIC_DISABLED X2APIC_ENABLED"),
    "VM_CAP_HALT_EXIT": 0, "VM_CAP_MTRAP_EXIT": 1, "VM_CAP_PAUSE_EXIT": 2,
    "VM_CAP_UNRESTRICTED_GUEST": 3, "VM_CAP_ENABLE_INVPCID": 4, "VM_CAP_IPI_EXIT": 8,
    **_seq("EDGE_TRIGGER LEVEL_TRIGGER"),
    **_seq("CPU_MODE_REAL CPU_MODE_PROTECTED CPU_MODE_COMPATIBILITY CPU_MODE_64BIT"),
    **_seq("PAGING_MODE_FLAT PAGING_MODE_32 PAGING_MODE_PAE PAGING_MODE_64"),
    **{"VM_EXITCODE_" + n: i for i, n in enumerate(
        "INOUT VMX BOGUS RDMSR WRMSR HLT MTRAP PAUSE PAGING INST_EMUL SPINUP_AP DEPRECATED1 "
        "RENDEZVOUS IOAPIC_EOI SUSPENDED INOUT_STR TASK_SWITCH MONITOR MWAIT SVM REQIDLE DEBUG "
        "VMINSN BPT IPI DB".split())},
    "VM_EXITCODE_MAX": 26,
    **_seq("STRUCT_VIOAPIC STRUCT_VM STRUCT_VLAPIC VM_MEM STRUCT_VHPET STRUCT_VMCX "
           "STRUCT_VATPIC STRUCT_VATPIT STRUCT_VPMTMR STRUCT_VRTC", 1),
    **_seq("VM_SNAPSHOT_SAVE VM_SNAPSHOT_RESTORE"),
}
REAL_VALUES.pop("VM_EXITCODE_DEPRECATED1")
REAL_VALUES.pop("VM_EXITCODE_DB")
for _n in ("PDPTE0", "PDPTE1", "PDPTE2", "PDPTE3"):
    REAL_VALUES.pop("VM_REG_GUEST_" + _n)

_FLAVOUR_ONLY = {"VMMAPI_OPEN_CREATE": "15", "VMMAPI_OPEN_REINIT": "15"}
_FEATURE_ONLY = {"VM_SUSPEND_DESTROY": "suspend_destroy"}


def concrete_cdef(cdef: str) -> str:
    """The builder's API-mode cdef made usable in ABI mode: no ``...``."""
    def typedef(m: re.Match[str]) -> str:
        return f"typedef {'uint64_t' if m.group(1) == 'vm_paddr_t' else 'int64_t'} {m.group(1)};"

    def define(m: re.Match[str]) -> str:
        return f"#define {m.group(1)} {REAL_VALUES[m.group(1)]}"

    def enum(m: re.Match[str]) -> str:
        names = [n.strip() for n in m.group(2).split(",") if n.strip() and n.strip() != "..."]
        return f"enum {m.group(1)} {{ " + ", ".join(f"{n} = {REAL_VALUES[n]}" for n in names) + " };"

    out = re.sub(r"typedef int\.\.\. (\w+);", typedef, cdef)
    out = out.replace("typedef struct { ...; } cpuset_t;", "typedef struct { uint64_t bits[16]; } cpuset_t;")
    out = re.sub(r"#define (\w+) \.\.\.", define, out)
    out = re.sub(r"enum (\w+) \{([^}]*)\};", enum, out)
    return out.replace("...;", "")


def make_fake_ffi(flavour: str = "15", features: frozenset[str] = frozenset({"suspend_destroy"})) -> cffi.FFI:
    """A real ``cffi.FFI`` (ABI mode) with the binding's types, for the test double."""
    vb = load_builder()
    ffi = cffi.FFI()
    ffi.cdef(concrete_cdef(vb.cdef_text(flavour, features)))
    return ffi


class FakeScriptExhausted(AssertionError):
    """The backend called vm_run more often than the test scripted exits."""


class FakeLibvmmapi:
    """Recorded-call test double of the libvmmapi cffi ``lib`` (see module doc).

    ``flavour`` "15" offers ``vm_openf``; "14" only ``vm_create``/``vm_open``.
    ``snapshot`` is "ok", "enotty" (kernel without BHYVE_SNAPSHOT), "absent"
    (functions not in the binding at all) or "weak-null" (declared, but the
    library lacks the symbols).
    """

    CTX = 0x1000
    VCPU_BASE = 0x100

    def __init__(self, ffi: cffi.FFI, *, flavour: str = "15", snapshot: str = "ok",
                 features: frozenset[str] = frozenset({"suspend_destroy"}), vendor: bytes = b"GenuineIntel") -> None:
        self._ffi = ffi
        self._flavour = flavour
        self._features = features
        self._snapshot = snapshot
        self._vendor = vendor
        self.calls: list[tuple[Any, ...]] = []
        self._fail: dict[str, deque[int]] = defaultdict(deque)
        self.exits: deque[dict[str, Any]] = deque()
        self.regs: dict[int, dict[int, int]] = defaultdict(dict)
        self.descs: dict[int, dict[int, tuple[int, int, int]]] = defaultdict(dict)
        self.caps_supported = {REAL_VALUES[n] for n in (
            "VM_CAP_HALT_EXIT", "VM_CAP_PAUSE_EXIT", "VM_CAP_UNRESTRICTED_GUEST",
            "VM_CAP_ENABLE_INVPCID", "VM_CAP_IPI_EXIT")}
        self.topology = (1, 1, 1, 16)
        self.lowmem = self.highmem = 0
        #: (lowmem, highmem) vm_setup_memory reports instead of the real split.
        self.mem_layout: tuple[int, int] | None = None
        self._keep: list[Any] = []
        self.kernel_state: dict[int, bytes] = {}
        self.restored: dict[int, bytes] = {}
        self.rtc: dict[int, int] = {}
        if flavour == "15":
            self.vm_openf = self._vm_openf
        if snapshot != "absent":
            self.vm_snapshot_req = self._vm_snapshot_req
            self.vm_restore_time = self._vm_restore_time

    # --- constants ----------------------------------------------------------------
    def __getattr__(self, name: str) -> int:
        if name in REAL_VALUES:
            if _FLAVOUR_ONLY.get(name, self._flavour) != self._flavour:
                raise AttributeError(name)
            if name in _FEATURE_ONLY and _FEATURE_ONLY[name] not in self._features:
                raise AttributeError(name)
            return REAL_VALUES[name]
        raise AttributeError(name)

    # --- scripting ----------------------------------------------------------------
    def fail(self, func: str, err: int, times: int = 1) -> None:
        """Make the next ``times`` calls of ``func`` fail with ``err``."""
        self._fail[func].extend([err] * times)

    def queue_exit(self, exitcode: str | int, *, rip: int = 0x1000, inst_length: int = 0,
                   cpuset: tuple[int, ...] = (), during: Any = None, **u: dict[str, Any]) -> None:
        """Script the next vm_run: ``queue_exit("INOUT", inout={...})``.

        ``during`` is called inside that vm_run, as if another thread acted
        while the vCPU was in the kernel (a kick)."""
        code = REAL_VALUES["VM_EXITCODE_" + exitcode] if isinstance(exitcode, str) else exitcode
        self.exits.append(dict(exitcode=code, rip=rip, inst_length=inst_length,
                               cpuset=cpuset, during=during, u=u))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def calls_to(self, name: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == name]

    # --- plumbing -------------------------------------------------------------------
    def _failing(self, name: str) -> bool:
        q = self._fail.get(name)
        if q:
            self._ffi.errno = q.popleft()
            return True
        return False

    def _vid(self, h: Any) -> int:
        return int(self._ffi.cast("uintptr_t", h)) - self.VCPU_BASE

    def _rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))

    def _int_result(self, name: str, *args: Any) -> int:
        self._rec(name, *args)
        return -1 if self._failing(name) else 0

    # --- lifecycle ----------------------------------------------------------------------
    def _vm_openf(self, name: bytes, flags: int) -> Any:
        self._rec("vm_openf", _text(name), flags)
        if self._failing("vm_openf"):
            return self._ffi.NULL
        return self._ffi.cast("struct vmctx *", self.CTX)

    def vm_create(self, name: bytes) -> int:
        return self._int_result("vm_create", name.decode())

    def vm_open(self, name: bytes) -> Any:
        self._rec("vm_open", name.decode())
        if self._failing("vm_open"):
            return self._ffi.NULL
        return self._ffi.cast("struct vmctx *", self.CTX)

    def vm_reinit(self, ctx: Any) -> int:
        return self._int_result("vm_reinit")

    def vm_close(self, ctx: Any) -> None:
        self._rec("vm_close")

    def vm_destroy(self, ctx: Any) -> None:
        self._rec("vm_destroy")

    def vm_vcpu_open(self, ctx: Any, vcpuid: int) -> Any:
        self._rec("vm_vcpu_open", vcpuid)
        return self._ffi.cast("struct vcpu *", self.VCPU_BASE + vcpuid)

    def vm_vcpu_close(self, vcpu: Any) -> None:
        self._rec("vm_vcpu_close", self._vid(vcpu))

    def vm_set_topology(self, ctx: Any, s: int, c: int, t: int, m: int) -> int:
        return self._int_result("vm_set_topology", s, c, t, m)

    def vm_get_topology(self, ctx: Any, s: Any, c: Any, t: Any, m: Any) -> int:
        s[0], c[0], t[0], m[0] = self.topology
        return self._int_result("vm_get_topology")

    # --- memory -------------------------------------------------------------------------
    def vm_set_memflags(self, ctx: Any, flags: int) -> None:
        self._rec("vm_set_memflags", flags)

    def vm_setup_memory(self, ctx: Any, size: int, style: int) -> int:
        self._rec("vm_setup_memory", size, style)
        if self._failing("vm_setup_memory"):
            return -1
        self.lowmem = min(size, 3 << 30)
        self.highmem = size - self.lowmem
        if self.mem_layout is not None:        # pretend sizes, kept small for tests
            self.lowmem, self.highmem = self.mem_layout
        self._ram = self._ffi.new("uint8_t[]", self.lowmem)
        self._high = self._ffi.new("uint8_t[]", max(self.highmem, 1))
        return 0

    def vm_get_lowmem_size(self, ctx: Any) -> int:
        return self.lowmem

    def vm_get_highmem_size(self, ctx: Any) -> int:
        return self.highmem

    def vm_map_gpa(self, ctx: Any, gpa: int, size: int) -> Any:
        self._rec("vm_map_gpa", gpa, size)
        if gpa + size <= self.lowmem:
            return self._ram + gpa
        if gpa >= 4 << 30 and gpa + size <= (4 << 30) + self.highmem:
            return self._high + (gpa - (4 << 30))
        return self._ffi.NULL

    def vm_create_devmem(self, ctx: Any, segid: int, name: bytes, size: int) -> Any:
        self._rec("vm_create_devmem", segid, _text(name), size)
        if self._failing("vm_create_devmem"):
            return self._ffi.cast("void *", -1)
        seg = self._ffi.new("uint8_t[]", size)
        self._keep.append(seg)
        return seg

    def vm_mmap_memseg(self, ctx: Any, gpa: int, segid: int, segoff: int, size: int, prot: int) -> int:
        return self._int_result("vm_mmap_memseg", gpa, segid, segoff, size, prot)

    def vm_munmap_memseg(self, ctx: Any, gpa: int, size: int) -> int:
        return self._int_result("vm_munmap_memseg", gpa, size)

    # --- vCPUs --------------------------------------------------------------------------
    def vm_activate_cpu(self, vcpu: Any) -> int:
        return self._int_result("vm_activate_cpu", self._vid(vcpu))

    def vm_suspend_cpu(self, vcpu: Any) -> int:
        return self._int_result("vm_suspend_cpu", self._vid(vcpu))

    def vm_resume_cpu(self, vcpu: Any) -> int:
        return self._int_result("vm_resume_cpu", self._vid(vcpu))

    def vm_restart_instruction(self, vcpu: Any) -> int:
        return self._int_result("vm_restart_instruction", self._vid(vcpu))

    def vcpu_reset(self, vcpu: Any) -> int:
        return self._int_result("vcpu_reset", self._vid(vcpu))

    def vm_get_capability(self, vcpu: Any, cap: int, out: Any) -> int:
        self._rec("vm_get_capability", self._vid(vcpu), cap)
        if cap not in self.caps_supported or self._failing("vm_get_capability"):
            self._ffi.errno = errno.ENOENT
            return -1
        out[0] = 0
        return 0

    def vm_set_capability(self, vcpu: Any, cap: int, val: int) -> int:
        self._rec("vm_set_capability", self._vid(vcpu), cap, val)
        if cap not in self.caps_supported or self._failing("vm_set_capability"):
            self._ffi.errno = errno.ENOENT
            return -1
        return 0

    def vm_set_x2apic_state(self, vcpu: Any, state: int) -> int:
        return self._int_result("vm_set_x2apic_state", self._vid(vcpu), state)

    def vm_run(self, vcpu: Any, vmrun: Any) -> int:
        self._rec("vm_run", self._vid(vcpu))
        if self._failing("vm_run"):
            return -1
        if not self.exits:
            raise FakeScriptExhausted("vm_run called with no scripted exit left")
        spec = self.exits.popleft()
        if spec["during"] is not None:
            spec["during"]()
        ffi = self._ffi
        vme = vmrun.vm_exit
        ffi.buffer(vme)[:] = bytes(ffi.sizeof("struct vm_exit"))
        vme.exitcode = spec["exitcode"]
        vme.rip = spec["rip"]
        vme.inst_length = spec["inst_length"]
        for member, fields in spec["u"].items():
            _fill(getattr(vme.u, member), fields)
        mask = 0
        for i in spec["cpuset"]:
            mask |= 1 << i
        n = vmrun.cpusetsize
        ffi.buffer(vmrun.cpuset, n)[:] = mask.to_bytes(n, "little")
        return 0

    # --- registers ----------------------------------------------------------------------
    def vm_get_register(self, vcpu: Any, reg: int, out: Any) -> int:
        self._rec("vm_get_register", self._vid(vcpu), reg)
        out[0] = self.regs[self._vid(vcpu)].get(reg, 0)
        return -1 if self._failing("vm_get_register") else 0

    def vm_set_register(self, vcpu: Any, reg: int, val: int) -> int:
        self._rec("vm_set_register", self._vid(vcpu), reg, val)
        if self._failing("vm_set_register"):
            return -1
        self.regs[self._vid(vcpu)][reg] = val
        return 0

    def vm_get_register_set(self, vcpu: Any, count: int, nums: Any, vals: Any) -> int:
        self._rec("vm_get_register_set", self._vid(vcpu), count)
        for i in range(count):
            vals[i] = self.regs[self._vid(vcpu)].get(nums[i], 0)
        return -1 if self._failing("vm_get_register_set") else 0

    def vm_set_register_set(self, vcpu: Any, count: int, nums: Any, vals: Any) -> int:
        self._rec("vm_set_register_set", self._vid(vcpu), {nums[i]: vals[i] for i in range(count)})
        if self._failing("vm_set_register_set"):
            return -1
        for i in range(count):
            self.regs[self._vid(vcpu)][nums[i]] = vals[i]
        return 0

    def vm_get_desc(self, vcpu: Any, reg: int, base: Any, limit: Any, access: Any) -> int:
        self._rec("vm_get_desc", self._vid(vcpu), reg)
        base[0], limit[0], access[0] = self.descs[self._vid(vcpu)].get(reg, (0, 0xFFFF, 0x93))
        return -1 if self._failing("vm_get_desc") else 0

    def vm_set_desc(self, vcpu: Any, reg: int, base: int, limit: int, access: int) -> int:
        self._rec("vm_set_desc", self._vid(vcpu), reg, base, limit, access)
        if self._failing("vm_set_desc"):
            return -1
        self.descs[self._vid(vcpu)][reg] = (base, limit, access)
        return 0

    # --- interrupts ---------------------------------------------------------------------
    def vm_inject_exception(self, vcpu: Any, vector: int, valid: int, code: int, restart: int) -> int:
        return self._int_result("vm_inject_exception", self._vid(vcpu), vector, valid, code, restart)

    def vm_inject_nmi(self, vcpu: Any) -> int:
        return self._int_result("vm_inject_nmi", self._vid(vcpu))

    def vm_lapic_msi(self, ctx: Any, addr: int, msg: int) -> int:
        return self._int_result("vm_lapic_msi", addr, msg)

    def vm_ioapic_assert_irq(self, ctx: Any, irq: int) -> int:
        return self._int_result("vm_ioapic_assert_irq", irq)

    def vm_ioapic_deassert_irq(self, ctx: Any, irq: int) -> int:
        return self._int_result("vm_ioapic_deassert_irq", irq)

    def vm_ioapic_pulse_irq(self, ctx: Any, irq: int) -> int:
        return self._int_result("vm_ioapic_pulse_irq", irq)

    def vm_isa_assert_irq(self, ctx: Any, atpic: int, ioapic: int) -> int:
        return self._int_result("vm_isa_assert_irq", atpic, ioapic)

    def vm_isa_deassert_irq(self, ctx: Any, atpic: int, ioapic: int) -> int:
        return self._int_result("vm_isa_deassert_irq", atpic, ioapic)

    def vm_isa_pulse_irq(self, ctx: Any, atpic: int, ioapic: int) -> int:
        return self._int_result("vm_isa_pulse_irq", atpic, ioapic)

    def vm_suspend(self, ctx: Any, how: int) -> int:
        return self._int_result("vm_suspend", how)

    # --- RTC ----------------------------------------------------------------------------
    def vm_rtc_write(self, ctx: Any, offset: int, value: int) -> int:
        self.rtc[offset] = value
        return self._int_result("vm_rtc_write", offset, value)

    def vm_rtc_read(self, ctx: Any, offset: int, out: Any) -> int:
        out[0] = self.rtc.get(offset, 0)
        return self._int_result("vm_rtc_read", offset)

    def vm_rtc_settime(self, ctx: Any, secs: int) -> int:
        return self._int_result("vm_rtc_settime", secs)

    # --- snapshots ----------------------------------------------------------------------
    def _vm_snapshot_req(self, ctx: Any, meta: Any) -> int:
        ffi = self._ffi
        req, op = int(meta.dev_req), int(meta.op)
        self._rec("vm_snapshot_req", ffi.string(meta.dev_name).decode(), req, op, int(meta.buffer.buf_size))
        if self._snapshot == "enotty":
            ffi.errno = errno.ENOTTY
            return -1
        if self._failing("vm_snapshot_req"):
            return -1
        if op == REAL_VALUES["VM_SNAPSHOT_SAVE"]:
            data = self.kernel_state.get(req, b"")
            if len(data) > meta.buffer.buf_rem:
                ffi.errno = errno.E2BIG
                return -1
            ffi.buffer(meta.buffer.buf, len(data))[:] = data
        else:
            data = bytes(ffi.buffer(meta.buffer.buf, meta.buffer.buf_rem))
            self.restored[req] = data
        meta.buffer.buf = meta.buffer.buf + len(data)
        meta.buffer.buf_rem = meta.buffer.buf_rem - len(data)
        return 0

    def _vm_restore_time(self, ctx: Any) -> int:
        return self._int_result("vm_restore_time")

    def bhyvepy_missing_symbols(self) -> int:
        return 3 if self._snapshot == "weak-null" else 0

    def bhyvepy_cpuid(self, leaf: int, regs: Any) -> None:
        v = self._vendor
        regs[0] = 0x16
        regs[1] = int.from_bytes(v[0:4], "little")
        regs[3] = int.from_bytes(v[4:8], "little")
        regs[2] = int.from_bytes(v[8:12], "little")


def _text(name: Any) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def _fill(obj: Any, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if isinstance(value, dict):
            _fill(getattr(obj, name), value)
        elif isinstance(value, (bytes, list)):
            target = getattr(obj, name)
            for i, b in enumerate(value):
                target[i] = b
        else:
            setattr(obj, name, value)
