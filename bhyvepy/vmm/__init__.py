"""Kernel backends behind one contract, shaped after libvmmapi.

vmm.ko (FreeBSD) is the primary target; Linux KVM is the second backend on
which everything above this package is tested.  The contract below is what
:mod:`bhyvepy.vm` and the device models may use; anything a backend does
differently (instruction emulation on vmm.ko, Python models of the RTC/PM
timer/HPET on KVM) stays behind it.

Conventions
-----------
* Guest memory is ``MemoryRegion`` objects whose ``buf`` is a writable
  buffer (an ``mmap``) covering ``size`` bytes at guest-physical ``gpa``.
  Devices never touch it directly: they go through
  :class:`bhyvepy.memory.GuestMemory`, the one bounds-checked accessor.
* ``Vcpu.run(io)`` runs the vCPU until an exit the VM loop must decide
  about; port I/O and MMIO are completed inside the backend by calling
  ``io``.  ``Vcpu.kick()`` may be called from any thread and makes a
  running or about-to-run ``run()`` return ``ExitReason.INTERRUPTED``.
* Kernel state sections carry the same names on every backend:
  ``KERNEL_SECTIONS`` in bhyve's table order.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Protocol

from bhyvepy.layout import BOOTROM_SEG_SIZE, HIGHMEM_BASE, LOWMEM_LIMIT
from bhyvepy.vmm.exits import ExitReason, SuspendHow, VmExit

__all__ = [
    "KERNEL_SECTIONS", "LOWMEM_LIMIT", "HIGHMEM_BASE", "BOOTROM_SEG_SIZE",
    "IoHandler", "MemoryRegion", "Topology", "Backend", "VirtualMachine", "Vcpu",
    "ExitReason", "SuspendHow", "VmExit", "get_backend",
]

#: bhyve's kernel-structure table order (.kern order and restore order).
KERNEL_SECTIONS = ("vhpet", "vm", "vioapic", "vlapic", "vmcx", "vatpit", "vatpic", "vpmtmr", "vrtc")



class IoHandler(Protocol):
    """What the backend calls to complete port I/O and MMIO exits."""

    def pio_in(self, vcpu: int, port: int, size: int) -> int: ...
    def pio_out(self, vcpu: int, port: int, size: int, value: int) -> None: ...
    def mmio_read(self, vcpu: int, gpa: int, size: int) -> int: ...
    def mmio_write(self, vcpu: int, gpa: int, size: int, value: int) -> None: ...


@dataclass(slots=True)
class MemoryRegion:
    """A range of guest-physical address space backed by host memory."""

    name: str          # "lowmem", "highmem", "bootrom", "framebuffer", ...
    gpa: int
    size: int
    buf: object        # writable buffer (mmap); read-only ROMs are still host-writable
    readonly: bool = False   # read-only for the guest
    is_ram: bool = True      # saved in snapshots (bhyve saves lowmem and highmem only)
    #: Backend hook behind :meth:`data_extents`; None where the backend cannot tell.
    extent_source: Callable[[], list[tuple[int, int]] | None] | None = \
        field(default=None, repr=False, compare=False)

    def data_extents(self) -> list[tuple[int, int]] | None:
        """Sorted ``(offset, length)`` runs outside which the region is known to be zero.

        Lets a snapshot skip memory the guest never touched without reading
        it: reading an untouched page of shared guest memory allocates it, so
        a full zero scan of a large, mostly idle guest costs its whole size in
        host RAM and time.  The runs may still hold zero pages (the guest
        zeroed them).  None means unknown (the caller must look at every
        page): vmm.ko offers no such query to userland yet.  Ask only while
        the vCPUs are stopped, or the answer is stale at once.
        """
        return None if self.extent_source is None else self.extent_source()


@dataclass(slots=True, frozen=True)
class Topology:
    cpus: int = 1
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    maxcpus: int = 0


class Vcpu(abc.ABC):
    """One virtual CPU.  Only its own thread calls ``run`` and the register methods
    while the VM runs; ``kick`` is safe from any thread."""

    id: int

    @abc.abstractmethod
    def run(self, io: IoHandler) -> VmExit: ...

    @abc.abstractmethod
    def kick(self) -> None: ...

    @abc.abstractmethod
    def get_registers(self) -> dict[str, int]:
        """General registers, rip, rflags, cr0/2/3/4, efer and segment selectors/bases."""

    @abc.abstractmethod
    def set_registers(self, regs: dict[str, int]) -> None: ...

    @abc.abstractmethod
    def reset_to_reset_vector(self) -> None:
        """Architectural reset state for a firmware boot (BSP starts at 0xFFFFFFF0)."""

    def close(self) -> None:  # pragma: no cover - optional
        pass


class VirtualMachine(abc.ABC):
    """A named kernel VM object with its memory, vCPUs and interrupt controllers."""

    name: str
    backend_name: str
    #: True where the kernel emulates the RTC, PM timer and HPET itself (vmm.ko);
    #: False on KVM, where Python models provide them and their state sections.
    kernel_emulates_platform: bool

    # --- memory ----------------------------------------------------------
    @abc.abstractmethod
    def setup_memory(self, size: int, *, wired: bool = False, in_core: bool = False) -> list[MemoryRegion]:
        """Create lowmem (up to 3 GiB at 0) and highmem (the rest at 4 GiB)."""

    @abc.abstractmethod
    def map_devmem(self, name: str, gpa: int, size: int, *, readonly: bool) -> MemoryRegion:
        """Create a device memory segment (boot ROM, framebuffer) mapped at ``gpa``."""

    @abc.abstractmethod
    def memory_regions(self) -> list[MemoryRegion]: ...

    def unmap_devmem(self, name: str) -> None:
        """Remove a device memory segment's mapping (a framebuffer BAR moving)."""
        raise NotImplementedError

    # --- vCPUs -----------------------------------------------------------
    @abc.abstractmethod
    def set_topology(self, topo: Topology) -> None: ...

    @abc.abstractmethod
    def create_vcpu(self, vcpu_id: int) -> Vcpu: ...

    @abc.abstractmethod
    def set_capability(self, name: str, value: bool) -> bool:
        """Set an optional capability (``hlt_exit``, ``pause_exit``, ``x2apic``);
        return False where the backend does not offer it."""

    # --- interrupts ------------------------------------------------------
    def ioapic_pincount(self) -> int:
        """Pins of the I/O APIC (vmm.ko: 32, KVM: 24); PCI INTx uses 16 and up."""
        return 24

    @abc.abstractmethod
    def ioapic_assert(self, pin: int) -> None: ...
    @abc.abstractmethod
    def ioapic_deassert(self, pin: int) -> None: ...
    @abc.abstractmethod
    def ioapic_pulse(self, pin: int) -> None: ...
    # ``ioapic_pin`` -1 means "the 8259 only", as in libvmmapi.
    @abc.abstractmethod
    def isa_assert(self, irq: int, ioapic_pin: int) -> None: ...
    @abc.abstractmethod
    def isa_deassert(self, irq: int, ioapic_pin: int) -> None: ...
    @abc.abstractmethod
    def isa_pulse(self, irq: int, ioapic_pin: int) -> None: ...
    @abc.abstractmethod
    def lapic_msi(self, addr: int, data: int) -> None: ...
    @abc.abstractmethod
    def inject_nmi(self, vcpu_id: int) -> None: ...

    # --- RTC (vm_rtc_* on vmm.ko; the Python RTC model on KVM) -------------
    @abc.abstractmethod
    def rtc_write(self, offset: int, value: int) -> None:
        """Write a CMOS/NVRAM byte (bhyve stores the memory size there)."""

    @abc.abstractmethod
    def rtc_read(self, offset: int) -> int: ...

    @abc.abstractmethod
    def rtc_settime(self, secs: int) -> None: ...

    # --- lifecycle -------------------------------------------------------
    @abc.abstractmethod
    def suspend(self, how: SuspendHow) -> None:
        """Ask every vCPU to stop with ``how`` (bhyvectl --force-reset/--force-poweroff)."""

    @abc.abstractmethod
    def destroy(self) -> None: ...

    # --- snapshots -------------------------------------------------------
    @abc.abstractmethod
    def save_kernel_section(self, name: str) -> bytes:
        """State of one of ``KERNEL_SECTIONS`` (all vCPUs included); vCPUs must be stopped."""

    def check_kernel_section(self, name: str, data: bytes) -> object:
        """Validate a section for this VM without changing anything (restore
        checks every section before applying any)."""
        return None

    @abc.abstractmethod
    def restore_kernel_section(self, name: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def restore_time(self) -> None:
        """Re-base guest time after a restore (vm_restore_time / KVM_SET_CLOCK)."""


class Backend(abc.ABC):
    """A kernel hypervisor interface: how to create or open named VMs."""

    name: str

    @classmethod
    @abc.abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(usable, reason-if-not)."""

    @abc.abstractmethod
    def create_vm(self, name: str, *, reinit: bool = True) -> VirtualMachine:
        """Create the VM (or re-initialise an existing one when booting from a ROM)."""

    @abc.abstractmethod
    def open_vm(self, name: str) -> VirtualMachine:
        """Open a VM that already exists (prepared by bhyveload); fail as bhyve does."""


def get_backend(name: str | None = None) -> Backend:
    """The backend for this host (``vmm`` on FreeBSD, ``kvm`` on Linux) or the named one."""
    import sys

    from bhyvepy.errors import BackendUnavailable

    if name is None:
        name = "vmm" if sys.platform.startswith("freebsd") else "kvm"
    if name == "kvm":
        from bhyvepy.vmm.kvm import KvmBackend as cls
    elif name == "vmm":
        from bhyvepy.vmm.vmmapi import VmmapiBackend as cls  # type: ignore[assignment]
    else:
        raise BackendUnavailable(f"unknown backend {name!r}")
    ok, why = cls.available()
    if not ok:
        raise BackendUnavailable(why)
    return cls()
