"""BlockBackend (bhyve's blockif) on real files in tmp_path."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bhyvepy.block as block
from bhyvepy.block import (BLOCKIF_MAXREQ, BlockBackend, BlockOpenError, BlockRequest,
                           default_serial, parse_sectorsize)
from bhyvepy.config import ConfigTree, PlainBhyveExit
from bhyvepy.errors import BhyveExit

WAIT = 10.0


def make_file(tmp_path, size: int, fill: bytes | None = None, name: str = "disk.img") -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as fh:
        if fill is None:
            fh.truncate(size)
        else:
            fh.write((fill * (size // len(fill) + 1))[:size])
    return path


def open_disk(path: str, **opts: str) -> BlockBackend:
    tree = ConfigTree(warn=lambda m: None)
    tree.set_value("pci.0.3.0.device", "virtio-blk")
    tree.set_value("pci.0.3.0.path", path)
    for key, value in opts.items():
        tree.set_value(f"pci.0.3.0.{key}", value)
    return BlockBackend.open(tree.node("pci.0.3.0"), "3:0")


class Waiter:
    """Collects completions; each request's callback fires exactly once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: dict[int, tuple[int, int, str]] = {}
        self.cond = threading.Condition(self.lock)

    def __call__(self, req: BlockRequest, err: int) -> None:
        with self.cond:
            assert id(req) not in self.done, "completed twice"
            self.done[id(req)] = (err, req.resid, threading.current_thread().name)
            self.cond.notify_all()

    def wait(self, req: BlockRequest, timeout: float = WAIT) -> tuple[int, int, str]:
        with self.cond:
            assert self.cond.wait_for(lambda: id(req) in self.done, timeout), "no completion"
            return self.done[id(req)]

    def wait_count(self, count: int, timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.done) >= count, timeout), \
                f"only {len(self.done)} of {count} completed"


def run(be: BlockBackend, op: str, offset: int = 0, iov=(), length=None) -> tuple[int, int]:
    w = Waiter()
    req = BlockRequest(w, offset, iov, length)
    assert getattr(be, op)(req) == 0
    err, resid, _ = w.wait(req)
    return err, resid


@pytest.fixture
def disk(tmp_path):
    path = make_file(tmp_path, 1 << 20, fill=b"\xa5")
    be = open_disk(path)
    yield be, path
    be.close()


class Gate:
    """Makes preadv/pwritev wait until opened, and records which offsets started."""

    def __init__(self, monkeypatch) -> None:
        self.event = threading.Event()
        self.started: list[int] = []
        self.lock = threading.Lock()
        real_r, real_w = os.preadv, os.pwritev

        def gated(real):
            def call(fd, bufs, offset, *a):
                with self.lock:
                    self.started.append(offset)
                assert self.event.wait(WAIT)
                return real(fd, bufs, offset, *a)
            return call
        monkeypatch.setattr(block.os, "preadv", gated(real_r))
        monkeypatch.setattr(block.os, "pwritev", gated(real_w))

    def wait_started(self, count: int) -> None:
        for _ in range(int(WAIT / 0.01)):
            with self.lock:
                if len(self.started) >= count:
                    return
            threading.Event().wait(0.01)
        raise AssertionError(f"only {len(self.started)} requests started")


@pytest.fixture
def gate(disk, monkeypatch):
    """A Gate that is opened at teardown, before the disk is closed."""
    g = Gate(monkeypatch)
    yield g
    g.event.set()


# --------------------------------------------------------------------------
# data path
# --------------------------------------------------------------------------

