"""A guest-side legacy virtio driver for tests: rings in guest memory, BAR 0
register accesses through the real port bus, like a guest kernel would.

Independent of bhyvepy's queue code on purpose: it lays rings out from the
virtio 0.9.5 rules (descriptors, avail ring, page-aligned used ring) and
reads the used ring itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from bhyvepy.memory import GuestMemory
from bhyvepy.vmm import MemoryRegion

NEXT, WRITE, INDIRECT = 1, 2, 4
PAGE = 4096

# legacy header
HOST_FEATURES, GUEST_FEATURES, QUEUE_PFN, QUEUE_NUM, QUEUE_SEL, QUEUE_NOTIFY = 0, 4, 8, 12, 14, 16
STATUS, ISR, CONFIG_VECTOR, QUEUE_VECTOR = 18, 19, 20, 22
ACK, DRIVER, DRIVER_OK, NEEDS_RESET, FAILED = 1, 2, 4, 0x40, 0x80


def make_memory(*spans: tuple[int, int]) -> GuestMemory:
    """Guest RAM made of bytearrays at the given (gpa, size) spans."""
    return GuestMemory([MemoryRegion(f"ram{i}", gpa, size, bytearray(size))
                        for i, (gpa, size) in enumerate(spans)])


class Allocator:
    """Bump allocator for guest buffers inside one RAM span."""

    def __init__(self, base: int, size: int) -> None:
        self.next, self.end = base, base + size

    def alloc(self, n: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + n > self.end:
            raise MemoryError("test guest memory exhausted")
        self.next = addr + n
        return addr


def ring_layout(base: int, qsize: int) -> tuple[int, int, int, int]:
    """(desc, avail, used, total bytes) for a legacy ring at ``base``."""
    avail = base + 16 * qsize
    used = (avail + 6 + 2 * qsize + PAGE - 1) & ~(PAGE - 1)
    total = ((used + 6 + 8 * qsize + PAGE - 1) & ~(PAGE - 1)) - base
    return base, avail, used, total


@dataclass
class DriverQueue:
    """The driver's view of one split ring."""

    mem: GuestMemory
    base: int
    qsize: int
    event_idx: bool = False
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0
    heads: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.desc, self.avail, self.used, self.total = ring_layout(self.base, self.qsize)
        self.free = list(range(self.qsize))
        self.mem.write(self.base, bytes(self.total))

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write_int(self.avail + 4 + 2 * (self.avail_idx % self.qsize), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_int(self.avail + 2, 2, self.avail_idx)

    def add(self, bufs: list[tuple[int, int, bool]], *, publish: bool = True) -> int:
        """Queue a chain of (gpa, len, device-writable) buffers; returns its head."""
        ids = [self.free.pop(0) for _ in bufs]
        for k, ((addr, ln, w), i) in enumerate(zip(bufs, ids)):
            last = k == len(bufs) - 1
            self.write_desc(i, addr, ln, (WRITE if w else 0) | (0 if last else NEXT),
                            0 if last else ids[k + 1])
        self.heads[ids[0]] = ids
        if publish:
            self.publish(ids[0])
        return ids[0]

    def add_indirect(self, table: int, bufs: list[tuple[int, int, bool]]) -> int:
        """Queue one descriptor pointing at an indirect table written at ``table``."""
        for k, (addr, ln, w) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.mem.write(table + 16 * k, struct.pack("<QIHH", addr, ln,
                                                        (WRITE if w else 0) | (0 if last else NEXT),
                                                        0 if last else k + 1))
        i = self.free.pop(0)
        self.write_desc(i, table, 16 * len(bufs), INDIRECT, 0)
        self.heads[i] = [i]
        self.publish(i)
        return i

    @property
    def used_idx(self) -> int:
        return self.mem.read_int(self.used + 2, 2)

    @property
    def used_flags(self) -> int:
        return self.mem.read_int(self.used, 2)

    def set_used_event(self, value: int) -> None:
        self.mem.write_int(self.avail + 4 + 2 * self.qsize, 2, value)

    def set_avail_flags(self, value: int) -> None:
        self.mem.write_int(self.avail, 2, value)

    @property
    def avail_event(self) -> int:
        return self.mem.read_int(self.used + 4 + 8 * self.qsize, 2)

    def collect(self) -> list[tuple[int, int]]:
        """New used entries (head, len); their descriptors become free again."""
        out = []
        while self.last_used != self.used_idx:
            slot = self.last_used % self.qsize
            head, ln = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append((head, ln))
            self.free.extend(self.heads.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class LegacyDriver:
    """Register-level driver for one virtio PCI function on a test Machine."""

    def __init__(self, machine, fn, mem: GuestMemory, alloc: Allocator) -> None:
        self.m, self.fn, self.mem, self.alloc = machine, fn, mem, alloc
        self.io = machine.bar_addr(fn, 0)
        self.queues: dict[int, DriverQueue] = {}

    # raw registers
    def r(self, off: int, size: int) -> int:
        return self.m.dispatch.pio_in(0, self.io + off, size)

    def w(self, off: int, size: int, value: int) -> None:
        self.m.dispatch.pio_out(0, self.io + off, size, value)

    @property
    def cfg_base(self) -> int:
        return 24 if self.fn.msix_enabled else 20

    def cfg_read(self, off: int, size: int) -> int:
        return self.r(self.cfg_base + off, size)

    def negotiate(self, want: int | None = None) -> int:
        self.w(STATUS, 1, 0)
        self.w(STATUS, 1, ACK)
        self.w(STATUS, 1, ACK | DRIVER)
        host = self.r(HOST_FEATURES, 4)
        feats = host if want is None else host & want
        self.w(GUEST_FEATURES, 4, feats)
        return feats

    def setup_queue(self, index: int, *, event_idx: bool = False) -> DriverQueue:
        self.w(QUEUE_SEL, 2, index)
        qsize = self.r(QUEUE_NUM, 2)
        assert qsize, f"queue {index} does not exist"
        _, _, _, total = ring_layout(0, qsize)
        base = self.alloc.alloc(total, PAGE)
        q = DriverQueue(self.mem, base, qsize, event_idx)
        self.w(QUEUE_PFN, 4, base >> 12)
        self.queues[index] = q
        return q

    def driver_ok(self) -> None:
        self.w(STATUS, 1, ACK | DRIVER | DRIVER_OK)

    def kick(self, index: int) -> None:
        self.w(QUEUE_NOTIFY, 2, index)

    def status(self) -> int:
        return self.r(STATUS, 1)

    def buf(self, data: bytes | int, align: int = 16) -> int:
        """Allocate a guest buffer (filled with ``data``, or ``data`` zero bytes)."""
        n = data if isinstance(data, int) else len(data)
        addr = self.alloc.alloc(max(n, 1), align)
        self.mem.write(addr, bytes(n) if isinstance(data, int) else data)
        return addr
