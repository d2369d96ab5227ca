"""Split virtqueues as the device side sees them (virtio 0.9.5 legacy layout).

Everything in a virtqueue's rings is written by the guest and therefore
hostile: descriptor indexes, ``next`` links, addresses, lengths, the
available index.  This module is the only place that interprets them, and
it does so defensively:

* the descriptor table, available ring and used ring are checked once, when
  the queue is set up, to lie in guest RAM, and then read through bounded
  memoryviews (an out-of-range index ends in a :class:`VirtqueueError`, not
  an access outside the ring);
* every buffer a descriptor names is mapped through
  :class:`~bhyvepy.memory.GuestMemory`, so an address outside RAM or a length
  that wraps or exceeds the per-access limit makes *that request* fail
  (:attr:`DescriptorChain.error`) without touching memory;
* a chain is walked at most ``size`` hops through the descriptor table, an
  indirect table at most as many hops as it has entries, and at most
  ``max(size, VQ_MAX_DESCRIPTORS)`` buffers in total, so a looping chain is a
  bounded amount of work and then a :class:`VirtqueueError`.

A :class:`VirtqueueError` means the ring itself cannot be trusted any more;
the transport answers it by marking the queue broken and setting the
device's ``NEEDS_RESET`` status bit.  The guest keeps running and other
queues and devices are unaffected.

The interrupt decision in :meth:`Virtqueue.end_chains` and the meaning of
the state fields follow bhyve's ``virtio.c`` (``vq_endchains``,
``vq_relchain``), including its event-index arithmetic.

:class:`Virtqueue` does no locking: the owning device serialises access with
its own lock (completions from I/O threads included).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from bhyvepy.errors import GuestMemoryError
from bhyvepy.snapshot.state import U8, U16, U32, U64, StateError, device_state

# Descriptor flags.
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
# Ring flags.
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
# Transport-independent feature bits that concern the rings.
VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29

VRING_ALIGN = 4096
VRING_PFN = 12                  # the legacy PFN register counts 4 KiB pages
VIRTIO_MSI_NO_VECTOR = 0xFFFF
MAX_QUEUE_SIZE = 32768          # the ring indexes are 16-bit
#: bhyve's cap on the buffers of one chain (``VQ_MAX_DESCRIPTORS``); a queue
#: larger than this may still use chains as long as the queue.
VQ_MAX_DESCRIPTORS = 512

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")      # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")   # id, len

#: Queue state flags (bhyve's ``vq_flags``): VQ_ALLOC, and "broken" for a
#: queue that hit a guest error and waits for a device reset.
QF_ENABLED = 0x01
QF_BROKEN = 0x02

_EMPTY = memoryview(bytearray(0))


class VirtqueueError(Exception):
    """The guest corrupted a ring; the queue is broken until a device reset."""


def _align(n: int, a: int = VRING_ALIGN) -> int:
    return (n + a - 1) & ~(a - 1)


def desc_bytes(size: int) -> int:
    return DESC_SIZE * size


def avail_bytes(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return 2 * (3 + size)


def used_bytes(size: int) -> int:
    """flags, idx, ring[size] of (id, len), avail_event."""
    return 6 + 8 * size


def vring_size(size: int) -> int:
    """Bytes of a legacy ring: descriptors and avail ring, page-aligned, then used ring."""
    return _align(desc_bytes(size) + avail_bytes(size)) + used_bytes(size)


def vring_size_aligned(size: int) -> int:
    return _align(vring_size(size))


def legacy_layout(pfn: int, size: int) -> tuple[int, int, int]:
    """Guest addresses of (descriptors, avail ring, used ring) for a legacy PFN."""
    base = pfn << VRING_PFN
    avail = base + desc_bytes(size)
    return base, avail, _align(avail + avail_bytes(size))


def valid_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


# ----------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------

@device_state("virtqueue", version=1)
@dataclass
class QueueState:
    """One queue as bhyve's ``vi_pci_snapshot_queues`` saves it.

    ``size`` is compared on restore (it is fixed by the device model); the
    ring addresses are kept beside the legacy ``pfn`` so the record does not
    depend on the transport that set the queue up.  The ring contents are
    not copied (bhyve copies them): they are guest memory, which the
    snapshot holds anyway.
    """

    size: U16 = 0
    flags: U8 = 0
    pfn: U32 = 0
    desc_addr: U64 = 0
    avail_addr: U64 = 0
    used_addr: U64 = 0
    last_avail: U16 = 0
    next_used: U16 = 0
    save_used: U16 = 0
    msix_vector: U16 = VIRTIO_MSI_NO_VECTOR

    def validate(self) -> None:
        if self.size and not valid_queue_size(self.size):
            raise StateError(f"queue size {self.size} is not a power of two up to {MAX_QUEUE_SIZE}")
        if self.flags & ~(QF_ENABLED | QF_BROKEN):
            raise StateError(f"unknown queue flags {self.flags:#x}")
        if self.flags & QF_ENABLED and not self.size:
            raise StateError("enabled queue of size 0")


# ----------------------------------------------------------------------------
# chains
# ----------------------------------------------------------------------------

@dataclass
class DescriptorChain:
    """One request: the head index and its buffers in chain order.

    ``segments`` are ``(view, writable)`` pairs, views straight into guest
    memory.  ``error`` is set when a buffer is not guest RAM, a length is
    out of range, or a device-readable buffer follows a device-writable one
    (the virtio layout rule); such a buffer appears as an empty view and the
    device should fail the request rather than act on it.
    ``generation`` ties the chain to one incarnation of its queue: pushing
    it back after the queue was reset is a no-op.
    """

    head: int
    segments: list[tuple[memoryview, bool]] = field(default_factory=list)
    error: str | None = None
    generation: int = 0

    @property
    def readable(self) -> list[memoryview]:
        return [v for v, w in self.segments if not w]

    @property
    def writable(self) -> list[memoryview]:
        return [v for v, w in self.segments if w]

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v, w in self.segments if not w)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v, w in self.segments if w)

    def gather(self, limit: int | None = None) -> bytes:
        """The device-readable bytes, in order (at most ``limit``)."""
        out = bytearray()
        for v, w in self.segments:
            if w:
                continue
            if limit is not None and len(out) + len(v) >= limit:
                out += v[:limit - len(out)]
                break
            out += v
        return bytes(out)

    def scatter(self, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` into the device-writable buffers; returns bytes copied."""
        src = memoryview(data).cast("B")
        done = 0
        for v, w in self.segments:
            if not w or done >= len(src):
                continue
            n = min(len(v), len(src) - done)
            v[:n] = src[done:done + n]
            done += n
        return done


