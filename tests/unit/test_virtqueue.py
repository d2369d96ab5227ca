"""The device side of split virtqueues against rings a test driver writes
into real guest memory; hostile rings from hypothesis."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bhyvepy.dev.virtio.queue import (VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_EVENT_IDX,
                                      VQ_MAX_DESCRIPTORS, QueueState, Virtqueue,
                                      VirtqueueError, legacy_layout, slice_views, used_bytes,
                                      vring_size, vring_size_aligned)
from bhyvepy.errors import GuestMemoryError
from bhyvepy.memory import GuestMemory
from bhyvepy.snapshot.state import StateError, decode, encode
from bhyvepy.vmm import MemoryRegion

from virtio_driver import INDIRECT, NEXT, DriverQueue, ring_layout

# Two RAM spans with unmapped gaps before, between and after them.
SPANS = ((0x10000, 0x40000), (0x80000, 0x10000))
RING = 0x20000          # ring base (page aligned, inside the first span)
BUFS = 0x30000          # buffers start here


class SpyMemory(GuestMemory):
    """GuestMemory that records every access it grants and checks it is RAM."""

    def __init__(self, regions) -> None:
        super().__init__(regions)
        self.granted: list[tuple[int, int]] = []

    def _check(self, gpa: int, n: int) -> None:
        for r in self.regions:
            if r.gpa <= gpa and gpa + n <= r.gpa + r.size:
                self.granted.append((gpa, n))
                return
        raise AssertionError(f"granted access outside RAM {gpa:#x}+{n:#x}")

    def view(self, gpa: int, length: int) -> memoryview:
        v = super().view(gpa, length)
        self._check(gpa, length)
        return v

    def read(self, gpa: int, length: int) -> bytes:
        data = super().read(gpa, length)
        self._check(gpa, length)
        return data

    def write(self, gpa: int, data) -> None:
        super().write(gpa, data)
        self._check(gpa, len(data))


def make(qsize: int = 16, spy: bool = False):
    cls = SpyMemory if spy else GuestMemory
    mem = cls([MemoryRegion(f"r{i}", g, s, bytearray(s)) for i, (g, s) in enumerate(SPANS)])
    drv = DriverQueue(mem, RING, qsize)
    vq = Virtqueue(mem, 0, qsize, name="test")
    vq.set_pfn(RING >> 12)
    vq.indirect_ok = True
    return mem, drv, vq


def test_layout_matches_the_legacy_rules() -> None:
    for qsize in (1, 16, 64, 128, 256, 1024):
        desc, avail, used, total = ring_layout(RING, qsize)
        assert legacy_layout(RING >> 12, qsize) == (desc, avail, used)
        assert vring_size_aligned(qsize) == total
    assert vring_size(256) == 0x2000 + used_bytes(256)      # 4096 + 518 bytes -> two pages


def test_simple_chain_round_trip() -> None:
    mem, drv, vq = make()
    mem.write(BUFS, b"request!")
    head = drv.add([(BUFS, 8, False), (BUFS + 0x100, 32, True)])
    assert vq.has_descs()
    chain = vq.pop()
    assert chain is not None and chain.head == head and chain.error is None
    assert chain.gather() == b"request!"
    assert [(len(v), w) for v, w in chain.segments] == [(8, False), (32, True)]
    assert chain.scatter(b"x" * 40) == 32
    assert mem.read(BUFS + 0x100, 32) == b"x" * 32
    assert vq.pop() is None and not vq.has_descs()
    assert vq.push(chain, 32)
    assert drv.collect() == [(head, 32)]
    assert drv.free.count(head) == 1


def test_many_chains_wrap_the_ring() -> None:
    mem, drv, vq = make(qsize=4)
    seen = []
    for i in range(40):                       # 16-bit indexes wrap modulo the ring many times
        head = drv.add([(BUFS + 16 * (i % 4), 16, True)])
        chain = vq.pop()
        assert chain.head == head
        vq.push(chain, i)
        seen += drv.collect()
    assert [ln for _, ln in seen] == list(range(40))


def test_indirect_chain() -> None:
    mem, drv, vq = make()
    mem.write(BUFS, b"hdr-16-bytes....")
    head = drv.add_indirect(BUFS + 0x800, [(BUFS, 16, False), (BUFS + 0x100, 512, True),
                                           (BUFS + 0x400, 1, True)])
    chain = vq.pop()
    assert chain.head == head and chain.error is None
    assert [len(v) for v in chain.writable] == [512, 1]
    assert chain.gather(4) == b"hdr-"


def test_indirect_refused_unless_offered() -> None:
    mem, drv, vq = make()
    vq.indirect_ok = False
    drv.add_indirect(BUFS + 0x800, [(BUFS, 16, True)])
    with pytest.raises(VirtqueueError, match="INDIRECT"):
        vq.pop()
    assert vq.broken and not vq.ready and vq.pop() is None


@pytest.mark.parametrize("table,why", [
    ([(BUFS, 16, 4, 0)], "INDIR"),                    # nested indirect
    ([(BUFS, 16, 1, 5)], "invalid next"),             # next beyond the table
    ([(BUFS, 16, 1, 1), (BUFS, 16, 1, 0)], "loop"),   # cycle inside the table
])
def test_bad_indirect_tables(table, why) -> None:
    mem, drv, vq = make()
    for k, (a, ln, f, n) in enumerate(table):
        mem.write(BUFS + 0x800 + 16 * k, struct.pack("<QIHH", a, ln, f, n))
    i = drv.free.pop(0)
    drv.write_desc(i, BUFS + 0x800, 16 * len(table), INDIRECT, 0)
    drv.publish(i)
    with pytest.raises(VirtqueueError, match=why):
        vq.pop()


@pytest.mark.parametrize("length", [0, 24, 16 * 3 + 1])
def test_indirect_length_must_be_whole_descriptors(length) -> None:
    mem, drv, vq = make()
    i = drv.free.pop(0)
    drv.write_desc(i, BUFS + 0x800, length, INDIRECT, 0)
    drv.publish(i)
    with pytest.raises(VirtqueueError, match="indir len"):
        vq.pop()


def test_indirect_table_outside_ram_breaks_queue() -> None:
    mem, drv, vq = make()
    i = drv.free.pop(0)
    drv.write_desc(i, 0x60000, 64, INDIRECT, 0)         # in the gap between spans
    drv.publish(i)
    with pytest.raises(VirtqueueError, match="not guest RAM"):
        vq.pop()


def test_descriptor_loops_are_bounded() -> None:
    mem, drv, vq = make(qsize=8)
    for i in range(8):
        drv.write_desc(i, BUFS, 8, NEXT, (i + 1) % 8)    # a cycle through the whole table
    drv.publish(3)
    with pytest.raises(VirtqueueError, match="loop"):
        vq.pop()


def test_chain_as_long_as_the_queue_is_fine() -> None:
    mem, drv, vq = make(qsize=8)
    drv.add([(BUFS + 16 * i, 16, True) for i in range(8)])
    chain = vq.pop()
    assert len(chain.segments) == 8 and chain.error is None


def test_indirect_total_is_capped() -> None:
    mem, drv, vq = make(qsize=4)
    n = VQ_MAX_DESCRIPTORS + 1
    table = BUFS
    drv.add_indirect(table, [(BUFS + 0x8000, 1, True)] * n)
    with pytest.raises(VirtqueueError, match="loop"):
        vq.pop()


def test_head_index_out_of_range_and_too_many_available() -> None:
    mem, drv, vq = make(qsize=8)
    drv.publish(9)
    with pytest.raises(VirtqueueError, match="out of range"):
        vq.pop()
    mem, drv, vq = make(qsize=8)
    mem.write_int(drv.avail + 2, 2, 9)                  # 9 available in a ring of 8
    with pytest.raises(VirtqueueError, match="ndesc"):
        vq.pop()


def test_bad_buffers_fail_the_request_not_the_queue() -> None:
    mem, drv, vq = make()
    drv.add([(0x60000, 16, True)])                       # unmapped gap
    drv.add([(BUFS, 0xFFFFFFFF, True)])                  # length far beyond RAM
    drv.add([(0x10000 + 0x40000 - 8, 16, True)])         # straddles the end of a span
    drv.add([(BUFS, 8, True), (BUFS + 8, 8, False)])     # readable after writable
    for _ in range(4):
        chain = vq.pop()
        assert chain.error is not None
    assert vq.ready


def test_push_after_reset_is_dropped() -> None:
    mem, drv, vq = make()
    drv.add([(BUFS, 8, True)])
    chain = vq.pop()
    vq.reset()
    vq.set_pfn(RING >> 12)
    assert not vq.push(chain, 8)
    assert drv.used_idx == 0


def test_pfn_zero_disables_and_bad_pfn_breaks() -> None:
    mem, drv, vq = make()
    vq.set_pfn(0)
    assert not vq.ready and not vq.broken and vq.pop() is None
    with pytest.raises(VirtqueueError):
        vq.set_pfn(0x60000 >> 12)
    assert vq.broken


def test_interrupt_decision_plain_and_no_interrupt() -> None:
    mem, drv, vq = make()
    assert not vq.end_chains()                           # nothing used
    drv.add([(BUFS, 8, True)])
    vq.push(vq.pop(), 8)
    assert vq.end_chains()
    drv.set_avail_flags(1)
    drv.add([(BUFS, 8, True)])
    vq.push(vq.pop(), 8)
    assert not vq.end_chains()


def test_notify_on_empty() -> None:
    mem, drv, vq = make()
    drv.set_avail_flags(1)
    vq.features = VIRTIO_F_NOTIFY_ON_EMPTY
    assert vq.end_chains(used_all_avail=True)
    assert not vq.end_chains(used_all_avail=False)


def test_event_idx() -> None:
    mem, drv, vq = make()
    vq.features = VIRTIO_RING_F_EVENT_IDX
    drv.set_avail_flags(1)                               # ignored with EVENT_IDX
    drv.set_used_event(2)                                # interrupt when used idx passes 2
    for i in range(4):
        drv.add([(BUFS, 8, True)])
    results = []
    for i in range(4):
        vq.push(vq.pop(), 8)
        results.append(vq.end_chains())
    assert results == [False, False, True, False]        # used idx 1, 2, 3 (crosses 2), 4
    assert drv.avail_event == 4                          # device asks for a kick at index 4
    for i in range(3):
        drv.add([(BUFS, 8, True)])
        vq.push(vq.pop(), 8)
    drv.set_used_event(5)
    assert vq.end_chains()                               # 4 -> 7 crosses 5 in one batch


def test_kick_suppression_flag() -> None:
    mem, drv, vq = make()
    vq.kick_disable()
    assert drv.used_flags & 1
    vq.kick_enable()
    assert drv.used_flags & 1 == 0


def test_slice_views() -> None:
    a, b, c = memoryview(b"abcd"), memoryview(b"efgh"), memoryview(b"ij")
    assert b"".join(bytes(v) for v in slice_views([a, b, c], 2, 5)) == b"cdefg"
    assert b"".join(bytes(v) for v in slice_views([a, b, c], 9, 5)) == b"j"
    assert slice_views([a], 4, 3) == []


def test_state_round_trip_and_checks() -> None:
    mem, drv, vq = make()
    drv.add([(BUFS, 8, True)])
    vq.push(vq.pop(), 8)
    s = decode(QueueState, encode(vq.save()))
    other = Virtqueue(mem, 0, 16)
    other.check(s)
    other.load(s)
    assert other.ready and (other.last_avail, other.next_used) == (1, 1)
    drv.add([(BUFS, 8, True)])
    assert other.pop() is not None                       # continues the same ring
    with pytest.raises(StateError, match="size"):
        Virtqueue(mem, 0, 32).check(s)
    s.used_addr = 0x60000
    with pytest.raises(StateError, match="not guest RAM"):
        other.check(s)
    with pytest.raises(StateError):
        decode(QueueState, encode(QueueState(size=12)))


# ----------------------------------------------------------------------------
# hostile rings
# ----------------------------------------------------------------------------

QSIZES = st.sampled_from([1, 2, 4, 8, 16])
addr_st = st.one_of(st.sampled_from([BUFS, BUFS + 0x1000, 0x4FFF0, 0x8FFF0, 0x60000]),
                    st.integers(0, 2**64 - 1))
len_st = st.one_of(st.sampled_from([0, 1, 16, 48, 0x1000, 0x7FFFFFFF]), st.integers(0, 2**32 - 1))


def desc_st(n: int):
    """Descriptors whose links mostly stay inside a table of ``n`` entries."""
    return st.tuples(addr_st, len_st, st.integers(0, 7),
                     st.one_of(st.integers(0, max(n - 1, 0)), st.integers(0, 0xFFFF)))


def _snapshot_outside(mem: GuestMemory, keep: tuple[int, int]) -> list[bytes]:
    out = []
    for r in mem.regions:
        data = bytearray(r.buf)
        lo, hi = keep[0] - r.gpa, keep[1] - r.gpa
        if 0 <= lo < len(data):
            data[lo:max(lo, min(hi, len(data)))] = b""
        out.append(bytes(data))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), qsize=QSIZES, used_event=st.integers(0, 0xFFFF),
       features=st.sampled_from([0, VIRTIO_RING_F_EVENT_IDX, VIRTIO_F_NOTIFY_ON_EMPTY]),
       indirect_ok=st.booleans())
def test_hostile_rings_never_escape(data, qsize, used_event, features, indirect_ok) -> None:
    small = st.integers(0, qsize - 1)
    descs = data.draw(st.lists(desc_st(qsize), min_size=qsize, max_size=qsize))
    ring = data.draw(st.lists(st.one_of(small, st.integers(0, 0xFFFF)),
                              min_size=qsize, max_size=qsize))
    indirect = data.draw(st.lists(desc_st(4), max_size=6))
    avail_idx = data.draw(st.one_of(st.integers(1, qsize), st.integers(0, 0xFFFF)))
    mem, drv, vq = make(qsize, spy=True)
    vq.features, vq.indirect_ok = features, indirect_ok
    for i in range(qsize):
        drv.write_desc(i, *descs[i])
    for k, d in enumerate(indirect):                      # a table guests may point into
        mem.write(BUFS + 16 * k, struct.pack("<QIHH", *d))
    for i in range(qsize):
        mem.write_int(drv.avail + 4 + 2 * i, 2, ring[i])
    mem.write_int(drv.avail + 2, 2, avail_idx)
    drv.set_used_event(used_event)
    used_area = (drv.used, drv.used + used_bytes(qsize))
    before = _snapshot_outside(mem, used_area)
    mem.granted.clear()
    for _ in range(qsize + 2):
        try:
            chain = vq.pop()
        except VirtqueueError:
            assert vq.broken and vq.pop() is None
            break
        if chain is None:
            break
        assert chain.head < qsize
        assert len(chain.segments) <= max(qsize, VQ_MAX_DESCRIPTORS)
        for v, _w in chain.segments:
            assert len(v) <= 64 << 20
        vq.push(chain, chain.writable_len)
        vq.end_chains()
    # The device wrote nothing but the used ring.
    assert _snapshot_outside(mem, used_area) == before


@settings(max_examples=50, deadline=None)
@given(qsize=QSIZES, chains=st.lists(st.lists(st.tuples(st.integers(0, 255),
                                                         st.integers(1, 64), st.booleans()),
                                               min_size=1, max_size=4), max_size=12))
def test_well_formed_chains_come_out_as_written(qsize, chains) -> None:
    mem, drv, vq = make(qsize)
    for bufs in chains:
        bufs = sorted(bufs, key=lambda b: b[2])           # readable first, as the spec says
        if len(bufs) > len(drv.free):
            break
        spec = [(BUFS + 256 * a, n, w) for a, n, w in bufs]
        head = drv.add(spec)
        chain = vq.pop()
        assert chain.head == head and chain.error is None
        assert [(len(v), w) for v, w in chain.segments] == [(n, w) for _, n, w in spec]
        vq.push(chain, 0)
        assert drv.collect() == [(head, 0)]


def test_guest_memory_refuses_what_the_queue_would_need() -> None:
    mem, _, _ = make()
    with pytest.raises(GuestMemoryError):
        mem.view(0x60000, 1)