def test_scatter_gather_write_then_read(disk):
    be, path = disk
    parts = [bytearray(b"A" * 100), bytearray(b"B" * 412), bytearray(b"C" * 512)]
    assert run(be, "write", 4096, [memoryview(p) for p in parts]) == (0, 0)
    with open(path, "rb") as fh:
        fh.seek(4096)
        assert fh.read(1024) == b"A" * 100 + b"B" * 412 + b"C" * 512
        fh.seek(4096 - 1)
        assert fh.read(1) == b"\xa5"          # the byte before is untouched
    out = bytearray(2048)
    views = [memoryview(out)[:7], memoryview(out)[7:1500], memoryview(out)[1500:]]
    assert run(be, "read", 4096 - 512, views) == (0, 0)
    assert out == b"\xa5" * 512 + b"A" * 100 + b"B" * 412 + b"C" * 512 + b"\xa5" * 512


def test_completion_runs_on_a_worker_thread(disk):
    be, _ = disk
    w = Waiter()
    req = BlockRequest(w, 0, [bytearray(512)])
    assert be.read(req) == 0
    _, _, thread = w.wait(req)
    assert thread != threading.current_thread().name
    assert thread.startswith("blk-3:0-")


def test_flush_calls_fsync(disk, monkeypatch):
    be, _ = disk
    calls = []
    real = os.fsync
    monkeypatch.setattr(block.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    assert run(be, "flush") == (0, 0)
    assert len(calls) == 1


def test_flush_error_is_reported_in_completion(disk, monkeypatch):
    be, _ = disk

    def fail(fd):
        raise OSError(errno.EIO, "boom")
    monkeypatch.setattr(block.os, "fsync", fail)
    assert run(be, "flush")[0] == errno.EIO


def test_discard_punches_a_hole(tmp_path):
    path = make_file(tmp_path, 1 << 20, fill=b"\x5a")
    os.sync()
    before = os.stat(path).st_blocks
    be = open_disk(path)
    try:
        assert be.can_delete
        assert run(be, "discard", 256 << 10, length=512 << 10) == (0, 0)
        after = os.stat(path)
        assert after.st_size == 1 << 20
        assert after.st_blocks <= before - (512 << 10) // 512 + 16, (before, after.st_blocks)
        out = bytearray(1 << 20)
        assert run(be, "read", 0, [out]) == (0, 0)
        assert out[: 256 << 10] == b"\x5a" * (256 << 10)
        assert out[256 << 10: 768 << 10] == bytes(512 << 10)
        assert out[768 << 10:] == b"\x5a" * (256 << 10)
    finally:
        be.close()


def test_write_zeroes(disk):
    be, path = disk
    assert run(be, "write_zeroes", 1000, length=3000) == (0, 0)
    with open(path, "rb") as fh:
        data = fh.read()
    assert len(data) == 1 << 20
    assert data[:1000] == b"\xa5" * 1000
    assert data[1000:4000] == bytes(3000)
    assert data[4000:] == b"\xa5" * (len(data) - 4000)


def test_nodelete_refuses_discard(tmp_path):
    be = open_disk(make_file(tmp_path, 65536, fill=b"x"), nodelete="true")
    try:
        assert not be.can_delete
        assert run(be, "discard", 0, length=4096)[0] == errno.EOPNOTSUPP
    finally:
        be.close()


def test_read_only_rejects_writes_and_discards(tmp_path):
    path = make_file(tmp_path, 65536, fill=b"r")
    be = open_disk(path, ro="true")
    try:
        assert be.read_only
        assert run(be, "write", 0, [b"w" * 512]) == (errno.EROFS, 512)
        assert run(be, "discard", 0, length=512)[0] in (errno.EROFS, errno.EOPNOTSUPP)
        assert run(be, "write_zeroes", 0, length=512)[0] == errno.EROFS
        buf = bytearray(512)
        assert run(be, "read", 0, [buf]) == (0, 0) and buf == b"r" * 512
        assert be.pause() == 0
        be.resume()
    finally:
        be.close()
    with open(path, "rb") as fh:
        assert fh.read() == b"r" * 65536


@pytest.mark.parametrize("offset,length", [(65536 - 512, 1024), (65536, 1), (-512, 512),
                                           (1 << 40, 512)])
def test_out_of_range_fails_without_touching_anything(tmp_path, offset, length):
    path = make_file(tmp_path, 65536, fill=b"o")
    be = open_disk(path)
    try:
        guard = bytearray(b"G" * length)
        assert run(be, "read", offset, [guard]) == (errno.EINVAL, length)
        assert guard == b"G" * length
        assert run(be, "write", offset, [b"W" * length]) == (errno.EINVAL, length)
        assert run(be, "discard", offset, length=length)[0] == errno.EINVAL
        assert run(be, "write_zeroes", offset, length=length)[0] == errno.EINVAL
    finally:
        be.close()
    assert os.path.getsize(path) == 65536
    with open(path, "rb") as fh:
        assert fh.read() == b"o" * 65536


def test_unusable_buffer_completes_with_efault(disk):
    be, _ = disk
    assert run(be, "read", 0, [b"immutable"])[0] == errno.EFAULT
    assert run(be, "read", 0, [object()])[0] == errno.EFAULT


def test_callback_exception_does_not_kill_workers(disk):
    be, _ = disk

    def bad(req, err):
        raise RuntimeError("device bug")
    for _ in range(block.BLOCKIF_NUMTHR * 2):
        assert be.read(BlockRequest(bad, 0, [bytearray(512)])) == 0
    assert run(be, "read", 0, [bytearray(512)]) == (0, 0)


def test_many_concurrent_requests(tmp_path):
    be_size = 1 << 20
    path = make_file(tmp_path, be_size)
    be = open_disk(path)
    w = Waiter()
    count = be.queue_depth
    reqs = []
    try:
        def submit(base: int) -> None:
            for i in range(base, count, 3):
                req = BlockRequest(w, i * 4096, [bytes([i % 251 + 1]) * 4096])
                reqs.append(req)
                assert be.write(req) == 0
        threads = [threading.Thread(target=submit, args=(b,)) for b in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.wait_count(count)
        assert all(err == 0 and resid == 0 for err, resid, _ in w.done.values())
        assert be.in_flight == 0
    finally:
        be.close()
    with open(path, "rb") as fh:
        data = fh.read()
    assert len(data) == be_size
    for i in range(count):
        assert data[i * 4096:(i + 1) * 4096] == bytes([i % 251 + 1]) * 4096


def test_queue_limit_returns_e2big(disk, gate):
    be, _ = disk
    w = Waiter()
    try:
        for i in range(BLOCKIF_MAXREQ):
            assert be.read(BlockRequest(w, (i % 64) * 512 + 1, [bytearray(1)])) == 0
        assert be.in_flight == BLOCKIF_MAXREQ
        assert be.read(BlockRequest(w, 0, [bytearray(1)])) == errno.E2BIG
    finally:
        gate.event.set()
    w.wait_count(BLOCKIF_MAXREQ)


def test_slow_request_does_not_block_the_submitter(disk, gate):
    be, _ = disk
    w = Waiter()
    req = BlockRequest(w, 0, [bytearray(512)])
    assert be.read(req) == 0            # returns although the I/O cannot finish
    gate.wait_started(1)
    assert w.done == {}
    assert be.in_flight == 1
    gate.event.set()
    assert w.wait(req)[0] == 0


def test_request_starting_where_another_ends_waits_for_it(disk, gate):
    be, _ = disk
    w = Waiter()
    first = BlockRequest(w, 8192, [b"1" * 4096])
    second = BlockRequest(w, 8192 + 4096, [b"2" * 4096])
    other = BlockRequest(w, 65536, [b"3" * 512])
    assert be.write(first) == 0
    gate.wait_started(1)
    assert be.write(second) == 0
    assert be.write(other) == 0
    gate.wait_started(2)
    with gate.lock:
        assert 65536 in gate.started and 8192 + 4096 not in gate.started
    gate.event.set()
    w.wait_count(3)


def test_cancel(disk, gate):
    be, _ = disk
    w = Waiter()
    busy = [BlockRequest(w, i * 8192, [bytearray(512)]) for i in range(block.BLOCKIF_NUMTHR)]
    for req in busy:
        assert be.read(req) == 0
    gate.wait_started(block.BLOCKIF_NUMTHR)
    queued = BlockRequest(w, 1 << 19, [bytearray(512)])
    assert be.read(queued) == 0
    assert be.cancel(queued) == 0
    assert be.cancel(queued) == errno.EINVAL
    assert be.cancel(busy[0]) == errno.EBUSY
    gate.event.set()
    w.wait_count(len(busy))
    be.pause()                           # everything finished
    assert id(queued) not in w.done      # a cancelled request never calls back
    be.resume()


# --------------------------------------------------------------------------
# pause / resume / close
# --------------------------------------------------------------------------

def test_pause_drains_then_flushes_and_holds_new_requests(disk, gate, monkeypatch):
    be, path = disk
    order: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(block.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    w = Waiter()
    reqs = [BlockRequest(w, i * 8192, [b"p" * 4096]) for i in range(12)]
    for req in reqs:
        assert be.write(req) == 0
    gate.wait_started(block.BLOCKIF_NUMTHR)

    paused = threading.Event()
    result: list[int] = []

    def do_pause() -> None:
        result.append(be.pause())
        order.append("paused")
        paused.set()
    t = threading.Thread(target=do_pause)
    t.start()
    assert not paused.wait(0.2)          # in-flight writes hold the pause
    gate.event.set()
    assert paused.wait(WAIT)
    t.join()
    assert result == [0]
    assert len(w.done) == len(reqs)      # all drained before pause returned
    assert order == ["fsync", "paused"]

    late = BlockRequest(w, 1 << 19, [b"L" * 512])
    assert be.write(late) == 0
    assert be.in_flight == 1
    assert not threading.Event().wait(0.2) and id(late) not in w.done
    be.resume()
    assert w.wait(late)[0] == 0
    with open(path, "rb") as fh:
        fh.seek(1 << 19)
        assert fh.read(512) == b"L" * 512


def test_close_rejects_later_requests(tmp_path):
    be = open_disk(make_file(tmp_path, 4096))
    assert run(be, "read", 0, [bytearray(512)]) == (0, 0)
    be.close()
    be.close()                            # idempotent
    assert be.read(BlockRequest(lambda r, e: None, 0, [bytearray(512)])) == errno.ENXIO


# --------------------------------------------------------------------------
# opening: options, errors, geometry
# --------------------------------------------------------------------------

def test_geometry_of_a_file(tmp_path):
    path = make_file(tmp_path, 1 << 20)
    be = open_disk(path)
    try:
        assert be.size == 1 << 20
        assert be.sector_size == 512
        assert be.physical_sector == (os.stat(path).st_blksize, 0)
        assert not be.read_only and not be.is_disk
        assert be.queue_depth == 135
        assert path in be.describe() and "regular file" in be.describe()
        # VHD algorithm by hand: 2048 sectors -> 17 spt, 120 cyl*heads, 4 heads
        assert be.chs() == (30, 4, 17)
    finally:
        be.close()


def test_chs_of_a_large_sparse_file(tmp_path):
    path = make_file(tmp_path, 8 << 30)
    be = open_disk(path)
    try:
        # 16777216 sectors: 17 spt needs 964 heads, 31 spt too many cylinders,
        # so 63 spt, 16 heads, 16777216 // 63 // 16 cylinders.
        assert be.chs() == (16644, 16, 63)
    finally:
        be.close()


@pytest.mark.parametrize("text,expected", [
    ("4096", (4096, 4096)), ("512/4096", (512, 4096)), (" +512/4096", (512, 4096)),
    ("0", (0, 0)), ("0/4096", (0, 4096)),
])
def test_sectorsize_syntax(text, expected):
    assert parse_sectorsize(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "512/", "512x", "512/4096x", "512//4096",
                                  "0x200", "512/ "])
def test_sectorsize_syntax_errors(tmp_path, text):
    with pytest.raises(BlockOpenError) as info:
        open_disk(make_file(tmp_path, 4096), sectorsize=text)
    assert info.value.message == f'Invalid sector size "{text}"'
    assert info.value.status == 4
    assert isinstance(info.value, PlainBhyveExit)


@pytest.mark.parametrize("text,message", [
    ("256", "Invalid sector size 256/256"),
    ("1000", "Invalid sector size 1000/1000"),
    ("4096/512", "Invalid sector size 4096/512"),
    ("512/1000", "Invalid sector size 512/1000"),
    ("-512", "Invalid sector size -512/-512"),
])
def test_sectorsize_value_errors(tmp_path, text, message):
    with pytest.raises(BlockOpenError) as info:
        open_disk(make_file(tmp_path, 4096), sectorsize=text)
    assert info.value.message == message


def test_sectorsize_overrides_geometry(tmp_path):
    be = open_disk(make_file(tmp_path, 65536), sectorsize="4096/16384")
    try:
        assert be.sector_size == 4096
        assert be.physical_sector == (16384, 0)
    finally:
        be.close()


def test_sectorsize_zero_keeps_the_default(tmp_path):
    be = open_disk(make_file(tmp_path, 65536), sectorsize="0")
    try:
        assert be.sector_size == 512
    finally:
        be.close()


def test_missing_path():
    tree = ConfigTree(warn=lambda m: None)
    tree.set_value("pci.0.3.0.device", "virtio-blk")
    with pytest.raises(BlockOpenError) as info:
        BlockBackend.open(tree.node("pci.0.3.0"))
    assert info.value.message == 'Missing "path" for block device.'
    assert info.value.status == 4


def test_missing_file_names_path_and_reason(tmp_path):
    path = str(tmp_path / "nope.img")
    with pytest.raises(BlockOpenError) as info:
        open_disk(path)
    assert info.value.message.endswith(f"Could not open backing file: {path}: "
                                       f"{os.strerror(errno.ENOENT)}")
    assert info.value.errno == errno.ENOENT


def test_directory_is_refused(tmp_path):
    with pytest.raises(BlockOpenError) as info:
        open_disk(str(tmp_path))
    assert os.strerror(errno.EISDIR) in info.value.message


def test_bad_boolean_option(tmp_path):
    with pytest.raises(BhyveExit) as info:
        open_disk(make_file(tmp_path, 4096), nocache="maybe")
    assert info.value.message == "Invalid value maybe for boolean variable nocache"
    assert info.value.status == 4


def test_bootindex_is_parsed_like_atoi(tmp_path):
    path = make_file(tmp_path, 4096)
    for text, value in (("3", 3), ("12abc", 12), ("x", 0)):
        be = open_disk(path, bootindex=text)
        assert be.bootindex == value
        be.close()
    be = open_disk(path)
    assert be.bootindex is None
    be.close()


def test_nocache_uses_o_direct(tmp_path):
    path = make_file(tmp_path, 65536, fill=b"d")
    try:
        be = open_disk(path, nocache="true", sync="true")
    except BlockOpenError as exc:
        pytest.skip(f"the file system of tmp_path refuses O_DIRECT: {exc.message}")
    try:
        assert "nocache" in be.describe() and "sync" in be.describe()
        buf = mmap.mmap(-1, 8192)            # page-aligned, as guest memory is
        view = memoryview(buf)
        view[:4096] = b"q" * 4096
        assert run(be, "write", 4096, [view[:4096]]) == (0, 0)
        assert run(be, "read", 0, [view]) == (0, 0)
        assert bytes(view[:4096]) == b"d" * 4096 and bytes(view[4096:]) == b"q" * 4096
        view.release()
        buf.close()
    finally:
        be.close()


def test_default_serial_matches_bhyve():
    # printf '/tmp/disk.img' | md5sum -> 8081a1ad5745bdcd...
    assert default_serial("/tmp/disk.img") == "BHYVE-8081-A1AD-5745"


# --------------------------------------------------------------------------
# a host block device (loop device), when we may make one
# --------------------------------------------------------------------------

@pytest.fixture
def loopdev(tmp_path):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup to attach a loop device")
    made = []

    def attach(size: int, sector: int | None = None) -> str:
        img = make_file(tmp_path, size, fill=b"L", name=f"loop{len(made)}.img")
        cmd = ["losetup", "-f", "--show"]
        cmd += (["--sector-size", str(sector)] if sector else []) + [img]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"losetup failed: {proc.stderr.strip()}")
        made.append(proc.stdout.strip())
        return made[-1]
    yield attach
    for dev in made:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_block_device_geometry_and_io(loopdev):
    dev = loopdev(4 << 20)
    be = open_disk(dev)
    try:
        assert be.is_disk and "block device" in be.describe()
        assert be.size == 4 << 20
        assert be.sector_size == 512
        assert run(be, "write", 512, [b"D" * 512]) == (0, 0)
        assert run(be, "write_zeroes", 1024, length=512) == (0, 0)
        buf = bytearray(2048)
        assert run(be, "read", 0, [buf]) == (0, 0)
        assert buf == b"L" * 512 + b"D" * 512 + bytes(512) + b"L" * 512
        assert run(be, "read", 4 << 20, [bytearray(512)])[0] == errno.EINVAL
        if be.can_delete:
            assert run(be, "discard", 0, length=4096) == (0, 0)
        assert run(be, "flush") == (0, 0)
    finally:
        be.close()


def test_sectorsize_incompatible_with_device(loopdev):
    dev = loopdev(1 << 20, sector=4096)
    with pytest.raises(BlockOpenError) as info:
        open_disk(dev, sectorsize="512")
    assert info.value.message == ("Sector size 512 incompatible with underlying device "
                                  "sector size 4096")


# --------------------------------------------------------------------------
# property: a request never touches bytes outside its range
# --------------------------------------------------------------------------

DISK = 64 << 10


@pytest.fixture(scope="module")
def prop_disk(tmp_path_factory):
    path = make_file(tmp_path_factory.mktemp("prop"), DISK)
    be = open_disk(path)
    yield be, path
    be.close()


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(-1024, DISK + 1024),
       lengths=st.lists(st.integers(0, 5000), min_size=1, max_size=4),
       op=st.sampled_from(["read", "write", "write_zeroes", "discard"]))
