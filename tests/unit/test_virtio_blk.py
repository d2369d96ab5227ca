"""virtio-blk on real image files, driven through BAR 0 like a guest driver."""

from __future__ import annotations

import hashlib
import os
import struct
import time

import pytest

from bhyvepy.dev.hostbridge import HostBridge
from bhyvepy.dev.virtio_blk import VirtioBlk, VirtioBlkState
from bhyvepy.memory import GuestMemory
from bhyvepy.snapshot.state import StateError, decode, encode
from bhyvepy.vmm import MemoryRegion

from pci_testkit import Machine
from virtio_driver import (ISR, NEEDS_RESET, STATUS, Allocator, DriverQueue, LegacyDriver,
                           make_memory)

RAM = (0x100000, 0x400000)
DISK = 1 << 20
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_DISCARD = 1 << 2, 1 << 6, 1 << 9, 1 << 10, 1 << 13
F_INDIRECT = 1 << 28


def image(path, fill: bytes = b"") -> str:
    data = fill * (DISK // len(fill)) if fill else bytes((i * 7 + 3) & 0xFF for i in range(DISK))
    path.write_bytes(data)
    return str(path)


class Rig:
    """A machine with virtio-blk disks and a driver per disk."""

    def __init__(self, disks: dict[int, dict[str, str]], mem: GuestMemory | None = None) -> None:
        self.mem = mem or make_memory(RAM)
        self.m = Machine(mem=self.mem)
        self.m.add(HostBridge, 0, 0, 0)
        self.devs = {}
        for slot, opts in disks.items():
            node = self.m.node(0, slot, 0, device="virtio-blk", **opts)
            self.devs[slot] = self.m.add(VirtioBlk, 0, slot, 0, config=node)
        self.m.pci.finalize()
        self.alloc = Allocator(*RAM)
        self.drv = {s: LegacyDriver(self.m, d, self.mem, self.alloc) for s, d in self.devs.items()}

    def start(self, slot: int) -> DriverQueue:
        drv = self.drv[slot]
        drv.negotiate()
        q = drv.setup_queue(0)
        drv.driver_ok()
        return q

    def close(self) -> None:
        for d in self.devs.values():
            d.close()


@pytest.fixture
def rigs():
    made = []

    def build(disks, mem=None):
        r = Rig(disks, mem)
        made.append(r)
        return r

    yield build
    for r in made:
        r.close()


def request(drv: LegacyDriver, q: DriverQueue, rtype: int, sector: int = 0,
            data: bytes | int | None = None, *, indirect: bool = False) -> tuple[int, int, int]:
    """Queue one request; returns (head, data address, status address)."""
    hdr = drv.buf(struct.pack("<IIQ", rtype, 0, sector))
    status = drv.buf(b"\xAA")
    bufs = [(hdr, 16, False)]
    addr = 0
    if data is not None:
        writable = isinstance(data, int)
        addr = drv.buf(data, 512)
        bufs.append((addr, data if writable else len(data), writable))
    bufs.append((status, 1, True))
    head = drv.alloc.alloc(16 * len(bufs)) if indirect else None
    h = q.add_indirect(head, bufs) if indirect else q.add(bufs)
    return h, addr, status


def wait_used(q: DriverQueue, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        got += q.collect()
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(got)} of {n} requests completed")
        time.sleep(0.001)
    return got


def run(r: Rig, slot: int, q: DriverQueue, *reqs) -> list[int]:
    """Submit requests, kick, wait; returns the status bytes in order."""
    drv = r.drv[slot]
    made = [request(drv, q, *a) for a in reqs]
    drv.kick(0)
    wait_used(q, len(made))
    return [r.mem.read(st, 1)[0] for _, _, st in made]


def test_identity_features_and_config(tmp_path, rigs) -> None:
    r = rigs({4: {"path": image(tmp_path / "d.img"), "sectorsize": "512/4096"}})
    dev, drv = r.devs[4], r.drv[4]
    assert r.m.cfg1_read(0, 4, 0, 0, 4) == 0x1001_1AF4
    assert r.m.cfg1_read(0, 4, 0, 0x2C, 4) == 0x0002_1AF4
    assert r.m.cfg1_read(0, 4, 0, 0x0B, 1) == 0x01
    feats = drv.negotiate()
    expect = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_INDIRECT
    assert feats & ~F_DISCARD == expect
    assert bool(feats & F_DISCARD) == dev.backend.can_delete
    assert drv.cfg_read(0, 4) | drv.cfg_read(4, 4) << 32 == DISK // 512      # capacity
    assert drv.cfg_read(12, 4) == 126                                       # seg_max
    assert drv.cfg_read(16, 4) == 0                                         # no geometry
    assert drv.cfg_read(20, 4) == 512                                       # blk_size
    assert drv.cfg_read(24, 1) == 3                                         # 4096 = 512 << 3
    assert drv.cfg_read(25, 1) == 0
    assert drv.cfg_read(36, 4) == 32768                                     # 16 MiB discard
    assert drv.cfg_read(40, 4) == 1
    assert drv.cfg_read(44, 4) == 8                                         # 4096 / 512
    assert drv.cfg_read(56, 4) == 0 and drv.cfg_read(58, 4) == 0xFFFFFFFF  # 60 bytes only
    drv.w(drv.cfg_base, 4, 0x12345678)                                      # read-only config
    assert drv.cfg_read(0, 4) == DISK // 512


def test_read_write_flush_and_file_contents(tmp_path, rigs) -> None:
    path = image(tmp_path / "d.img")
    r = rigs({4: {"path": path}})
    q = r.start(4)
    drv = r.drv[4]
    h, rd, st = request(drv, q, T_IN, 3, 1024)
    h2, rd2, st2 = request(drv, q, T_IN, 0, 512, indirect=True)
    drv.kick(0)
    used = dict(wait_used(q, 2))
    assert used == {h: 1, h2: 1}
    disk = open(path, "rb").read()
    assert r.mem.read(rd, 1024) == disk[3 * 512:5 * 512]
    assert r.mem.read(rd2, 512) == disk[:512]
    assert r.mem.read(st, 1) == r.mem.read(st2, 1) == b"\0"
    payload = os.urandom(1536)
    assert run(r, 4, q, (T_OUT, 10, payload), (T_FLUSH,)) == [S_OK, S_OK]
    before = disk
    disk = open(path, "rb").read()
    assert disk[10 * 512:13 * 512] == payload and len(disk) == DISK
    assert disk[:10 * 512] == before[:10 * 512] and disk[13 * 512:] == before[13 * 512:]


def test_interrupt_after_completion(tmp_path, rigs) -> None:
    r = rigs({4: {"path": image(tmp_path / "d.img")}})
    q = r.start(4)
    run(r, 4, q, (T_IN, 0, 512))
    deadline = time.monotonic() + 2
    while not any(c[0] == "ioapic_assert" for c in r.m.vm.calls):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert r.drv[4].r(ISR, 1) == 1


def test_get_id_default_and_ser(tmp_path, rigs) -> None:
    path = image(tmp_path / "d.img")
    r = rigs({4: {"path": path}, 5: {"path": path, "ser": "MYSERIAL-0123456789-EXTRA"}})
    q4, q5 = r.start(4), r.start(5)
    d = hashlib.md5(path.encode()).digest()
    expect = "BHYVE-%02X%02X-%02X%02X-%02X%02X" % tuple(d[:6])
    _, a4, _ = request(r.drv[4], q4, T_GET_ID, 0, 20)
    r.drv[4].kick(0)
    wait_used(q4, 1)
    assert r.mem.read(a4, 20) == expect.encode()
    _, a5, s5 = request(r.drv[5], q5, T_GET_ID, 0, 32)
    r.drv[5].kick(0)
    wait_used(q5, 1)
    assert r.mem.read(a5, 32) == b"MYSERIAL-0123456789-" + bytes(12)       # 20 chars, NUL padded
    assert r.mem.read(s5, 1) == b"\0"


def test_discard(tmp_path, rigs) -> None:
    path = image(tmp_path / "d.img")
    r = rigs({4: {"path": path}})
    dev = r.devs[4]
    q = r.start(4)
    seg = struct.pack("<QII", 8, 4, 0)
    statuses = run(r, 4, q, (T_DISCARD, 0, seg),
                   (T_DISCARD, 0, struct.pack("<QII", 8, 4, 1)),          # unmap flag
                   (T_DISCARD, 0, struct.pack("<QII", 0, 32769, 0)),      # over the limit
                   (T_DISCARD, 0, seg + seg))                             # two segments
    if dev.backend.can_delete:
        assert statuses[0] == S_OK
        assert open(path, "rb").read()[8 * 512:12 * 512] == bytes(2048)
    else:
        assert statuses[0] == S_UNSUPP
    assert statuses[1:] == [S_UNSUPP, S_IOERR, S_IOERR]


def test_unsupported_and_out_of_range(tmp_path, rigs) -> None:
    path = image(tmp_path / "d.img")
    r = rigs({4: {"path": path}})
    q = r.start(4)
    statuses = run(r, 4, q, (T_WRITE_ZEROES, 0, struct.pack("<QII", 0, 1, 0)),
                   (99,),
                   (T_IN, DISK // 512, 512),                  # just past the end
                   (T_OUT, DISK // 512 - 1, b"x" * 1024),     # straddles the end
                   (T_IN, 2**63 // 256, 512))                 # offset overflows 64 bits
    assert statuses == [S_UNSUPP, S_UNSUPP, S_IOERR, S_IOERR, S_IOERR]
    assert os.path.getsize(path) == DISK


def test_two_disks_never_mix(tmp_path, rigs) -> None:
    pa, pb = image(tmp_path / "a.img", b"A"), image(tmp_path / "b.img", b"B")
    r = rigs({4: {"path": pa}, 6: {"path": pb}})
    qa, qb = r.start(4), r.start(6)
    da, db = r.drv[4], r.drv[6]
    for i in range(8):
        request(da, qa, T_OUT, i, bytes([0x10 + i]) * 512)
        request(db, qb, T_OUT, i, bytes([0x80 + i]) * 512)
    da.kick(0)
    db.kick(0)
    wait_used(qa, 8)
    wait_used(qb, 8)
    a, b = open(pa, "rb").read(), open(pb, "rb").read()
    for i in range(8):
        assert a[i * 512:(i + 1) * 512] == bytes([0x10 + i]) * 512
        assert b[i * 512:(i + 1) * 512] == bytes([0x80 + i]) * 512
    assert a[8 * 512:] == b"A" * (DISK - 4096) and b[8 * 512:] == b"B" * (DISK - 4096)
    _, ra, _ = request(da, qa, T_IN, 20, 512)
    _, rb, _ = request(db, qb, T_IN, 20, 512)
    da.kick(0)
    db.kick(0)
    wait_used(qa, 1)
    wait_used(qb, 1)
    assert r.mem.read(ra, 512) == b"A" * 512 and r.mem.read(rb, 512) == b"B" * 512
    assert r.devs[4].name == "virtio-blk-pci-0-4-0" and r.devs[6].name == "virtio-blk-pci-0-6-0"


def test_read_only_rejects_writes(tmp_path, rigs) -> None:
    path = image(tmp_path / "d.img")
    before = open(path, "rb").read()
    r = rigs({4: {"path": path, "ro": "true"}})
    q = r.start(4)
    assert run(r, 4, q, (T_OUT, 0, b"z" * 512), (T_IN, 0, 512),
               (T_DISCARD, 0, struct.pack("<QII", 0, 1, 0)))[:2] == [S_IOERR, S_OK]
    assert open(path, "rb").read() == before


def test_garbage_fails_requests_or_needs_reset(tmp_path, rigs) -> None:
    path = image(tmp_path / "d.img")
    r = rigs({4: {"path": path}})
    drv = r.drv[4]
    q = r.start(4)
    status = drv.buf(b"\xAA")
    hdr = drv.buf(struct.pack("<IIQ", T_IN, 0, 0))
    q.add([(hdr, 16, False), (0x7000_0000, 512, True), (status, 1, True)])   # buffer not RAM
    short = drv.buf(b"\0" * 8)
    status2 = drv.buf(b"\xAA")
    q.add([(short, 8, False), (status2, 1, True)])                           # short header
    q.add([(hdr, 16, False)])                                                # no status byte
    drv.kick(0)
    used = wait_used(q, 3)
    assert r.mem.read(status, 1)[0] == S_IOERR and r.mem.read(status2, 1)[0] == S_IOERR
    assert sorted(ln for _, ln in used) == [0, 1, 1]
    assert drv.status() & NEEDS_RESET == 0
    # a descriptor loop breaks the queue: NEEDS_RESET, config interrupt, VM goes on
    i = q.free.pop(0)
    q.write_desc(i, hdr, 16, 1, i)
    q.publish(i)
    drv.kick(0)
    assert drv.status() & NEEDS_RESET and drv.r(ISR, 1) & 2
    request(drv, q, T_IN, 0, 512)
    drv.kick(0)
    time.sleep(0.05)
    assert q.collect() == []
    drv.w(STATUS, 1, 0)                                  # reset, start over: works again
    q = r.start(4)
    assert run(r, 4, q, (T_IN, 0, 512)) == [S_OK]


def test_pause_drains_and_resume_restarts(tmp_path, rigs) -> None:
    path = image(tmp_path / "d.img")
    r = rigs({4: {"path": path}})
    dev, drv = r.devs[4], r.drv[4]
    q = r.start(4)
    for i in range(16):
        request(drv, q, T_OUT, 16 * i, os.urandom(8192))
    drv.kick(0)
    dev.pause()
    assert dev.backend.in_flight == 0 and not dev._inflight
    assert len(q.collect()) == 16                        # all done before pause returned
    request(drv, q, T_IN, 0, 512)
    drv.kick(0)                                          # held while paused
    time.sleep(0.05)
    assert q.collect() == []
    dev.resume()
    wait_used(q, 1)


def test_snapshot_round_trip_mid_operation(tmp_path, rigs) -> None:
    path = image(tmp_path / "d.img")
    r = rigs({4: {"path": path}})
    dev, drv = r.devs[4], r.drv[4]
    q = r.start(4)
    assert run(r, 4, q, (T_OUT, 1, b"1" * 512), (T_IN, 0, 512)) == [S_OK, S_OK]
    # the guest queued more work but has not kicked yet when the VM is paused
    _, rd, st = request(drv, q, T_IN, 1, 512)
    dev.pause()
    blob = encode(dev.save_state())
    dev.resume()
    state = decode(VirtioBlkState, blob)
    assert state.virtio.queues[0].last_avail == 2 and state.capacity == DISK // 512
    # restore into a new VM with a copy of guest memory and the same disk
    mem2 = GuestMemory([MemoryRegion("ram", RAM[0], RAM[1], bytearray(r.mem.regions[0].buf))])
    r2 = rigs({4: {"path": path}}, mem2)
    dev2 = r2.devs[4]
    dev2.restore_state(state)
    assert dev2.ident == dev.ident and dev2.queues[0].ready
    q.mem = mem2
    r2.drv[4].kick(0)
    wait_used(q, 1)
    assert mem2.read(rd, 512) == b"1" * 512 and mem2.read(st, 1) == b"\0"
    # a snapshot of another disk is refused
    other = image(tmp_path / "small.img")
    os.truncate(other, DISK // 2)
    r3 = rigs({4: {"path": other}})
    with pytest.raises(StateError, match="disk"):
        r3.devs[4].restore_state(state)


def test_save_refused_with_io_in_flight(tmp_path, rigs) -> None:
    r = rigs({4: {"path": image(tmp_path / "d.img")}})
    dev = r.devs[4]
    with dev._lock:
        dev._inflight[object()] = None                   # as if a request were running
        with pytest.raises(StateError, match="in flight"):
            dev.save_state()
        dev._inflight.clear()


def test_bad_path_is_a_clear_error(tmp_path) -> None:
    from bhyvepy.block import BlockOpenError

    m = Machine(mem=make_memory(RAM))
    with pytest.raises(BlockOpenError, match="Could not open backing file"):
        m.add(VirtioBlk, 0, 4, 0, config=m.node(0, 4, 0, path=str(tmp_path / "missing.img")))
