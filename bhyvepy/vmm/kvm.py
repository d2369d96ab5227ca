"""Linux KVM backend: the libvmmapi-shaped contract on top of ``/dev/kvm``.

What KVM does differently from vmm.ko, and how this module hides it:

* VMs are anonymous file descriptors, not named kernel objects: a name is a
  label, VMs live in this process, and ``open_vm`` finds only VMs created here.
* The in-kernel irqchip (8259 pair, IOAPIC, LAPIC) and 8254 PIT are KVM's;
  the RTC, ACPI PM timer and HPET are not, so Python models stand in for them
  (``bhyvepy.dev.rtc/pmtmr/hpet``).  Their ports and MMIO window are
  intercepted inside :meth:`KvmVcpu.run` before the caller's IoHandler sees
  the access, and their state is exposed as the ``vrtc``, ``vpmtmr`` and
  ``vhpet`` kernel sections, so nothing above the backend can tell.
* KVM handles HLT in the kernel.  bhyve's "halted with interrupts disabled"
  condition is detected by a per-VM watchdog that looks at vCPUs which stay
  inside ``KVM_RUN`` for long (see :class:`_Watchdog`).
* MMIO instructions are emulated by KVM: the IoHandler sees plain reads and
  writes.  Guest writes to read-only (ROM) slots come back as MMIO writes and
  are dropped here.

Guest-physical placement of KVM's private pages
-----------------------------------------------
On Intel hosts KVM needs a 3-page TSS (``KVM_SET_TSS_ADDR``) and a 1-page
identity-mapped page table (``KVM_SET_IDENTITY_MAP_ADDR``) for real-mode and
unpaged guests.  Both live in guest-physical space and must not overlap
anything bhyve places there.  bhyve uses [0xC0000000, 0xE0000000) for 32-bit
BARs, [0xE0000000, 0xF0000000) for ECAM, 0xFEC00000 (IOAPIC), 0xFED00000
(HPET), 0xFED40000 (TPM CRB), 0xFEE00000 (LAPIC) and [0xFF000000, 4 GiB) for
the boot ROM and its variable store.  We put the identity map at 0xFEFFC000
and the TSS at 0xFEFFD000..0xFF000000: the four pages right below the boot ROM
segment, above everything else bhyve maps in the hole.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

from bhyvepy.errors import BackendUnavailable, BhyveExit, ExitStatus
from bhyvepy.layout import HPET_BASE, HPET_SIZE, PORT_PMTMR, PORT_RTC
from bhyvepy.snapshot.state import (
    U32, U64, Blob, ListOf, Nested, StateError, decode, device_state, encode,
)
from bhyvepy.vmm import (
    BOOTROM_SEG_SIZE, HIGHMEM_BASE, KERNEL_SECTIONS, LOWMEM_LIMIT, Backend, IoHandler,
    MemoryRegion, Topology, Vcpu, VirtualMachine,
)
from bhyvepy.vmm.exits import ExitReason, SuspendHow, VmExit

try:
    from bhyvepy.vmm._kvm_ffi import ffi, lib
    _FFI_ERROR = ""
except ImportError as _e:  # not built, or not Linux
    ffi = lib = None  # type: ignore[assignment]
    _FFI_ERROR = str(_e)

__all__ = ["KvmBackend", "KvmVm", "KvmVcpu", "KvmError", "IDENTITY_MAP_ADDR", "TSS_ADDR"]

KVM_DEVICE = "/dev/kvm"
IDENTITY_MAP_ADDR = (1 << 32) - BOOTROM_SEG_SIZE - 4 * 4096     # 0xFEFFC000, 1 page
TSS_ADDR = IDENTITY_MAP_ADDR + 4096                              # 0xFEFFD000, 3 pages
_KVM_PRIVATE_START, _KVM_PRIVATE_END = IDENTITY_MAP_ADDR, TSS_ADDR + 3 * 4096

# Platform devices KVM lacks: how many ports each answers, and the RTC's IRQ.
RTC_NPORTS = 2
PMTMR_NPORTS = 4
RTC_IRQ = 8

# GSI numbering of our routing table (see KvmVm._set_gsi_routing).
_GSI_PIC_ONLY = 32       # 32 + irq: 8259 input only
_GSI_IOAPIC_ONLY = 48    # 48 + pin: IOAPIC pin only
_IOAPIC_PINS = 24
_PIC_IRQS = 16

_PAGE = mmap.PAGESIZE
_NEG_EINTR, _NEG_EAGAIN = -errno.EINTR, -errno.EAGAIN
_RFLAGS_IF = 1 << 9
#: How long a vCPU may stay inside KVM_RUN before the watchdog looks at it.
WATCHDOG_PERIOD = 0.25
#: How long destroy() waits for vCPU threads to leave run().
DESTROY_WAIT = 5.0

# MSRs not always in KVM_GET_MSR_INDEX_LIST that a snapshot must carry.
_MSR_TSC = 0x10
_MSR_APIC_BASE = 0x1B
_MSR_TSC_DEADLINE = 0x6E0
_EXTRA_MSRS = (
    [0x10, 0x174, 0x175, 0x176, 0x277, 0x2FF, 0x250, 0x258, 0x259]
    + list(range(0x268, 0x270)) + list(range(0x200, 0x210))
    + [0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102, 0xC0000103]
)
# Carried elsewhere (sregs / vlapic section) or not restorable by value.
_SKIP_MSRS = {_MSR_APIC_BASE, 0xC0000080}


# ----------------------------------------------------------------------------
# errors and ioctl plumbing
# ----------------------------------------------------------------------------

class KvmError(OSError):
    """A KVM ioctl failed; ``str()`` is ``"<IOCTL>: <strerror>"``."""

    def __init__(self, what: str, err: int, detail: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.what = what
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.what}: {self.strerror}{extra}"


def _ioctl(fd: int, name: str, arg: Any = None) -> int:
    """ioctl with a pointer argument (or none); raises :class:`KvmError`."""
    r = lib.bhyvepy_ioctl(fd, getattr(lib, name), ffi.NULL if arg is None else arg)
    if r < 0:
        raise KvmError(name, -r)
    return r


def _ioctl_val(fd: int, name: str, value: int = 0) -> int:
    """ioctl with an integer argument; raises :class:`KvmError`."""
    r = lib.bhyvepy_ioctl_val(fd, getattr(lib, name), value)
    if r < 0:
        raise KvmError(name, -r)
    return r


def _check_extension(fd: int, cap: str) -> int:
    r = lib.bhyvepy_ioctl_val(fd, lib.KVM_CHECK_EXTENSION, getattr(lib, cap))
    return r if r > 0 else 0


def _field_struct(ctype: str, *paths: str) -> tuple[struct.Struct, int]:
    """A ``struct.Struct`` that reads the integer members ``paths`` (dotted for
    nested ones, e.g. ``"io.port"``) of ``ctype`` in one call.  The layout comes
    from the compiler's offsets (cffi's ``typeof().fields``), never from
    hand-written numbers.  Returns it and the offset to unpack at.  Used on the
    vCPU hot path, where one ``unpack_from`` costs a tenth of the equivalent
    cffi attribute reads."""
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    fmt, first, pos = "<", None, 0
    for path in paths:
        t, off = ffi.typeof(ctype), 0
        for part in path.split("."):
            f = dict(t.fields)[part]
            off += f.offset
            t = f.type
        size = ffi.sizeof(t)
        if t.kind != "primitive" or size not in codes:
            raise TypeError(f"{ctype}.{path} is not an integer member")
        if first is None:
            first = pos = off
        if off < pos:
            raise TypeError(f"{ctype}.{path}: members must be listed in address order")
        fmt += (f"{off - pos}x" if off > pos else "") + codes[size]
        pos = off + size
    return struct.Struct(fmt), first or 0


def _sizeof(ctype: str, fallback: int) -> int:
    return ffi.sizeof(ctype) if ffi is not None else fallback


def _odd_get(n: int) -> Callable[[Any, int], tuple[int]]:
    return lambda mv, off: (int.from_bytes(mv[off:off + n], "little"),)


def _odd_put(n: int) -> Callable[[Any, int, int], None]:
    def put(mv: Any, off: int, value: int) -> None:
        mv[off:off + n] = value.to_bytes(n, "little")
    return put


#: Little-endian readers/writers of 1..8-byte I/O data, indexed by size.
_GET: list[Callable[..., tuple[int]]] = [_odd_get(n) for n in range(9)]
_PUT: list[Callable[..., None]] = [_odd_put(n) for n in range(9)]
for _n, _code in ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q")):
    _GET[_n] = struct.Struct(_code).unpack_from
    _PUT[_n] = struct.Struct(_code).pack_into

if ffi is not None:
    _IO_EXIT, _IO_EXIT_AT = _field_struct(
        "struct kvm_run", "exit_reason", "io.direction", "io.size", "io.port", "io.count", "io.data_offset")
    _MMIO_EXIT, _MMIO_EXIT_AT = _field_struct("struct kvm_run", "mmio.phys_addr", "mmio.len", "mmio.is_write")


def _raw(cdata: Any, ctype: str) -> bytes:
    return bytes(ffi.buffer(cdata, ffi.sizeof(ctype)))


def _from_raw(ctype: str, data: bytes) -> Any:
    p = ffi.new(ctype + " *")
    ffi.memmove(p, data, ffi.sizeof(ctype))
    return p


# ----------------------------------------------------------------------------
# kernel-section state (declarative; raw KVM structs as fixed-size blobs)
# ----------------------------------------------------------------------------

_MAX_VCPUS = 1024
_LAPIC_SZ = _sizeof("struct kvm_lapic_state", 1024)
_IRQCHIP_SZ = _sizeof("struct kvm_irqchip", 520)
_PIT_SZ = _sizeof("struct kvm_pit_state2", 112)
_REGS_SZ = _sizeof("struct kvm_regs", 144)
_SREGS_SZ = _sizeof("struct kvm_sregs", 312)
_XCRS_SZ = _sizeof("struct kvm_xcrs", 392)
_EVENTS_SZ = _sizeof("struct kvm_vcpu_events", 64)
_DEBUGREGS_SZ = _sizeof("struct kvm_debugregs", 128)
_XSAVE_MIN = _sizeof("struct kvm_xsave", 4096)
_XSAVE_MAX = 1 << 20
#: KVM_MP_STATE_RUNNABLE, UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED.
_X86_MP_STATES = frozenset(range(5))


@device_state("kvm-vm", version=1)
@dataclass
class KvmVmState:
    """KVM's VM-wide clock (kvmclock nanoseconds) and the vCPU count."""
    ncpus: U32 = 0
    clock: U64 = 0
    clock_flags: U32 = 0


