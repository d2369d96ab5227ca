"""vCPU threads: run a backend vCPU, act on what comes back, park on request.

One thread per vCPU, as in bhyve.  Port I/O and MMIO never surface here (the
backend completes them through the dispatcher); what does is a lifecycle
event (reset, power off, halt, triple fault), a kick because another thread
wants the vCPUs stopped (checkpoint, exit), or an error.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from bhyvepy.dispatch import StrictIoViolation
from bhyvepy.errors import ExitStatus
from bhyvepy.vmm import IoHandler, Vcpu
from bhyvepy.vmm.exits import ExitReason

log = logging.getLogger("bhyvepy.vcpu")


def set_native_thread_name(name: str) -> None:
    """Name the calling OS thread (``vcpu 0``), as bhyve names its vCPU
    threads, so ps/top/procstat show which host thread runs which vCPU."""
    import ctypes
    import ctypes.util
    import sys

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        raw = name.encode()[:15]
        if sys.platform.startswith("linux"):
            libc.prctl(15, ctypes.c_char_p(raw), 0, 0, 0)          # PR_SET_NAME
        elif hasattr(libc, "pthread_set_name_np"):
            libc.pthread_set_name_np(libc.pthread_self(), ctypes.c_char_p(raw))
    except (OSError, AttributeError, TypeError):
        pass


class VcpuGate:
    """Stops all vCPU threads at a safe point and lets them go again.

    ``pause()`` returns once every running vCPU thread is parked outside the
    kernel run call, which is what a checkpoint needs before it reads kernel
    state or guest memory.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._pause_requested = False
        self._parked = 0
        self._running = 0
        self._vcpus: list[Vcpu] = []
        self.stopping = False

    def add(self, vcpu: Vcpu) -> None:
        with self._cv:
            self._vcpus.append(vcpu)
            self._running += 1
            self._cv.notify_all()

    def wait_registered(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` vCPU threads have joined (or some have already left)."""
        with self._cv:
            return self._cv.wait_for(lambda: len(self._vcpus) >= n or self.stopping, timeout)

    def remove(self) -> None:
        with self._cv:
            self._running -= 1
            self._cv.notify_all()

    def kick_all(self) -> None:
        for v in list(self._vcpus):
            try:
                v.kick()
            except Exception:  # pragma: no cover - a closing vCPU
                log.debug("kick failed", exc_info=True)

    def pause(self, timeout: float = 30.0) -> bool:
        with self._cv:
            self._pause_requested = True
        self.kick_all()
        with self._cv:
            ok = self._cv.wait_for(lambda: self._parked >= self._running or self.stopping, timeout)
        if not ok:
            self.resume()
        return ok

    def resume(self) -> None:
        with self._cv:
            self._pause_requested = False
            self._cv.notify_all()

    def checkpoint_park(self) -> None:
        """Called by a vCPU thread after a kick: wait while a pause is requested."""
        with self._cv:
            if not self._pause_requested:
                return
            self._parked += 1
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._pause_requested or self.stopping)
            self._parked -= 1

    def stop(self) -> None:
        with self._cv:
            self.stopping = True
            self._cv.notify_all()
        self.kick_all()


def vcpu_thread_main(vcpu: Vcpu, io: IoHandler, gate: VcpuGate,
                     on_exit: Callable[[int, str], None],
                     on_halt: Callable[[int, bool], bool]) -> None:
    """Body of a vCPU thread.

    ``on_exit(status, message)`` ends the VM; ``on_halt(vcpu_id, halted)``
    reports a vCPU halted with interrupts disabled and returns True when the
    whole VM is halted (bhyve's VM_SUSPEND_HALT).
    """
    gate.add(vcpu)
    try:
        while not gate.stopping:
            try:
                ex = vcpu.run(io)
            except StrictIoViolation as e:
                on_exit(ExitStatus.ERROR, str(e))
                return
            except Exception as e:  # backend failure: report, end the VM
                log.debug("vcpu %d run failed", vcpu.id, exc_info=True)
                on_exit(ExitStatus.ERROR, f"vm_run error on vcpu {vcpu.id}: {e}")
                return
            reason = ex.reason
            if reason is ExitReason.INTERRUPTED:
                gate.checkpoint_park()
                continue
            if reason is ExitReason.SUSPENDED:
                assert ex.how is not None
                on_exit(int(ex.how), ex.detail)
                return
            if reason is ExitReason.HLT:
                if ex.info.get("intr_disabled") and on_halt(vcpu.id, True):
                    on_exit(ExitStatus.HALT, "all vCPUs halted")
                    return
                continue
            if reason in (ExitReason.DEBUG, ExitReason.INIT):
                gate.checkpoint_park()
                continue
            on_exit(ExitStatus.ERROR, f"vcpu {vcpu.id}: {ex.detail or ex.reason.value}")
            return
    finally:
        gate.remove()