def test_requests_stay_inside_their_range(prop_disk, offset, lengths, op):
    be, path = prop_disk
    pattern = bytes((i * 7 + 3) & 0xFF or 1 for i in range(DISK))
    with open(path, "r+b") as fh:
        fh.write(pattern)
    total = sum(lengths)
    inside = 0 <= offset and offset + total <= DISK
    if op == "read":
        backing = bytearray(b"\xee" * (total + 64))
        view = memoryview(backing)
        iov, pos = [], 32
        for n in lengths:
            iov.append(view[pos:pos + n])
            pos += n
        err, resid = run(be, op, offset, iov)
        assert backing[:32] == b"\xee" * 32 and backing[32 + total:] == b"\xee" * 32
        if inside:
            assert (err, resid) == (0, 0)
            assert backing[32:32 + total] == pattern[offset:offset + total]
        else:
            assert err == errno.EINVAL and backing[32:32 + total] == b"\xee" * total
        expected = pattern
    elif op == "write":
        err, resid = run(be, op, offset, [b"\x00" * n for n in lengths])
        expected = pattern[:offset] + bytes(total) + pattern[offset + total:] if inside else pattern
    else:
        err, resid = run(be, op, offset, length=total)
        expected = pattern[:offset] + bytes(total) + pattern[offset + total:] if inside else pattern
    assert err == (0 if inside else errno.EINVAL)
    with open(path, "rb") as fh:
        assert fh.read() == expected