@device_state("kvm-ioapic", version=1)
@dataclass
class KvmIoapicState:
    chip: Annotated[bytes, Blob(exact=_IRQCHIP_SZ)] = b"\0" * _IRQCHIP_SZ


@device_state("kvm-atpic", version=1)
@dataclass
class KvmAtpicState:
    master: Annotated[bytes, Blob(exact=_IRQCHIP_SZ)] = b"\0" * _IRQCHIP_SZ
    slave: Annotated[bytes, Blob(exact=_IRQCHIP_SZ)] = b"\0" * _IRQCHIP_SZ


@device_state("kvm-atpit", version=1)
@dataclass
class KvmAtpitState:
    pit: Annotated[bytes, Blob(exact=_PIT_SZ)] = b"\0" * _PIT_SZ


@device_state("kvm-lapic-cpu", version=1)
@dataclass
class KvmLapicCpu:
    apic_base: U64 = 0
    regs: Annotated[bytes, Blob(exact=_LAPIC_SZ)] = b"\0" * _LAPIC_SZ


@device_state("kvm-lapic", version=1)
@dataclass
class KvmLapicState:
    cpus: Annotated[list, ListOf(Nested(cls=KvmLapicCpu), max_len=_MAX_VCPUS)] = field(default_factory=list)


@device_state("kvm-msr", version=1)
@dataclass
class KvmMsr:
    index: U32 = 0
    value: U64 = 0


@device_state("kvm-cpu", version=1)
@dataclass
class KvmCpuState:
    """Everything KVM keeps per vCPU besides the LAPIC (bhyve's VMCS/VMCB + regs)."""
    regs: Annotated[bytes, Blob(exact=_REGS_SZ)] = b"\0" * _REGS_SZ
    sregs: Annotated[bytes, Blob(exact=_SREGS_SZ)] = b"\0" * _SREGS_SZ
    xsave: Annotated[bytes, Blob(max_len=_XSAVE_MAX)] = b"\0" * _XSAVE_MIN
    xcrs: Annotated[bytes, Blob(exact=_XCRS_SZ)] = b"\0" * _XCRS_SZ
    msrs: Annotated[list, ListOf(Nested(cls=KvmMsr), max_len=1024)] = field(default_factory=list)
    events: Annotated[bytes, Blob(exact=_EVENTS_SZ)] = b"\0" * _EVENTS_SZ
    mp_state: U32 = 0
    debugregs: Annotated[bytes, Blob(exact=_DEBUGREGS_SZ)] = b"\0" * _DEBUGREGS_SZ

    def validate(self) -> None:
        if len(self.xsave) < _XSAVE_MIN or len(self.xsave) % 4:
            raise StateError(f"XSAVE area of {len(self.xsave)} bytes is malformed")
        if len({m.index for m in self.msrs}) != len(self.msrs):
            raise StateError("duplicate MSR in vCPU state")
        if self.mp_state not in _X86_MP_STATES:
            raise StateError(f"vCPU MP state {self.mp_state} is not an x86 one")


@device_state("kvm-vmcx", version=1)
@dataclass
class KvmVmcxState:
    cpus: Annotated[list, ListOf(Nested(cls=KvmCpuState), max_len=_MAX_VCPUS)] = field(default_factory=list)


# ----------------------------------------------------------------------------
# backend
# ----------------------------------------------------------------------------

_REQUIRED_CAPS = (
    "KVM_CAP_USER_MEMORY", "KVM_CAP_IRQCHIP", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_SET_IDENTITY_MAP_ADDR",
    "KVM_CAP_PIT2", "KVM_CAP_PIT_STATE2", "KVM_CAP_IRQ_ROUTING", "KVM_CAP_SIGNAL_MSI",
    "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_READONLY_MEM", "KVM_CAP_MP_STATE", "KVM_CAP_VCPU_EVENTS",
    "KVM_CAP_XCRS", "KVM_CAP_DEBUGREGS", "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_EXT_CPUID",
)


def _probe() -> tuple[bool, str]:
    if lib is None:
        return False, (f"the KVM binding is not built ({_FFI_ERROR}); "
                       "build it with: python libvmmapi_ffi/kvm_build.py")
    if not os.path.exists(KVM_DEVICE):
        return False, f"{KVM_DEVICE} does not exist: the kvm module is not loaded or the CPU lacks virtualization"
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return False, f"{KVM_DEVICE}: Permission denied (the user must be allowed to open it, e.g. group kvm)"
    except OSError as e:
        return False, f"{KVM_DEVICE}: {e.strerror}"
    try:
        ver = lib.bhyvepy_ioctl_val(fd, lib.KVM_GET_API_VERSION, 0)
        if ver < 0:
            return False, f"{KVM_DEVICE}: not a KVM device ({os.strerror(-ver)})"
        if ver != lib.KVM_API_VERSION:
            return False, f"{KVM_DEVICE}: KVM API version {ver}, this bhyvepy needs {lib.KVM_API_VERSION}"
        missing = [c[len("KVM_CAP_"):] for c in _REQUIRED_CAPS if not _check_extension(fd, c)]
        if missing:
            return False, f"{KVM_DEVICE}: the kernel lacks KVM capabilities {', '.join(missing)}"
        if not _check_extension(fd, "KVM_CAP_XSAVE"):
            return False, f"{KVM_DEVICE}: the kernel lacks KVM capability XSAVE"
    finally:
        os.close(fd)
    return True, ""


