"""The one bounds-checked accessor through which devices reach guest memory.

Every guest-physical address a device uses came from the guest (descriptor
tables, DMA addresses, ring bases) and is untrusted.  Funnelling all of them
through :class:`GuestMemory` means a bad address, a wrapped length or a range
that straddles a hole ends as :class:`~bhyvepy.errors.GuestMemoryError` -- a
device error -- instead of an IndexError deep in a device, a write into the
wrong mapping, or a crash of the VM process.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Sequence

from bhyvepy.errors import GuestMemoryError
from bhyvepy.vmm import MemoryRegion

#: Largest single access a device may ask for; guards against guest-supplied
#: lengths that would make us allocate gigabytes.
MAX_ACCESS = 64 << 20


class GuestMemory:
    """Guest RAM (and optionally ROM) regions, sorted by address.

    Only regions flagged ``is_ram`` are visible to device DMA; a device that
    points DMA at the boot ROM or an MMIO hole gets an error, as on real
    hardware behind an IOMMU-less chipset it would get garbage.
    """

    def __init__(self, regions: Iterable[MemoryRegion]) -> None:
        self._regions: list[MemoryRegion] = sorted((r for r in regions if r.is_ram), key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self._regions]
        self._views = [memoryview(r.buf).cast("B") for r in self._regions]  # type: ignore[arg-type]

    @property
    def regions(self) -> Sequence[MemoryRegion]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    def _locate(self, gpa: int, length: int) -> tuple[memoryview, int]:
        if length < 0 or length > MAX_ACCESS:
            raise GuestMemoryError(f"guest access of {length} bytes at {gpa:#x} refused")
        if gpa < 0:
            raise GuestMemoryError(f"negative guest address {gpa:#x}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            off = gpa - r.gpa
            if off + length <= r.size:
                return self._views[i], off
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not guest RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable window onto ``length`` bytes at ``gpa``."""
        mv, off = self._locate(gpa, length)
        return mv[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        mv, off = self._locate(gpa, length)
        return bytes(mv[off:off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        mv, off = self._locate(gpa, n)
        mv[off:off + n] = data

    def read_int(self, gpa: int, size: int) -> int:
        mv, off = self._locate(gpa, size)
        return int.from_bytes(mv[off:off + size], "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        mv, off = self._locate(gpa, size)
        mv[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True
