"""ACPI PM timer at port 0x408, re-created after vmm.ko's ``vpmtmr``.

A free-running 32-bit counter at 3.579545 MHz (bhyve's FADT sets
TMR_VAL_EXT, i.e. 32 bits), derived from the host monotonic clock.  Only
4-byte reads are answered, as vpmtmr does; other accesses behave like an
unclaimed port under bhyve (reads return all ones, writes are ignored).

The counter keeps running while the VM is paused, as the kernel's does, so a
checkpoint that lets the VM continue causes no jump.  A snapshot records the
counter value and a restore continues counting from it, which is what
bhyve's ``vpmtmr_snapshot`` does ("the saved count, not the source host
uptime, is portable").
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from bhyvepy.dev.deadline import NS_PER_S, Clock
from bhyvepy.snapshot.state import U32, device_state

PMTMR_PORT = 0x408
PMTMR_FREQ = 3_579_545
PMTMR_BITS = 32


@device_state("vpmtmr", version=1)
@dataclass
class PmTimerState:
    value: U32 = 0


class PmTimer:
    state_class = PmTimerState

    def __init__(self, clock: Clock = time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._base_ns = clock()
        self._base_val = 0

    def counter(self) -> int:
        with self._lock:
            return self._value(self._clock())

    def _value(self, now: int) -> int:
        ticks = (now - self._base_ns) * PMTMR_FREQ // NS_PER_S
        return (self._base_val + ticks) & 0xFFFFFFFF

    def read(self, offset: int, size: int) -> int:
        if offset != 0 or size != 4:
            return (1 << (8 * size)) - 1
        return self.counter()

    def write(self, offset: int, size: int, value: int) -> None:
        pass   # read-only

    def save_state(self) -> PmTimerState:
        return PmTimerState(value=self.counter())

    def restore_state(self, state: PmTimerState) -> None:
        with self._lock:
            self._base_ns = self._clock()
            self._base_val = state.value & 0xFFFFFFFF

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


__all__ = ["PmTimer", "PmTimerState", "PMTMR_PORT", "PMTMR_FREQ"]