class KvmBackend(Backend):
    """``/dev/kvm``.  One open system fd per backend; VMs live in this process."""

    name = "kvm"
    _live: dict[str, "KvmVm"] = {}
    _live_lock = threading.Lock()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _probe()

    def __init__(self) -> None:
        ok, why = _probe()
        if not ok:
            raise BackendUnavailable(why)
        self.fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        signo = lib.bhyvepy_kick_setup()
        if signo < 0:
            raise KvmError("sigaction", -signo)
        self._cpuid: list[tuple[int, ...]] | None = None
        self._msr_index: list[int] | None = None

    # --- system-wide queries (cached) --------------------------------------
    def supported_cpuid(self) -> list[tuple[int, ...]]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples."""
        if self._cpuid is None:
            n = 128
            while True:
                buf, c = _cpuid2(n)
                r = lib.bhyvepy_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, c)
                if r == -errno.E2BIG and n < 4096:   # more entries than room
                    n *= 2
                    continue
                if r < 0:
                    raise KvmError("KVM_GET_SUPPORTED_CPUID", -r)
                break
            self._cpuid = [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                           for e in (c.entries[i] for i in range(c.nent))]
        return self._cpuid

    def msr_index_list(self) -> list[int]:
        if self._msr_index is None:
            n = 256
            while True:
                buf = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * n)
                ml = ffi.cast("struct kvm_msr_list *", buf)
                ml.nmsrs = n
                r = lib.bhyvepy_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, ml)
                if r == -errno.E2BIG and n < 65536:
                    n = max(n * 2, ml.nmsrs)
                    continue
                if r < 0:
                    raise KvmError("KVM_GET_MSR_INDEX_LIST", -r)
                break
            self._msr_index = [ml.indices[i] for i in range(ml.nmsrs)]
        return self._msr_index

    # --- VMs ----------------------------------------------------------------
    def create_vm(self, name: str, *, reinit: bool = True) -> "KvmVm":
        with self._live_lock:
            old = self._live.get(name)
        if old is not None:
            if not reinit:
                return old
            old.destroy()     # KVM has no in-place reinit: start from a fresh VM
        vm = KvmVm(self, name)
        with self._live_lock:
            self._live[name] = vm
        return vm

    def open_vm(self, name: str) -> "KvmVm":
        with self._live_lock:
            vm = self._live.get(name)
        if vm is None:
            # KVM VMs do not outlive their process, so nothing a bhyveload could
            # have prepared exists; bhyve 15 words a missing VM without a boot
            # ROM this way (exit status 4).
            raise BhyveExit("no bootrom was configured", ExitStatus.ERROR)
        return vm

    def _forget(self, vm: "KvmVm") -> None:
        with self._live_lock:
            if self._live.get(vm.name) is vm:
                del self._live[vm.name]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _cpuid2(n: int) -> tuple[Any, Any]:
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"))
    c = ffi.cast("struct kvm_cpuid2 *", buf)
    c.nent = n
    return buf, c


def _bits(n: int) -> int:
    """Width of an APIC-ID field that holds ``n`` values."""
    return max(0, (n - 1).bit_length())


def build_cpuid(supported: list[tuple[int, ...]], vcpu_id: int, topo: Topology,
                x2apic: bool) -> list[tuple[int, ...]]:
    """Per-vCPU CPUID: KVM's supported leaves with bhyve's APIC ID = vCPU id and
    the topology of ``topo`` in leaves 1, 4, 0xB and the AMD leaves; hypervisor
    bit set; x2APIC only when asked for (bhyve's default is off)."""
    threads, cores = max(1, topo.threads), max(1, topo.cores)
    tbits, cbits = _bits(threads), _bits(cores)
    per_pkg = threads * cores
    apic = vcpu_id
    amd = any(f == 0 and ebx == 0x68747541 for f, _i, _fl, _a, ebx, _c, _d in supported)
    out: list[tuple[int, ...]] = []
    max_basic = next((e[3] for e in supported if e[0] == 0), 0)
    for (fn, idx, fl, eax, ebx, ecx, edx) in supported:
        if fn in (0xB, 0x1F):
            continue                       # rebuilt below (0x1F dropped: 0xB says it all)
        if fn == 1:
            ebx = (ebx & 0x0000FFFF) | ((apic & 0xFF) << 24) | ((1 << (tbits + cbits)) & 0xFF) << 16
            edx = edx | (1 << 28) if per_pkg > 1 else edx & ~(1 << 28)
            ecx |= 1 << 31
            ecx = ecx | (1 << 21) if x2apic else ecx & ~(1 << 21)
        elif fn == 4 and eax & 0x1F:
            level = (eax >> 5) & 7
            sharing = (1 << (tbits + cbits)) if level >= 3 else (1 << tbits)
            eax = (eax & 0x3FFF) | ((sharing - 1) << 14) | (((1 << cbits) - 1) << 26)
        elif amd and fn == 0x80000001:
            ecx = ecx | 2 if per_pkg > 1 else ecx & ~2          # CmpLegacy
        elif amd and fn == 0x80000008:
            ecx = (ecx & ~0xF0FF) | ((tbits + cbits) << 12) | ((per_pkg - 1) & 0xFF)
        elif amd and fn == 0x8000001D and eax & 0x1F:
            level = (eax >> 5) & 7
            sharing = per_pkg if level >= 3 else threads
            eax = (eax & ~(0xFFF << 14)) | ((sharing - 1) << 14)
        elif amd and fn == 0x8000001E:
            eax = apic
            ebx = ((threads - 1) << 8) | ((apic >> tbits) & 0xFF)
            ecx = 0
        out.append((fn, idx, fl, eax, ebx, ecx, edx))
    if max_basic >= 0xB:
        sig = lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX if lib is not None else 1
        out.append((0xB, 0, sig, tbits, threads, 0x100, apic))
        out.append((0xB, 1, sig, tbits + cbits, per_pkg, 0x201, apic))
        out.append((0xB, 2, sig, 0, 0, 2, apic))
    return out


# ----------------------------------------------------------------------------
# the VM
# ----------------------------------------------------------------------------

class _MemfdMap(mmap.mmap):
    """A MAP_SHARED mapping of a memfd that owns the memfd.

    The descriptor stays open for :meth:`data_extents`; :meth:`close` (what
    ``KvmVm.destroy`` calls) or garbage collection closes it with the
    mapping, since an open memfd alone keeps all of guest RAM allocated.
    (Python's mmap also keeps a private duplicate of the descriptor, which
    it closes itself.)
    """

    __slots__ = ("_fd", "_release")

    def __new__(cls, fd: int, size: int) -> "_MemfdMap":
        self = super().__new__(cls, fd, size, flags=mmap.MAP_SHARED | lib.MAP_NORESERVE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._fd = fd
        self._release = weakref.finalize(self, os.close, fd)
        return self

    def close(self) -> None:
        super().close()          # BufferError while views exist: keep the fd too
        self._release()

    def data_extents(self) -> list[tuple[int, int]] | None:
        """Runs of pages ever written (or read: a read allocates a page too),
        from SEEK_DATA/SEEK_HOLE on the memfd; no page is touched.  None if
        the kernel cannot tell (shmem gained SEEK_DATA in Linux 3.8)."""
        if self.closed:
            raise ValueError("guest memory is unmapped")
        size = len(self)
        out: list[tuple[int, int]] = []
        pos = 0
        try:
            while pos < size:
                try:
                    start = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:      # no data at or after pos
                        break
                    raise
                end = min(os.lseek(self._fd, start, os.SEEK_HOLE), size)
                out.append((start, end - start))
                pos = end
        except OSError:
            return None
        return out


class KvmVm(VirtualMachine):
    backend_name = "kvm"
    kernel_emulates_platform = False

    def __init__(self, backend: KvmBackend, name: str) -> None:
        self.name = name
        self._backend = backend
        self._lock = threading.RLock()
        self._regions: list[MemoryRegion] = []
        self._slot_of: dict[str, int] = {}        # region name -> KVM memory slot
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._rom_ranges: tuple[tuple[int, int], ...] = ()
        self._vcpus: dict[int, KvmVcpu] = {}
        self._topology = Topology()
        self._x2apic = False
        self._suspend_how: SuspendHow | None = None
        self._platform: _Platform | None = None
        self._msrs: list[int] | None = None
        self._saved_clock: int | None = None
        self._saved_tsc: dict[int, tuple[int, int]] = {}
        self._closed = False
        self.fd = _ioctl_val(backend.fd, "KVM_CREATE_VM", 0)
        try:
            self._max_vcpus = _check_extension(self.fd, "KVM_CAP_MAX_VCPUS") or \
                _check_extension(self.fd, "KVM_CAP_NR_VCPUS") or 4
            self._xsave_size = max(_XSAVE_MIN, _check_extension(self.fd, "KVM_CAP_XSAVE2"))
            self._run_size = _ioctl_val(backend.fd, "KVM_GET_VCPU_MMAP_SIZE", 0)
            _ioctl_val(self.fd, "KVM_SET_TSS_ADDR", TSS_ADDR)
            _ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", IDENTITY_MAP_ADDR))
            _ioctl(self.fd, "KVM_CREATE_IRQCHIP")
            _ioctl(self.fd, "KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *",
                                                       {"flags": lib.KVM_PIT_SPEAKER_DUMMY}))
            self._set_gsi_routing()
        except BaseException:
            os.close(self.fd)
            raise
        self._watchdog = _Watchdog(self)

    def __repr__(self) -> str:
        return f"<KvmVm {self.name!r} fd={self.fd}>"

    # --- interrupt routing ---------------------------------------------------
    def _set_gsi_routing(self) -> None:
        """Install our GSI table.

        KVM's default table maps GSI n to 8259 input n and IOAPIC pin n, so
        asserting GSI 0 (which the in-kernel PIT does) reaches IOAPIC pin 0,
        whereas bhyve's MADT tells the guest ISA IRQ 0 arrives on pin 2.  The
        table below follows the MADT: GSI 0 -> PIC 0 + IOAPIC 2, GSI 1..15
        (not 2) -> PIC n + IOAPIC n, GSI 16..23 -> IOAPIC n.  Two extra ranges
        reach one controller alone, for ``isa_*`` calls whose IRQ/pin pair is
        not the standard one and for ``ioapic_*`` calls on pins below 16.
        """
        routes: list[tuple[int, int, int]] = []          # (gsi, chip, pin)
        ioapic, pic_m, pic_s = lib.KVM_IRQCHIP_IOAPIC, lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE

        def pic(irq: int) -> tuple[int, int]:
            return (pic_m, irq) if irq < 8 else (pic_s, irq - 8)

        for irq in range(_PIC_IRQS):
            if irq == 2:
                continue                   # cascade
            routes.append((irq, *pic(irq)))
            routes.append((irq, ioapic, 2 if irq == 0 else irq))
        for pin in range(16, _IOAPIC_PINS):
            routes.append((pin, ioapic, pin))
        for irq in range(_PIC_IRQS):
            if irq != 2:
                routes.append((_GSI_PIC_ONLY + irq, *pic(irq)))
        for pin in range(_IOAPIC_PINS):
            routes.append((_GSI_IOAPIC_ONLY + pin, ioapic, pin))
        n = len(routes)
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_irq_routing") + n * ffi.sizeof("struct kvm_irq_routing_entry"))
        rt = ffi.cast("struct kvm_irq_routing *", buf)
        rt.nr = n
        for i, (gsi, chip, pin) in enumerate(routes):
            e = rt.entries[i]
            e.gsi = gsi
            e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip = chip
            e.u.irqchip.pin = pin
        _ioctl(self.fd, "KVM_SET_GSI_ROUTING", rt)

    def _irq_line(self, gsi: int, level: int) -> None:
        _ioctl(self.fd, "KVM_IRQ_LINE", ffi.new("struct kvm_irq_level *", {"irq": gsi, "level": level}))

    @staticmethod
    def _check_pin(pin: int) -> None:
        if not 0 <= pin < _IOAPIC_PINS:
            raise ValueError(f"IOAPIC pin {pin} out of range 0..{_IOAPIC_PINS - 1}")

    @staticmethod
    def _isa_gsis(irq: int, pin: int) -> tuple[int, ...]:
        if not 0 <= irq < _PIC_IRQS or irq == 2:
            raise ValueError(f"ISA IRQ {irq} is not a usable 8259 input")
        if (irq == 0 and pin == 2) or (irq != 0 and pin == irq):
            return (irq,)
        if pin < 0:
            return (_GSI_PIC_ONLY + irq,)
        KvmVm._check_pin(pin)
        return (_GSI_PIC_ONLY + irq, _GSI_IOAPIC_ONLY + pin)

    def ioapic_assert(self, pin: int) -> None:
        self._check_pin(pin)
        self._irq_line(_GSI_IOAPIC_ONLY + pin, 1)

    def ioapic_deassert(self, pin: int) -> None:
        self._check_pin(pin)
        self._irq_line(_GSI_IOAPIC_ONLY + pin, 0)

    def ioapic_pulse(self, pin: int) -> None:
        self._check_pin(pin)
        self._irq_line(_GSI_IOAPIC_ONLY + pin, 1)
        self._irq_line(_GSI_IOAPIC_ONLY + pin, 0)

    def isa_assert(self, irq: int, ioapic_pin: int) -> None:
        for gsi in self._isa_gsis(irq, ioapic_pin):
            self._irq_line(gsi, 1)

    def isa_deassert(self, irq: int, ioapic_pin: int) -> None:
        for gsi in self._isa_gsis(irq, ioapic_pin):
            self._irq_line(gsi, 0)

    def isa_pulse(self, irq: int, ioapic_pin: int) -> None:
        """ISA interrupts are edge-triggered at the 8259: a rising then falling edge."""
        gsis = self._isa_gsis(irq, ioapic_pin)
        for gsi in gsis:
            self._irq_line(gsi, 1)
        for gsi in gsis:
            self._irq_line(gsi, 0)

    def lapic_msi(self, addr: int, data: int) -> None:
        msi = ffi.new("struct kvm_msi *", {"address_lo": addr & 0xFFFFFFFF,
                                           "address_hi": (addr >> 32) & 0xFFFFFFFF,
                                           "data": data & 0xFFFFFFFF})
        _ioctl(self.fd, "KVM_SIGNAL_MSI", msi)

    def inject_nmi(self, vcpu_id: int) -> None:
        """KVM_NMI is a vCPU ioctl, which blocks while that vCPU is inside KVM_RUN;
        so the NMI is queued and the vCPU's own thread issues it after a kick
        (vmm.ko does the same: nmi_pending plus a notification)."""
        v = self._vcpu(vcpu_id)
        v._nmi_pending = True
        v._attention()

    # --- memory --------------------------------------------------------------
    def _check_range(self, name: str, gpa: int, size: int, ignore: str | None = None) -> None:
        if size <= 0 or size % _PAGE or gpa % _PAGE or gpa < 0:
            raise ValueError(f"{name}: guest memory {gpa:#x}+{size:#x} is not page-aligned")
        if gpa < _KVM_PRIVATE_END and _KVM_PRIVATE_START < gpa + size:
            raise ValueError(f"{name} at {gpa:#x}+{size:#x} overlaps KVM's TSS/identity map at "
                             f"{_KVM_PRIVATE_START:#x}..{_KVM_PRIVATE_END:#x}")
        for r in self._regions:
            if r.name != ignore and gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise ValueError(f"{name} at {gpa:#x}+{size:#x} overlaps {r.name} "
                                 f"at {r.gpa:#x}+{r.size:#x}")

    def _set_slot(self, slot: int, gpa: int, size: int, addr: int, readonly: bool) -> None:
        reg = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": lib.KVM_MEM_READONLY if readonly else 0,
            "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": addr})
        _ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", reg)

    def _attach(self, region: MemoryRegion) -> None:
        """Give ``region`` a KVM slot (caller holds the lock and checked the range)."""
        p = ffi.from_buffer(region.buf)
        addr = int(ffi.cast("uintptr_t", p))
        ffi.release(p)
        slot = self._free_slots.pop() if self._free_slots else self._next_slot
        self._set_slot(slot, region.gpa, region.size, addr, region.readonly)
        if slot == self._next_slot:
            self._next_slot += 1
        self._slot_of[region.name] = slot
        self._regions.append(region)
        self._rom_ranges = tuple((r.gpa, r.gpa + r.size) for r in self._regions if r.readonly)

    def _detach(self, name: str) -> MemoryRegion | None:
        slot = self._slot_of.pop(name, None)
        if slot is None:
            return None
        region = next(r for r in self._regions if r.name == name)
        self._set_slot(slot, region.gpa, 0, 0, False)       # size 0 deletes the slot
        self._free_slots.append(slot)
        self._regions.remove(region)
        self._rom_ranges = tuple((r.gpa, r.gpa + r.size) for r in self._regions if r.readonly)
        return region

    def _map_guest_ram(self, name: str, size: int) -> "_MemfdMap":
        """Guest RAM as a shared mapping of a memfd rather than anonymous memory.

        Both are shmem to the kernel and behave the same for KVM, but a memfd
        can say which pages were ever touched (SEEK_DATA/SEEK_HOLE) without
        touching the rest, which is what lets a snapshot of a large idle guest
        skip its untouched memory.  The memfd's name shows in /proc/PID/maps.
        """
        fd = os.memfd_create(f"bhyvepy:{self.name}:{name}"[:200], os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return _MemfdMap(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def _new_region(self, name: str, gpa: int, size: int, *, readonly: bool, is_ram: bool,
                    wired: bool = False, in_core: bool = True) -> MemoryRegion:
        with self._lock:
            if name in self._slot_of:
                raise ValueError(f"guest memory {name!r} exists already")
            self._check_range(name, gpa, size)
            try:
                if is_ram:
                    mm: mmap.mmap = self._map_guest_ram(name, size)
                else:
                    mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | lib.MAP_NORESERVE,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                raise KvmError("mmap", e.errno or errno.ENOMEM, f"{name}: {size >> 20} MiB") from None
            region = MemoryRegion(name=name, gpa=gpa, size=size, buf=mm, readonly=readonly, is_ram=is_ram,
                                  extent_source=getattr(mm, "data_extents", None))
            try:
                if wired:
                    p = ffi.from_buffer(mm)
                    rc = lib.mlock(p, size)
                    err = ffi.errno
                    ffi.release(p)
                    if rc != 0:
                        raise KvmError("mlock", err, f"{name}: {size >> 20} MiB")
                if not in_core and hasattr(mmap, "MADV_DONTDUMP"):
                    mm.madvise(mmap.MADV_DONTDUMP)
                self._attach(region)
            except BaseException:
                mm.close()
                raise
            return region

    def setup_memory(self, size: int, *, wired: bool = False, in_core: bool = False) -> list[MemoryRegion]:
        if size <= 0:
            raise ValueError("guest memory size must be positive")
        size = (size + _PAGE - 1) // _PAGE * _PAGE
        low = min(size, LOWMEM_LIMIT)
        out = [self._new_region("lowmem", 0, low, readonly=False, is_ram=True, wired=wired, in_core=in_core)]
        if size > low:
            out.append(self._new_region("highmem", HIGHMEM_BASE, size - low, readonly=False,
                                        is_ram=True, wired=wired, in_core=in_core))
        return out

    def map_devmem(self, name: str, gpa: int, size: int, *, readonly: bool) -> MemoryRegion:
        """A device segment (boot ROM, variables, framebuffer, option ROM).

        Read-only ones are KVM_MEM_READONLY slots: guest reads hit memory,
        guest writes come back as MMIO writes that :meth:`KvmVcpu.run` drops
        (ROM semantics).  Mapping a name again moves it, keeping its contents
        (a reprogrammed BAR), as on vmm.ko where the segment outlives the
        mapping; a different size gives fresh memory.
        """
        with self._lock:
            old = next((r for r in self._regions if r.name == name), None)
            if old is None or old.size != size:
                if old is not None:
                    self.unmap_devmem(name)
                return self._new_region(name, gpa, size, readonly=readonly, is_ram=False, in_core=True)
            self._check_range(name, gpa, size, ignore=name)
            self._detach(name)
            region = MemoryRegion(name=name, gpa=gpa, size=size, buf=old.buf, readonly=readonly, is_ram=False)
            try:
                self._attach(region)
            except BaseException:
                self._attach(old)      # put it back where it was
                raise
            return region

    def unmap_devmem(self, name: str) -> None:
        """Remove a device segment's mapping (a BAR being disabled); its memory goes."""
        with self._lock:
            region = self._detach(name)
        if region is not None:
            try:
                region.buf.close()  # type: ignore[attr-defined]
            except BufferError:
                pass       # a device still holds a view; unmapped when it lets go

    def memory_regions(self) -> list[MemoryRegion]:
        with self._lock:
            return list(self._regions)

    # --- vCPUs ---------------------------------------------------------------
    def set_topology(self, topo: Topology) -> None:
        if topo.cpus < 1 or topo.cpus > self._max_vcpus:
            raise ValueError(f"{topo.cpus} vCPUs requested, KVM allows 1..{self._max_vcpus}")
        self._topology = topo
        for v in list(self._vcpus.values()):
            v._apply_cpuid()

    def create_vcpu(self, vcpu_id: int) -> "KvmVcpu":
        with self._lock:
            if not 0 <= vcpu_id < self._max_vcpus:
                raise ValueError(f"vCPU id {vcpu_id} out of range 0..{self._max_vcpus - 1}")
            if vcpu_id in self._vcpus:
                raise ValueError(f"vCPU {vcpu_id} already exists")
            fd = _ioctl_val(self.fd, "KVM_CREATE_VCPU", vcpu_id)
            try:
                v = KvmVcpu(self, vcpu_id, fd)
            except BaseException:
                os.close(fd)
                raise
            self._vcpus[vcpu_id] = v
        v._apply_cpuid()
        if vcpu_id > 0:
            v._set_mp_state(lib.KVM_MP_STATE_INIT_RECEIVED)
        self._watchdog.start()
        return v

    def vcpus(self) -> list["KvmVcpu"]:
        return [self._vcpus[i] for i in sorted(self._vcpus)]

    def _vcpu(self, vcpu_id: int) -> "KvmVcpu":
        try:
            return self._vcpus[vcpu_id]
        except KeyError:
            raise ValueError(f"no vCPU {vcpu_id}") from None

    def set_capability(self, name: str, value: bool) -> bool:
        """``hlt_exit`` and ``pause_exit`` are accepted without changing
        anything: what bhyve asks of them (give the host CPU back while the
        guest idles or spins) KVM already does -- with the in-kernel irqchip a
        halted vCPU sleeps in the kernel until its interrupt, and pause-loop
        exiting is on by default; the watchdog still reports bhyve's
        halted-with-interrupts-disabled case.  ``x2apic`` sets or clears the
        x2APIC CPUID bit; ``unrestricted_guest`` is always on (KVM runs real
        mode itself)."""
        if name == "x2apic":
            self._x2apic = bool(value)
            for v in list(self._vcpus.values()):
                v._apply_cpuid()
            return True
        if name in ("unrestricted_guest", "hlt_exit", "pause_exit"):
            return True
        return False

    # --- RTC (Python model) ---------------------------------------------------
    @property
    def platform(self) -> "_Platform":
        if self._platform is None:
            with self._lock:
                if self._platform is None:
                    self._platform = _Platform(self)
        return self._platform

    def platform_devices(self) -> dict[str, Any]:
        """The Python models standing in for vmm.ko's RTC, PM timer and HPET
        (section name -> model), for pause/resume and close by the VM."""
        return self.platform.models()

    def rtc_write(self, offset: int, value: int) -> None:
        self.platform.rtc().nvram_write(offset, value)

    def rtc_read(self, offset: int) -> int:
        return self.platform.rtc().nvram_read(offset)

    def rtc_settime(self, secs: int) -> None:
        self.platform.rtc().settime(secs)

    # --- lifecycle -----------------------------------------------------------
    def suspend(self, how: SuspendHow) -> None:
        with self._lock:
            if self._suspend_how is None:
                self._suspend_how = SuspendHow(how)
        for v in list(self._vcpus.values()):
            v._attention()

    def destroy(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._watchdog.stop()
        vs = list(self._vcpus.values())
        if any(v._c.has_thread for v in vs):
            self.suspend(SuspendHow.POWEROFF)   # make every run() return ...
            deadline = time.monotonic() + DESTROY_WAIT
            while any(v._c.has_thread for v in vs) and time.monotonic() < deadline:
                time.sleep(0.01)
        for v in vs:
            if v._c.has_thread:
                continue    # ... and leak one stuck in its IoHandler rather than unmap under it
            v.close()
        self._vcpus.clear()
        if self._platform is not None:
            self._platform.close()
        os.close(self.fd)
        for r in self._regions:
            try:
                r.buf.close()  # type: ignore[attr-defined]
            except (BufferError, AttributeError):
                pass           # a device still holds a view; unmapped when it lets go
        self._backend._forget(self)

    # --- snapshots -----------------------------------------------------------
    def _require_stopped(self) -> list["KvmVcpu"]:
        vs = self.vcpus()
        busy = [v.id for v in vs if v._c.has_thread]
        if busy:
            raise RuntimeError(f"vCPU(s) {busy} are running; stop them before saving or restoring state")
        return vs

    def save_kernel_section(self, name: str) -> bytes:
        if name not in KERNEL_SECTIONS:
            raise ValueError(f"unknown kernel section {name!r}")
        vs = self._require_stopped()
        if name in _Platform.SECTIONS:
            return self.platform.save(name)
        return encode(getattr(self, "_save_" + name)(vs))

    def check_kernel_section(self, name: str, data: bytes) -> Any:
        """Decode and validate ``data`` against this VM (vCPU count, irqchip ids,
        XSAVE size, MSRs this host has) without changing anything, so a restore
        can check every section before it applies any.  Returns the decoded
        state; bad data raises :class:`StateError`."""
        if name not in KERNEL_SECTIONS:
            raise ValueError(f"unknown kernel section {name!r}")
        if name in _Platform.SECTIONS:
            return self.platform.check(name, data)
        cls, check, _apply = _SECTION_CODECS[name]
        state = decode(cls, data)
        check(self, self.vcpus(), state)
        return state

    def restore_kernel_section(self, name: str, data: bytes) -> None:
        vs = self._require_stopped()
        state = self.check_kernel_section(name, data)
        if name in _Platform.SECTIONS:
            self.platform.apply(name, state)
        else:
            _SECTION_CODECS[name][2](self, vs, state)

    # Per section: _save_X builds the state, _check_X refuses what does not fit
    # this VM, _restore_X applies a checked state.

    def _check_ncpus(self, vs: list["KvmVcpu"], n: int, what: str) -> None:
        if n != len(vs):
            raise StateError(f"{what}: snapshot has {n} vCPUs, this VM has {len(vs)}")

    def _save_vm(self, vs: list["KvmVcpu"]) -> KvmVmState:
        cd = ffi.new("struct kvm_clock_data *")
        _ioctl(self.fd, "KVM_GET_CLOCK", cd)
        return KvmVmState(ncpus=len(vs), clock=cd.clock, clock_flags=cd.flags)

    def _check_vm(self, vs: list["KvmVcpu"], st: KvmVmState) -> None:
        self._check_ncpus(vs, st.ncpus, "vm")

    def _restore_vm(self, vs: list["KvmVcpu"], st: KvmVmState) -> None:
        self._saved_clock = st.clock
        self._set_clock(st.clock)

    def _set_clock(self, ns: int) -> None:
        _ioctl(self.fd, "KVM_SET_CLOCK", ffi.new("struct kvm_clock_data *", {"clock": ns}))

    def _get_chip(self, chip: int) -> bytes:
        p = ffi.new("struct kvm_irqchip *", {"chip_id": chip})
        _ioctl(self.fd, "KVM_GET_IRQCHIP", p)
        return _raw(p, "struct kvm_irqchip")

    @staticmethod
    def _check_chip(chip: int, raw: bytes, what: str) -> None:
        found = _from_raw("struct kvm_irqchip", raw).chip_id
        if found != chip:
            raise StateError(f"{what}: record for interrupt controller {found}, expected {chip}")

    def _set_chip(self, raw: bytes) -> None:
        _ioctl(self.fd, "KVM_SET_IRQCHIP", _from_raw("struct kvm_irqchip", raw))

    def _save_vioapic(self, vs: list["KvmVcpu"]) -> KvmIoapicState:
        return KvmIoapicState(chip=self._get_chip(lib.KVM_IRQCHIP_IOAPIC))

    def _check_vioapic(self, vs: list["KvmVcpu"], st: KvmIoapicState) -> None:
        self._check_chip(lib.KVM_IRQCHIP_IOAPIC, st.chip, "vioapic")

    def _restore_vioapic(self, vs: list["KvmVcpu"], st: KvmIoapicState) -> None:
        self._set_chip(st.chip)

    def _save_vatpic(self, vs: list["KvmVcpu"]) -> KvmAtpicState:
        return KvmAtpicState(master=self._get_chip(lib.KVM_IRQCHIP_PIC_MASTER),
                             slave=self._get_chip(lib.KVM_IRQCHIP_PIC_SLAVE))

    def _check_vatpic(self, vs: list["KvmVcpu"], st: KvmAtpicState) -> None:
        self._check_chip(lib.KVM_IRQCHIP_PIC_MASTER, st.master, "vatpic")
        self._check_chip(lib.KVM_IRQCHIP_PIC_SLAVE, st.slave, "vatpic")

    def _restore_vatpic(self, vs: list["KvmVcpu"], st: KvmAtpicState) -> None:
        self._set_chip(st.master)
        self._set_chip(st.slave)

    def _save_vatpit(self, vs: list["KvmVcpu"]) -> KvmAtpitState:
        p = ffi.new("struct kvm_pit_state2 *")
        _ioctl(self.fd, "KVM_GET_PIT2", p)
        return KvmAtpitState(pit=_raw(p, "struct kvm_pit_state2"))

    def _check_vatpit(self, vs: list["KvmVcpu"], st: KvmAtpitState) -> None:
        pass    # fixed size is all there is to check; KVM clamps the rest

    def _restore_vatpit(self, vs: list["KvmVcpu"], st: KvmAtpitState) -> None:
        _ioctl(self.fd, "KVM_SET_PIT2", _from_raw("struct kvm_pit_state2", st.pit))

    def _save_vlapic(self, vs: list["KvmVcpu"]) -> KvmLapicState:
        return KvmLapicState(cpus=[v._save_lapic() for v in vs])

    def _check_vlapic(self, vs: list["KvmVcpu"], st: KvmLapicState) -> None:
        self._check_ncpus(vs, len(st.cpus), "vlapic")

    def _restore_vlapic(self, vs: list["KvmVcpu"], st: KvmLapicState) -> None:
        for v, c in zip(vs, st.cpus):
            v._restore_lapic(c)

    def _save_vmcx(self, vs: list["KvmVcpu"]) -> KvmVmcxState:
        return KvmVmcxState(cpus=[v._save_cpu() for v in vs])

    def _check_vmcx(self, vs: list["KvmVcpu"], st: KvmVmcxState) -> None:
        self._check_ncpus(vs, len(st.cpus), "vmcx")
        known = set(self.msr_list(vs[0])) if vs else set()
        for n, c in enumerate(st.cpus):
            if len(c.xsave) > self._xsave_size:
                raise StateError(f"vmcx: vCPU {n}: XSAVE area of {len(c.xsave)} bytes exceeds "
                                 f"this host's {self._xsave_size}")
            missing = sorted({m.index for m in c.msrs} - known)
            if missing:
                raise StateError(f"vmcx: vCPU {n}: MSRs {', '.join(hex(i) for i in missing)} "
                                 "are not available on this host")

    def _restore_vmcx(self, vs: list["KvmVcpu"], st: KvmVmcxState) -> None:
        self._saved_tsc = {}
        for v, c in zip(vs, st.cpus):
            v._restore_cpu(c)
            msrs = {m.index: m.value for m in c.msrs}
            if _MSR_TSC in msrs:
                self._saved_tsc[v.id] = (msrs[_MSR_TSC], msrs.get(_MSR_TSC_DEADLINE, 0))

    def restore_time(self) -> None:
        """Re-base guest time after a restore, as vm_restore_time does on vmm.ko.

        Guest time stands still while the VM is suspended: the kvmclock is
        set back to the saved nanoseconds and every vCPU's TSC to its saved
        value (one host-initiated IA32_TSC write each, which KVM keeps in
        sync across vCPUs), followed by the TSC-deadline MSR, whose hrtimer
        KVM computes from the TSC at write time.  The restore steps already
        did this once; repeating it here drops the time spent loading memory
        and device state in between.
        """
        self._require_stopped()
        if self._saved_clock is not None:
            self._set_clock(self._saved_clock)
        for v in self.vcpus():
            saved = self._saved_tsc.get(v.id)
            if saved is None:
                continue
            tsc, deadline = saved
            pairs = [(_MSR_TSC, tsc)]
            if deadline:
                pairs.append((_MSR_TSC_DEADLINE, deadline))
            v._set_msrs(pairs)
        if self._platform is not None:
            self._platform.restore_time()

    def msr_list(self, probe: "KvmVcpu") -> list[int]:
        """MSRs a snapshot carries: KVM's index list plus MTRRs and the syscall/
        sysenter MSRs, minus those KVM_GET_MSRS cannot read on this host."""
        if self._msrs is None:
            cands: list[int] = []
            for i in list(self._backend.msr_index_list()) + _EXTRA_MSRS:
                if i not in cands and i not in _SKIP_MSRS:
                    cands.append(i)
            self._msrs = [i for i in cands if probe._get_msrs([i]) is not None]
        return self._msrs


_SECTION_CODECS: dict[str, tuple[type, Callable[..., None], Callable[..., None]]] = {
    name: (cls, getattr(KvmVm, "_check_" + name), getattr(KvmVm, "_restore_" + name))
    for name, cls in (("vm", KvmVmState), ("vioapic", KvmIoapicState), ("vatpic", KvmAtpicState),
                      ("vatpit", KvmAtpitState), ("vlapic", KvmLapicState), ("vmcx", KvmVmcxState))
}


# ----------------------------------------------------------------------------
# vCPUs
# ----------------------------------------------------------------------------

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_CRS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


class KvmVcpu(Vcpu):
    def __init__(self, vm: KvmVm, vcpu_id: int, fd: int) -> None:
        self.id = vcpu_id
        self._vm = vm
        self._fd = fd
        self._run_mm = mmap.mmap(fd, vm._run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run = ffi.from_buffer("struct kvm_run *", self._run_mm)
        self._mv = memoryview(self._run_mm)
        self._mmio_data = ffi.offsetof("struct kvm_run", "mmio", "data")
        self._c = ffi.new("struct bhyvepy_vcpu *")
        lib.bhyvepy_vcpu_init(self._c, fd, self._run)
        self._kick_pending = False    # kick() from outside: return INTERRUPTED
        self._probe = False           # watchdog: check for halted-with-IF=0
        self._nmi_pending = False
        self._wd_seq = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<KvmVcpu {self.id} of {self._vm.name!r}>"

    # --- running ---------------------------------------------------------------
    def kick(self) -> None:
        self._kick_pending = True
        self._attention()

    def _attention(self) -> None:
        if not self._closed:
            r = lib.bhyvepy_vcpu_kick(self._c)
            if r < 0 and r != -errno.ESRCH:      # the thread is gone; the flag stays set
                raise KvmError("pthread_kill", -r)

    def run(self, io: IoHandler) -> VmExit:
        """Run until an exit the VM loop must see.

        Port I/O and MMIO are completed here.  The RTC, PM timer and HPET ports
        and window go to the Python models, the rest to ``io``; writes to ROM
        slots are dropped.  A signal-interrupted KVM_RUN (EINTR) means someone
        asked for attention: an outside kick, a suspend, a queued NMI, or the
        watchdog; only the first two end ``run``.

        The loop is the I/O fast path: everything is bound to locals, the exit
        fields are read with one ``unpack_from`` each (layout from the
        compiler, see :func:`_field_struct`) and I/O data with per-size
        precompiled structs.
        """
        vm = self._vm
        if vm._suspend_how is not None:
            return VmExit.suspended(vm._suspend_how, "VM suspended")
        plat = vm.platform
        ports = plat.port_map
        hpet_lo, hpet_hi, hpet = plat.mmio_window()
        roms = vm._rom_ranges
        c, mv = self._c, self._mv
        moff = self._mmio_data
        vid = self.id
        vcpu_run = lib.bhyvepy_vcpu_run
        io_exit, io_at = _IO_EXIT.unpack_from, _IO_EXIT_AT
        mmio_exit, mmio_at = _MMIO_EXIT.unpack_from, _MMIO_EXIT_AT
        get, put = _GET, _PUT
        pio_in, pio_out, mmio_read, mmio_write = io.pio_in, io.pio_out, io.mmio_read, io.mmio_write
        EXIT_IO, EXIT_MMIO = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO
        lib.bhyvepy_vcpu_enter(c)
        try:
            while True:
                r = vcpu_run(c)
                if r == 0:
                    reason, out, size, port, count, off = io_exit(mv, io_at)
                    if reason == EXIT_IO:
                        dev = ports.get(port)
                        if out:
                            if count == 1:
                                if dev is None:
                                    pio_out(vid, port, size, get[size](mv, off)[0])
                                else:
                                    dev.write(port - dev.base, size, get[size](mv, off)[0])
                                continue
                            for o in range(off, off + count * size, size):
                                if dev is None:
                                    pio_out(vid, port, size, get[size](mv, o)[0])
                                else:
                                    dev.write(port - dev.base, size, get[size](mv, o)[0])
                            continue
                        mask = (1 << (8 * size)) - 1
                        for o in range(off, off + count * size, size):
                            value = pio_in(vid, port, size) if dev is None else dev.read(port - dev.base, size)
                            put[size](mv, o, value & mask)
                        continue
                    if reason == EXIT_MMIO:
                        gpa, ln, is_write = mmio_exit(mv, mmio_at)
                        if is_write:
                            value = get[ln](mv, moff)[0]
                            if hpet_lo <= gpa < hpet_hi:
                                hpet.write(gpa - hpet_lo, ln, value)
                            else:
                                for lo, hi in roms:
                                    if lo <= gpa < hi:
                                        break       # ROM: writes vanish
                                else:
                                    mmio_write(vid, gpa, ln, value)
                        else:
                            if hpet_lo <= gpa < hpet_hi:
                                value = hpet.read(gpa - hpet_lo, ln)
                            else:
                                value = mmio_read(vid, gpa, ln)
                            put[ln](mv, moff, value & ((1 << (8 * ln)) - 1))
                        continue
                    ex = self._other_exit(reason)
                    if ex is not None:
                        return ex
                    continue
                if r == _NEG_EINTR or r == _NEG_EAGAIN:
                    ex = self._on_signal()
                    if ex is not None:
                        return ex
                    continue
                raise KvmError("KVM_RUN", -r, f"vCPU {vid}")
        finally:
            lib.bhyvepy_vcpu_leave(c)

    def _on_signal(self) -> VmExit | None:
        # Clear the flag before looking at the reasons: a kick racing with us
        # sets it again and the next KVM_RUN returns at once.
        lib.bhyvepy_vcpu_clear_kick(self._c)
        vm = self._vm
        if vm._suspend_how is not None:
            return VmExit.suspended(vm._suspend_how, "VM suspended")
        if self._nmi_pending:
            self._nmi_pending = False
            _ioctl(self._fd, "KVM_NMI")
        if self._kick_pending:
            self._kick_pending = False
            self._probe = False
            return VmExit(ExitReason.INTERRUPTED)
        if self._probe:
            self._probe = False
            if self._halted_intr_disabled():
                return VmExit(ExitReason.HLT, info={"intr_disabled": True})
        return None

    def _halted_intr_disabled(self) -> bool:
        if self._get_mp_state() != lib.KVM_MP_STATE_HALTED:
            return False
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self._fd, "KVM_GET_REGS", regs)
        return not regs.rflags & _RFLAGS_IF

    def _where(self) -> tuple[int, int]:
        try:
            regs = ffi.new("struct kvm_regs *")
            sregs = ffi.new("struct kvm_sregs *")
            _ioctl(self._fd, "KVM_GET_REGS", regs)
            _ioctl(self._fd, "KVM_GET_SREGS", sregs)
            return sregs.cs.selector, regs.rip
        except KvmError:
            return -1, -1

    def _other_exit(self, reason: int) -> VmExit | None:
        runp = self._run
        vm = self._vm
        if reason == lib.KVM_EXIT_SHUTDOWN:
            vm.suspend(SuspendHow.TRIPLEFAULT)    # like vmm.ko: the whole VM stops
            return VmExit.suspended(SuspendHow.TRIPLEFAULT, f"vCPU {self.id}: triple fault")
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            t = runp.system_event.type
            how = {lib.KVM_SYSTEM_EVENT_SHUTDOWN: SuspendHow.POWEROFF,
                   lib.KVM_SYSTEM_EVENT_RESET: SuspendHow.RESET}.get(t)
            if how is not None:
                vm.suspend(how)
                return VmExit.suspended(how, f"vCPU {self.id}: system event {t}")
            return VmExit.unhandled(f"vCPU {self.id}: KVM system event {t}", system_event=t)
        if reason == lib.KVM_EXIT_HLT:
            return VmExit(ExitReason.HLT, info={"intr_disabled": not runp.if_flag})
        if reason == lib.KVM_EXIT_INTR:
            return self._on_signal()
        if reason == lib.KVM_EXIT_DEBUG:
            return VmExit(ExitReason.DEBUG)
        cs, rip = self._where()
        at = f"at {cs:#06x}:{rip:#x}"
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            hw = runp.fail_entry.hardware_entry_failure_reason
            return VmExit.unhandled(
                f"vCPU {self.id}: VM entry failed, hardware reason {hw:#x} {at}",
                exit_reason=reason, hardware_entry_failure_reason=hw, cs=cs, rip=rip)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            sub = runp.internal.suberror
            nd = min(runp.internal.ndata, 16)
            data = [runp.internal.data[i] for i in range(nd)]
            names = {lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
                     lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
                     lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
                     lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit"}
            return VmExit.unhandled(
                f"vCPU {self.id}: KVM internal error {sub} ({names.get(sub, 'unknown')}) {at}",
                exit_reason=reason, suberror=sub, data=data, cs=cs, rip=rip)
        if reason == lib.KVM_EXIT_EXCEPTION:
            return VmExit.unhandled(f"vCPU {self.id}: exception {runp.ex.exception} {at}",
                                    exit_reason=reason, exception=runp.ex.exception,
                                    error_code=runp.ex.error_code, cs=cs, rip=rip)
        if reason == lib.KVM_EXIT_UNKNOWN:
            hw = runp.hw.hardware_exit_reason
            return VmExit.unhandled(f"vCPU {self.id}: unknown exit, hardware reason {hw:#x} {at}",
                                    exit_reason=reason, hardware_exit_reason=hw, cs=cs, rip=rip)
        return VmExit.unhandled(f"vCPU {self.id}: unexpected KVM exit reason {reason} {at}",
                                exit_reason=reason, cs=cs, rip=rip)

    # --- registers ---------------------------------------------------------------
    def _get_regs(self) -> Any:
        p = ffi.new("struct kvm_regs *")
        _ioctl(self._fd, "KVM_GET_REGS", p)
        return p

    def _get_sregs(self) -> Any:
        p = ffi.new("struct kvm_sregs *")
        _ioctl(self._fd, "KVM_GET_SREGS", p)
        return p

    def get_registers(self) -> dict[str, int]:
        """GPRs, rip, rflags, control registers, efer, apic_base, segment
        selector/base/limit as ``cs``, ``cs_base``, ``cs_limit`` (likewise for
        ds es fs gs ss tr ldt) and ``gdt_base/limit``, ``idt_base/limit``."""
        regs, sregs = self._get_regs(), self._get_sregs()
        out = {n: getattr(regs, n) for n in _GPRS}
        out.update({n: getattr(sregs, n) for n in _CRS})
        for s in _SEGS:
            seg = getattr(sregs, s)
            out[s], out[s + "_base"], out[s + "_limit"] = seg.selector, seg.base, seg.limit
        for t in ("gdt", "idt"):
            dt = getattr(sregs, t)
            out[t + "_base"], out[t + "_limit"] = dt.base, dt.limit
        return out

    def set_registers(self, regs: dict[str, int]) -> None:
        """Change the named registers (names as in :meth:`get_registers`)."""
        gp = {k: v for k, v in regs.items() if k in _GPRS}
        rest = {k: v for k, v in regs.items() if k not in _GPRS}
        if gp:
            p = self._get_regs()
            for k, v in gp.items():
                setattr(p, k, v)
            _ioctl(self._fd, "KVM_SET_REGS", p)
        if rest:
            s = self._get_sregs()
            for k, v in rest.items():
                if k in _CRS:
                    setattr(s, k, v)
                    continue
                base, _, part = k.partition("_")
                if base in _SEGS and part in ("", "base", "limit"):
                    setattr(getattr(s, base), {"": "selector"}.get(part, part), v)
                elif base in ("gdt", "idt") and part in ("base", "limit"):
                    setattr(getattr(s, base), part, v)
                else:
                    raise KeyError(f"unknown register {k!r}")
            _ioctl(self._fd, "KVM_SET_SREGS", s)

    def reset_to_reset_vector(self) -> None:
        """Power-on RESET state: CS=0xF000 with base 0xFFFF0000 and IP 0xFFF0, so
        the first fetch is at 0xFFFFFFF0; flat 64 KiB real-mode data segments;
        CR0=0x60000010; EDX holds the processor signature.  APs then wait for
        SIPI (the in-kernel LAPIC handles INIT/SIPI from the BSP)."""
        regs = ffi.new("struct kvm_regs *")
        regs.rflags = 0x2
        regs.rip = 0xFFF0
        regs.rdx = next((e[3] for e in self._cpuid_entries() if e[0] == 1), 0x600)
        _ioctl(self._fd, "KVM_SET_REGS", regs)
        s = self._get_sregs()

        def seg(x: Any, sel: int, base: int, typ: int, code_data: int) -> None:
            x.selector, x.base, x.limit, x.type = sel, base, 0xFFFF, typ
            x.present, x.dpl, x.db, x.s, x.l, x.g, x.avl, x.unusable = 1, 0, 0, code_data, 0, 0, 0, 0

        seg(s.cs, 0xF000, 0xFFFF0000, 0xB, 1)
        for n in ("ds", "es", "fs", "gs", "ss"):
            seg(getattr(s, n), 0, 0, 0x3, 1)
        seg(s.tr, 0, 0, 0xB, 0)
        seg(s.ldt, 0, 0, 0x2, 0)
        s.gdt.base, s.gdt.limit = 0, 0xFFFF
        s.idt.base, s.idt.limit = 0, 0xFFFF
        s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer = 0x60000010, 0, 0, 0, 0, 0
        for i in range(len(s.interrupt_bitmap)):
            s.interrupt_bitmap[i] = 0
        _ioctl(self._fd, "KVM_SET_SREGS", s)
        self._set_mp_state(lib.KVM_MP_STATE_RUNNABLE if self.id == 0 else lib.KVM_MP_STATE_INIT_RECEIVED)

    def _get_mp_state(self) -> int:
        p = ffi.new("struct kvm_mp_state *")
        _ioctl(self._fd, "KVM_GET_MP_STATE", p)
        return p.mp_state

    def _set_mp_state(self, state: int) -> None:
        _ioctl(self._fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    # --- CPUID -----------------------------------------------------------------
    def _cpuid_entries(self) -> list[tuple[int, ...]]:
        vm = self._vm
        return build_cpuid(vm._backend.supported_cpuid(), self.id, vm._topology, vm._x2apic)

    def _apply_cpuid(self) -> None:
        entries = self._cpuid_entries()
        buf, c = _cpuid2(len(entries))
        for i, (fn, idx, fl, a, b, cx, d) in enumerate(entries):
            e = c.entries[i]
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = fn, idx, fl, a, b, cx, d
        try:
            _ioctl(self._fd, "KVM_SET_CPUID2", c)
        except KvmError as e:
            if e.errno == errno.EBUSY:
                raise KvmError("KVM_SET_CPUID2", e.errno,
                               f"vCPU {self.id} has already run; CPUID is fixed from then on") from None
            raise

    # --- MSRs ------------------------------------------------------------------
    def _get_msrs(self, indices: list[int]) -> list[int] | None:
        """Values of ``indices``, or None if KVM cannot read all of them."""
        n = len(indices)
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + n * ffi.sizeof("struct kvm_msr_entry"))
        m = ffi.cast("struct kvm_msrs *", buf)
        m.nmsrs = n
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        r = lib.bhyvepy_ioctl(self._fd, lib.KVM_GET_MSRS, m)
        if r < 0:
            raise KvmError("KVM_GET_MSRS", -r)
        if r != n:
            return None
        return [m.entries[i].data for i in range(n)]

    def _set_msrs(self, pairs: list[tuple[int, int]]) -> None:
        n = len(pairs)
        if not n:
            return
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + n * ffi.sizeof("struct kvm_msr_entry"))
        m = ffi.cast("struct kvm_msrs *", buf)
        m.nmsrs = n
        for i, (idx, val) in enumerate(pairs):
            m.entries[i].index, m.entries[i].data = idx, val
        r = lib.bhyvepy_ioctl(self._fd, lib.KVM_SET_MSRS, m)
        if r < 0:
            raise KvmError("KVM_SET_MSRS", -r)
        if r != n:
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"vCPU {self.id}: MSR {pairs[r][0]:#x} rejected "
                                              f"value {pairs[r][1]:#x}")

    # --- state -------------------------------------------------------------------
    def _save_lapic(self) -> KvmLapicCpu:
        p = ffi.new("struct kvm_lapic_state *")
        _ioctl(self._fd, "KVM_GET_LAPIC", p)
        return KvmLapicCpu(apic_base=self._get_sregs().apic_base, regs=_raw(p, "struct kvm_lapic_state"))

    def _restore_lapic(self, st: KvmLapicCpu) -> None:
        # APIC base first: KVM interprets the register page (xAPIC or x2APIC
        # ID format) according to the mode the base MSR selects.
        self._set_msrs([(_MSR_APIC_BASE, st.apic_base)])
        _ioctl(self._fd, "KVM_SET_LAPIC", _from_raw("struct kvm_lapic_state", st.regs))

    def _save_cpu(self) -> KvmCpuState:
        fd = self._fd
        xs_size = self._vm._xsave_size
        xs = ffi.new("char[]", xs_size)
        if xs_size > _XSAVE_MIN and lib.KVM_GET_XSAVE2:
            _ioctl(fd, "KVM_GET_XSAVE2", xs)
        else:
            _ioctl(fd, "KVM_GET_XSAVE", xs)
        xcrs = ffi.new("struct kvm_xcrs *")
        _ioctl(fd, "KVM_GET_XCRS", xcrs)
        ev = ffi.new("struct kvm_vcpu_events *")
        _ioctl(fd, "KVM_GET_VCPU_EVENTS", ev)
        dr = ffi.new("struct kvm_debugregs *")
        _ioctl(fd, "KVM_GET_DEBUGREGS", dr)
        idx = self._vm.msr_list(self)
        vals = self._get_msrs(idx)
        if vals is None:
            raise KvmError("KVM_GET_MSRS", errno.EIO, f"vCPU {self.id}: an MSR became unreadable")
        return KvmCpuState(
            regs=_raw(self._get_regs(), "struct kvm_regs"),
            sregs=_raw(self._get_sregs(), "struct kvm_sregs"),
            xsave=bytes(ffi.buffer(xs, xs_size)),
            xcrs=_raw(xcrs, "struct kvm_xcrs"),
            msrs=[KvmMsr(index=i, value=v) for i, v in zip(idx, vals)],
            events=_raw(ev, "struct kvm_vcpu_events"),
            mp_state=self._get_mp_state(),
            debugregs=_raw(dr, "struct kvm_debugregs"),
        )

    def _restore_cpu(self, st: KvmCpuState) -> None:
        fd = self._fd
        _ioctl(fd, "KVM_SET_REGS", _from_raw("struct kvm_regs", st.regs))
        xs = ffi.new("char[]", max(self._vm._xsave_size, len(st.xsave)))
        ffi.memmove(xs, st.xsave, len(st.xsave))
        _ioctl(fd, "KVM_SET_XSAVE", xs)
        _ioctl(fd, "KVM_SET_XCRS", _from_raw("struct kvm_xcrs", st.xcrs))
        _ioctl(fd, "KVM_SET_SREGS", _from_raw("struct kvm_sregs", st.sregs))
        self._set_msrs([(m.index, m.value) for m in st.msrs])
        self._set_mp_state(st.mp_state)
        _ioctl(fd, "KVM_SET_VCPU_EVENTS", _from_raw("struct kvm_vcpu_events", st.events))
        _ioctl(fd, "KVM_SET_DEBUGREGS", _from_raw("struct kvm_debugregs", st.debugregs))

    # --- teardown ------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lib.bhyvepy_vcpu_detach(self._c)
        ffi.release(self._run)
        self._mv.release()
        try:
            self._run_mm.close()
        except BufferError:
            pass
        os.close(self._fd)


# ----------------------------------------------------------------------------
# halt watchdog
# ----------------------------------------------------------------------------

class _Watchdog:
    """Finds vCPUs halted with interrupts disabled.

    vmm.ko sees every HLT and, when RFLAGS.IF is clear, reports that nothing
    but an NMI or INIT can wake the vCPU (bhyve then ends the VM once every
    vCPU is in that state).  KVM swallows HLT in the kernel.  So a vCPU whose
    ``KVM_RUN`` has not returned for a whole period is kicked (invisibly to
    the caller), and the vCPU's own thread checks MP state and RFLAGS before
    resuming.  The sequence counter in the C vCPU record is odd while the
    thread is inside ``KVM_RUN`` and changes on every entry and exit, so two
    equal odd samples one period apart mean "stuck in the kernel for a period".
    """

    def __init__(self, vm: KvmVm, period: float = WATCHDOG_PERIOD) -> None:
        self._vm = vm
        self._period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, name=f"kvm watchdog {self._vm.name}",
                                                daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            for v in list(self._vm._vcpus.values()):
                if v._closed:
                    continue
                seq = v._c.seq
                if seq & 1 and seq == v._wd_seq:
                    v._probe = True
                    try:
                        v._attention()
                    except KvmError:
                        pass
                v._wd_seq = seq


# ----------------------------------------------------------------------------
# platform devices KVM does not emulate
# ----------------------------------------------------------------------------

class _PortDev:
    """A Python model behind a port range, as seen from the vCPU loop."""

    __slots__ = ("base", "read", "write")

    def __init__(self, base: int, model: Any) -> None:
        self.base = base
        self.read = model.read
        self.write = model.write


class _Platform:
    """The RTC, PM timer and HPET models a KVM VM composes.

    Imported lazily: a missing model leaves its ports to the caller's
    IoHandler (and its section unavailable) instead of breaking the backend.
    """

    SECTIONS = ("vrtc", "vpmtmr", "vhpet")

    def __init__(self, vm: KvmVm) -> None:
        self._vm = vm
        self._models: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.port_map: dict[int, _PortDev] = {}
        for section, build in (("vrtc", self._build_rtc), ("vpmtmr", self._build_pmtmr),
                               ("vhpet", self._build_hpet)):
            try:
                self._models[section] = build()
            except ImportError as e:
                self.errors[section] = f"model not available: {e}"
        for section, base, n in (("vrtc", PORT_RTC, RTC_NPORTS), ("vpmtmr", PORT_PMTMR, PMTMR_NPORTS)):
            if section in self._models:
                d = _PortDev(base, self._models[section])
                for p in range(base, base + n):
                    self.port_map[p] = d

    def _build_rtc(self) -> Any:
        from bhyvepy.dev.rtc import Rtc
        from bhyvepy.irq import IsaIrq
        return Rtc(IsaIrq(self._vm, RTC_IRQ))

    def _build_pmtmr(self) -> Any:
        from bhyvepy.dev.pmtmr import PmTimer
        return PmTimer()

    def _build_hpet(self) -> Any:
        from bhyvepy.dev.hpet import Hpet
        from bhyvepy.irq import LapicMsi
        return Hpet(self._vm, LapicMsi(self._vm), ioapic_pins=_IOAPIC_PINS)

    def models(self) -> dict[str, Any]:
        return dict(self._models)

    def mmio_window(self) -> tuple[int, int, Any]:
        h = self._models.get("vhpet")
        return (HPET_BASE, HPET_BASE + HPET_SIZE, h) if h is not None else (0, 0, None)

    def rtc(self) -> Any:
        return self._model("vrtc")

    def _model(self, section: str) -> Any:
        try:
            return self._models[section]
        except KeyError:
            raise BackendUnavailable(f"{section}: {self.errors.get(section, 'no model')}") from None

    def save(self, section: str) -> bytes:
        return encode(self._model(section).save_state())

    def check(self, section: str, data: bytes) -> Any:
        return decode(self._model(section).state_class, data)

    def apply(self, section: str, state: Any) -> None:
        self._model(section).restore_state(state)

    def restore_time(self) -> None:
        for m in self._models.values():
            fn = getattr(m, "restore_time", None)
            if callable(fn):
                fn()

    def close(self) -> None:
        for m in self._models.values():
            fn = getattr(m, "close", None)
            if callable(fn):
                try:
                    fn()
                except Exception:  # pragma: no cover - teardown best effort
                    pass
