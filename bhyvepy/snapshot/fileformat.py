"""The bhyvepy snapshot file, format 1: one self-describing file per snapshot.

bhyve(8) writes three files (raw RAM, ``.kern`` blobs, ``.meta`` JSON) with
no magic, version or checksum, and overwrites them in place.  bhyvepy keeps
bhyve's metadata vocabulary but puts everything in one file that can be
validated completely before anything is restored, and replaces it
atomically so a failed checkpoint never destroys an older one.

Layout (all integers little endian)::

    0      header (144 bytes)
             magic "BHYVEPY\\0SNAPSHOT" (16), format version u32 = 1,
             header size u32 = 144,
             metadata offset u64, metadata length u64,
             section area offset u64, section area length u64,
             memory area offset u64, memory area length u64,
             file size u64, SHA-256 of the metadata (32),
             SHA-256 of the preceding 112 header bytes (32)
    144    metadata: UTF-8 JSON, see below
    ...    section area: the section payloads back to back
    ...    memory area, page aligned: each region page aligned, lowmem
           then highmem; all-zero pages are holes (never written, so the
           file is sparse) and the metadata lists the data extents, so a
           restore reads only data

Metadata: bhyve 14's ``"basic metadata"`` {ncpus, vmname, memsize, memflags,
...}, ``"kern_structs"`` and ``"devices"`` arrays of {device, size,
file_offset} (offset within the section area, as bhyve's is within .kern)
plus per record ``"version"`` and ``"checksum"`` ("sha256:<hex>"); and
``"format"``, ``"backend"``, ``"host"``, ``"created"``, ``"config"`` (the
whole config tree) and ``"memory"``: regions {gpa, size, file_offset (within
the memory area), extents [[offset, length], ...] (region relative data
runs), checksum ("crc32:<hex>" over the data extents in order)}.

Checksums: SHA-256 for the header, the metadata and every section (small,
and a wrong device state must never be loaded); CRC-32 for memory, because
it runs at several GB/s and a full SHA-256 of guest RAM would cost more than
writing it.  The memory checksum is verified while memory is loaded, since
reading all of guest memory twice would halve restore speed.

bhyve's three-file layout is not read; :func:`read_snapshot` recognises it
and says so.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from bhyvepy.snapshot.registry import parse_upstream_name

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PAGE_SIZE",
    "KINDS",
    "SnapshotFormatError",
    "Section",
    "MemRegion",
    "SectionInfo",
    "MemoryRegionInfo",
    "Snapshot",
    "write_snapshot",
    "read_snapshot",
    "HEADER",
]

MAGIC = b"BHYVEPY\0SNAPSHOT"
FORMAT_VERSION = 1
PAGE_SIZE = 4096
KINDS = ("kern_structs", "devices")

_PREFIX = struct.Struct("<16sII")
_HEADER = struct.Struct("<16sII7Q32s32s")
HEADER = _HEADER            # public: bhyvepyctl's lenient reader decodes it too
HEADER_SIZE = _HEADER.size  # 144

_SCAN_CHUNK = 1 << 20       # zero test granularity before going per page
_IO_CHUNK = 64 << 20        # largest single pread/pwrite, and progress step
_MAX_METADATA = 512 << 20
_MAX_INT = (1 << 63) - 1
_ZERO_CHUNK = bytes(_SCAN_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)

ProgressFn = Callable[[int, int], None]


class SnapshotFormatError(Exception):
    """A snapshot file is not a valid bhyvepy format-1 snapshot."""


@dataclass(frozen=True)
class Section:
    """One opaque state record: a kernel struct or a device instance."""

    name: str
    version: int
    payload: bytes


@dataclass(frozen=True)
class MemRegion:
    """Guest memory at ``gpa``; ``buffer`` is anything with the buffer protocol.

    ``extents``, when given, are ``(offset, length)`` runs outside which the
    buffer is known to be zero (``MemoryRegion.data_extents()``): the writer
    then never reads outside them, which matters for shared guest memory
    where reading an untouched page allocates it.  None: every page is
    looked at.
    """

    gpa: int
    buffer: Any
    extents: Sequence[tuple[int, int]] | None = None


@dataclass(frozen=True)
class SectionInfo:
    kind: str
    name: str
    version: int
    size: int
    file_offset: int        # within the section area
    checksum: str


@dataclass(frozen=True)
class MemoryRegionInfo:
    gpa: int
    size: int
    file_offset: int        # within the memory area
    extents: tuple[tuple[int, int], ...]
    checksum: str

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.extents)


def _align(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def _bytes_view(buffer: Any, what: str) -> memoryview:
    mv = memoryview(buffer)
    if mv.format != "B" or mv.itemsize != 1 or mv.ndim != 1:
        if not mv.c_contiguous:
            raise ValueError(f"{what} is not a contiguous buffer")
        mv = mv.cast("B")
    return mv


# --------------------------------------------------------------------------
# metadata schema
# --------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Schema:
    """Type checks of the metadata, with messages that name the field."""

    def fail(self, where: str, what: str) -> SnapshotFormatError:
        return SnapshotFormatError(f"bad snapshot metadata: {where} {what}")

    def obj(self, v: Any, where: str) -> dict:
        if not isinstance(v, dict):
            raise self.fail(where, "must be an object")
        return v

    def get(self, d: dict, key: str, where: str) -> Any:
        if key not in d:
            raise self.fail(f"{where}'{key}'".lstrip("."), "is missing")
        return d[key]

    def int(self, d: dict, key: str, where: str, lo: int = 0) -> int:
        v = self.get(d, key, where)
        name = f"{where}'{key}'"
        if not _is_int(v):
            raise self.fail(name, "must be an integer")
        if not lo <= v <= _MAX_INT:
            raise self.fail(name, f"is out of range ({v})")
        return v

    def str(self, d: dict, key: str, where: str, nonempty: bool = False) -> str:
        v = self.get(d, key, where)
        if not isinstance(v, str) or (nonempty and not v):
            raise self.fail(f"{where}'{key}'", "must be a non-empty string" if nonempty
                            else "must be a string")
        return v

    def list(self, d: dict, key: str, where: str) -> list:
        v = self.get(d, key, where)
        if not isinstance(v, list):
            raise self.fail(f"{where}'{key}'", "must be an array")
        return v

    def config(self, v: Any, where: str) -> None:
        """The config tree: objects whose leaves are strings (bhyve_config(5))."""
        stack = [(v, where)]
        while stack:
            node, path = stack.pop()
            if not isinstance(node, dict):
                raise self.fail(path, "must be an object")
            for k, sub in node.items():
                if isinstance(sub, dict):
                    stack.append((sub, f"{path}.'{k}'"))
                elif not isinstance(sub, str):
                    raise self.fail(f"{path}.'{k}'", "must be a string or an object")


_SHA_RE = re.compile(r"sha256:[0-9a-f]{64}")
_CRC_RE = re.compile(r"crc32:[0-9a-f]{8}")


def _check_metadata(meta: Any) -> tuple[dict[str, list[SectionInfo]], list[MemoryRegionInfo]]:
    """Check every field's type and the internal consistency of ``meta``."""
    s = _Schema()
    if not isinstance(meta, dict):
        raise SnapshotFormatError("bad snapshot metadata: not a JSON object")
    fmt = s.get(meta, "format", "")
    if not _is_int(fmt) or fmt != FORMAT_VERSION:
        raise s.fail("'format'", f"is {fmt!r}, expected {FORMAT_VERSION}")
    s.str(meta, "backend", "", nonempty=True)
    s.obj(s.get(meta, "host", ""), "'host'")
    s.str(meta, "created", "")
    s.config(s.get(meta, "config", ""), "'config'")
    basic = s.obj(s.get(meta, "basic metadata", ""), "'basic metadata'")
    where = "'basic metadata'."
    s.int(basic, "ncpus", where, lo=1)
    s.str(basic, "vmname", where)
    memsize = s.int(basic, "memsize", where)
    s.int(basic, "memflags", where)

    sections: dict[str, list[SectionInfo]] = {}
    for kind in KINDS:
        infos: list[SectionInfo] = []
        seen: set[str] = set()
        for i, rec in enumerate(s.list(meta, kind, "")):
            w = f"'{kind}'[{i}]."
            rec = s.obj(rec, w.rstrip("."))
            name = s.str(rec, "device", w, nonempty=True)
            w = f"section '{name}': "
            if name in seen:
                raise SnapshotFormatError(f"bad snapshot metadata: duplicate section '{name}' in {kind}")
            seen.add(name)
            checksum = s.str(rec, "checksum", w)
            if not _SHA_RE.fullmatch(checksum):
                raise s.fail(f"{w}'checksum'", "must be 'sha256:' and 64 hex digits")
            infos.append(SectionInfo(kind, name, s.int(rec, "version", w), s.int(rec, "size", w),
                                     s.int(rec, "file_offset", w), checksum))
        sections[kind] = infos

    regions: list[MemoryRegionInfo] = []
    for i, rec in enumerate(s.list(meta, "memory", "")):
        w = f"'memory'[{i}]."
        rec = s.obj(rec, w.rstrip("."))
        gpa, size = s.int(rec, "gpa", w), s.int(rec, "size", w)
        foff = s.int(rec, "file_offset", w)
        if foff % PAGE_SIZE:
            raise s.fail(f"{w}'file_offset'", "is not page aligned")
        checksum = s.str(rec, "checksum", w)
        if not _CRC_RE.fullmatch(checksum):
            raise s.fail(f"{w}'checksum'", "must be 'crc32:' and 8 hex digits")
        extents = []
        end = 0
        for j, ext in enumerate(s.list(rec, "extents", w)):
            ew = f"{w}'extents'[{j}]"
            if not (isinstance(ext, list) and len(ext) == 2 and all(_is_int(x) for x in ext)):
                raise s.fail(ew, "must be a pair of integers [offset, length]")
            off, length = ext
            if length <= 0 or off < end:
                raise s.fail(ew, "is empty, out of order or overlaps the previous extent")
            if off + length > size:
                raise s.fail(ew, f"extends past the end of the {size}-byte region")
            end = off + length
            extents.append((off, length))
        regions.append(MemoryRegionInfo(gpa, size, foff, tuple(extents), checksum))

    for a, b in zip(sorted(regions, key=lambda r: r.gpa), sorted(regions, key=lambda r: r.gpa)[1:]):
        if a.gpa + a.size > b.gpa:
            raise SnapshotFormatError(
                f"bad snapshot metadata: memory regions at gpa {a.gpa:#x} and {b.gpa:#x} overlap")
    by_file = sorted(regions, key=lambda r: r.file_offset)
    for a, b in zip(by_file, by_file[1:]):
        if a.file_offset + _align(a.size) > b.file_offset:
            raise SnapshotFormatError(
                f"bad snapshot metadata: memory regions at gpa {a.gpa:#x} and {b.gpa:#x} "
                "overlap in the file")
    total = sum(r.size for r in regions)
    if total != memsize:
        raise SnapshotFormatError(
            f"bad snapshot metadata: 'memsize' is {memsize} but the memory regions hold {total} bytes")
    return sections, regions


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------

