#!/usr/bin/env python3
"""virtio-blk throughput: a guest's 4 KiB random reads and 1 MiB sequential writes vs the bare host.

The guest (``tests/guests/diskbench.c``) runs under bhyvepy with one
virtio-blk disk backed by an image file this script creates:

1. ``--reads`` random 4 KiB reads, queue depth 1 (one request in flight,
   completion by interrupt), block numbers from a 64-bit LCG;
2. ``--writes`` sequential 1 MiB writes (one request each, the data split
   into up to 8 descriptors as seg_max allows), then one FLUSH.

The guest cannot time itself, so it prints a marker before and after each
phase and this script timestamps the markers as they arrive on COM1 (a
UNIX socket).  The time therefore includes one console line (a few dozen
port exits) per phase, which is negligible against phases of seconds.

The baseline runs right after, in this process, on the same image file:
the same LCG sequence of 4 KiB ``pread`` calls, then the same 1 MiB
``pwrite`` calls and one ``fsync`` (the guest's FLUSH).  Page cache is not
dropped (that needs root and disturbs the host); both runs are cache-warm,
since the guest's run has just read and written the same file.  The result
is the ratio guest / baseline; absolute numbers are printed for context.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCK = 4096
CHUNK = 1 << 20
LCG_MUL = 6364136223846793005
LCG_ADD = 1442695040888963407
MASK64 = (1 << 64) - 1
TAG_XOR = 0x4B4E424B53494442          # "BDISKBNK": must match diskbench.c
WORD_MUL = 0x9E3779B97F4A7C15


def _load_harness():
    """tests/integration/harness.py by path: the bench is not a test package."""
    path = REPO / "tests" / "integration" / "harness.py"
    spec = importlib.util.spec_from_file_location("bhyvepy_test_harness", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def lcg_blocks(seed: int, n: int, blocks: int):
    """The guest's read sequence: state advanced first, block = (state >> 33) mod blocks."""
    x = seed & MASK64
    for _ in range(n):
        x = (x * LCG_MUL + LCG_ADD) & MASK64
        yield (x >> 33) % blocks


def write_chunk() -> bytes:
    """The 1 MiB the guest writes: le64 word j = (j + 1) * WORD_MUL mod 2^64."""
    words = CHUNK // 8
    return struct.pack(f"<{words}Q", *(((j + 1) * WORD_MUL) & MASK64 for j in range(words)))


