"""Tests for the bhyvepy snapshot file (format 1) and the progress line."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import mmap
import os
import re
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bhyvepy.snapshot import fileformat
from bhyvepy.snapshot.fileformat import (
    MemRegion,
    Section,
    SnapshotFormatError,
    read_snapshot,
    write_snapshot,
)
from bhyvepy.snapshot.progress import ProgressBar, render

# The documented header layout, restated here independently of the module.
HDR = struct.Struct("<16sII7Q32s32s")
MAGIC = b"BHYVEPY\0SNAPSHOT"
PAGE = 4096
GIB4 = 4 << 30

KERN = [Section(n, 1, (n * 7).encode()) for n in
        ("vhpet", "vm", "vioapic", "vlapic", "vmcx", "vatpit", "vatpic", "vpmtmr", "vrtc")]
DEVS = [
    Section("hostbridge-pci-0-0-0", 1, b"\x01" * 64),
    Section("virtio-blk-pci-0-3-0", 2, b"disk zero" + bytes(300)),
    Section("virtio-blk-pci-0-3-1", 2, b"disk one!" + bytes(300)),
    Section("lpc-pci-0-31-0", 1, b"lpc"),
    Section("atkbdc", 1, b"kbd"),
]


def base_meta(**extra) -> dict:
    meta = {
        "basic metadata": {"ncpus": 2, "vmname": "vm0", "memflags": 0},
        "backend": "kvm",
        "host": {"os": "Linux", "machine": "x86_64"},
        "config": {"name": "vm0", "cpus": "2",
                   "pci": {"0": {"3": {"0": {"device": "virtio-blk", "path": "/a"},
                                       "1": {"device": "virtio-blk", "path": "/b"}}}}},
    }
    meta.update(extra)
    return meta


def patterned(size: int, data_pages: set[int], seed: int = 1) -> bytearray:
    buf = bytearray(size)
    for p in data_pages:
        start = p * PAGE
        end = min(start + PAGE, size)
        buf[start:end] = bytes(((seed + p + i) % 251) + 1 for i in range(end - start))
    return buf


def standard_memory():
    low = patterned(64 * 1024, {0, 1, 5, 15})           # last page has data
    high = patterned(16 * 1024, {0, 3})                 # last page has data
    return low, high


@pytest.fixture
def snap(tmp_path):
    low, high = standard_memory()
    path = tmp_path / "vm.ckp"
    meta = write_snapshot(path, metadata=base_meta(), kern_structs=KERN, devices=DEVS,
                          memory=[MemRegion(0, low), MemRegion(GIB4, high)])
    return path, meta, low, high


def header(raw: bytes):
    return HDR.unpack_from(raw)


def areas(raw: bytes):
    f = header(raw)
    return dict(meta_off=f[3], meta_len=f[4], sec_off=f[5], sec_len=f[6], mem_off=f[7],
                mem_len=f[8], file_size=f[9])


def meta_of(raw: bytes) -> dict:
    a = areas(raw)
    return json.loads(raw[a["meta_off"]:a["meta_off"] + a["meta_len"]])


def rewrite_metadata(path, mutate) -> None:
    """Change the metadata and re-sign header and metadata, keeping offsets."""
    raw = path.read_bytes()
    f = header(raw)
    meta_off, meta_len = f[3], f[4]
    meta = json.loads(raw[meta_off:meta_off + meta_len])
    mutate(meta)
    new = json.dumps(meta, separators=(",", ":")).encode().ljust(meta_len)
    assert len(new) == meta_len
    head = HDR.pack(*f[:10], hashlib.sha256(new).digest(), bytes(32))[:-32]
    head += hashlib.sha256(head).digest()
    path.write_bytes(head + new + raw[meta_off + meta_len:])


def expect_error(path, pattern: str) -> SnapshotFormatError:
    with pytest.raises(SnapshotFormatError, match=pattern) as info:
        read_snapshot(path).close()
    return info.value


# --------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------

def test_round_trip(snap):
    path, meta, low, high = snap
    with read_snapshot(path) as s:
        for sec in KERN:
            assert s.section("kern_structs", sec.name) == sec.payload
        for sec in DEVS:
            assert s.section("devices", sec.name) == sec.payload
            assert s.section_info("devices", sec.name).version == sec.version
        # two instances of one device type stay apart
        assert s.section("devices", "virtio-blk-pci-0-3-0").startswith(b"disk zero")
        assert s.section("devices", "virtio-blk-pci-0-3-1").startswith(b"disk one!")
        # upstream bhyve's spelling of the instance name is an alias
        assert s.section("devices", "virtio-blk@pci.0.3.1") == DEVS[2].payload
        assert [i.name for i in s.sections("devices")] == [d.name for d in DEVS]
        assert [i.name for i in s.sections("kern_structs")] == [k.name for k in KERN]
        assert s.basic["ncpus"] == 2 and s.basic["vmname"] == "vm0"
        assert s.basic["memsize"] == len(low) + len(high)
        assert s.config == base_meta()["config"]
        assert s.backend == "kvm" and s.host["os"] == "Linux"
        assert s.metadata["format"] == 1 and s.metadata["created"]
        assert [(r.gpa, r.size) for r in s.memory] == [(0, len(low)), (GIB4, len(high))]

        out_low, out_high = bytearray(len(low)), bytearray(len(high))
        s.load_memory([out_low, out_high])
        assert out_low == low and out_high == high

        got = {}

        def by_gpa(gpa, size):
            got[gpa] = bytearray(size)
            return got[gpa]

        s.load_memory(by_gpa)
        assert got == {0: low, GIB4: high}
    assert meta["basic metadata"]["memsize"] == len(low) + len(high)


def test_missing_section_is_named(snap):
    path = snap[0]
    with read_snapshot(path) as s:
        assert not s.has_section("devices", "virtio-blk-pci-0-4-0")
        with pytest.raises(SnapshotFormatError, match="no section 'virtio-blk-pci-0-4-0' in devices"):
            s.section("devices", "virtio-blk-pci-0-4-0")


def test_layout_matches_documentation(snap):
    """Find everything through the documented header alone."""
    path, _, low, high = snap
    raw = path.read_bytes()
    f = header(raw)
    assert f[0] == MAGIC and f[1] == 1 and f[2] == HDR.size == 144
    a = areas(raw)
    assert hashlib.sha256(raw[:112]).digest() == f[11]
    assert hashlib.sha256(raw[a["meta_off"]:a["meta_off"] + a["meta_len"]]).digest() == f[10]
    assert a["sec_off"] == a["meta_off"] + a["meta_len"]
    assert a["mem_off"] % PAGE == 0 and a["mem_off"] >= a["sec_off"] + a["sec_len"]
    assert a["file_size"] == len(raw) == a["mem_off"] + a["mem_len"]
    meta = meta_of(raw)
    # bhyve 14's three sections, with version and checksum per record
    assert set(meta) >= {"basic metadata", "kern_structs", "devices", "format", "backend",
                         "host", "created", "config", "memory"}
    assert set(meta["basic metadata"]) >= {"ncpus", "vmname", "memsize", "memflags"}
    for kind, secs in (("kern_structs", KERN), ("devices", DEVS)):
        assert [r["device"] for r in meta[kind]] == [s.name for s in secs]
        for rec, sec in zip(meta[kind], secs):
            start = a["sec_off"] + rec["file_offset"]
            assert raw[start:start + rec["size"]] == sec.payload
            assert rec["version"] == sec.version
            assert rec["checksum"] == "sha256:" + hashlib.sha256(sec.payload).hexdigest()
    # memory last, lowmem then highmem, page aligned, data where the extents say
    regions = meta["memory"]
    assert [r["gpa"] for r in regions] == [0, GIB4]
    for rec, buf in zip(regions, (low, high)):
        base = a["mem_off"] + rec["file_offset"]
        assert base % PAGE == 0
        for off, length in rec["extents"]:
            assert raw[base + off:base + off + length] == buf[off:off + length]
    assert regions[0]["extents"] == [[0, 2 * PAGE], [5 * PAGE, PAGE], [15 * PAGE, PAGE]]


def test_sparse_holes_are_really_holes(tmp_path):
    size = 64 << 20
    region = mmap.mmap(-1, size)
    for off in (0, 10 << 20, size - PAGE):
        region[off:off + 5] = b"data!"
    path = tmp_path / "sparse.ckp"
    write_snapshot(path, metadata=base_meta(), kern_structs=KERN, devices=DEVS,
                   memory=[MemRegion(0, region)])
    st_ = os.stat(path)
    assert st_.st_size > size
    if st_.st_blocks * 512 >= size:
        pytest.skip("this filesystem does not keep holes in sparse files")
    assert st_.st_blocks * 512 < 1 << 20
    with read_snapshot(path) as s:
        assert s.memory[0].extents == ((0, PAGE), (10 << 20, PAGE), (size - PAGE, PAGE))
        out = mmap.mmap(-1, size)
        s.load_memory([out])
        assert out[:] == region[:]


def test_zero_holes_on_request(snap):
    path, _, low, high = snap
    with read_snapshot(path) as s:
        dirty_low, dirty_high = bytearray(b"\xff" * len(low)), bytearray(b"\xff" * len(high))
        s.load_memory([dirty_low, dirty_high])
        assert dirty_low != low                      # holes left alone by default
        assert dirty_low[5 * PAGE:6 * PAGE] == low[5 * PAGE:6 * PAGE]
        s.load_memory([dirty_low, dirty_high], zero_holes=True)
        assert dirty_low == low and dirty_high == high


def test_load_memory_size_mismatch(snap):
    with read_snapshot(snap[0]) as s:
        with pytest.raises(SnapshotFormatError, match="65536 bytes in the snapshot but 4096"):
            s.load_memory([bytearray(PAGE), bytearray(16 * 1024)])
        with pytest.raises(SnapshotFormatError, match="2 memory regions, 1 buffers"):
            s.load_memory([bytearray(64 * 1024)])


def test_progress_callbacks(snap, tmp_path):
    low, high = standard_memory()
    calls = []
    write_snapshot(tmp_path / "p.ckp", metadata=base_meta(), kern_structs=[], devices=[],
                   memory=[MemRegion(0, low), MemRegion(GIB4, high)],
                   progress=lambda d, t: calls.append((d, t)))
    total = len(low) + len(high)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    with read_snapshot(tmp_path / "p.ckp") as s:
        s.load_memory([bytearray(len(low)), bytearray(len(high))],
                      progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_no_memory_and_no_sections(tmp_path):
    meta = base_meta()
    write_snapshot(tmp_path / "e", metadata=meta, kern_structs=[], devices=[], memory=[])
    with read_snapshot(tmp_path / "e") as s:
        assert s.memory == [] and s.sections("devices") == []
        assert s.basic["memsize"] == 0


def test_dir_fd(tmp_path):
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_snapshot("rel.ckp", metadata=base_meta(), kern_structs=KERN, devices=[],
                       memory=[MemRegion(0, bytearray(PAGE))], dir_fd=dfd)
        assert os.listdir(tmp_path) == ["rel.ckp"]
        with read_snapshot("rel.ckp", dir_fd=dfd) as s:
            assert s.section("kern_structs", "vm") == KERN[1].payload
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------
# corruption
# --------------------------------------------------------------------------

def _expected_truncation_message(raw: bytes, cut: int) -> str:
    a = areas(raw)
    meta = meta_of(raw)
    if cut == 0:
        return "snapshot file is empty"
    if cut < 144:
        return "snapshot truncated: header extends past end of file"
    if cut < a["meta_off"] + a["meta_len"]:
        return "snapshot truncated: metadata extends past end of file"
    for kind in ("kern_structs", "devices"):
        for rec in meta[kind]:
            if a["sec_off"] + rec["file_offset"] + rec["size"] > cut:
                return f"snapshot truncated: section '{rec['device']}' extends past end of file"
    for rec in meta["memory"]:
        for off, length in rec["extents"]:
            if a["mem_off"] + rec["file_offset"] + off + length > cut:
                return (f"snapshot truncated: memory region at gpa {rec['gpa']:#x} "
                        "extends past end of file")
    return f"snapshot truncated: file is {cut} bytes, its header says {a['file_size']}"


def test_truncated_at_many_points(snap, tmp_path):
    path = snap[0]
    raw = path.read_bytes()
    a = areas(raw)
    meta = meta_of(raw)
    cuts = set(range(0, a["sec_off"] + a["sec_len"] + 1, 97))
    cuts |= {1, 15, 16, 23, 24, 143, 144, 145, a["sec_off"] - 1, a["sec_off"], len(raw) - 1}
    for kind in ("kern_structs", "devices"):
        for rec in meta[kind]:
            cuts.add(a["sec_off"] + rec["file_offset"] + rec["size"] // 2)
            cuts.add(a["sec_off"] + rec["file_offset"] + rec["size"] - 1)
    for rec in meta["memory"]:
        base = a["mem_off"] + rec["file_offset"]
        cuts |= {base, base + 3 * PAGE, base + 6 * PAGE + 10, base + rec["size"] - 1}
    seen = set()
    cut_path = tmp_path / "cut.ckp"
    for cut in sorted(c for c in cuts if 0 <= c < len(raw)):
        cut_path.write_bytes(raw[:cut])
        message = _expected_truncation_message(raw, cut)
        with pytest.raises(SnapshotFormatError) as info:
            read_snapshot(cut_path).close()
        assert str(info.value) == message, f"cut at {cut}"
        seen.add(message.split(": ", 1)[-1].split("'")[0].strip())
    # every kind of place was hit
    assert {"header extends past end of file", "metadata extends past end of file",
            "section", "memory region at gpa 0x0 extends past end of file",
            "memory region at gpa 0x100000000 extends past end of file"} <= seen
    names = {m.split("'")[1] for m in (_expected_truncation_message(raw, c) for c in cuts)
             if "section '" in m}
    assert {"vhpet", "virtio-blk-pci-0-3-0", "virtio-blk-pci-0-3-1", "atkbdc"} <= names


def test_truncated_inside_trailing_hole(tmp_path):
    path = tmp_path / "t.ckp"
    write_snapshot(path, metadata=base_meta(), kern_structs=[], devices=[],
                   memory=[MemRegion(0, patterned(8 * PAGE, {0}))])
    raw = path.read_bytes()
    path.write_bytes(raw[:-PAGE])
    expect_error(path, re.escape(f"snapshot truncated: file is {len(raw) - PAGE} bytes, "
                                 f"its header says {len(raw)}"))


def test_trailing_garbage(snap):
    path = snap[0]
    with open(path, "ab") as f:
        f.write(b"junk")
    expect_error(path, "4 unexpected bytes after its end")


def flip(path, pos: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x41
    path.write_bytes(bytes(raw))


def test_flipped_byte_in_header(snap, tmp_path):
    raw = snap[0].read_bytes()
    p = tmp_path / "h.ckp"
    for pos in range(144):
        p.write_bytes(raw)
        flip(p, pos)
        if pos < 16:
            expected = r"^not a bhyvepy snapshot \(bad magic\)$"
        elif pos < 20:
            expected = r"^unsupported snapshot format version \d+ \(this bhyvepy reads version 1\)$"
        else:
            expected = "^checksum mismatch in snapshot header$"
        expect_error(p, expected)


def test_flipped_byte_in_metadata(snap, tmp_path):
    raw = snap[0].read_bytes()
    a = areas(raw)
    p = tmp_path / "m.ckp"
    text = raw[a["meta_off"]:a["meta_off"] + a["meta_len"]]
    extents_at = a["meta_off"] + text.index(b'"extents"') + 20  # inside the extents table
    for pos in list(range(a["meta_off"], a["meta_off"] + a["meta_len"], 53)) + [extents_at]:
        p.write_bytes(raw)
        flip(p, pos)
        expect_error(p, "^checksum mismatch in snapshot metadata$")


def test_flipped_byte_in_each_section(snap, tmp_path):
    raw = snap[0].read_bytes()
    a = areas(raw)
    meta = meta_of(raw)
    p = tmp_path / "s.ckp"
    for kind in ("kern_structs", "devices"):
        for rec in meta[kind]:
            for pos in (0, rec["size"] - 1):
                p.write_bytes(raw)
                flip(p, a["sec_off"] + rec["file_offset"] + pos)
                expect_error(p, f"^checksum mismatch in section '{re.escape(rec['device'])}'$")


def test_flipped_byte_in_memory_is_caught_on_load(snap, tmp_path):
    raw = snap[0].read_bytes()
    a = areas(raw)
    meta = meta_of(raw)
    high = meta["memory"][1]
    p = tmp_path / "mem.ckp"
    p.write_bytes(raw)
    flip(p, a["mem_off"] + high["file_offset"] + 3 * PAGE + 77)
    with read_snapshot(p) as s:
        with pytest.raises(SnapshotFormatError,
                           match="^checksum mismatch in memory region at gpa 0x100000000$"):
            s.load_memory([bytearray(64 * 1024), bytearray(16 * 1024)])


def test_wrong_version(snap):
    path = snap[0]
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 16, 2)
    path.write_bytes(bytes(raw))
    expect_error(path, r"^unsupported snapshot format version 2 \(this bhyvepy reads version 1\)$")


def test_wrong_magic(snap, tmp_path):
    path = snap[0]
    raw = path.read_bytes()
    path.write_bytes(b"BHYVEPY\0SNAPSHOU" + raw[16:])
    expect_error(path, r"^not a bhyvepy snapshot \(bad magic\)$")
    other = tmp_path / "text"
    other.write_text("hello")
    expect_error(other, r"^not a bhyvepy snapshot \(bad magic\)$")


def test_bhyve_three_file_layout_is_recognised(tmp_path):
    (tmp_path / "old").write_bytes(bytes(PAGE))
    (tmp_path / "old.kern").write_bytes(b"k")
    (tmp_path / "old.meta").write_text('{"basic metadata": {}}')
    expect_error(tmp_path / "old", r"bhyve\(8\) snapshot \(with \.meta and \.kern files\)")


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m["basic metadata"].update(ncpus="2"),
     r"^bad snapshot metadata: 'basic metadata'\.'ncpus' must be an integer$"),
    (lambda m: m["basic metadata"].update(ncpus=0), "'ncpus' is out of range"),
    (lambda m: m["basic metadata"].update(vmname=7), "'vmname' must be a string"),
    (lambda m: m["basic metadata"].pop("memflags"), "'basic metadata'.'memflags' is missing"),
    (lambda m: m["basic metadata"].update(memsize=1), "'memsize' is 1 but the memory regions hold"),
    (lambda m: m.update(format=2), "'format' is 2, expected 1"),
    (lambda m: m.pop("backend"), "'backend' is missing"),
    (lambda m: m.update(host="x"), "'host' must be an object"),
    (lambda m: m["config"].update(cpus=2), r"'config'\.'cpus' must be a string or an object"),
    (lambda m: m.update(devices={}), "'devices' must be an array"),
    (lambda m: m["devices"][1].update(size=-1), "'size' is out of range"),
    (lambda m: m["devices"][1].update(size=True), "'size' must be an integer"),
    (lambda m: m["devices"][2].update(device="virtio-blk-pci-0-3-0"),
     "duplicate section 'virtio-blk-pci-0-3-0' in devices"),
    (lambda m: m["devices"][0].update(checksum="md5:00"), "'checksum' must be 'sha256:'"),
    (lambda m: m["devices"][0].pop("version"), "'version' is missing"),
    (lambda m: m["devices"][0].update(file_offset=m["devices"][1]["file_offset"]),
     "checksum mismatch in section 'hostbridge-pci-0-0-0'"),
    (lambda m: m["kern_structs"][0].update(file_offset=10 ** 9),
     "snapshot truncated: section 'vhpet' extends past end of file"),
    (lambda m: m["memory"][0]["extents"].append([5 * PAGE, 100]),
     "is empty, out of order or overlaps the previous extent"),
    (lambda m: m["memory"][0]["extents"].__setitem__(0, [0, 10 ** 7]),
     "extends past the end of the 65536-byte region"),
    (lambda m: m["memory"][0]["extents"].__setitem__(0, [0, 0]), "is empty"),
    (lambda m: m["memory"][0]["extents"].__setitem__(0, [0]), "must be a pair of integers"),
    (lambda m: m["memory"][1].update(gpa=PAGE), "memory regions at gpa 0x0 and 0x1000 overlap"),
    (lambda m: m["memory"][1].update(file_offset=PAGE), "overlap in the file"),
    (lambda m: m["memory"][1].update(file_offset=100), "is not page aligned"),
    (lambda m: m["memory"][1].update(file_offset=1 << 30),
     "memory region at gpa 0x100000000 lies outside the memory area"),
    (lambda m: m["memory"][0].update(checksum="crc32:xyz"), "'checksum' must be 'crc32:'"),
    (lambda m: m.clear(), "'format' is missing"),
])
def test_metadata_schema(snap, mutate, message):
    path = snap[0]
    rewrite_metadata(path, mutate)
    expect_error(path, message)


def test_invalid_json(snap):
    path = snap[0]
    raw = path.read_bytes()
    f = header(raw)
    bad = b"{not json".ljust(f[4])
    head = HDR.pack(*f[:10], hashlib.sha256(bad).digest(), bytes(32))[:-32]
    head += hashlib.sha256(head).digest()
    path.write_bytes(head + bad + raw[f[3] + f[4]:])
    expect_error(path, r"^bad snapshot metadata: invalid JSON")


# --------------------------------------------------------------------------
# failed writes keep the old snapshot
# --------------------------------------------------------------------------

def _write_other(path, **kw):
    return write_snapshot(path, metadata=base_meta(), kern_structs=KERN[:2],
                          devices=DEVS[:1], memory=[MemRegion(0, patterned(8 * PAGE, {0, 7}))],
                          **kw)


def test_enospc_leaves_existing_snapshot_intact(snap, monkeypatch):
    path = snap[0]
    before = path.read_bytes()
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fileformat.os, "pwrite", failing_pwrite)
    with pytest.raises(OSError) as info:
        _write_other(path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]
    read_snapshot(path).close()


def test_interrupted_write_leaves_existing_snapshot_intact(snap):
    path = snap[0]
    before = path.read_bytes()

    def interrupt(done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_other(path, progress=interrupt)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_pwrite = os.pwrite

    def short_pwrite(fd, data, offset):
        return real_pwrite(fd, memoryview(data)[:1000], offset)

    monkeypatch.setattr(fileformat.os, "pwrite", short_pwrite)
    low = patterned(4 * PAGE, {0, 1, 3})
    path = tmp_path / "short.ckp"
    write_snapshot(path, metadata=base_meta(), kern_structs=KERN, devices=DEVS,
                   memory=[MemRegion(0, low)])
    monkeypatch.undo()
    with read_snapshot(path) as s:
        out = bytearray(len(low))
        s.load_memory([out])
        assert out == low


@pytest.mark.parametrize("kw,message", [
    (dict(devices=[Section("a", 1, b""), Section("a", 1, b"")]), "duplicate section 'a'"),
    (dict(devices=[Section("", 1, b"")]), "must be a non-empty string"),
    (dict(devices=[Section("a", -1, b"")]), "'version' is out of range"),
    (dict(metadata={"backend": "kvm"}), "'host' is missing"),
    (dict(metadata=dict(base_meta(), memory=[])), "must not contain 'memory'"),
    (dict(metadata=dict(base_meta(), host={"x": object()})), "cannot write snapshot"),
    (dict(memory=[MemRegion(0, bytearray(PAGE)), MemRegion(0, bytearray(PAGE))]), "overlap"),
])
def test_invalid_input_is_refused_before_writing(snap, kw, message):
    path = snap[0]
    before = path.read_bytes()
    args = dict(metadata=base_meta(), kern_structs=KERN, devices=DEVS,
                memory=[MemRegion(0, bytearray(PAGE))])
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        write_snapshot(path, **args)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


# --------------------------------------------------------------------------
# property: random sections and memory patterns
# --------------------------------------------------------------------------

_section_lists = st.lists(
    st.tuples(st.text("abcdefghijklmnopqrstuvwxyz-0123456789@.", min_size=1, max_size=20),
              st.integers(0, 5), st.binary(max_size=300)),
    max_size=6, unique_by=lambda t: t[0])
_regions = st.lists(
    st.tuples(st.integers(1, 6 * PAGE),
              st.sets(st.integers(0, 5), max_size=6),
              st.integers(1, 200)),
    max_size=3)


@given(_section_lists, _section_lists, _regions)
@settings(max_examples=40, deadline=None)
def test_random_round_trip(kern, devs, regions):
    kern_secs = [Section(n, v, p) for n, v, p in kern]
    dev_secs = [Section(n, v, p) for n, v, p in devs]
    memory = []
    gpa = 0
    for size, pages, seed in regions:
        buf = patterned(size, {p for p in pages if p * PAGE < size}, seed)
        memory.append(MemRegion(gpa, buf))
        gpa += (size + PAGE - 1) // PAGE * PAGE + PAGE
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.ckp")
        write_snapshot(path, metadata=base_meta(), kern_structs=kern_secs, devices=dev_secs,
                       memory=memory)
        with read_snapshot(path) as s:
            for sec in kern_secs:
                assert s.section("kern_structs", sec.name) == sec.payload
            for sec in dev_secs:
                assert s.section("devices", sec.name) == sec.payload
                assert s.section_info("devices", sec.name).version == sec.version
            outs = [bytearray(len(m.buffer)) for m in memory]
            s.load_memory(outs)
            assert outs == [m.buffer for m in memory]
            for info, m in zip(s.memory, memory):
                # extents cover exactly the non-zero pages
                covered = bytearray(len(m.buffer))
                for off, length in info.extents:
                    covered[off:off + length] = m.buffer[off:off + length]
                    assert off % PAGE == 0
                assert covered == m.buffer
                assert info.data_bytes <= len(m.buffer)


# --------------------------------------------------------------------------
# progress line
# --------------------------------------------------------------------------

class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("total,unit", [
    (10 << 20, "KiB"), ((10 << 20) + 1, "MiB"), (10 << 30, "MiB"), ((10 << 30) + 1, "GiB"),
    (4096, "KiB")])
def test_render_units(total, unit):
    line = render(total // 2, total, 120)
    assert re.match(rf"^\r\[ *\d+\.\d{{3}}{unit} / \d+\.\d{{3}}{unit}\] \|", line)


def test_render_layout():
    total = 64 << 20
    line = render(16 << 20, total, 80, spin=1)
    assert line.startswith("\r[16.000MiB / 64.000MiB] |")
    assert len(line) == 79 and line.endswith("|")
    bar = line[len("\r[16.000MiB / 64.000MiB] |"):-1]
    room = len(bar)
    assert bar == "#" * (room // 4) + "-" + "_" * (room - room // 4 - 1)
    # current value is right-aligned to the width of the total
    assert render(0, total, 80).startswith("\r[ 0.000MiB / 64.000MiB] |/")
    done = render(total, total, 80)
    assert done == "\r[64.000MiB / 64.000MiB] |" + "#" * (78 - 26) + "|"
    assert render(0, 0, 80) == "[0B / 0B]"
    # too narrow for a bar: only the text, cut to the width
    assert render(1, total, 10) == "\r[ 0.000M"


def test_progress_bar_only_on_a_tty():
    plain = io.StringIO()
    bar = ProgressBar(plain, width=80)
    bar(1, 2)
    bar.finish()
    assert plain.getvalue() == ""

    tty = FakeTTY()
    now = [0.0]
    bar = ProgressBar(tty, width=60, clock=lambda: now[0])
    with bar:
        bar(0, 100 << 20)
        bar(1 << 20, 100 << 20)          # within 50 ms: not redrawn
        now[0] = 0.06
        bar(2 << 20, 100 << 20)
        bar(100 << 20, 100 << 20)        # completion always drawn
    out = tty.getvalue()
    assert out.count("\r[") == 3
    assert out.endswith("#|\r\n")
    spinners = [seg[seg.index("|") + 1:][len(seg[seg.index("|") + 1:].rstrip("_|")) - 1]
                for seg in out.split("\r[")[1:3]]
    assert spinners == ["/", "-"]


def test_progress_bar_as_write_callback(tmp_path):
    tty = FakeTTY()
    low = patterned(32 * PAGE, {0, 31})
    with ProgressBar(tty, width=70, interval=0) as bar:
        write_snapshot(tmp_path / "bar.ckp", metadata=base_meta(), kern_structs=[], devices=[],
                       memory=[MemRegion(0, low)], progress=bar)
    last = tty.getvalue().split("\r")[-2]
    assert last.startswith("[128.000KiB / 128.000KiB] |#")


# --------------------------------------------------------------------------
# regions that report their data extents (memfd-backed guest RAM)
# --------------------------------------------------------------------------

class GuardedBuffer:
    """Guest memory that may be touched only inside ``allowed`` (offset,
    length) ranges: every slice of its view is checked, and anything else
    (a whole-buffer read, single bytes) is not a buffer and fails loudly."""

    def __init__(self, data: bytearray, allowed) -> None:
        self.view = memoryview(data)
        self.allowed = [(off, off + length) for off, length in allowed]
        self.touched: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None, f"unexpected access {key!r}"
        start, stop, _ = key.indices(len(self.view))
        if stop > start:
            assert any(lo <= start and stop <= hi for lo, hi in self.allowed), \
                f"read of [{start:#x}, {stop:#x}) outside the data extents {self.allowed}"
            self.touched.append((start, stop))
        return self.view[key]


@pytest.fixture
def guarded(monkeypatch):
    real = fileformat._bytes_view

    def view(buffer, what):
        return buffer if isinstance(buffer, GuardedBuffer) else real(buffer, what)

    monkeypatch.setattr(fileformat, "_bytes_view", view)


def test_extents_limit_what_is_read(tmp_path, guarded):
    size = 4 << 20
    data = patterned(size, {0, 1, 2, 300, 301, 1023})
    # extents as SEEK_DATA gives them: page 2 was touched but zeroed again by
    # the guest, page 9 likewise; everything outside is a hole and unreadable.
    for page in (2, 9):
        data[page * PAGE:(page + 1) * PAGE] = bytes(PAGE)
    extents = [(0, 3 * PAGE), (9 * PAGE, PAGE), (300 * PAGE, 2 * PAGE), (1023 * PAGE, PAGE)]
    buf = GuardedBuffer(data, extents)
    path = tmp_path / "ext.ckp"
    write_snapshot(path, metadata=base_meta(), kern_structs=KERN, devices=DEVS,
                   memory=[MemRegion(0, buf, extents)])
    assert buf.touched, "the data extents were never read"
    with read_snapshot(path) as s:
        # zero pages inside the extents are still holes in the file
        assert s.memory[0].extents == ((0, 2 * PAGE), (300 * PAGE, 2 * PAGE), (1023 * PAGE, PAGE))
        out = bytearray(size)
        s.load_memory([out])
        assert out == data


def test_without_extents_every_page_is_read(tmp_path, guarded):
    """The guard itself works: with no extents the writer scans the whole region."""
    data = patterned(64 * PAGE, {3})
    buf = GuardedBuffer(data, [(0, PAGE)])
    with pytest.raises(AssertionError, match="outside the data extents"):
        write_snapshot(tmp_path / "x.ckp", metadata=base_meta(), kern_structs=[], devices=[],
                       memory=[MemRegion(0, buf)])


def test_unaligned_and_overlapping_extents_are_widened_to_pages(tmp_path, guarded):
    size = 32 * PAGE
    data = patterned(size, {4, 5, 6, 20})
    hint = [(20 * PAGE + 100, 8), (5 * PAGE + 7, 10), (4 * PAGE + 4095, 1), (5 * PAGE, 2 * PAGE - 1)]
    buf = GuardedBuffer(data, [(4 * PAGE, 3 * PAGE), (20 * PAGE, PAGE)])
    path = tmp_path / "w.ckp"
    write_snapshot(path, metadata=base_meta(), kern_structs=[], devices=[],
                   memory=[MemRegion(0, buf, hint)])
    with read_snapshot(path) as s:
        assert s.memory[0].extents == ((4 * PAGE, 3 * PAGE), (20 * PAGE, PAGE))
        out = bytearray(size)
        s.load_memory([out])
        assert out == data


@pytest.mark.parametrize("hint,message", [
    ([(0, 9 * PAGE)], "lies outside the 32768-byte region"),
    ([(-PAGE, PAGE)], "lies outside"),
    ([(0, -1)], "lies outside"),
    ([(0,)], "is not \\(offset, length\\)"),
    ([("a", 1)], "is not \\(offset, length\\)"),
])
def test_bad_extents_are_refused_before_writing(tmp_path, hint, message):
    with pytest.raises(ValueError, match=message):
        write_snapshot(tmp_path / "bad.ckp", metadata=base_meta(), kern_structs=[], devices=[],
                       memory=[MemRegion(0, bytearray(8 * PAGE), hint)])
    assert os.listdir(tmp_path) == []


def _memfd_region(size: int):
    if not hasattr(os, "memfd_create"):
        pytest.skip("os.memfd_create is not available on this system")
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED)


def _seek_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        pos = end
    return out


def test_holes_of_shared_memory_stay_unallocated(tmp_path):
    """With extents, a snapshot of memfd memory allocates none of its holes
    (reading an untouched shared page would); without them it would."""
    size = 8 << 20
    fd, mm = _memfd_region(size)
    try:
        mm[0:4] = b"low!"
        mm[size - PAGE:size - PAGE + 4] = b"top!"
        before = _seek_extents(fd, size)
        assert before == [(0, PAGE), (size - PAGE, PAGE)]
        path = tmp_path / "m.ckp"
        write_snapshot(path, metadata=base_meta(), kern_structs=[], devices=[],
                       memory=[MemRegion(0, mm, before)])
        assert _seek_extents(fd, size) == before
        with read_snapshot(path) as s:
            assert s.memory[0].extents == tuple(before)
        write_snapshot(path, metadata=base_meta(), kern_structs=[], devices=[],
                       memory=[MemRegion(0, mm)])
        assert _seek_extents(fd, size) == [(0, size)]      # the full scan allocated it all
    finally:
        mm.close()
        os.close(fd)


@given(st.lists(st.integers(0, 47), max_size=12), st.lists(st.integers(0, 47), max_size=6),
       st.integers(0, PAGE - 1))
@settings(max_examples=60, deadline=None)
def test_extents_give_the_same_file_map_as_a_full_scan(data_pages, zeroed, tail):
    """Any extents that cover every non-zero byte give the same data extents
    as scanning everything, across 1 MiB scan chunks and a partial last page."""
    size = 47 * PAGE + tail if tail else 48 * PAGE
    data = patterned(size, set(data_pages))
    for p in zeroed:
        data[p * PAGE:(p + 1) * PAGE] = bytes(len(data[p * PAGE:(p + 1) * PAGE]))
    touched = sorted({p for p in (*data_pages, *zeroed) if p * PAGE < size})
    hint = [(p * PAGE, min(PAGE, size - p * PAGE)) for p in touched]
    real_chunk, real_zero = fileformat._SCAN_CHUNK, fileformat._ZERO_CHUNK
    fileformat._SCAN_CHUNK, fileformat._ZERO_CHUNK = 4 * PAGE, bytes(4 * PAGE)  # many chunks
    try:
        with tempfile.TemporaryDirectory() as d:
            full = write_snapshot(os.path.join(d, "a"), metadata=base_meta(), kern_structs=[],
                                  devices=[], memory=[MemRegion(0, data)])
            hinted = write_snapshot(os.path.join(d, "b"), metadata=base_meta(), kern_structs=[],
                                    devices=[], memory=[MemRegion(0, data, hint)])
    finally:
        fileformat._SCAN_CHUNK, fileformat._ZERO_CHUNK = real_chunk, real_zero
    assert hinted["memory"] == full["memory"]
    expected = []
    for p in range((size + PAGE - 1) // PAGE):
        if any(data[p * PAGE:(p + 1) * PAGE]):
            if expected and expected[-1][0] + expected[-1][1] == p * PAGE:
                expected[-1][1] += min(PAGE, size - p * PAGE)
            else:
                expected.append([p * PAGE, min(PAGE, size - p * PAGE)])
    assert full["memory"][0]["extents"] == expected


def test_memory_written_runs_before_the_old_file_is_replaced(snap, monkeypatch):
    """The hook a checkpoint uses to let the VM run during fsync: called once,
    after all memory is in the temporary file and before fsync and rename."""
    path = snap[0]
    before = path.read_bytes()
    events = []
    real_fsync = os.fsync

    def hook():
        events.append("written")
        assert path.read_bytes() == before                  # old snapshot still in place
        tmp = [n for n in os.listdir(path.parent) if n.endswith(".tmp")]
        assert len(tmp) == 1
        assert os.path.getsize(path.parent / tmp[0]) > 8 * PAGE

    def fsync(fd):
        events.append("fsync")
        return real_fsync(fd)

    monkeypatch.setattr(fileformat.os, "fsync", fsync)
    _write_other(path, memory_written=hook)
    assert events[:2] == ["written", "fsync"] and events.count("written") == 1
    assert path.read_bytes() != before


def test_failed_fsync_after_memory_written_keeps_the_old_file(snap, monkeypatch):
    path = snap[0]
    before = path.read_bytes()
    called = []

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fileformat.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        _write_other(path, memory_written=lambda: called.append(1))
    monkeypatch.undo()
    assert called == [1]
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]