def _spans(hint: Sequence[tuple[int, int]] | None, size: int, gpa: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges to scan: the caller's data extents widened
    to whole pages, sorted and merged, or the whole region without a hint."""
    if hint is None:
        return [(0, size)] if size else []
    spans: list[tuple[int, int]] = []
    for ext in sorted(hint):
        try:
            off, length = (int(x) for x in ext)
        except (TypeError, ValueError):
            raise ValueError(f"memory at gpa {gpa:#x}: extent {ext!r} is not (offset, length)") \
                from None
        if off < 0 or length < 0 or off + length > size:
            raise ValueError(f"memory at gpa {gpa:#x}: extent ({off}, {length}) lies outside "
                             f"the {size}-byte region")
        if length == 0:
            continue
        lo = off // PAGE_SIZE * PAGE_SIZE
        hi = min(_align(off + length), size)
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return spans


def _scan(mv: memoryview, spans: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Data extents of ``mv``: runs of pages that are not all zero.

    Only the page-aligned ``spans`` (default: all of ``mv``) are read.
    Compares 1 MiB at a time against zeros (a C memcmp on a copy, several
    GB/s; comparing the memoryview itself goes byte by byte, 30x slower).
    Inside a chunk that holds data, a page whose first byte is not zero is
    data without looking further (``chunk[::PAGE_SIZE]`` tells in C), only
    the others are compared whole, and runs are found with a regex over one
    flag byte per page: a per-page Python loop would cost more than the
    disk write for a guest full of data.
    """
    extents: list[tuple[int, int]] = []
    size = len(mv)
    for lo, hi in ([(0, size)] if spans is None else spans):
        run = -1                            # start of the open run, or -1
        for base in range(lo, hi, _SCAN_CHUNK):
            n = min(_SCAN_CHUNK, hi - base)
            chunk = mv[base:base + n].tobytes()
            if chunk == (_ZERO_CHUNK if n == _SCAN_CHUNK else bytes(n)):
                if run >= 0:
                    extents.append((run, base - run))
                    run = -1
                continue
            flags = bytearray(chunk[::PAGE_SIZE])
            i = flags.find(0)
            while i >= 0:
                page = chunk[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                if page != (_ZERO_PAGE if len(page) == PAGE_SIZE else bytes(len(page))):
                    flags[i] = 1
                i = flags.find(0, i + 1)
            for m in _DATA_RUN.finditer(flags):
                a, b = base + m.start() * PAGE_SIZE, base + min(m.end() * PAGE_SIZE, n)
                if run >= 0 and a != base:  # the run left open by the last chunk ends
                    extents.append((run, base - run))
                    run = -1
                if run < 0:
                    run = a
                if b < base + n:            # ends inside the chunk
                    extents.append((run, b - run))
                    run = -1
        if run >= 0:
            extents.append((run, hi - run))
    return extents


_DATA_RUN = re.compile(rb"[^\x00]+")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write to snapshot file")
        data = data[n:]
        offset += n


def _prepare_metadata(metadata: dict, memsize: int) -> dict:
    if not isinstance(metadata, dict):
        raise ValueError("snapshot metadata must be a dict")
    for reserved in (*KINDS, "memory"):
        if reserved in metadata:
            raise ValueError(f"snapshot metadata must not contain '{reserved}': it is generated")
    if metadata.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"snapshot metadata 'format' must be {FORMAT_VERSION}")
    meta = dict(metadata)
    meta["format"] = FORMAT_VERSION
    meta.setdefault("created", datetime.datetime.now(datetime.timezone.utc)
                    .isoformat(timespec="seconds"))
    basic = dict(meta.get("basic metadata") or {})
    basic.setdefault("memsize", memsize)
    meta["basic metadata"] = basic
    return meta


def write_snapshot(path: str | os.PathLike, *, metadata: dict,
                   kern_structs: Sequence[Section], devices: Sequence[Section],
                   memory: Sequence[MemRegion], progress: ProgressFn | None = None,
                   dir_fd: int | None = None,
                   memory_written: Callable[[], None] | None = None) -> dict:
    """Write a complete snapshot to ``path`` atomically; return its metadata.

    ``metadata`` holds "basic metadata" (ncpus, vmname, memflags; memsize is
    filled in), "backend", "host" and "config", plus anything else worth
    keeping; the section tables, "memory", "format" and (unless given)
    "created" are generated.  Memory must not change while this runs (vCPUs
    paused) up to ``memory_written()``, which is called once every byte is in
    the file but before it is fsynced and renamed into place: guest memory
    is not read after it, so a checkpoint can let the VM run on during the
    (slow) flush.  A region's ``extents`` limit what is read of it (see
    :class:`MemRegion`).  The file is written under a temporary name in the same
    directory, fsynced, renamed over ``path`` and the directory fsynced; on
    any failure the temporary file is removed and an existing ``path`` is
    left as it was.  ``progress(done, total)`` is called while memory is
    written.  ``dir_fd`` makes ``path`` relative to a directory descriptor,
    as bhyve's checkpoint requests carry one.
    """
    views = sorted(((r.gpa, _bytes_view(r.buffer, f"memory at gpa {r.gpa:#x}"), r.extents)
                    for r in memory), key=lambda v: v[0])
    memsize = sum(len(mv) for _, mv, _ in views)
    meta = _prepare_metadata(metadata, memsize)

    # Section tables (offsets within the section area) and payloads.
    payloads: list[bytes] = []
    offset = 0
    for kind, secs in (("kern_structs", kern_structs), ("devices", devices)):
        table = []
        for sec in secs:
            payload = bytes(sec.payload)
            table.append({"device": sec.name, "size": len(payload), "file_offset": offset,
                          "version": sec.version,
                          "checksum": "sha256:" + hashlib.sha256(payload).hexdigest()})
            payloads.append(payload)
            offset += len(payload)
        meta[kind] = table
    sections_length = offset

    # Memory map: first pass finds the data extents (cheap, in memory, and
    # only inside the extents the region reports); the checksum is filled in
    # while writing, its JSON text has a fixed width.
    regions = []
    mem_off = 0
    for gpa, mv, hint in views:
        spans = _spans(hint, len(mv), gpa)
        regions.append({"gpa": gpa, "size": len(mv), "file_offset": mem_off,
                        "extents": [list(e) for e in _scan(mv, spans)],
                        "checksum": "crc32:00000000"})
        mem_off += _align(len(mv))
    memory_length = mem_off
    meta["memory"] = regions

    try:
        _check_metadata(json.loads(json.dumps(meta)))
    except (SnapshotFormatError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot write snapshot: {exc}") from None

    def dump() -> bytes:
        # Indented for people, except one line per memory region: a guest
        # with scattered zero pages has 100k+ extents, and json's indenting
        # encoder is pure Python (seconds, with the vCPUs stopped).
        rest = {k: v for k, v in meta.items() if k != "memory"}
        text = json.dumps(rest, indent=2, ensure_ascii=False, allow_nan=False)
        lines = ",\n".join("    " + json.dumps(r, ensure_ascii=False, allow_nan=False)
                           for r in meta["memory"])
        body = f'"memory": [\n{lines}\n  ]' if lines else '"memory": []'
        return (f"{text[:-2]},\n  {body}\n}}\n" if rest else f"{{\n  {body}\n}}\n").encode()

    meta_len = len(dump())
    sections_offset = HEADER_SIZE + meta_len
    memory_offset = _align(sections_offset + sections_length)
    file_size = memory_offset + memory_length

    target = os.fspath(path)
    directory, base = os.path.split(target)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        # Memory first: it is the slow part and the progress bar covers it.
        done = 0
        if progress:
            progress(0, memsize)
        for (gpa, mv, _), region in zip(views, regions):
            crc = 0
            start = memory_offset + region["file_offset"]
            pos = 0
            for off, length in region["extents"]:
                for piece in range(off, off + length, _IO_CHUNK):
                    data = mv[piece:min(piece + _IO_CHUNK, off + length)]
                    crc = zlib.crc32(data, crc)
                    _pwrite_all(fd, data, start + piece)
                    if progress:
                        progress(done + piece + len(data), memsize)
                pos = off + length
            region["checksum"] = f"crc32:{crc:08x}"
            done += len(mv)
            if progress and pos < len(mv):
                progress(done, memsize)
        meta_bytes = dump()
        if len(meta_bytes) != meta_len:
            raise AssertionError("snapshot metadata changed size while writing")
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, HEADER_SIZE, meta_len,
                            sections_offset, sections_length, memory_offset, memory_length,
                            file_size, hashlib.sha256(meta_bytes).digest(), bytes(32))[:-32]
        head += hashlib.sha256(head).digest()
        _pwrite_all(fd, memoryview(head + meta_bytes + b"".join(payloads)), 0)
        os.ftruncate(fd, file_size)
        if memory_written is not None:
            memory_written()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    _fsync_dir(directory, dir_fd)
    return meta


def _fsync_dir(directory: str, dir_fd: int | None) -> None:
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------

def _pread_exact(fd: int, n: int, offset: int, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise SnapshotFormatError(f"snapshot truncated: {what} extends past end of file")
        got += k
    return bytes(buf)


def _looks_like_bhyve(path: str, dir_fd: int | None) -> bool:
    try:
        for ext in (".meta", ".kern"):
            os.stat(path + ext, dir_fd=dir_fd)
        return True
    except OSError:
        return False


class Snapshot:
    """A snapshot file that has passed every check.

    Section payloads are held in memory; guest memory stays in the file
    until :meth:`load_memory`.  Keeps the file open (the same inode that was
    validated) until :meth:`close`.
    """

    def __init__(self, path: str, fd: int, metadata: dict,
                 sections: dict[str, list[SectionInfo]], payloads: dict[tuple[str, str], bytes],
                 regions: list[MemoryRegionInfo], memory_offset: int) -> None:
        self.path = path
        self._fd = fd
        self.metadata = metadata
        self._sections = sections
        self._payloads = payloads
        self.memory = regions
        self._memory_offset = memory_offset

    # metadata accessors --------------------------------------------------
    @property
    def basic(self) -> dict:
        return self.metadata["basic metadata"]

    @property
    def config(self) -> dict:
        return self.metadata["config"]

    @property
    def backend(self) -> str:
        return self.metadata["backend"]

    @property
    def host(self) -> dict:
        return self.metadata["host"]

    def sections(self, kind: str) -> list[SectionInfo]:
        if kind not in KINDS:
            raise ValueError(f"unknown section kind '{kind}' (expected one of {', '.join(KINDS)})")
        return list(self._sections[kind])

    def has_section(self, kind: str, name: str) -> bool:
        return (kind, parse_upstream_name(name)) in self._payloads

    def section_info(self, kind: str, name: str) -> SectionInfo:
        name = parse_upstream_name(name)
        for info in self.sections(kind):
            if info.name == name:
                return info
        raise SnapshotFormatError(f"snapshot has no section '{name}' in {kind}")

    def section(self, kind: str, name: str) -> bytes:
        """The payload of section ``name`` (upstream's ``emu@pci.b.s.f`` works too)."""
        info = self.section_info(kind, name)
        return self._payloads[(kind, info.name)]

    # memory ----------------------------------------------------------------
    def load_memory(self, target: Callable[[int, int], Any] | Sequence[Any], *,
                    zero_holes: bool = False, verify: bool = True,
                    progress: ProgressFn | None = None) -> None:
        """Read guest memory into the caller's buffers, data extents only.

        ``target`` is either ``f(gpa, size) -> writable buffer`` or a list of
        writable buffers, one per region in order.  Holes are left alone
        unless ``zero_holes`` (for buffers that are not known to be zero).
        With ``verify`` each region's CRC-32 is checked after it is read.
        """
        if self._fd < 0:
            raise ValueError("snapshot is closed")
        if not callable(target) and len(target) != len(self.memory):
            raise SnapshotFormatError(
                f"snapshot has {len(self.memory)} memory regions, {len(target)} buffers given")
        total = sum(r.size for r in self.memory)
        done = 0
        if progress:
            progress(0, total)
        for i, region in enumerate(self.memory):
            buf = target(region.gpa, region.size) if callable(target) else target[i]
            mv = _bytes_view(buf, f"buffer for gpa {region.gpa:#x}")
            if mv.readonly:
                raise ValueError(f"buffer for gpa {region.gpa:#x} is read-only")
            if len(mv) != region.size:
                raise SnapshotFormatError(
                    f"memory region at gpa {region.gpa:#x} is {region.size} bytes in the "
                    f"snapshot but {len(mv)} bytes in this VM")
            base = self._memory_offset + region.file_offset
            crc = 0
            pos = 0
            for off, length in region.extents:
                if zero_holes and off > pos:
                    _zero(mv, pos, off)
                for piece in range(off, off + length, _IO_CHUNK):
                    end = min(piece + _IO_CHUNK, off + length)
                    self._read_into(mv[piece:end], base + piece, region)
                    if verify:
                        crc = zlib.crc32(mv[piece:end], crc)
                    if progress:
                        progress(done + end, total)
                pos = off + length
            if zero_holes and pos < region.size:
                _zero(mv, pos, region.size)
            if verify and f"crc32:{crc:08x}" != region.checksum:
                raise SnapshotFormatError(
                    f"checksum mismatch in memory region at gpa {region.gpa:#x}")
            done += region.size
            if progress:
                progress(done, total)

    def _read_into(self, view: memoryview, offset: int, region: MemoryRegionInfo) -> None:
        while view:
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise SnapshotFormatError(
                    f"snapshot truncated: memory region at gpa {region.gpa:#x} "
                    "extends past end of file")
            view = view[n:]
            offset += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _zero(mv: memoryview, start: int, end: int) -> None:
    for p in range(start, end, _SCAN_CHUNK):
        q = min(p + _SCAN_CHUNK, end)
        mv[p:q] = _ZERO_CHUNK[:q - p]


def read_snapshot(path: str | os.PathLike, *, dir_fd: int | None = None) -> Snapshot:
    """Open ``path`` and validate all of it before returning anything.

    Checks magic, format version, header checksum and layout, metadata
    checksum, JSON and the type of every field, every section's place in the
    file and checksum, and that memory regions and extents lie within the
    file without overlapping.  Guest memory contents are checked (CRC) by
    :meth:`Snapshot.load_memory`.  Raises :class:`SnapshotFormatError`.
    """
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        snap = _validate(name, fd, dir_fd)
    except BaseException:
        os.close(fd)
        raise
    return snap


def _validate(path: str, fd: int, dir_fd: int | None) -> Snapshot:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotFormatError("snapshot is not a regular file")
    size = st.st_size
    if size == 0:
        raise SnapshotFormatError("snapshot file is empty")
    prefix = os.pread(fd, _PREFIX.size, 0)
    if prefix[:len(MAGIC)] != MAGIC:
        if len(prefix) < len(MAGIC) and MAGIC.startswith(prefix):
            raise SnapshotFormatError("snapshot truncated: header extends past end of file")
        if _looks_like_bhyve(path, dir_fd):
            raise SnapshotFormatError(
                "not a bhyvepy snapshot (bad magic): this looks like a bhyve(8) snapshot "
                "(with .meta and .kern files), which bhyvepy cannot read")
        raise SnapshotFormatError("not a bhyvepy snapshot (bad magic)")
    if len(prefix) < _PREFIX.size:
        raise SnapshotFormatError("snapshot truncated: header extends past end of file")
    _, version, header_size = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise SnapshotFormatError(
            f"unsupported snapshot format version {version} "
            f"(this bhyvepy reads version {FORMAT_VERSION})")
    head = _pread_exact(fd, HEADER_SIZE, 0, "header")
    if hashlib.sha256(head[:-32]).digest() != head[-32:]:
        raise SnapshotFormatError("checksum mismatch in snapshot header")
    (_, _, header_size, meta_off, meta_len, sec_off, sec_len, mem_off, mem_len, file_size,
     meta_sha, _) = _HEADER.unpack(head)
    if header_size != HEADER_SIZE or meta_off != HEADER_SIZE:
        raise SnapshotFormatError(f"bad snapshot header: header size {header_size}")
    if sec_off != meta_off + meta_len or mem_off != _align(sec_off + sec_len) \
            or file_size != mem_off + mem_len or meta_len > _MAX_METADATA:
        raise SnapshotFormatError("bad snapshot header: inconsistent area offsets")

    if meta_off + meta_len > size:
        raise SnapshotFormatError("snapshot truncated: metadata extends past end of file")
    raw_meta = _pread_exact(fd, meta_len, meta_off, "metadata")
    if hashlib.sha256(raw_meta).digest() != meta_sha:
        raise SnapshotFormatError("checksum mismatch in snapshot metadata")

    def no_constants(text: str) -> Any:
        raise ValueError(f"{text} is not allowed")

    try:
        meta = json.loads(raw_meta.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotFormatError(f"bad snapshot metadata: invalid JSON ({exc})") from None
    sections, regions = _check_metadata(meta)

    payloads: dict[tuple[str, str], bytes] = {}
    spans = []
    for kind in KINDS:
        for info in sections[kind]:
            start = sec_off + info.file_offset
            if start + info.size > size:
                raise SnapshotFormatError(
                    f"snapshot truncated: section '{info.name}' extends past end of file")
            if info.file_offset + info.size > sec_len:
                raise SnapshotFormatError(
                    f"bad snapshot metadata: section '{info.name}' lies outside the section area")
            spans.append((info.file_offset, info.size, info.name))
            data = _pread_exact(fd, info.size, start, f"section '{info.name}'")
            if "sha256:" + hashlib.sha256(data).hexdigest() != info.checksum:
                raise SnapshotFormatError(f"checksum mismatch in section '{info.name}'")
            payloads[(kind, info.name)] = data
    spans.sort()
    for (a_off, a_len, a_name), (b_off, _, b_name) in zip(spans, spans[1:]):
        if a_off + a_len > b_off:
            raise SnapshotFormatError(
                f"bad snapshot metadata: sections '{a_name}' and '{b_name}' overlap")

    for region in regions:
        if region.file_offset + _align(region.size) > mem_len:
            raise SnapshotFormatError(
                f"bad snapshot metadata: memory region at gpa {region.gpa:#x} lies outside "
                "the memory area")
        for off, length in region.extents:
            if mem_off + region.file_offset + off + length > size:
                raise SnapshotFormatError(
                    f"snapshot truncated: memory region at gpa {region.gpa:#x} "
                    "extends past end of file")

    if size < file_size:
        raise SnapshotFormatError(
            f"snapshot truncated: file is {size} bytes, its header says {file_size}")
    if size > file_size:
        raise SnapshotFormatError(
            f"snapshot has {size - file_size} unexpected bytes after its end")
    return Snapshot(path, fd, meta, sections, payloads, regions, mem_off)
