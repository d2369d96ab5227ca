"""Address-space dispatch: port I/O and MMIO ranges to device handlers.

Devices know nothing of buses (rust-vmm style): they expose ``read(offset,
size)`` / ``write(offset, size, value)`` and the VM places them.  The port
table is a flat list indexed by port number because it sits on the hottest
path of the vCPU loop (one list index per exit); MMIO ranges are few and
sparse, so they live in a sorted list searched with bisect.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

ReadFn = Callable[[int, int], int]          # (offset, size) -> value
WriteFn = Callable[[int, int, int], None]   # (offset, size, value)


class BusConflict(Exception):
    """Two devices claimed overlapping addresses (a configuration error)."""


@dataclass(slots=True)
class Range:
    name: str
    base: int
    length: int
    read: ReadFn
    write: WriteFn


class PortBus:
    """The 64 KiB x86 I/O port space."""

    def __init__(self) -> None:
        self._ports: list[Range | None] = [None] * 0x10000

    def register(self, name: str, base: int, length: int, read: ReadFn, write: WriteFn) -> Range:
        if base < 0 or length <= 0 or base + length > 0x10000:
            raise BusConflict(f"{name}: I/O ports {base:#x}+{length} out of range")
        for p in range(base, base + length):
            other = self._ports[p]
            if other is not None:
                raise BusConflict(f"{name}: I/O port {p:#x} already used by {other.name}")
        r = Range(name, base, length, read, write)
        for p in range(base, base + length):
            self._ports[p] = r
        return r

    def unregister(self, r: Range) -> None:
        for p in range(r.base, r.base + r.length):
            if self._ports[p] is r:
                self._ports[p] = None

    def lookup(self, port: int) -> Range | None:
        return self._ports[port & 0xFFFF]


class MmioBus:
    """Guest-physical MMIO ranges (BARs, LAPIC-adjacent platform devices, ECAM)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[Range] = []
        self._table: tuple[list[int], list[Range]] = (self._starts, self._ranges)

    def register(self, name: str, base: int, length: int, read: ReadFn, write: WriteFn) -> Range:
        if length <= 0:
            raise BusConflict(f"{name}: empty MMIO range")
        i = bisect.bisect_left(self._starts, base)
        for j in (i - 1, i):
            if 0 <= j < len(self._ranges):
                o = self._ranges[j]
                if base < o.base + o.length and o.base < base + length:
                    raise BusConflict(
                        f"{name}: MMIO {base:#x}+{length:#x} overlaps {o.name} at {o.base:#x}+{o.length:#x}")
        r = Range(name, base, length, read, write)
        ranges = self._ranges[:i] + [r] + self._ranges[i:]
        self._publish(ranges)
        return r

    def unregister(self, r: Range) -> None:
        self._publish([o for o in self._ranges if o is not r])

    def _publish(self, ranges: list[Range]) -> None:
        # vCPU threads look ranges up without a lock while BARs move: build new
        # lists and swap them in with one assignment so a lookup never sees a
        # half-updated table.
        self._table = ([r.base for r in ranges], ranges)
        self._starts, self._ranges = self._table

    def lookup(self, gpa: int) -> Range | None:
        starts, ranges = self._table
        i = bisect.bisect_right(starts, gpa) - 1
        if i >= 0:
            r = ranges[i]
            if gpa < r.base + r.length:
                return r
        return None