def slice_views(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """Sub-views covering bytes ``[start, start + length)`` of the
    concatenation of ``views`` (clipped to what exists)."""
    out: list[memoryview] = []
    pos = 0
    end = start + length
    for v in views:
        n = len(v)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append(v[lo - pos:hi - pos])
        pos += n
        if pos >= end:
            break
    return out


# ----------------------------------------------------------------------------
# the queue
# ----------------------------------------------------------------------------

class Virtqueue:
    """The device side of one split virtqueue.

    The transport sets it up (:meth:`set_pfn` / :meth:`configure`), keeps
    :attr:`features` equal to the negotiated features and
    :attr:`indirect_ok` equal to whether the device offers indirect
    descriptors (bhyve checks its offer, not the negotiation).  Devices
    :meth:`pop` chains, :meth:`push` them back with the number of bytes
    written, and call :meth:`end_chains` to learn whether to interrupt.
    """

    def __init__(self, mem: object, index: int, size: int, *, name: str = "virtqueue",
                 msix_vector: int = VIRTIO_MSI_NO_VECTOR) -> None:
        if not valid_queue_size(size):
            raise ValueError(f"virtqueue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.mem = mem
        self.index = index
        self.size = size
        self.name = name
        self.features = 0
        self.indirect_ok = False
        self.generation = 0
        self._desc = self._avail = self._used = _EMPTY
        self.reset(msix_vector)

    # --- set-up -------------------------------------------------------------
    def reset(self, msix_vector: int = VIRTIO_MSI_NO_VECTOR) -> None:
        """bhyve's per-queue part of ``vi_reset_dev``."""
        self.flags = 0
        self.pfn = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.last_avail = self.next_used = self.save_used = 0
        self.msix_vector = msix_vector
        self._desc = self._avail = self._used = _EMPTY
        self.generation += 1

    @property
    def ready(self) -> bool:
        """Set up and not broken (bhyve's ``vq_ring_ready``)."""
        return self.flags & (QF_ENABLED | QF_BROKEN) == QF_ENABLED

    @property
    def broken(self) -> bool:
        return bool(self.flags & QF_BROKEN)

    def set_pfn(self, pfn: int) -> None:
        """The guest wrote the legacy QUEUE_PFN register.

        PFN 0 is how legacy drivers tear a queue down; any other value must
        put the whole ring in guest RAM, else the queue is broken.
        """
        if pfn == 0:
            self.flags = 0
            self.pfn = 0
            self.desc_addr = self.avail_addr = self.used_addr = 0
            self._desc = self._avail = self._used = _EMPTY
            self.generation += 1
            return
        self.pfn = pfn
        self.configure(*legacy_layout(pfn, self.size))

    def configure(self, desc: int, avail: int, used: int) -> None:
        """Point the queue at rings in guest memory and start at index 0."""
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.last_avail = self.next_used = self.save_used = 0
        self.generation += 1
        try:
            self._map()
        except GuestMemoryError as e:
            self.flags = QF_BROKEN
            self._desc = self._avail = self._used = _EMPTY
            raise VirtqueueError(f"ring of queue {self.index} is not in guest RAM ({e})") from None
        self.flags = QF_ENABLED

    def _map(self) -> None:
        mem = self.mem
        q = self.size
        self._desc = mem.view(self.desc_addr, desc_bytes(q))        # type: ignore[attr-defined]
        self._avail = mem.view(self.avail_addr, avail_bytes(q))     # type: ignore[attr-defined]
        self._used = mem.view(self.used_addr, used_bytes(q))        # type: ignore[attr-defined]

    def mark_broken(self, reason: str) -> VirtqueueError:
        self.flags |= QF_BROKEN
        return VirtqueueError(reason)

    # --- the available side -------------------------------------------------------
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0] if self.ready else self.last_avail

    def avail_flags(self) -> int:
        return _U16.unpack_from(self._avail, 0)[0] if self.ready else 0

    def used_event(self) -> int:
        return _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]

    def has_descs(self) -> bool:
        """Are chains waiting?  (bhyve's ``vq_has_descs``.)"""
        return self.ready and _U16.unpack_from(self._avail, 2)[0] != self.last_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.  Raises :class:`VirtqueueError`
        (and marks the queue broken) when the ring is corrupt."""
        if not self.ready:
            return None
        q = self.size
        avail_idx = _U16.unpack_from(self._avail, 2)[0]
        ndesc = (avail_idx - self.last_avail) & 0xFFFF
        if ndesc == 0:
            return None
        if ndesc > q:
            raise self.mark_broken(f"{self.name}: ndesc ({ndesc}) out of range, driver confused?")
        head = _U16.unpack_from(self._avail, 4 + 2 * (self.last_avail & (q - 1)))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = self._walk(head)
        if self.features & VIRTIO_RING_F_EVENT_IDX:
            # Ask for a kick as soon as anything beyond what we consumed is added.
            _U16.pack_into(self._used, 4 + 8 * q, self.last_avail)
        return chain

    def unpop(self, n: int = 1) -> None:
        """Give back the last ``n`` popped chains (bhyve's ``vq_retchains``)."""
        self.last_avail = (self.last_avail - n) & 0xFFFF

    def _walk(self, head: int) -> DescriptorChain:
        q = self.size
        desc = self._desc
        mem = self.mem
        limit = max(q, VQ_MAX_DESCRIPTORS)
        chain = DescriptorChain(head, generation=self.generation)
        segs = chain.segments
        seen_writable = False

        def record(addr: int, length: int, flags: int) -> None:
            nonlocal seen_writable
            writable = bool(flags & VRING_DESC_F_WRITE)
            try:
                view = mem.view(addr, length)       # type: ignore[attr-defined]
            except GuestMemoryError:
                view = _EMPTY
                if chain.error is None:
                    chain.error = f"buffer {addr:#x}+{length:#x} is not guest RAM"
            if writable:
                seen_writable = True
            elif seen_writable and chain.error is None:
                chain.error = "device-readable buffer after a device-writable one"
            segs.append((view, writable))

        idx = head
        for _ in range(q):
            if idx >= q:
                raise self.mark_broken(f"{self.name}: descriptor index {idx} out of range, "
                                       "driver confused?")
            addr, length, flags, nxt = _DESC.unpack_from(desc, DESC_SIZE * idx)
            if flags & VRING_DESC_F_INDIRECT:
                self._walk_indirect(addr, length, record, segs, limit)
            else:
                record(addr, length, flags)
                if len(segs) > limit:
                    break
            if not flags & VRING_DESC_F_NEXT:
                return chain
            idx = nxt
        raise self.mark_broken(f"{self.name}: descriptor loop? chain longer than "
                               f"{min(q, limit)} - driver confused?")

    def _walk_indirect(self, addr: int, length: int, record, segs: list, limit: int) -> None:
        if not self.indirect_ok:
            raise self.mark_broken(f"{self.name}: descriptor has forbidden INDIRECT flag, "
                                   "driver confused?")
        n_indir = length // DESC_SIZE
        if length % DESC_SIZE or n_indir == 0:
            raise self.mark_broken(f"{self.name}: invalid indir len {length:#x}, driver confused?")
        try:
            table = self.mem.view(addr, length)     # type: ignore[attr-defined]
        except GuestMemoryError:
            raise self.mark_broken(f"{self.name}: indirect table {addr:#x}+{length:#x} "
                                   "is not guest RAM") from None
        j = 0
        for _ in range(n_indir):
            a, ln, f, nxt = _DESC.unpack_from(table, DESC_SIZE * j)
            if f & VRING_DESC_F_INDIRECT:
                raise self.mark_broken(f"{self.name}: indirect desc has INDIR flag, "
                                       "driver confused?")
            record(a, ln, f)
            if len(segs) > limit:
                raise self.mark_broken(f"{self.name}: descriptor loop? count > {limit} - "
                                       "driver confused?")
            if not f & VRING_DESC_F_NEXT:
                return
            if nxt >= n_indir:
                raise self.mark_broken(f"{self.name}: invalid next {nxt} > {n_indir}, "
                                       "driver confused?")
            j = nxt
        raise self.mark_broken(f"{self.name}: indirect descriptor loop, driver confused?")

    # --- the used side -----------------------------------------------------------
    def push(self, chain: DescriptorChain | int, length: int) -> bool:
        """Return a chain to the guest with ``length`` bytes written
        (bhyve's ``vq_relchain``).  A chain from before a reset is dropped."""
        if isinstance(chain, DescriptorChain):
            if chain.generation != self.generation:
                return False
            head = chain.head
        else:
            head = chain
        if not self.ready:
            return False
        slot = self.next_used & (self.size - 1)
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head & 0xFFFFFFFF, length & 0xFFFFFFFF)
        self.next_used = (self.next_used + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.next_used)
        return True

    def end_chains(self, used_all_avail: bool = False) -> bool:
        """Should the guest be interrupted for what was pushed since the last
        call?  (bhyve's ``vq_endchains`` without the interrupt itself.)"""
        if not self.ready:
            return False
        old, new = self.save_used, self.next_used
        self.save_used = new
        if used_all_avail and self.features & VIRTIO_F_NOTIFY_ON_EMPTY:
            return True
        if self.features & VIRTIO_RING_F_EVENT_IDX:
            event = self.used_event()
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return new != old and not self.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT

    def kick_disable(self) -> None:
        if self.ready:
            flags = _U16.unpack_from(self._used, 0)[0]
            _U16.pack_into(self._used, 0, flags | VRING_USED_F_NO_NOTIFY)

    def kick_enable(self) -> None:
        if self.ready:
            flags = _U16.unpack_from(self._used, 0)[0]
            _U16.pack_into(self._used, 0, flags & ~VRING_USED_F_NO_NOTIFY)

    # --- snapshots -------------------------------------------------------------
    def save(self) -> QueueState:
        return QueueState(self.size, self.flags, self.pfn, self.desc_addr, self.avail_addr,
                          self.used_addr, self.last_avail, self.next_used, self.save_used,
                          self.msix_vector)

    def check(self, s: QueueState) -> None:
        """Raise StateError if ``s`` cannot be loaded into this queue."""
        if s.size != self.size:
            raise StateError(f"queue {self.index} has size {s.size} in the snapshot, "
                             f"{self.size} here")
        if s.flags & QF_ENABLED and not s.flags & QF_BROKEN:
            mem = self.mem
            for what, addr, n in (("descriptor table", s.desc_addr, desc_bytes(s.size)),
                                  ("available ring", s.avail_addr, avail_bytes(s.size)),
                                  ("used ring", s.used_addr, used_bytes(s.size))):
                if not mem.contains(addr, n):        # type: ignore[attr-defined]
                    raise StateError(f"queue {self.index}: {what} at {addr:#x} is not guest RAM")

    def load(self, s: QueueState) -> None:
        """Apply a state already accepted by :meth:`check`."""
        self.flags = s.flags
        self.pfn = s.pfn
        self.desc_addr, self.avail_addr, self.used_addr = s.desc_addr, s.avail_addr, s.used_addr
        self.last_avail, self.next_used, self.save_used = s.last_avail, s.next_used, s.save_used
        self.msix_vector = s.msix_vector
        self.generation += 1
        self._desc = self._avail = self._used = _EMPTY
        if self.ready:
            self._map()


__all__ = [
    "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_DESC_F_INDIRECT",
    "VRING_AVAIL_F_NO_INTERRUPT", "VRING_USED_F_NO_NOTIFY", "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX", "VRING_ALIGN", "VRING_PFN",
    "VIRTIO_MSI_NO_VECTOR", "MAX_QUEUE_SIZE", "VQ_MAX_DESCRIPTORS", "QF_ENABLED", "QF_BROKEN",
    "VirtqueueError", "QueueState", "DescriptorChain", "Virtqueue", "slice_views",
    "vring_size", "vring_size_aligned", "legacy_layout", "valid_queue_size",
    "desc_bytes", "avail_bytes", "used_bytes",
]