def make_image(path: Path, size: int) -> None:
    """Every 4 KiB block starts with its number ^ TAG_XOR (the guest checks it);
    the rest is non-zero filler, so no block is a hole."""
    filler = (bytes(range(256)) * (BLOCK // 256))[8:]
    with open(path, "wb") as f:
        batch = 256
        for first in range(0, size // BLOCK, batch):
            last = min(first + batch, size // BLOCK)
            f.write(b"".join(struct.pack("<Q", b ^ TAG_XOR) + filler for b in range(first, last)))


@dataclass
class Phase:
    seconds: float
    ops: int
    nbytes: int

    @property
    def iops(self) -> float:
        return self.ops / self.seconds

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6


def run_guest(harness, workdir: Path, image: Path, reads: int, writes: int, seed: int,
              mem: str, timeout: float) -> tuple[Phase, Phase, str]:
    rom = harness.guest_rom("diskbench")
    run = harness.GuestRun(workdir, rom, name="diskbench", mem=mem,
                           slots=[f"3,virtio-blk,{image}"])
    try:
        run.read_until("DISKBENCH READY", timeout)
        run.send(f"{reads} {writes} {seed}\n".encode())
        out = run.read_until("DISKBENCH PARAMS", timeout)   # the READY line is whole by now
        info = out.split("DISKBENCH READY", 1)[1].split("\n", 1)[0]
        stamps = []
        for marker in ("DISKBENCH READS START", "DISKBENCH READS DONE",
                       "DISKBENCH WRITES START", "DISKBENCH WRITES DONE"):
            run.read_until(marker, timeout)
            stamps.append(time.monotonic())
        rc = run.wait(timeout)
        out = run.output.decode(errors="replace")
        if "FAIL" in out or rc != 1:
            raise SystemExit(f"guest failed (exit status {rc}):\n{out}\n{run.stderr}")
        for line, n in (("DISKBENCH READS DONE", reads), ("DISKBENCH WRITES DONE", writes)):
            if f"{line} {n}\n" not in out:
                raise SystemExit(f"guest did not report {line} {n}:\n{out}")
    except AssertionError as e:
        raise SystemExit(f"guest run failed: {e}") from None
    finally:
        run.close()
    return (Phase(stamps[1] - stamps[0], reads, reads * BLOCK),
            Phase(stamps[3] - stamps[2], writes, writes * CHUNK), info.strip())


def check_written(image: Path, writes: int, chunk: bytes) -> None:
    """The guest's writes really reached the file (first min(writes, chunks) MiB)."""
    chunks = os.path.getsize(image) // CHUNK
    with open(image, "rb") as f:
        for i in range(min(writes, chunks)):
            if os.pread(f.fileno(), CHUNK, i * CHUNK) != chunk:
                raise SystemExit(f"image MiB {i} does not hold what the guest wrote")


def run_baseline(image: Path, reads: int, writes: int, seed: int, chunk: bytes) -> tuple[Phase, Phase]:
    size = os.path.getsize(image)
    blocks, chunks = size // BLOCK, size // CHUNK
    offsets = [b * BLOCK for b in lcg_blocks(seed, reads, blocks)]   # outside the timed loop
    fd = os.open(image, os.O_RDWR)
    try:
        pread, pwrite = os.pread, os.pwrite
        t0 = time.monotonic()
        for off in offsets:
            if len(pread(fd, BLOCK, off)) != BLOCK:
                raise SystemExit(f"short read at {off}")
        t1 = time.monotonic()
        for i in range(writes):
            pwrite(fd, chunk, (i % chunks) * CHUNK)
        os.fsync(fd)
        t2 = time.monotonic()
    finally:
        os.close(fd)
    return Phase(t1 - t0, reads, reads * BLOCK), Phase(t2 - t1, writes, writes * CHUNK)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=20000, help="random 4 KiB reads (default 20000)")
    ap.add_argument("--writes", type=int, default=1024, help="sequential 1 MiB writes, wrapping around the image (default 1024)")
    ap.add_argument("--image-mb", type=int, default=256, help="image size in MiB (default 256)")
    ap.add_argument("--seed", type=int, default=1, help="LCG seed (default 1)")
    ap.add_argument("--mem", default="64M", help="guest memory (default 64M)")
    ap.add_argument("--dir", default=None, help="where to put the image (default: a temporary "
                    "directory under $TMPDIR)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-step timeout, seconds")
    args = ap.parse_args()
    if args.reads < 1 or args.writes < 1 or args.image_mb < 1 or args.seed < 0:
        ap.error("--reads, --writes and --image-mb must be >= 1, --seed >= 0")

    harness = _load_harness()
    ok, why = harness.kvm_usable()
    if not ok:
        print(f"skipped: {why}")
        return 0

    with tempfile.TemporaryDirectory(prefix="bhyvepy-disk-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        image = workdir / "disk.img"
        size = args.image_mb * CHUNK
        make_image(image, size)
        chunk = write_chunk()
        g_read, g_write, info = run_guest(harness, workdir, image, args.reads, args.writes,
                                          args.seed, args.mem, args.timeout)
        check_written(image, args.writes, chunk)
        b_read, b_write = run_baseline(image, args.reads, args.writes, args.seed, chunk)

    print(f"image {args.image_mb} MiB ({size // BLOCK} blocks of 4 KiB); guest: {info}")
    print(f"reads: {args.reads} x 4 KiB random, queue depth 1, seed {args.seed}; "
          f"writes: {args.writes} x 1 MiB sequential + flush/fsync")
    print("baseline: pread/pwrite on the same file after the guest run (page cache warm for both)")
    print()
    print(f"{'':24}{'guest':>12}{'baseline':>12}{'ratio':>8}")
    print(f"{'4 KiB random read IOPS':24}{g_read.iops:12.0f}{b_read.iops:12.0f}"
          f"{g_read.iops / b_read.iops:8.3f}")
    print(f"{'1 MiB seq write MB/s':24}{g_write.mbps:12.1f}{b_write.mbps:12.1f}"
          f"{g_write.mbps / b_write.mbps:8.3f}")
    print(f"{'(read MB/s)':24}{g_read.mbps:12.1f}{b_read.mbps:12.1f}")
    print(f"{'(write IOPS)':24}{g_write.iops:12.1f}{b_write.iops:12.1f}")
    print(f"{'(read phase, s)':24}{g_read.seconds:12.3f}{b_read.seconds:12.3f}")
    print(f"{'(write phase, s)':24}{g_write.seconds:12.3f}{b_write.seconds:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
