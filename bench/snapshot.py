#!/usr/bin/env python3
"""Snapshot save and restore speed against a plain copy of the same bytes.

For each guest size (default 1G and 4G) and each fill:

* ``fresh``: a new guest that touched only its first 16 MiB (data), the
  rest never touched (what a just-booted, mostly idle guest looks like);
* ``random``: every page holds random data.  os.urandom of several GiB is
  slow, so 64 MiB of random bytes are made once and repeated; the snapshot
  path neither compresses nor deduplicates, so repetition changes nothing.

a machine is built in this process exactly as ``bhyvepy`` builds it
(parsed command line, :func:`bhyvepy.vm.build_machine`, no vCPU threads
running), filled, saved with :func:`bhyvepy.snapshot.checkpoint.checkpoint`
and restored into a second machine with
:func:`bhyvepy.snapshot.restore.restore_machine`.  The baseline writes the
same guest memory buffers (all of them, zeros included, as ``dd`` of the
guest's RAM would) to a file on the same filesystem with large writes plus
fsync, and reads that file back into fresh shared memory of the same size.
Before the baseline write the untouched pages are populated, so the
baseline pays for I/O only, not for allocating memory.  Both files are
dropped from the page cache before they are read (POSIX_FADV_DONTNEED on the
file), so both reads come from the disk.

Reported: save time (to the renamed, fsynced file) and the part of it the
vCPUs were paused, baseline write time and save/baseline ratio, the
snapshot's apparent and allocated size, the growth of the process's shared
memory during the save (reading untouched guest memory would allocate it),
restore time, baseline read time and their ratio, each the best of
``--repeat`` rounds (save and baseline interleaved so they share the disk's
moods).  Absolute numbers depend on the disk; the ratios are the result.
"""

from __future__ import annotations

import argparse
import gc
import io
import mmap
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bhyvepy.cli import parse_args, resolve_settings  # noqa: E402
from bhyvepy.snapshot.checkpoint import checkpoint  # noqa: E402
from bhyvepy.snapshot.restore import restore_machine  # noqa: E402
from bhyvepy.vm import build_machine  # noqa: E402

MIB = 1 << 20
RANDOM_BLOCK = 64 * MIB
FRESH_DATA = 16 * MIB
IO_CHUNK = 1 << 30                    # Linux moves at most 2 GiB - 4 KiB per call
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
FILLS = ("fresh", "random")


@dataclass
class Result:
    case: str
    save: float = 0.0
    paused: float = 0.0
    base_write: float = 0.0
    apparent: int = 0
    allocated: int = 0
    shmem_growth: int = 0
    restore: float = 0.0
    base_read: float = 0.0
    skipped: str = ""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}G"


def write_rom(directory: Path) -> Path:
    """A one-page boot ROM (``hlt`` at the reset vector): the vCPUs never run here."""
    path = directory / "hlt.rom"
    path.write_bytes(b"\xf4" * 4096)
    return path


def make_machine(memsize: str, rom: Path, name: str):
    quiet = io.StringIO()
    parsed = parse_args(["-m", memsize, "-s", "0,hostbridge", "-s", "31,lpc",
                         "-l", f"bootrom,{rom}", name], stdout=quiet, stderr=quiet)
    return build_machine(parsed.config, resolve_settings(parsed.config))


def teardown(m) -> None:
    m.close()
    m.vm.destroy()
    del m
    gc.collect()            # device views of guest memory keep the mappings alive


def ram(m) -> list:
    return [r for r in m.mem.regions if r.is_ram]


def fill(m, how: str, block: bytes) -> None:
    for r in ram(m):
        mv = memoryview(r.buf)
        if how == "fresh":
            end = min(FRESH_DATA, r.size) if r.gpa == 0 else 0
        else:
            end = r.size
        for off in range(0, end, len(block)):
            n = min(len(block), end - off)
            mv[off:off + n] = block[:n]
        mv.release()


def populate(m) -> None:
    """Allocate every page of guest RAM (contents unchanged) before the baseline."""
    for r in ram(m):
        try:
            r.buf.madvise(MADV_POPULATE_WRITE)
        except (OSError, ValueError):        # before Linux 5.14: write the holes' zeros
            mv = memoryview(r.buf)
            zero = bytes(MIB)
            for off, length in holes(r):
                for p in range(off, off + length, MIB):
                    q = min(p + MIB, off + length)
                    mv[p:q] = zero[:q - p]
            mv.release()


def holes(r) -> list[tuple[int, int]]:
    """Never-touched ranges of ``r`` (none known where the backend cannot tell)."""
    extents = r.data_extents()
    if extents is None:
        return []
    out, pos = [], 0
    for off, length in extents:
        if off > pos:
            out.append((pos, off - pos))
        pos = off + length
    if pos < r.size:
        out.append((pos, r.size - pos))
    return out


