"""FreeBSD vmm.ko backend, through libvmmapi (cffi API mode binding).

The binding ``bhyvepy.vmm._vmmapi_ffi`` is built by
``libvmmapi_ffi/vmmapi_build.py`` against the installed headers and is
imported lazily, so this module imports (and reports itself unavailable) on
any system.  Every class takes the ``(ffi, lib)`` pair it should use; the
unit tests hand in a recorded-call test double, production code the real
module.

What the kernel does and what is done here
------------------------------------------
vmm.ko emulates the LAPIC, I/O APIC, 8259 pair, PIT, HPET, PM timer and RTC
itself (``kernel_emulates_platform``).  It leaves to userland, as exits of
``vm_run``: port I/O (``INOUT``, string forms ``INOUT_STR``), MMIO
(``INST_EMUL``: the instruction bytes, decoded and emulated here with
:mod:`bhyvepy.vmm.insn_emul`), unknown MSRs, INIT/SIPI (``IPI``), and the
end of the VM (``SUSPENDED``).  Exits are handled the way bhyve's
``amd64/vmexit.c`` handles them; only what the VM loop has to decide about is
returned (see :mod:`bhyvepy.vmm.exits`).

Parking vCPUs
-------------
vmm.ko has one park mechanism, the per-vCPU "debug" suspension
(``vm_suspend_cpu``/``vm_resume_cpu``): a suspended vCPU's ``vm_run``
returns ``VM_EXITCODE_DEBUG`` at once.  bhyve uses it for three things and
so does this backend, with the state kept per vCPU:

* start-up: every vCPU is activated and immediately suspended; the BSP is
  resumed by its first :meth:`VmmapiVcpu.run`, an AP only by a STARTUP IPI
  (``spinup_ap``: ``vcpu_reset``, CS:IP from the vector, resume);
* INIT IPI: the target is suspended again and waits for its SIPI;
* :meth:`VmmapiVcpu.kick` (checkpoint, shutdown): sets a flag and suspends
  the vCPU, so a ``vm_run`` in progress returns ``DEBUG`` and ``run``
  returns ``INTERRUPTED``; the next ``run`` resumes it unless it is an AP
  still waiting for its SIPI.  An AP waiting for its SIPI sees a ``DEBUG``
  exit per millisecond (bhyve's ``usleep(1000)``), returned to the VM loop
  as ``ExitReason.DEBUG`` so that the loop can park it for a checkpoint.

After a restore, :meth:`VmmapiVm.restore_time` marks every vCPU runnable,
as bhyve resumes all vCPUs after ``vm_restore_time``.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

from bhyvepy.errors import BackendUnavailable, BhyveExit, ExitStatus, GuestMemoryError
from bhyvepy.memory import GuestMemory
from bhyvepy.vmm import (
    BOOTROM_SEG_SIZE, HIGHMEM_BASE, KERNEL_SECTIONS, Backend, IoHandler, MemoryRegion,
    Topology, Vcpu, VirtualMachine,
)
from bhyvepy.vmm import insn_emul
from bhyvepy.vmm.exits import INTERRUPTED, ExitReason, SuspendHow, VmExit
from bhyvepy.vmm.insn_emul import Access, CpuMode, GuestFault, PagingMode, Reg
from bhyvepy.vmm.insn_paging import is_canonical

__all__ = [
    "VmmapiBackend", "VmmapiVm", "VmmapiVcpu", "MsrPolicy", "KernelStateError", "SnapshotUnsupported",
    "SNAPSHOT_SUPPORT_HELP", "SNAPSHOT_BUFFER_SIZE", "read_sysctl", "host_facts",
]

log = logging.getLogger("bhyvepy.vmm")

PAGE_SIZE = 4096
#: bhyve's SNAPSHOT_BUFFER_SIZE (14+): one buffer for every kernel section.
SNAPSHOT_BUFFER_SIZE = 40 << 20
#: Base of the 16 MiB boot ROM segment (bhyve bootrom.c: the top of 4 GiB).
BOOTROM_BASE = HIGHMEM_BASE - BOOTROM_SEG_SIZE
#: String I/O iterations per exit (bhyve does 16; a larger batch means fewer
#: exits for ATA PIO sectors while still returning to the guest regularly).
STRING_IO_BATCH = 256
#: How long an AP waiting for its SIPI sleeps per DEBUG exit (bhyve: 1 ms).
PARKED_POLL_SECONDS = 0.001

# Architectural constants (Intel SDM vol. 3).
_RFLAGS_DF = 1 << 10
_RFLAGS_AC = 1 << 18
_CR0_AM = 1 << 18
_VEC_GP, _VEC_SS, _VEC_PF, _VEC_AC = 13, 12, 14, 17
_DESC_UNUSABLE = 1 << 16

SNAPSHOT_SUPPORT_HELP = (
    "vmm.ko and libvmmapi were built without snapshot support. Rebuild with it: "
    "add WITH_BHYVE_SNAPSHOT=yes to /etc/src.conf and 'options BHYVE_SNAPSHOT' to the "
    "kernel configuration, then rebuild and install lib/libvmmapi, usr.sbin/bhyve and "
    "the vmm module (make buildworld buildkernel installkernel installworld, or at least "
    "'make -C /usr/src/lib/libvmmapi all install' and "
    "'make -C /usr/src/sys/modules/vmm all install') and reload vmm.ko"
)


class KernelStateError(RuntimeError):
    """Saving a kernel state section failed; the VM keeps running."""


class SnapshotUnsupported(KernelStateError):
    """The kernel or libvmmapi lacks snapshot support (no ``options BHYVE_SNAPSHOT``)."""


# --- sysctl helper ---------------------------------------------------------------

def read_sysctl(name: str) -> Any:
    """Value of a sysctl (``hw.vmm.maxcpu``, ``kern.osreldate``, ``hw.physmem``), or None.

    Goes through the ``freebsd_sysctl`` package, imported only on FreeBSD.
    That package does not report unknown names, so an all-zero OID is
    treated as "no such sysctl".
    """
    if not sys.platform.startswith("freebsd"):
        return None
    try:
        from freebsd_sysctl import Sysctl  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        oid = Sysctl.name2oid(name)
        if not oid or not any(oid):
            return None
        return Sysctl(name=name, oid=oid).value
    except Exception:   # a sysctl we cannot decode is as good as absent
        return None


def host_facts() -> dict[str, Any]:
    """Host facts recorded in snapshot metadata and error reports."""
    return {
        "os": "FreeBSD",
        "osreldate": read_sysctl("kern.osreldate"),
        "physmem": read_sysctl("hw.physmem"),
        "vmm_maxcpu": read_sysctl("hw.vmm.maxcpu"),
    }


# --- loading the binding ---------------------------------------------------------

def _load_binding() -> tuple[Any, Any]:
    if not sys.platform.startswith("freebsd"):
        raise BackendUnavailable(
            f"the vmm backend needs FreeBSD with vmm.ko (this host is {sys.platform})")
    try:
        from bhyvepy.vmm import _vmmapi_ffi  # type: ignore[attr-defined]
    except ImportError as e:
        raise BackendUnavailable(
            f"the libvmmapi binding is not built ({e}); run "
            "'python libvmmapi_ffi/vmmapi_build.py' or reinstall bhyvepy") from None
    return _vmmapi_ffi.ffi, _vmmapi_ffi.lib


def _vmm_loaded() -> bool:
    return (os.path.exists("/dev/vmmctl") or os.path.isdir("/dev/vmm")
            or read_sysctl("hw.vmm.maxcpu") is not None)


def _strerror(e: int) -> str:
    return os.strerror(e) if e else "Unknown error: 0"


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


# --- userland MSRs (bhyve amd64/xmsr.c) -------------------------------------------

_INTEL_RDMSR = {
    0x08B: 0, 0x017: 0, 0x611: 0, 0x639: 0, 0x641: 0, 0x619: 0, 0x140: 0,
    0x606: 0x000A1003,              # RAPL power unit: the SDM's documented default
    0x03A: 0x1,                     # feature control: locked (Windows reads it)
}
_INTEL_WRMSR_IGNORED = frozenset({0xD04, 0xC24, 0x079, 0x08B})
_AMD_RDMSR = {
    0x08B: 0,
    0xC0010015: 0x01000010 | 1 << 9,    # HWCR reset value, MONITOR/MWAIT disabled
    0xC001001F: 0, 0xC0011020: 0, 0xC0011021: 0,
    0xC0010000: 0, 0xC0010001: 0, 0xC0010002: 0, 0xC0010003: 0,
    0xC0010004: 0, 0xC0010005: 0, 0xC0010006: 0, 0xC0010007: 0,
    0xC0010112: 0, 0xC0010113: 0,
    0xC0010061: 0, 0xC0010062: 0, 0xC0010063: 0, 0xC0010064: 0,
    0xC0011029: 1,                      # erratum 721 workaround reported applied
    0xC0010114: 0x10,                   # VM_CR: SVM disabled (no nested virtualisation)
}
_AMD_WRMSR_IGNORED = frozenset({
    0xC0010015, 0xC001001F, 0xC0011020, 0xC0011021,
    0xC0010000, 0xC0010001, 0xC0010002, 0xC0010003,
    0xC0010004, 0xC0010005, 0xC0010006, 0xC0010007, 0xC0010062,
})


@dataclasses.dataclass(frozen=True)
class MsrPolicy:
    """bhyve's userland MSR handling: a small per-vendor table, and for the
    rest ``x86.strictmsr`` (inject #GP, bhyve's default) or read-as-zero /
    ignore-write; ``x86.verbosemsr`` logs every unknown access."""

    vendor: str = ""        # "intel", "amd" (includes Hygon) or "" (unknown: table empty)
    strict: bool = True
    verbose: bool = False

    def read(self, msr: int) -> int | None:
        table = _INTEL_RDMSR if self.vendor == "intel" else _AMD_RDMSR if self.vendor == "amd" else {}
        return table.get(msr)

    def write_ignored(self, msr: int) -> bool:
        if self.vendor == "intel":
            return msr in _INTEL_WRMSR_IGNORED
        if self.vendor == "amd":
            return msr in _AMD_WRMSR_IGNORED
        return False


def _host_vendor(ffi: Any, lib: Any) -> str:
    if not hasattr(lib, "bhyvepy_cpuid"):
        return ""
    regs = ffi.new("unsigned int[4]")
    lib.bhyvepy_cpuid(0, regs)
    name = b"".join(int(regs[i]).to_bytes(4, "little") for i in (1, 3, 2))
    return {b"GenuineIntel": "intel", b"AuthenticAMD": "amd", b"HygonGenuine": "amd"}.get(name, "")


# --- backend -----------------------------------------------------------------------

class VmmapiBackend(Backend):
    """vmm.ko: VMs are named kernel objects (``/dev/vmm/<name>``) that outlive
    the process; bhyveload(8) may have created and loaded one already."""

    name = "vmm"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            _load_binding()
        except BackendUnavailable as e:
            return False, str(e)
        if not _vmm_loaded():
            return False, ("vmm.ko is not loaded (/dev/vmm is missing): run 'kldload vmm' as root, "
                           "or add vmm_load=\"YES\" to /boot/loader.conf")
        if os.geteuid() != 0 and not os.access("/dev/vmmctl", os.R_OK | os.W_OK):
            return False, "permission denied: creating virtual machines with vmm.ko needs root"
        return True, ""

    def __init__(self, *, ffi: Any = None, lib: Any = None,
                 strict_msr: bool = True, verbose_msr: bool = False) -> None:
        if ffi is None or lib is None:
            ffi, lib = _load_binding()
        self._ffi, self._lib = ffi, lib
        self.strict_msr = strict_msr
        self.verbose_msr = verbose_msr
        self._vendor: str | None = None

    @property
    def has_openf(self) -> bool:
        """FreeBSD 15's ``vm_openf`` (VMMAPI_VERSION 0300)."""
        return hasattr(self._lib, "vm_openf")

    def _msr_policy(self, strict: bool | None, verbose: bool | None) -> MsrPolicy:
        if self._vendor is None:
            self._vendor = _host_vendor(self._ffi, self._lib)
        return MsrPolicy(self._vendor, self.strict_msr if strict is None else strict,
                         self.verbose_msr if verbose is None else verbose)

    def _cname(self, name: str) -> bytes:
        if not name or "\0" in name or "/" in name:
            raise BhyveExit(f"invalid VM name {name!r}", ExitStatus.ERROR)
        return name.encode()

    def create_vm(self, name: str, *, reinit: bool = True, strict_msr: bool | None = None,
                  verbose_msr: bool | None = None) -> "VmmapiVm":
        """bhyve's ``do_open`` with a boot ROM: create the VM, or re-initialise
        (``reinit``) one that exists."""
        ffi, lib = self._ffi, self._lib
        cname = self._cname(name)
        if self.has_openf:
            ctx = lib.vm_openf(cname, lib.VMMAPI_OPEN_REINIT if reinit else 0)
            if ctx == ffi.NULL:
                err = ffi.errno
                if err != errno_mod.ENOENT:
                    raise BhyveExit(f"vm_openf: {_strerror(err)}", ExitStatus.ERROR)
                ctx = lib.vm_openf(cname, lib.VMMAPI_OPEN_CREATE)
                if ctx == ffi.NULL:
                    raise BhyveExit(f"vm_openf: {_strerror(ffi.errno)}", ExitStatus.ERROR)
        else:
            do_reinit = False
            if lib.vm_create(cname) != 0:
                err = ffi.errno
                if err != errno_mod.EEXIST:
                    raise BhyveExit(f"vm_create: {_strerror(err)}", ExitStatus.ERROR)
                do_reinit = reinit
            ctx = lib.vm_open(cname)
            if ctx == ffi.NULL:
                raise BhyveExit(f"vm_open: {_strerror(ffi.errno)}", ExitStatus.ERROR)
            if do_reinit and lib.vm_reinit(ctx) != 0:
                err = ffi.errno
                lib.vm_close(ctx)
                raise BhyveExit(f"vm_reinit: {_strerror(err)}", ExitStatus.ERROR)
        return VmmapiVm(self, name, ctx, self._msr_policy(strict_msr, verbose_msr))

    def open_vm(self, name: str, *, strict_msr: bool | None = None,
                verbose_msr: bool | None = None) -> "VmmapiVm":
        """bhyve's ``do_open`` without a boot ROM: the VM must exist (bhyveload)."""
        ffi, lib = self._ffi, self._lib
        cname = self._cname(name)
        if self.has_openf:
            ctx = lib.vm_openf(cname, 0)
            if ctx == ffi.NULL:
                err = ffi.errno
                if err == errno_mod.ENOENT:
                    raise BhyveExit("no bootrom was configured", ExitStatus.ERROR)
                raise BhyveExit(f"vm_openf: {_strerror(err)}", ExitStatus.ERROR)
        else:
            if lib.vm_create(cname) == 0:
                # bhyve 14 leaves the empty VM behind; remove what we just made.
                ctx = lib.vm_open(cname)
                if ctx != ffi.NULL:
                    lib.vm_destroy(ctx)
                raise BhyveExit("virtual machine cannot be booted", ExitStatus.ERROR)
            err = ffi.errno
            if err != errno_mod.EEXIST:
                raise BhyveExit(f"vm_create: {_strerror(err)}", ExitStatus.ERROR)
            ctx = lib.vm_open(cname)
            if ctx == ffi.NULL:
                raise BhyveExit(f"vm_open: {_strerror(ffi.errno)}", ExitStatus.ERROR)
        return VmmapiVm(self, name, ctx, self._msr_policy(strict_msr, verbose_msr))


# --- the VM ---------------------------------------------------------------------------

_CAPS = {
    "hlt_exit": "VM_CAP_HALT_EXIT",
    "pause_exit": "VM_CAP_PAUSE_EXIT",
    "unrestricted_guest": "VM_CAP_UNRESTRICTED_GUEST",
    "ipi_exit": "VM_CAP_IPI_EXIT",
    "enable_invpcid": "VM_CAP_ENABLE_INVPCID",
}


@dataclasses.dataclass
class _DevSeg:
    segid: int
    name: str
    size: int
    host: Any           # uint8_t * to the segment's host mapping
    base_gpa: int       # GPA at which segment offset 0 would sit


class VmmapiVm(VirtualMachine):
    backend_name = "vmm"
    kernel_emulates_platform = True

    def __init__(self, backend: VmmapiBackend, name: str, ctx: Any, msr: MsrPolicy) -> None:
        self.name = name
        self.backend = backend
        self._ffi, self._lib = backend._ffi, backend._lib
        self._ctx = ctx
        self.msr = msr
        self._lock = threading.Lock()
        #: Guards the park state of every vCPU (kick, INIT/SIPI, entry).
        self.park_lock = threading.Lock()
        self._handles: dict[int, Any] = {}
        self._vcpus: dict[int, VmmapiVcpu] = {}
        self._caps: dict[str, bool] = {}
        self._x2apic = False
        self._regions: list[MemoryRegion] = []
        self._devsegs: dict[int, _DevSeg] = {}
        self._devmaps: dict[str, MemoryRegion] = {}
        self.emul_mem = GuestMemory(())
        self._snap_buf: Any = None
        self._snap_dirty = 0
        self._destroyed = False
        lib = self._lib
        self._snapshot_reqs = {
            "vhpet": lib.STRUCT_VHPET, "vm": lib.STRUCT_VM, "vioapic": lib.STRUCT_VIOAPIC,
            "vlapic": lib.STRUCT_VLAPIC, "vmcx": lib.STRUCT_VMCX, "vatpit": lib.STRUCT_VATPIT,
            "vatpic": lib.STRUCT_VATPIC, "vpmtmr": lib.STRUCT_VPMTMR, "vrtc": lib.STRUCT_VRTC,
        }
        assert set(self._snapshot_reqs) == set(KERNEL_SECTIONS)

    # --- helpers ---------------------------------------------------------------
    @property
    def destroyed(self) -> bool:
        return self._destroyed

    @property
    def ctx(self) -> Any:
        if self._destroyed:
            raise RuntimeError(f"VM {self.name} has been destroyed")
        return self._ctx

    def _oserror(self, what: str) -> OSError:
        err = self._ffi.errno
        return OSError(err, f"{what}: {_strerror(err)}")

    def handle(self, vcpu_id: int) -> Any:
        """libvmmapi's ``struct vcpu *`` for ``vcpu_id`` (a userland allocation;
        the kernel vCPU appears on its first ioctl)."""
        with self._lock:
            h = self._handles.get(vcpu_id)
            if h is None:
                h = self._lib.vm_vcpu_open(self.ctx, vcpu_id)
                if h == self._ffi.NULL:
                    raise MemoryError(f"vm_vcpu_open({vcpu_id}) failed")
                self._handles[vcpu_id] = h
            return h

    def vcpu(self, vcpu_id: int) -> "VmmapiVcpu | None":
        return self._vcpus.get(vcpu_id)

    def vcpus(self) -> list["VmmapiVcpu"]:
        return [self._vcpus[i] for i in sorted(self._vcpus)]

    # --- memory ------------------------------------------------------------------
    def setup_memory(self, size: int, *, wired: bool = False, in_core: bool = False) -> list[MemoryRegion]:
        """``-S`` sets VM_MEM_F_WIRED, ``-C`` VM_MEM_F_INCORE; then
        ``vm_setup_memory(VM_MMAP_ALL)`` and the host views of lowmem/highmem."""
        if size <= 0:
            raise ValueError("guest memory size must be positive")
        ffi, lib = self._ffi, self._lib
        flags = (lib.VM_MEM_F_WIRED if wired else 0) | (lib.VM_MEM_F_INCORE if in_core else 0)
        lib.vm_set_memflags(self.ctx, flags)
        if lib.vm_setup_memory(self.ctx, size, lib.VM_MMAP_ALL) != 0:
            raise BhyveExit(f"Unable to setup memory ({ffi.errno})", ExitStatus.ERROR)
        low = int(lib.vm_get_lowmem_size(self.ctx))
        high = int(lib.vm_get_highmem_size(self.ctx))
        regions = [self._ram("lowmem", 0, low)]
        if high:
            regions.append(self._ram("highmem", HIGHMEM_BASE, high))
        with self._lock:
            self._regions = [r for r in self._regions if not r.is_ram] + regions
        self._refresh_emul_mem()
        return list(regions)

    def _ram(self, name: str, gpa: int, size: int) -> MemoryRegion:
        p = self._lib.vm_map_gpa(self.ctx, gpa, size)
        if p == self._ffi.NULL:
            raise BhyveExit(f"vm_map_gpa: no host mapping for {name} {gpa:#x}+{size:#x}",
                            ExitStatus.ERROR)
        return MemoryRegion(name, gpa, size, self._ffi.buffer(p, size))

    def _refresh_emul_mem(self) -> None:
        # The emulator may touch RAM and writable device memory directly; a
        # read-only ROM stays behind the MMIO path so guest writes never land.
        with self._lock:
            visible = [dataclasses.replace(r, is_ram=True) for r in self._regions
                       if r.is_ram or not r.readonly]
        self.emul_mem = GuestMemory(visible)

    def _devseg(self, segid: int, seg_name: str, size: int, base_gpa: int) -> _DevSeg:
        seg = self._devsegs.get(segid)
        if seg is not None:
            if seg.size != size:
                raise ValueError(f"{seg_name} segment already exists with size {seg.size:#x}")
            return seg
        ffi, lib = self._ffi, self._lib
        p = lib.vm_create_devmem(self.ctx, segid, seg_name.encode(), size)
        if p == ffi.NULL or int(ffi.cast("intptr_t", p)) == -1:      # MAP_FAILED
            raise BhyveExit(f"{seg_name}: vm_create_devmem: {_strerror(ffi.errno)}",
                            ExitStatus.ERROR)
        seg = _DevSeg(segid, seg_name, size, ffi.cast("uint8_t *", p), base_gpa)
        self._devsegs[segid] = seg
        return seg

    def map_devmem(self, name: str, gpa: int, size: int, *, readonly: bool) -> MemoryRegion:
        """Device memory as bhyve lays it out.

        Anything inside [4 GiB - 16 MiB, 4 GiB) -- the boot ROM and the
        variables store below it -- is a window on the one 16 MiB
        ``VM_BOOTROM`` segment (bhyve ``bootrom_alloc``: segment offset = GPA
        - base).  ``framebuffer`` is the ``VM_FRAMEBUFFER`` segment, any other
        name the ``VM_PCIROM`` one.  Mapping a name again moves it (a BAR
        that was reprogrammed): the old mapping is removed first.
        """
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ValueError(f"{name}: {gpa:#x}+{size:#x} is not a page-aligned, non-empty range")
        lib = self._lib
        if BOOTROM_BASE <= gpa and gpa + size <= HIGHMEM_BASE:
            seg = self._devseg(lib.VM_BOOTROM, "bootrom", BOOTROM_SEG_SIZE, BOOTROM_BASE)
        elif name in ("bootrom", "bootvars"):
            raise BhyveExit(f"No room for {size} byte {name} at {gpa:#x} in bootrom region",
                            ExitStatus.ERROR)
        elif name == "framebuffer":
            seg = self._devseg(lib.VM_FRAMEBUFFER, "framebuffer", size, gpa)
        else:
            seg = self._devseg(lib.VM_PCIROM, "pcirom", size, gpa)
        segoff = gpa - seg.base_gpa if seg.segid == lib.VM_BOOTROM else 0
        old = self._devmaps.get(name)
        if old is not None and lib.vm_munmap_memseg(self.ctx, old.gpa, old.size) != 0:
            raise self._oserror(f"{name}: vm_munmap_memseg")
        prot = lib.PROT_READ | lib.PROT_EXEC | (0 if readonly else lib.PROT_WRITE)
        if lib.vm_mmap_memseg(self.ctx, gpa, seg.segid, segoff, size, prot) != 0:
            raise BhyveExit(f"{name}: vm_mmap_memseg: {_strerror(self._ffi.errno)}", ExitStatus.ERROR)
        region = MemoryRegion(name, gpa, size, self._ffi.buffer(seg.host + segoff, size),
                              readonly=readonly, is_ram=False)
        with self._lock:
            if old is not None:
                self._regions = [r for r in self._regions if r is not old]
            self._regions.append(region)
            self._devmaps[name] = region
        self._refresh_emul_mem()
        return region

    def unmap_devmem(self, name: str) -> None:
        """Remove a device memory mapping (a BAR being disabled)."""
        old = self._devmaps.pop(name, None)
        if old is None:
            return
        if self._lib.vm_munmap_memseg(self.ctx, old.gpa, old.size) != 0:
            raise self._oserror(f"{name}: vm_munmap_memseg")
        with self._lock:
            self._regions = [r for r in self._regions if r is not old]
        self._refresh_emul_mem()

    def memory_regions(self) -> list[MemoryRegion]:
        with self._lock:
            return list(self._regions)

    # --- vCPUs ----------------------------------------------------------------------
    def set_topology(self, topo: Topology) -> None:
        """``vm_set_topology`` (maxcpus 0 = the kernel's ``hw.vmm.maxcpu``) and
        bhyve's vCPU limit: more than one vCPU needs unrestricted guest mode."""
        lib, ffi = self._lib, self._ffi
        if lib.vm_set_topology(self.ctx, topo.sockets, topo.cores, topo.threads, topo.maxcpus) != 0:
            raise BhyveExit("vm_set_topology", ExitStatus.EX_OSERR)
        allowed = 1
        tmp = ffi.new("int *")
        if lib.vm_get_capability(self.handle(0), lib.VM_CAP_UNRESTRICTED_GUEST, tmp) == 0:
            s, c, t, m = (ffi.new("uint16_t *") for _ in range(4))
            if lib.vm_get_topology(self.ctx, s, c, t, m) == 0:
                allowed = int(m[0])
        if topo.cpus > allowed:
            raise BhyveExit(f"{topo.cpus} vCPUs requested but only {allowed} available",
                            ExitStatus.ERROR)

    def create_vcpu(self, vcpu_id: int) -> "VmmapiVcpu":
        """Open, configure (bhyve's ``bhyve_init_vcpu``), activate and park a vCPU.

        The BSP is resumed by its first ``run``; an AP waits for its SIPI.
        """
        if vcpu_id in self._vcpus:
            raise ValueError(f"vCPU {vcpu_id} already exists")
        lib, ffi = self._lib, self._ffi
        h = self.handle(vcpu_id)
        for cap, value in self._caps.items():
            lib.vm_set_capability(h, getattr(lib, _CAPS[cap]), int(value))
        rc = lib.vm_set_x2apic_state(h, lib.X2APIC_ENABLED if self._x2apic else lib.X2APIC_DISABLED)
        if rc != 0:
            raise BhyveExit(f"Unable to set x2apic state ({rc})", ExitStatus.ERROR)
        lib.vm_set_capability(h, lib.VM_CAP_ENABLE_INVPCID, 1)
        # INIT/SIPI as IPI exits; kernels without the capability send SPINUP_AP.
        lib.vm_set_capability(h, lib.VM_CAP_IPI_EXIT, 1)
        if vcpu_id != 0 and lib.vm_set_capability(h, lib.VM_CAP_UNRESTRICTED_GUEST, 1) != 0:
            raise BhyveExit(f"vCPU {vcpu_id}: unrestricted guest capability not available: "
                            f"{_strerror(ffi.errno)}", ExitStatus.ERROR)
        if lib.vm_activate_cpu(h) != 0:
            raise BhyveExit(f"could not activate CPU {vcpu_id}: {_strerror(ffi.errno)}",
                            ExitStatus.EX_OSERR)
        if lib.vm_suspend_cpu(h) != 0:
            raise self._oserror(f"vm_suspend_cpu({vcpu_id})")
        v = VmmapiVcpu(self, vcpu_id, h)
        self._vcpus[vcpu_id] = v
        return v

    def set_capability(self, name: str, value: bool) -> bool:
        """``hlt_exit``/``pause_exit``/``unrestricted_guest``/``ipi_exit``/
        ``enable_invpcid`` map to VM_CAP_*; ``x2apic`` to the x2APIC state.
        Applied to existing vCPUs and remembered for later ones; False where
        the kernel lacks it (the caller then reports it as bhyve does, e.g.
        "VM exit on HLT not supported", exit 4)."""
        lib, ffi = self._lib, self._ffi
        if name == "x2apic":
            self._x2apic = bool(value)
            state = lib.X2APIC_ENABLED if value else lib.X2APIC_DISABLED
            return all(lib.vm_set_x2apic_state(v.handle, state) == 0 for v in self.vcpus())
        if name not in _CAPS:
            return False
        cap = getattr(lib, _CAPS[name])
        tmp = ffi.new("int *")
        if lib.vm_get_capability(self.handle(0), cap, tmp) != 0:
            return False
        self._caps[name] = bool(value)
        ok = True
        for v in self.vcpus():
            ok = lib.vm_set_capability(v.handle, cap, int(bool(value))) == 0 and ok
        return ok

    def pause_vcpus(self) -> None:
        """Kick every vCPU (bhyve's ``vm_suspend_all_cpus`` for a checkpoint)."""
        for v in self.vcpus():
            v.kick()

    def resume_vcpus(self) -> None:
        """Undo :meth:`pause_vcpus` now instead of at each vCPU's next ``run``."""
        for v in self.vcpus():
            v.prepare_entry()

    # --- interrupts ---------------------------------------------------------------------
    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise self._oserror(what)

    def ioapic_assert(self, pin: int) -> None:
        self._check(self._lib.vm_ioapic_assert_irq(self.ctx, pin), "vm_ioapic_assert_irq")

    def ioapic_deassert(self, pin: int) -> None:
        self._check(self._lib.vm_ioapic_deassert_irq(self.ctx, pin), "vm_ioapic_deassert_irq")

    def ioapic_pulse(self, pin: int) -> None:
        self._check(self._lib.vm_ioapic_pulse_irq(self.ctx, pin), "vm_ioapic_pulse_irq")

    def isa_assert(self, irq: int, ioapic_pin: int) -> None:
        self._check(self._lib.vm_isa_assert_irq(self.ctx, irq, ioapic_pin), "vm_isa_assert_irq")

    def isa_deassert(self, irq: int, ioapic_pin: int) -> None:
        self._check(self._lib.vm_isa_deassert_irq(self.ctx, irq, ioapic_pin), "vm_isa_deassert_irq")

    def isa_pulse(self, irq: int, ioapic_pin: int) -> None:
        self._check(self._lib.vm_isa_pulse_irq(self.ctx, irq, ioapic_pin), "vm_isa_pulse_irq")

    def isa_set_trigger(self, irq: int, level: bool) -> None:
        trig = self._lib.LEVEL_TRIGGER if level else self._lib.EDGE_TRIGGER
        self._check(self._lib.vm_isa_set_irq_trigger(self.ctx, irq, trig), "vm_isa_set_irq_trigger")

    def ioapic_pincount(self) -> int:
        n = self._ffi.new("int *")
        self._check(self._lib.vm_ioapic_pincount(self.ctx, n), "vm_ioapic_pincount")
        return int(n[0])

    def lapic_msi(self, addr: int, data: int) -> None:
        self._check(self._lib.vm_lapic_msi(self.ctx, addr, data), "vm_lapic_msi")

    def inject_nmi(self, vcpu_id: int) -> None:
        self._check(self._lib.vm_inject_nmi(self.handle(vcpu_id)), "vm_inject_nmi")

    # --- RTC ----------------------------------------------------------------------------
    def rtc_write(self, offset: int, value: int) -> None:
        self._check(self._lib.vm_rtc_write(self.ctx, offset, value & 0xFF), "vm_rtc_write")

    def rtc_read(self, offset: int) -> int:
        out = self._ffi.new("uint8_t *")
        self._check(self._lib.vm_rtc_read(self.ctx, offset, out), "vm_rtc_read")
        return int(out[0])

    def rtc_settime(self, secs: int) -> None:
        self._check(self._lib.vm_rtc_settime(self.ctx, secs), "vm_rtc_settime")

    # --- lifecycle ------------------------------------------------------------------------
    def suspend(self, how: SuspendHow) -> None:
        lib = self._lib
        code = {SuspendHow.RESET: lib.VM_SUSPEND_RESET, SuspendHow.POWEROFF: lib.VM_SUSPEND_POWEROFF,
                SuspendHow.HALT: lib.VM_SUSPEND_HALT,
                SuspendHow.TRIPLEFAULT: lib.VM_SUSPEND_TRIPLEFAULT}[SuspendHow(how)]
        self._check(lib.vm_suspend(self.ctx, code), "vm_suspend")

    def close(self) -> None:
        """Let go of the VM without destroying it (it stays in the kernel, as
        after bhyve exits)."""
        if self._destroyed:
            return
        self._release_handles()
        self._lib.vm_close(self._ctx)
        self._destroyed = True

    def destroy(self) -> None:
        """``vm_destroy``: the guest memory mappings die with it, so nothing
        may touch a region's buffer afterwards."""
        if self._destroyed:
            return
        self._release_handles()
        self._lib.vm_destroy(self._ctx)
        self._destroyed = True

    def _release_handles(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, {}
        for h in handles.values():
            self._lib.vm_vcpu_close(h)

    # --- snapshots ------------------------------------------------------------------------
    def _missing_snapshot_symbols(self) -> bool:
        lib = self._lib
        if not hasattr(lib, "vm_snapshot_req") or not hasattr(lib, "vm_restore_time"):
            return True
        if hasattr(lib, "bhyvepy_missing_symbols"):
            mask = lib.BHYVEPY_MISSING_SNAPSHOT_REQ | lib.BHYVEPY_MISSING_RESTORE_TIME
            return bool(lib.bhyvepy_missing_symbols() & mask)
        return False

    def _req(self, name: str) -> int:
        try:
            return self._snapshot_reqs[name]
        except KeyError:
            raise ValueError(f"unknown kernel state section {name!r}") from None

    def _meta(self, name: str, req: int, buf: Any, size: int, op: int) -> tuple[Any, Any]:
        ffi = self._ffi
        cname = ffi.new("char[]", name.encode())
        meta = ffi.new("struct vm_snapshot_meta *")
        meta.dev_data = ffi.NULL
        meta.dev_name = cname
        meta.dev_req = req
        meta.buffer.buf_start = buf
        meta.buffer.buf_size = size
        meta.buffer.buf = buf
        meta.buffer.buf_rem = size
        meta.op = op
        return meta, cname

    def save_kernel_section(self, name: str) -> bytes:
        """One ``VM_SNAPSHOT_REQ`` (op SAVE) into bhyve's 40 MiB buffer; the
        record is the ``buf_size - buf_rem`` bytes the kernel wrote."""
        req = self._req(name)
        if self._missing_snapshot_symbols():
            raise SnapshotUnsupported(f"Failed to snapshot struct {name}: libvmmapi lacks "
                                      f"vm_snapshot_req. {SNAPSHOT_SUPPORT_HELP}")
        ffi, lib = self._ffi, self._lib
        if self._snap_buf is None:
            self._snap_buf = ffi.new("uint8_t[]", SNAPSHOT_BUFFER_SIZE)
        elif self._snap_dirty:
            ffi.buffer(self._snap_buf, self._snap_dirty)[:] = bytes(self._snap_dirty)
        self._snap_dirty = 0
        meta, _keep = self._meta(name, req, self._snap_buf, SNAPSHOT_BUFFER_SIZE, lib.VM_SNAPSHOT_SAVE)
        if lib.vm_snapshot_req(self.ctx, meta) != 0:
            err = ffi.errno
            if err == errno_mod.ENOTTY:
                raise SnapshotUnsupported(f"Failed to snapshot struct {name}: the kernel has no "
                                          f"snapshot support (ENOTTY). {SNAPSHOT_SUPPORT_HELP}")
            raise KernelStateError(f"Failed to snapshot struct {name}: {_strerror(err)}")
        used = SNAPSHOT_BUFFER_SIZE - int(meta.buffer.buf_rem)
        if not 0 <= used <= SNAPSHOT_BUFFER_SIZE:
            raise KernelStateError(f"Failed to snapshot struct {name}: bad record length {used}")
        self._snap_dirty = used
        return bytes(ffi.buffer(self._snap_buf, used))

    def restore_kernel_section(self, name: str, data: bytes) -> None:
        """``VM_SNAPSHOT_REQ`` (op RESTORE); failure ends the process with
        EX_DATAERR, as bhyve's ``vm_restore_kern_structs``."""
        req = self._req(name)
        if self._missing_snapshot_symbols():
            raise BhyveExit(f"Failed to restore {name}: libvmmapi lacks vm_snapshot_req. "
                            f"{SNAPSHOT_SUPPORT_HELP}", ExitStatus.EX_DATAERR)
        if not data:
            raise BhyveExit(f"Failed to restore {name}: empty record", ExitStatus.EX_DATAERR)
        ffi, lib = self._ffi, self._lib
        buf = ffi.new("uint8_t[]", bytes(data))
        meta, _keep = self._meta(name, req, buf, len(data), lib.VM_SNAPSHOT_RESTORE)
        if lib.vm_snapshot_req(self.ctx, meta) != 0:
            err = ffi.errno
            why = (f"the kernel has no snapshot support (ENOTTY). {SNAPSHOT_SUPPORT_HELP}"
                   if err == errno_mod.ENOTTY else _strerror(err))
            raise BhyveExit(f"Failed to restore {name}: {why}", ExitStatus.EX_DATAERR)

    def restore_time(self) -> None:
        """``vm_restore_time`` (HPET and TSC re-based), then every vCPU is made
        runnable: bhyve resumes all vCPUs of a restored VM."""
        if self._missing_snapshot_symbols():
            raise BhyveExit(f"Unable to restore time: libvmmapi lacks vm_restore_time. "
                            f"{SNAPSHOT_SUPPORT_HELP}", ExitStatus.EX_OSERR)
        if self._lib.vm_restore_time(self.ctx) < 0:
            raise BhyveExit(f"Unable to restore time: {_strerror(self._ffi.errno)}", ExitStatus.EX_OSERR)
        with self.park_lock:
            for v in self.vcpus():
                v.waiting_for_sipi = False

    def host_facts(self) -> dict[str, Any]:
        return host_facts()


# --- vCPU -------------------------------------------------------------------------------

#: The VM_REG_GUEST_* names this backend uses (suffixes).
REG_NAMES = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RSP", "RBP", "R8", "R9", "R10", "R11",
             "R12", "R13", "R14", "R15", "RIP", "RFLAGS", "CR0", "CR2", "CR3", "CR4", "EFER",
             "CS", "DS", "ES", "FS", "GS", "SS", "TR", "LDTR", "GDTR", "IDTR")

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_CRS = ("cr0", "cr2", "cr3", "cr4", "efer")
_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_REG = {"cs": "CS", "ds": "DS", "es": "ES", "fs": "FS", "gs": "GS", "ss": "SS",
            "tr": "TR", "ldt": "LDTR", "gdt": "GDTR", "idt": "IDTR"}
#: Reg (emulator names) -> VM_REG_GUEST_* suffix.
_EMUL_REGS = {
    Reg.RAX: "RAX", Reg.RCX: "RCX", Reg.RDX: "RDX", Reg.RBX: "RBX", Reg.RSP: "RSP",
    Reg.RBP: "RBP", Reg.RSI: "RSI", Reg.RDI: "RDI", Reg.R8: "R8", Reg.R9: "R9",
    Reg.R10: "R10", Reg.R11: "R11", Reg.R12: "R12", Reg.R13: "R13", Reg.R14: "R14",
    Reg.R15: "R15", Reg.RIP: "RIP", Reg.RFLAGS: "RFLAGS", Reg.CR0: "CR0", Reg.CR3: "CR3",
    Reg.CR4: "CR4", Reg.EFER: "EFER",
}
_EMUL_SEG_BASES = {Reg.ES_BASE: "ES", Reg.CS_BASE: "CS", Reg.SS_BASE: "SS",
                   Reg.DS_BASE: "DS", Reg.FS_BASE: "FS", Reg.GS_BASE: "GS"}

#: A few VMX basic exit reasons (Intel SDM vol. 3, appendix C) for error reports.
VMX_EXIT_REASONS = {
    0: "Exception or NMI", 1: "External interrupt", 2: "Triple fault", 3: "INIT signal",
    4: "Start-up IPI", 7: "Interrupt window", 9: "Task switch", 10: "CPUID", 12: "HLT",
    18: "VMCALL", 28: "Control-register access", 30: "I/O instruction", 31: "RDMSR",
    32: "WRMSR", 33: "VM-entry failure due to invalid guest state",
    34: "VM-entry failure due to MSR loading", 41: "VM-entry failure due to machine-check event",
    44: "APIC access", 48: "EPT violation", 49: "EPT misconfiguration",
}

_DECODE_CACHE_MAX = 512


class _Mmio:
    """insn_emul's MmioAccess over the VM's IoHandler for one vCPU."""

    __slots__ = ("io", "vcpu")

    def __init__(self, io: IoHandler, vcpu: int) -> None:
        self.io, self.vcpu = io, vcpu

    def read(self, gpa: int, size: int) -> int:
        return self.io.mmio_read(self.vcpu, gpa, size)

    def write(self, gpa: int, size: int, value: int) -> None:
        self.io.mmio_write(self.vcpu, gpa, size, value)


class _ExitCpu:
    """insn_emul's CpuAccess over a stopped vCPU, for one exit.

    Values the exit already carries (CR3, CPL, and for string I/O RFLAGS and
    CR0) seed a cache; the rest is read on first use with
    ``vm_get_register``/``vm_get_desc``.  Writes go straight to the kernel.
    """

    __slots__ = ("_v", "_cache")

    def __init__(self, vcpu: "VmmapiVcpu", seed: dict[Reg, int]) -> None:
        self._v = vcpu
        self._cache = dict(seed)

    def get_reg(self, reg: Reg) -> int:
        try:
            return self._cache[reg]
        except KeyError:
            value = self._v.read_emul_reg(reg)
            self._cache[reg] = value
            return value

    def set_reg(self, reg: Reg, value: int) -> None:
        self._v.write_emul_reg(reg, value)
        self._cache[reg] = value & 0xFFFF_FFFF_FFFF_FFFF

    def read_phys(self, gpa: int, size: int) -> bytes:
        return self._v.vm.emul_mem.read(gpa, size)

    def write_phys(self, gpa: int, data: bytes) -> None:
        self._v.vm.emul_mem.write(gpa, data)


class VmmapiVcpu(Vcpu):
    """One vCPU.  ``run`` and the register methods belong to its own thread;
    ``kick`` may come from any thread, INIT/SIPI from another vCPU's."""

    def __init__(self, vm: VmmapiVm, vcpu_id: int, handle: Any) -> None:
        self.id = vcpu_id
        self.vm = vm
        self.handle = handle
        ffi, lib = vm._ffi, vm._lib
        self._ffi, self._lib = ffi, lib
        self._exit = ffi.new("struct vm_exit *")
        self._cpuset = ffi.new("cpuset_t *")
        self._cpuset_size = ffi.sizeof("cpuset_t")
        self._vmrun = ffi.new("struct vm_run *")
        self._vmrun.cpuid = vcpu_id
        self._vmrun.vm_exit = self._exit
        self._vmrun.cpuset = self._cpuset
        self._vmrun.cpusetsize = self._cpuset_size
        # Park state, guarded by vm.park_lock (see the module docstring).
        self.kick_pending = False
        self.kernel_suspended = True        # create_vcpu leaves it suspended
        self.waiting_for_sipi = vcpu_id != 0
        self._decoded: dict[tuple[bytes, int, bool], insn_emul.Instruction] = {}
        self._regnum = {name: getattr(lib, "VM_REG_GUEST_" + name) for name in REG_NAMES}
        self._handlers: dict[int, Callable[[IoHandler], VmExit | None]] = {
            lib.VM_EXITCODE_INOUT: self._exit_inout,
            lib.VM_EXITCODE_INOUT_STR: self._exit_inout,
            lib.VM_EXITCODE_INST_EMUL: self._exit_inst_emul,
            lib.VM_EXITCODE_SUSPENDED: self._exit_suspended,
            lib.VM_EXITCODE_DEBUG: self._exit_debug,
            lib.VM_EXITCODE_RDMSR: self._exit_rdmsr,
            lib.VM_EXITCODE_WRMSR: self._exit_wrmsr,
            lib.VM_EXITCODE_IPI: self._exit_ipi,
            lib.VM_EXITCODE_SPINUP_AP: self._exit_spinup_ap,
            lib.VM_EXITCODE_VMX: self._exit_vmx,
            lib.VM_EXITCODE_SVM: self._exit_svm,
            lib.VM_EXITCODE_BOGUS: self._exit_continue,
            lib.VM_EXITCODE_REQIDLE: self._exit_continue,
            lib.VM_EXITCODE_RENDEZVOUS: self._exit_continue,
            lib.VM_EXITCODE_HLT: self._exit_continue,
            lib.VM_EXITCODE_PAUSE: self._exit_continue,
            lib.VM_EXITCODE_MTRAP: self._exit_continue,
        }

    # --- run / kick -----------------------------------------------------------------------
    def prepare_entry(self) -> None:
        """Undo a kick's kernel suspension before entering the guest again."""
        if not self.kernel_suspended:
            return
        with self.vm.park_lock:
            if self.kernel_suspended and not self.waiting_for_sipi:
                if self._lib.vm_resume_cpu(self.handle) != 0:
                    raise self.vm._oserror(f"vm_resume_cpu({self.id})")
                self.kernel_suspended = False

    def kick(self) -> None:
        """Make ``run`` return INTERRUPTED: a flag for an exit already being
        handled, and the kernel's debug suspension for a ``vm_run`` in progress
        (or about to start), which then returns ``VM_EXITCODE_DEBUG``."""
        with self.vm.park_lock:
            self.kick_pending = True
            if not self.kernel_suspended and not self.vm.destroyed:
                self.kernel_suspended = True
                self._lib.vm_suspend_cpu(self.handle)

    def run(self, io: IoHandler) -> VmExit:
        lib, ffi = self._lib, self._ffi
        vme = self._exit
        handlers = self._handlers
        if self.vm.destroyed:
            return VmExit.unhandled(f"vCPU {self.id}: the VM has been destroyed",
                                    status=int(ExitStatus.ERROR))
        while True:
            if self.kick_pending:
                with self.vm.park_lock:
                    self.kick_pending = False
                return INTERRUPTED
            if self.kernel_suspended:
                self.prepare_entry()
            if lib.vm_run(self.handle, self._vmrun) != 0:
                err = ffi.errno
                if err == errno_mod.EINTR:
                    continue
                return VmExit.unhandled(f"vm_run error -1, errno {err} ({_strerror(err)})",
                                        errno=err, status=int(ExitStatus.ERROR))
            handler = handlers.get(vme.exitcode)
            if handler is None:
                return VmExit.unhandled(f"vm_loop: unexpected exitcode {int(vme.exitcode):#x}",
                                        exitcode=int(vme.exitcode), rip=int(vme.rip),
                                        status=int(ExitStatus.ERROR))
            result = handler(io)
            if result is not None:
                return result

    # --- exits ----------------------------------------------------------------------------
    def _exit_continue(self, io: IoHandler) -> None:
        return None

    def _exit_inout(self, io: IoHandler) -> VmExit | None:
        inout = self._exit.u.inout
        size, port, is_in = int(inout.bytes), int(inout.port), bool(getattr(inout, "in"))
        if size not in (1, 2, 4):
            return VmExit.unhandled(f"bad port I/O size {size} at port {port:#x}", port=port)
        if inout.string:
            return self._string_io(io, size, port, is_in)
        mask = _mask(size)
        eax = int(inout.eax)
        if is_in:
            value = io.pio_in(self.id, port, size) & mask
            # bhyve merges into the 32-bit EAX and writes it back to RAX.
            eax = (eax & ~mask & 0xFFFF_FFFF) | value
            if self._lib.vm_set_register(self.handle, self._regnum["RAX"], eax) != 0:
                return self._fail_reg("RAX")
        else:
            io.pio_out(self.id, port, size, eax & mask)
        return None

    def _string_io(self, io: IoHandler, size: int, port: int, is_in: bool) -> VmExit | None:
        """INS/OUTS: walk guest memory as the CPU would (segment, alignment,
        paging), up to STRING_IO_BATCH iterations per exit, then update
        rSI/rDI (and rCX with REP) and restart the instruction if iterations
        remain.  A fault is injected into the guest."""
        vis = self._exit.u.inout_str
        addrsize = int(vis.addrsize)
        if addrsize not in (2, 4, 8):
            return VmExit.unhandled(f"bad string I/O address size {addrsize} at port {port:#x}")
        amask = _mask(addrsize)
        index = int(vis.index) & amask
        count = int(vis.count) & amask
        rep = bool(vis.inout.rep)
        rflags = int(vis.rflags)
        step = -size if rflags & _RFLAGS_DF else size
        paging = vis.paging
        mode = int(paging.cpu_mode)
        pmode = PagingMode(int(paging.paging_mode))
        cpu = _ExitCpu(self, {Reg.CR3: int(paging.cr3), Reg.CPL: int(paging.cpl),
                              Reg.RFLAGS: rflags, Reg.CR0: int(vis.cr0)})
        seg = _SegInfo(int(vis.seg_name), int(vis.seg_desc.base), int(vis.seg_desc.limit),
                       int(vis.seg_desc.access), self._lib)
        access = Access.WRITE if is_in else Access.READ
        mem = self.vm.emul_mem
        fault: GuestFault | None = None
        batch = min(count, STRING_IO_BATCH)
        while batch:
            try:
                gla = seg.linear(mode, pmode, index, size, is_in)
                if (cpu.get_reg(Reg.CPL) == 3 and int(vis.cr0) & _CR0_AM and rflags & _RFLAGS_AC
                        and gla & (size - 1)):
                    raise GuestFault(_VEC_AC, 0)
                pieces = _translate(cpu, gla, size, access, pmode, mode)
            except GuestFault as f:
                fault = f
                break
            try:
                if is_in:
                    value = io.pio_in(self.id, port, size) & _mask(size)
                    for gpa, n in pieces:
                        mem.write(gpa, (value & _mask(n)).to_bytes(n, "little"))
                        value >>= 8 * n
                else:
                    value = shift = 0
                    for gpa, n in pieces:
                        value |= int.from_bytes(mem.read(gpa, n), "little") << shift
                        shift += 8 * n
                    io.pio_out(self.id, port, size, value)
            except GuestMemoryError as e:
                return VmExit.unhandled(
                    f"Unhandled {'in' if is_in else 'out'}{'bwl'[size >> 1]} {port:#06x} at "
                    f"{int(self._exit.rip):#x}: string I/O buffer is not guest RAM ({e})", port=port)
            index = (index + step) & amask
            count -= 1
            batch -= 1
        idxreg = Reg.RDI if is_in else Reg.RSI
        self._update_reg(idxreg, index, addrsize)
        if rep:
            self._update_reg(Reg.RCX, count, addrsize)
        if fault is not None:
            return self._inject(fault)
        if count:
            return self._restart()
        return None

    def _exit_inst_emul(self, io: IoHandler) -> VmExit | None:
        """MMIO: decode the instruction bytes the kernel fetched and emulate
        them against the devices.  A kernel that already decoded the
        instruction (``vie.decoded``) advances RIP itself by ``inst_length``;
        otherwise RIP is moved here once the instruction has retired."""
        vme = self._exit
        ie = vme.u.inst_emul
        vie = ie.vie
        nvalid = min(int(vie.num_valid), 15)
        code = bytes(self._ffi.buffer(vie.inst, 15))[:nvalid]
        rip = int(vme.rip)
        try:
            mode = CpuMode(int(ie.paging.cpu_mode))
            key = (code, int(mode), bool(ie.cs_d))
            insn = self._decoded.get(key)
            if insn is None:
                insn = insn_emul.decode(code, mode, bool(ie.cs_d))
                if len(self._decoded) >= _DECODE_CACHE_MAX:
                    self._decoded.clear()
                self._decoded[key] = insn
            cpu = _ExitCpu(self, {Reg.CR3: int(ie.paging.cr3), Reg.CPL: int(ie.paging.cpl),
                                  Reg.CS_BASE: int(ie.cs_base)})
            retired = insn_emul.emulate(insn, int(ie.gpa), int(ie.gla), cpu, _Mmio(io, self.id))
        except GuestFault as f:
            return self._inject(f)
        except (insn_emul.DecodeError, insn_emul.EmulationError, ValueError) as e:
            return VmExit.unhandled(
                f"Failed to emulate instruction sequence [ {code.hex()} ] at {rip:#x}: {e}",
                gpa=int(ie.gpa), rip=rip, code=code.hex())
        if not retired:
            return self._restart()
        if not vie.decoded or int(vme.inst_length) != insn.length:
            if self._lib.vm_set_register(self.handle, self._regnum["RIP"], rip + insn.length) != 0:
                return self._fail_reg("RIP")
        return None

    def _exit_suspended(self, io: IoHandler) -> VmExit:
        lib = self._lib
        how = int(self._exit.u.suspended.how)
        table = {lib.VM_SUSPEND_RESET: SuspendHow.RESET, lib.VM_SUSPEND_POWEROFF: SuspendHow.POWEROFF,
                 lib.VM_SUSPEND_HALT: SuspendHow.HALT, lib.VM_SUSPEND_TRIPLEFAULT: SuspendHow.TRIPLEFAULT}
        if how in table:
            return VmExit.suspended(table[how], table[how].name.lower())
        destroy = getattr(lib, "VM_SUSPEND_DESTROY", None)
        if destroy is not None and how == destroy:
            return VmExit.unhandled("the virtual machine was destroyed", how=how,
                                    status=int(ExitStatus.ERROR))
        return VmExit.unhandled(f"vmexit_suspend: invalid reason {how}", how=how, status=100)

    def _exit_debug(self, io: IoHandler) -> VmExit | None:
        if self.kick_pending:
            return None         # the loop returns INTERRUPTED
        time.sleep(PARKED_POLL_SECONDS)
        return VmExit(ExitReason.DEBUG)

    def _exit_rdmsr(self, io: IoHandler) -> VmExit | None:
        code = int(self._exit.u.msr.code)
        policy = self.vm.msr
        value = policy.read(code)
        if value is None:
            if policy.strict or policy.verbose:
                log.warning("rdmsr to register %#x on vcpu %d", code, self.id)
            if policy.strict:
                return self._inject(GuestFault(_VEC_GP, 0))
            value = 0
        lib = self._lib
        if lib.vm_set_register(self.handle, self._regnum["RAX"], value & 0xFFFF_FFFF) != 0:
            return self._fail_reg("RAX")
        if lib.vm_set_register(self.handle, self._regnum["RDX"], value >> 32) != 0:
            return self._fail_reg("RDX")
        return None

    def _exit_wrmsr(self, io: IoHandler) -> VmExit | None:
        code, wval = int(self._exit.u.msr.code), int(self._exit.u.msr.wval)
        policy = self.vm.msr
        if not policy.write_ignored(code):
            if policy.strict or policy.verbose:
                log.warning("wrmsr to register %#x(%#x) on vcpu %d", code, wval, self.id)
            if policy.strict:
                return self._inject(GuestFault(_VEC_GP, 0))
        return None

    def _exit_ipi(self, io: IoHandler) -> VmExit | None:
        """INIT parks the targets until their SIPI; STARTUP starts them at
        ``vector << 12`` (bhyve's ``vmexit_ipi`` and ``spinup_ap``)."""
        lib = self._lib
        mode, vector = int(self._exit.u.ipi.mode), int(self._exit.u.ipi.vector)
        mask = int.from_bytes(self._ffi.buffer(self._cpuset, self._cpuset_size), "little")
        targets = [i for i in range(8 * self._cpuset_size) if mask >> i & 1]
        if mode == lib.APIC_DELMODE_INIT:
            for i in targets:
                t = self.vm.vcpu(i)
                if t is None:
                    continue
                with self.vm.park_lock:
                    t.waiting_for_sipi = True
                    if not t.kernel_suspended:
                        if lib.vm_suspend_cpu(t.handle) != 0:
                            return VmExit.unhandled(f"failed to suspend cpu {i}",
                                                    status=int(ExitStatus.ERROR))
                        t.kernel_suspended = True
            return None
        if mode == lib.APIC_DELMODE_STARTUP:
            for i in targets:
                t = self.vm.vcpu(i)
                if t is not None:
                    failed = t.spinup(vector << 12)
                    if failed is not None:
                        return failed
            return None
        return VmExit.unhandled(f"unexpected IPI delivery mode {mode:#x}", mode=mode,
                                status=int(ExitStatus.ERROR))

    def _exit_spinup_ap(self, io: IoHandler) -> VmExit | None:
        """Kernels that do not offer VM_CAP_IPI_EXIT report a SIPI this way."""
        target, rip = int(self._exit.u.spinup_ap.vcpu), int(self._exit.u.spinup_ap.rip)
        t = self.vm.vcpu(target)
        if t is None:
            return None
        return t.spinup(rip)

    def spinup(self, rip: int) -> VmExit | None:
        """Start this AP in real mode at ``rip`` (a 4 KiB-aligned SIPI vector
        address): reset state, CS base = rip, CS = rip >> 4, IP = 0, resume."""
        with self.vm.park_lock:
            if not self.waiting_for_sipi:
                return None     # a second SIPI is ignored, as by the CPU
        lib, ffi = self._lib, self._ffi
        h, rn = self.handle, self._regnum
        base, limit, access = ffi.new("uint64_t *"), ffi.new("uint32_t *"), ffi.new("uint32_t *")
        if (lib.vcpu_reset(h) != 0 or lib.vm_set_register(h, rn["RIP"], 0) != 0
                or lib.vm_get_desc(h, rn["CS"], base, limit, access) != 0
                or lib.vm_set_desc(h, rn["CS"], rip, limit[0], access[0]) != 0
                or lib.vm_set_register(h, rn["CS"], (rip >> 4) & 0xFFFF) != 0):
            return VmExit.unhandled(f"could not start vCPU {self.id}: {_strerror(ffi.errno)}",
                                    status=int(ExitStatus.ERROR))
        with self.vm.park_lock:
            self.waiting_for_sipi = False
            if self.kernel_suspended and not self.kick_pending:
                lib.vm_resume_cpu(h)
                self.kernel_suspended = False
        return None

    def _exit_vmx(self, io: IoHandler) -> VmExit:
        vme = self._exit
        vmx = vme.u.vmx
        reason = int(vmx.exit_reason)
        desc = VMX_EXIT_REASONS.get(reason, "Unknown")
        info = dict(status=int(vmx.status), exit_reason=reason, exit_reason_desc=desc,
                    qualification=int(vmx.exit_qualification), inst_type=int(vmx.inst_type),
                    inst_error=int(vmx.inst_error), rip=int(vme.rip), inst_length=int(vme.inst_length))
        detail = (f"vm exit[{self.id}] reason VMX rip {info['rip']:#018x} inst_length "
                  f"{info['inst_length']} status {info['status']} exit_reason {reason} ({desc}) "
                  f"qualification {info['qualification']:#018x} inst_type {info['inst_type']} "
                  f"inst_error {info['inst_error']}")
        return VmExit.unhandled(detail, **info)

    def _exit_svm(self, io: IoHandler) -> VmExit:
        vme = self._exit
        svm = vme.u.svm
        info = dict(exitcode=int(svm.exitcode), exitinfo1=int(svm.exitinfo1),
                    exitinfo2=int(svm.exitinfo2), rip=int(vme.rip), inst_length=int(vme.inst_length))
        detail = (f"vm exit[{self.id}] reason SVM rip {info['rip']:#018x} inst_length "
                  f"{info['inst_length']} exitcode {info['exitcode']:#x} exitinfo1 "
                  f"{info['exitinfo1']:#x} exitinfo2 {info['exitinfo2']:#x}")
        return VmExit.unhandled(detail, **info)

    # --- helpers for exits ---------------------------------------------------------------
    def _fail_reg(self, name: str) -> VmExit:
        err = self._ffi.errno
        return VmExit.unhandled(f"vm_set_register({name}) on vcpu {self.id}: {_strerror(err)}",
                                errno=err)

    def _inject(self, fault: GuestFault) -> VmExit | None:
        """Deliver an exception at the current instruction (bhyve's
        ``vm_inject_fault`` with restart; #PF loads CR2 first)."""
        lib = self._lib
        if fault.vector == _VEC_PF and fault.cr2 is not None:
            if lib.vm_set_register(self.handle, self._regnum["CR2"], fault.cr2) != 0:
                return self._fail_reg("CR2")
        valid = fault.error_code is not None
        if lib.vm_inject_exception(self.handle, fault.vector, int(valid),
                                   (fault.error_code or 0) & 0xFFFF_FFFF, 1) != 0:
            err = self._ffi.errno
            return VmExit.unhandled(f"vm_inject_exception({fault.vector}) on vcpu {self.id}: "
                                    f"{_strerror(err)}", errno=err)
        return None

    def _restart(self) -> VmExit | None:
        """Resume the guest at the same instruction (REP with iterations left)."""
        lib = self._lib
        missing = lib.bhyvepy_missing_symbols() if hasattr(lib, "bhyvepy_missing_symbols") else 0
        if not missing & lib.BHYVEPY_MISSING_RESTART_INSTRUCTION:
            if lib.vm_restart_instruction(self.handle) == 0:
                return None
        # Setting RIP also sets the kernel's next RIP: the same effect.
        if lib.vm_set_register(self.handle, self._regnum["RIP"], int(self._exit.rip)) != 0:
            return self._fail_reg("RIP")
        return None

    def _update_reg(self, reg: Reg, value: int, size: int) -> None:
        """Write ``size`` bytes of a GPR as the CPU does: 8/16-bit writes keep
        the rest, 32-bit writes clear bits 63:32."""
        num = self._regnum[_EMUL_REGS[reg]]
        if size < 4:
            old = self._get(num)
            value = (old & ~_mask(size)) | (value & _mask(size))
        else:
            value &= _mask(size)
        if self._lib.vm_set_register(self.handle, num, value) != 0:
            raise OSError(self._ffi.errno, f"vm_set_register({reg.value})")

    def _get(self, num: int) -> int:
        out = self._ffi.new("uint64_t *")
        if self._lib.vm_get_register(self.handle, num, out) != 0:
            raise OSError(self._ffi.errno, f"vm_get_register({num})")
        return int(out[0])

    def _desc(self, num: int) -> tuple[int, int, int]:
        ffi = self._ffi
        base, limit, access = ffi.new("uint64_t *"), ffi.new("uint32_t *"), ffi.new("uint32_t *")
        if self._lib.vm_get_desc(self.handle, num, base, limit, access) != 0:
            raise OSError(ffi.errno, f"vm_get_desc({num})")
        return int(base[0]), int(limit[0]), int(access[0])

    def read_emul_reg(self, reg: Reg) -> int:
        if reg in _EMUL_REGS:
            return self._get(self._regnum[_EMUL_REGS[reg]])
        if reg in _EMUL_SEG_BASES:
            return self._desc(self._regnum[_EMUL_SEG_BASES[reg]])[0]
        if reg == Reg.SS_DB:
            return (self._desc(self._regnum["SS"])[2] >> 14) & 1
        if reg == Reg.CPL:
            return (self._desc(self._regnum["SS"])[2] >> 5) & 3
        raise insn_emul.EmulationError(f"register {reg.value} is not available")

    def write_emul_reg(self, reg: Reg, value: int) -> None:
        if reg not in _EMUL_REGS:
            raise insn_emul.EmulationError(f"register {reg.value} cannot be written")
        if self._lib.vm_set_register(self.handle, self._regnum[_EMUL_REGS[reg]],
                                     value & 0xFFFF_FFFF_FFFF_FFFF) != 0:
            raise insn_emul.EmulationError(f"vm_set_register({reg.value}): "
                                           f"{_strerror(self._ffi.errno)}")

    # --- registers ---------------------------------------------------------------------------
    def get_registers(self) -> dict[str, int]:
        """Names as on the KVM backend: GPRs, rip, rflags, cr0/2/3/4, efer,
        ``cs``/``cs_base``/``cs_limit``/``cs_access`` (likewise ds es fs gs ss
        tr ldt), ``gdt_base``/``gdt_limit``, ``idt_base``/``idt_limit``."""
        ffi, lib = self._ffi, self._lib
        names = _GPRS + _CRS + _SEGS
        nums = ffi.new("int[]", [self._regnum[_SEG_REG.get(n, n.upper())] for n in names])
        vals = ffi.new("uint64_t[]", len(names))
        if lib.vm_get_register_set(self.handle, len(names), nums, vals) != 0:
            raise OSError(ffi.errno, "vm_get_register_set")
        out = {n: int(vals[i]) for i, n in enumerate(names)}
        for s in _SEGS:
            out[s + "_base"], out[s + "_limit"], out[s + "_access"] = self._desc(self._regnum[_SEG_REG[s]])
        for t in ("gdt", "idt"):
            out[t + "_base"], out[t + "_limit"], _ = self._desc(self._regnum[_SEG_REG[t]])
        return out

    def set_registers(self, regs: dict[str, int]) -> None:
        """Change the named registers (names as in :meth:`get_registers`)."""
        ffi, lib = self._ffi, self._lib
        plain: dict[str, int] = {}
        descs: dict[str, dict[str, int]] = {}
        for key, value in regs.items():
            if key in _GPRS or key in _CRS or key in _SEGS:
                plain[key] = value
                continue
            seg, _, part = key.rpartition("_")
            if seg in _SEG_REG and part in ("base", "limit", "access") and (seg in _SEGS or part != "access"):
                descs.setdefault(seg, {})[part] = value
            else:
                raise KeyError(f"unknown register {key!r}")
        if plain:
            names = list(plain)
            nums = ffi.new("int[]", [self._regnum[_SEG_REG.get(n, n.upper())] for n in names])
            vals = ffi.new("uint64_t[]", [plain[n] & 0xFFFF_FFFF_FFFF_FFFF for n in names])
            if lib.vm_set_register_set(self.handle, len(names), nums, vals) != 0:
                raise OSError(ffi.errno, "vm_set_register_set")
        for seg, parts in descs.items():
            num = self._regnum[_SEG_REG[seg]]
            base, limit, access = self._desc(num)
            base = parts.get("base", base)
            limit = parts.get("limit", limit)
            access = parts.get("access", access)
            if lib.vm_set_desc(self.handle, num, base, limit & 0xFFFF_FFFF, access & 0xFFFF_FFFF) != 0:
                raise OSError(ffi.errno, f"vm_set_desc({seg})")

    def reset_to_reset_vector(self) -> None:
        """Firmware boot: unrestricted guest mode (real mode runs natively) and
        ``vcpu_reset``'s power-on state, so the vCPU fetches at 0xFFFFFFF0."""
        lib, ffi = self._lib, self._ffi
        if lib.vm_set_capability(self.handle, lib.VM_CAP_UNRESTRICTED_GUEST, 1) != 0:
            raise BhyveExit("ROM boot failed: unrestricted guest capability not available: "
                            f"{_strerror(ffi.errno)}", ExitStatus.ERROR)
        if lib.vcpu_reset(self.handle) != 0:
            raise OSError(ffi.errno, f"vcpu_reset({self.id})")

    def close(self) -> None:
        """The handle is released with the VM (``vm_vcpu_close`` in destroy/close)."""


# --- segmentation for string I/O -----------------------------------------------------------

class _SegInfo:
    """The segment of a string I/O operand and the CPU's checks on it."""

    __slots__ = ("is_fs_gs", "is_ss", "base", "limit", "access")

    def __init__(self, seg_name: int, base: int, limit: int, access: int, lib: Any) -> None:
        self.is_fs_gs = seg_name in (lib.VM_REG_GUEST_FS, lib.VM_REG_GUEST_GS)
        self.is_ss = seg_name == lib.VM_REG_GUEST_SS
        self.base, self.limit, self.access = base, limit, access

    def _fault(self) -> GuestFault:
        return GuestFault(_VEC_SS if self.is_ss else _VEC_GP, 0)

    def linear(self, cpu_mode: int, pmode: PagingMode, offset: int, size: int, write: bool) -> int:
        if cpu_mode == CpuMode.LONG64:
            base = self.base if self.is_fs_gs else 0
            gla = (base + offset) & 0xFFFF_FFFF_FFFF_FFFF
            last = (gla + size - 1) & 0xFFFF_FFFF_FFFF_FFFF
            if not (is_canonical(gla, pmode) and is_canonical(last, pmode)):
                raise self._fault()
            return gla
        if cpu_mode != CpuMode.REAL:
            acc = self.access
            if acc & _DESC_UNUSABLE or not acc & 0x80:         # unusable / not present
                raise self._fault()
            typ = acc & 0x1F
            if not typ & 0x10:                                 # system descriptor
                raise self._fault()
            code = bool(typ & 0x08)
            if write and (code or not typ & 0x02):             # not a writable data segment
                raise self._fault()
            if not write and code and not typ & 0x02:          # execute-only code
                raise self._fault()
            if not code and typ & 0x04:                        # expand-down data segment
                top = 0xFFFF_FFFF if acc & 0x4000 else 0xFFFF
                if offset <= self.limit or offset + size - 1 > top:
                    raise self._fault()
            elif offset + size - 1 > self.limit:
                raise self._fault()
        elif offset + size - 1 > (self.limit or 0xFFFF):   # a 0 limit read as real mode's 64 KiB
            raise self._fault()
        return (self.base + offset) & 0xFFFF_FFFF


def _translate(cpu: _ExitCpu, gla: int, size: int, access: Access, pmode: PagingMode,
               cpu_mode: int) -> list[tuple[int, int]]:
    """(gpa, length) pieces of an access, split where it crosses a page."""
    wrap = 0xFFFF_FFFF_FFFF_FFFF if cpu_mode == CpuMode.LONG64 else 0xFFFF_FFFF
    pieces = []
    while size:
        n = min(size, PAGE_SIZE - (gla & (PAGE_SIZE - 1)))
        pieces.append((insn_emul.gla_to_gpa(cpu, gla, access, pmode), n))
        gla = (gla + n) & wrap
        size -= n
    return pieces
