"""Normalized VM exits: what a backend's ``Vcpu.run()`` hands back to the VM loop.

Port I/O and MMIO exits are *not* returned: the backend completes them
itself through the :class:`~bhyvepy.vmm.IoHandler` it was given, because on
vmm.ko one MMIO exit may need several device accesses (read-modify-write
instructions, MOVS) and because the hot path should not allocate an object
per exit.  What comes back is everything the VM loop must decide about.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ExitReason(enum.Enum):
    SUSPENDED = "suspended"      # guest asked to reset / power off / halt, or triple fault
    INTERRUPTED = "interrupted"  # kick(): another thread wants this vCPU stopped
    HLT = "hlt"                  # HLT exit (only with x86.vmexit_on_hlt on backends that report it)
    DEBUG = "debug"              # debug exit (vmm.ko uses it to park vCPUs)
    UNHANDLED = "unhandled"      # an exit the backend could not complete: abort the VM
    INIT = "init"                # AP in wait-for-SIPI (backends without in-kernel INIT/SIPI)


class SuspendHow(enum.IntEnum):
    """Why a VM stops; values are bhyve's exit statuses for each."""

    RESET = 0
    POWEROFF = 1
    HALT = 2
    TRIPLEFAULT = 3


@dataclass(slots=True)
class VmExit:
    reason: ExitReason
    how: SuspendHow | None = None
    detail: str = ""
    info: dict[str, object] = field(default_factory=dict)

    @classmethod
    def suspended(cls, how: SuspendHow, detail: str = "") -> "VmExit":
        return cls(ExitReason.SUSPENDED, how=how, detail=detail)

    @classmethod
    def unhandled(cls, detail: str, **info: object) -> "VmExit":
        return cls(ExitReason.UNHANDLED, detail=detail, info=dict(info))


INTERRUPTED = VmExit(ExitReason.INTERRUPTED)