def shmem_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def baseline_write(m, path: Path) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for r in sorted(ram(m), key=lambda r: r.gpa):
            mv = memoryview(r.buf)
            for off in range(0, r.size, IO_CHUNK):
                chunk = mv[off:off + IO_CHUNK]
                while chunk:
                    chunk = chunk[os.write(fd, chunk):]
            del chunk
            mv.release()
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def baseline_read(path: Path, size: int) -> float:
    """Read the file back into fresh shared memory, as a restore does."""
    mfd = os.memfd_create("bench-read", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, size)
        buf = mmap.mmap(mfd, size, flags=mmap.MAP_SHARED)
        fd = os.open(path, os.O_RDONLY)
        try:
            mv = memoryview(buf)
            t0 = time.perf_counter()
            for off in range(0, size, IO_CHUNK):
                view = mv[off:off + IO_CHUNK]
                pos = off
                while view:
                    n = os.preadv(fd, [view], pos)
                    if n == 0:
                        raise RuntimeError("baseline file is short")
                    view, pos = view[n:], pos + n
            elapsed = time.perf_counter() - t0
            del view                 # slices pin the mapping until released
            mv.release()
        finally:
            os.close(fd)
            buf.close()
        return elapsed
    finally:
        os.close(mfd)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(size_text: str, how: str, workdir: Path, rom: Path, block: bytes,
             repeat: int) -> Result:
    size = parse_size(size_text)
    res = Result(f"{size_text} {how}")
    need_disk = (2 if how == "random" else 1) * size + 256 * MIB
    free = shutil.disk_usage(workdir).free
    if free < need_disk:
        res.skipped = f"needs {human(need_disk)} free on {workdir}, has {human(free)}"
        return res
    if mem_available() < size + 512 * MIB:
        res.skipped = f"needs {human(size + 512 * MIB)} of free RAM, has {human(mem_available())}"
        return res
    snap = workdir / f"{size_text}-{how}.snap"
    plain = workdir / f"{size_text}-{how}.raw"
    best = min
    try:
        m = make_machine(size_text, rom, "benchsave")
        try:
            fill(m, how, block)
            for rnd in range(repeat):           # save and baseline interleaved: shared noise
                for p in (snap, plain):
                    p.unlink(missing_ok=True)   # a fresh target each time, as the first save has
                before = shmem_kib()
                t0 = time.perf_counter()
                result = checkpoint(m, str(snap), progress=False)
                save = time.perf_counter() - t0
                if rnd == 0:
                    res.shmem_growth = (shmem_kib() - before) * 1024
                    populate(m)
                    res.save, res.paused = save, result.paused_seconds
                elif save < res.save:
                    res.save, res.paused = save, result.paused_seconds
                base = baseline_write(m, plain)
                res.base_write = base if rnd == 0 else best(res.base_write, base)
        finally:
            teardown(m)
        st = snap.stat()
        res.apparent, res.allocated = st.st_size, st.st_blocks * 512

        for rnd in range(repeat):
            drop_cache(snap)
            drop_cache(plain)
            m = make_machine(size_text, rom, "benchsave")
            try:
                t0 = time.perf_counter()
                restore_machine(m, str(snap), progress=False)
                restore = time.perf_counter() - t0
            finally:
                teardown(m)
            base = baseline_read(plain, size)
            res.restore = restore if rnd == 0 else best(res.restore, restore)
            res.base_read = base if rnd == 0 else best(res.base_read, base)
    finally:
        for p in (snap, plain):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return res


def ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}" if b > 0 else "     -"


def print_table(results: list[Result]) -> None:
    print(f"{'case':<12} {'save s':>7} {'paused':>7} {'base w':>7} {'ratio':>6} "
          f"{'file':>7} {'alloc':>7} {'shm+':>7} {'restore':>7} {'base r':>7} {'ratio':>6}")
    for r in results:
        if r.skipped:
            print(f"{r.case:<12} skipped: {r.skipped}")
            continue
        print(f"{r.case:<12} {r.save:7.2f} {r.paused:7.2f} {r.base_write:7.2f} "
              f"{ratio(r.save, r.base_write)} {human(r.apparent):>7} {human(r.allocated):>7} "
              f"{human(r.shmem_growth):>7} {r.restore:7.2f} {r.base_read:7.2f} "
              f"{ratio(r.restore, r.base_read)}")


def default_dir() -> str:
    if os.environ.get("TMPDIR"):
        return os.environ["TMPDIR"]
    tmp = tempfile.gettempdir()
    try:
        if os.stat(tmp).st_dev == os.stat(REPO).st_dev:
            return tmp
    except OSError:
        pass
    return str(REPO)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1G,4G", help="comma-separated guest sizes (default 1G,4G)")
    ap.add_argument("--fills", default=",".join(FILLS),
                    help="comma-separated: fresh (16 MiB touched), random (all pages)")
    ap.add_argument("--dir", default=default_dir(),
                    help="where the files go (default $TMPDIR, else the system temporary "
                         "directory if it is on the repository's filesystem, else the repository)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds per case, best time kept (default 2; disks here are noisy)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    from bhyvepy.vmm.kvm import KvmBackend
    ok, why = KvmBackend.available()
    if not ok:
        print(f"skipped: {why}")
        return 0
    fills = [f for f in args.fills.split(",") if f]
    bad = [f for f in fills if f not in FILLS]
    if bad:
        ap.error(f"unknown fill {bad[0]!r} (use {', '.join(FILLS)})")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        try:
            if parse_size(s) < 64 * MIB:
                ap.error(f"size {s!r} is below 64M")
        except ValueError:
            ap.error(f"bad size {s!r}")

    block = os.urandom(RANDOM_BLOCK) if "random" in fills else b""
    results = []
    with tempfile.TemporaryDirectory(prefix="bhyvepy-bench-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        rom = write_rom(workdir)
        print(f"files in {workdir}; random fill repeats one {RANDOM_BLOCK >> 20} MiB block; "
              "reads are from disk (page cache dropped per file)")
        for s in sizes:
            for how in fills:
                res = run_case(s, how, workdir, rom, block, args.repeat)
                results.append(res)
                print(f"  done: {res.case}" + (f" (skipped: {res.skipped})" if res.skipped else ""),
                      flush=True)
    print()
    print_table(results)
    print("\nsave/restore: bhyvepy snapshot; base w/r: the same guest memory bytes written with "
          "large writes + fsync / read back; ratio = bhyvepy / baseline (below 1 is faster); "
          "paused: part of the save with the vCPUs stopped; shm+: process shared-memory growth "
          "during the save")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
