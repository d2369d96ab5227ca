#!/usr/bin/env python3
"""Run the device-driver guests under QEMU and check what they print and write.

A development aid for the guests themselves (the test suite runs them under
bhyvepy): it builds disk and CD images, attaches QEMU's legacy virtio and
AHCI devices at the slots bhyvepy tests use, drives the network guest from
a unix datagram socket, and checks output lines, image contents and
checksums with disk_patterns.py and iostress_model.py.

    tools/qemu_check.py [--accel kvm|tcg] [--machine pc|q35] [GUEST ...]
"""

from __future__ import annotations

import argparse
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
GUESTS = HERE.parent
sys.path.insert(0, str(GUESTS))

import disk_patterns as dp  # noqa: E402
import iostress_model as im  # noqa: E402


class Session:
    """One QEMU process with COM1 on a socket; lines in, bytes out."""

    def __init__(self, rom: Path, accel: str, machine: str, extra: list[str],
                 tmp: Path) -> None:
        sock_path = str(tmp / "com1")
        cmd = ["qemu-system-x86_64", "-machine", f"{machine},accel={accel}", "-m", "64",
               "-bios", str(rom), "-display", "none", "-no-reboot", "-monitor", "none",
               "-nic", "none",
               "-chardev", f"socket,id=com1,path={sock_path},server=on,wait=on",
               "-serial", "chardev:com1",
               "-device", "isa-debug-exit,iobase=0x404,iosize=2", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(sock_path)
                break
            except OSError:
                self.sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("QEMU did not start: "
                                       + self.proc.stderr.read().decode(errors="replace"))
                time.sleep(0.05)
        self.buf = b""
        self.lines: list[str] = []

    def _fill(self, timeout: float) -> bool:
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            data = self.sock.recv(4096)
        except ConnectionResetError:
            data = b""
        if not data:
            return False
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.lines.append(line.decode(errors="replace"))
            print("   |", self.lines[-1])
        return True

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first line (already seen or new) matching PATTERN; FAIL lines abort."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if line.startswith("FAIL"):
                    raise AssertionError(f"guest failed: {line}")
                m = rx.search(line)
                if m:
                    return m
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s")
            if not self._fill(min(left, 0.2)) and self.proc.poll() is not None:
                self._fill(0.1)
                if not any(rx.search(x) for x in self.lines[seen:]):
                    raise AssertionError(f"QEMU exited ({self.proc.returncode}) before "
                                         f"{pattern!r}")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def finish(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._fill(0.1)
        while self._fill(0.05):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("guest did not power off")
        for line in self.lines:
            if line.startswith("FAIL"):
                raise AssertionError(f"guest failed: {line}")
        return self.proc.returncode

    def close(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def vblk_args(paths: list[Path], slot: int = 3) -> list[str]:
    args: list[str] = []
    for fn, p in enumerate(paths):
        args += ["-drive", f"if=none,id=vd{fn},file={p},format=raw",
                 "-device", f"virtio-blk-pci,disable-modern=on,drive=vd{fn},"
                 f"addr={slot}.{fn}" + (",multifunction=on" if fn == 0 and len(paths) > 1 else "")
                 + f",serial=VD{fn}SERIAL"]
    return args


def ahci_args(ports: list[tuple[str, Path]], slot: int = 4) -> list[str]:
    args = ["-device", f"ich9-ahci,id=ahci,addr={slot}.0"]
    for n, (kind, p) in enumerate(ports):
        media = ",media=cdrom" if kind == "cd" else ""
        dev = "ide-cd" if kind == "cd" else "ide-hd"
        args += ["-drive", f"if=none,id=ad{n},file={p},format=raw{media}",
                 "-device", f"{dev},drive=ad{n},bus=ahci.{n}"]
    return args


def make_image(path: Path, size: int, fill: Callable[[int], int] | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(bytes(fill(i) & 0xFF for i in range(size)))
    return path


def cd_image(path: Path, blocks: int, seed: int) -> Path:
    data = bytearray()
    for b in range(blocks):
        data += bytes(((b * 7 + seed + i * 3) & 0xFF) for i in range(dp.CD_BLOCK))
    path.write_bytes(bytes(data))
    return path


def check_virtio_blk(rom: str, ctx: dict) -> None:
    tmp: Path = ctx["tmp"]
    imgs = [make_image(tmp / "vb0.img", 1 << 20), make_image(tmp / "vb1.img", 3 << 19)]
    s = Session(GUESTS / "out" / rom, ctx["accel"], ctx["machine"], vblk_args(imgs), tmp)
    try:
        s.wait_for(r"^VIRTIO-BLK DONE 2$")
        for n, img in enumerate(imgs):
            cap = img.stat().st_size // 512
            s.wait_for(rf"^VBLK {n} capacity={cap} id=VD{n}SERIAL OK$")
        assert s.finish() == 1
    finally:
        s.close()
    for n, img in enumerate(imgs):
        data = img.read_bytes()
        bad = dp.check_image(data, dp.vblk_expected(n, len(data) // 512))
        assert not bad, f"disk {n}: wrong sectors {bad}"


def check_ahci(rom: str, ctx: dict) -> None:
    tmp: Path = ctx["tmp"]
    disk = make_image(tmp / "ahci0.img", 1 << 20)
    cd = cd_image(tmp / "cd.iso", 37, 5)
    small = cd_image(tmp / "small.iso", 3, 9)
    s = Session(GUESTS / "out" / rom, ctx["accel"], ctx["machine"],
                ahci_args([("hd", disk), ("cd", cd), ("cd", small)]), tmp)
    try:
        s.wait_for(r"^AHCI DONE hbas=\d+ disks=1 cds=2$")
        s.wait_for(rf"^AHCI port 0 disk sectors={(1 << 20) // 512} pattern-disk=0 OK$")
        for port, img in ((1, cd), (2, small)):
            image = img.read_bytes()
            for lba, n, fnv, head in dp.cd_reads(image):
                s.wait_for(rf"^AHCI port {port} cd read lba={lba} blocks={n} "
                           rf"fnv={fnv:08x} head={head}$")
            s.wait_for(rf"^AHCI port {port} cd blocks={len(image) // 2048} OK$")
        assert s.finish() == 1
    finally:
        s.close()
    data = disk.read_bytes()
    bad = dp.check_image(data, dp.ahci_expected(0, 0, len(data) // 512))
    assert not bad, f"wrong sectors {bad}"


def check_virtio_net(rom: str, ctx: dict) -> None:
    tmp: Path = ctx["tmp"]
    host = str(tmp / "host.sock")
    vm = str(tmp / "vm.sock")
    hs = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    hs.bind(host)
    args = ["-netdev", f"dgram,id=n0,local.type=unix,local.path={vm},"
            f"remote.type=unix,remote.path={host}",
            "-device", "virtio-net-pci,disable-modern=on,netdev=n0,addr=5.0,"
            "mac=52:54:00:12:34:56"]
    s = Session(GUESTS / "out" / rom, ctx["accel"], ctx["machine"], args, tmp)
    try:
        s.wait_for(r"^NET MAC 52:54:00:12:34:56")
        s.wait_for(r"^NET READY$")
        frames = []
        hs.settimeout(5)
        for _ in range(3):
            frames.append(hs.recv(2048))
        for i, f in enumerate(frames):
            assert f[:6] == b"\xff" * 6 and f[6:12] == bytes.fromhex("525400123456"), f
            assert f[12:14] == b"\x88\xb5", f
            assert f[14:].rstrip(b"\0") == f"bhyvepy-guest-frame {i}".encode(), f
        src = bytes.fromhex("02aabbccddee")
        sent = []
        for i, payload in enumerate([b"hello from host", b"x" * 100, b"quit"]):
            if i == 1:  # one frame of another type, which the guest skips
                hs.sendto(b"\xff" * 6 + src + b"\x08\x00" + b"\0" * 46, vm)
            frame = bytes.fromhex("525400123456") + src + b"\x88\xb5" + payload
            frame = frame.ljust(60, b"\0")
            hs.sendto(frame, vm)
            sent.append(frame)
        for f in sent:
            s.wait_for(rf"^NET RX len={len(f)} {f[:32].hex()}$")
        s.wait_for(r"^VIRTIO-NET DONE tx=3 rx=3 ignored=1$")
        assert s.finish() == 1
    finally:
        s.close()
        hs.close()


def check_virtio_rnd(rom: str, ctx: dict) -> None:
    s = Session(GUESTS / "out" / rom, ctx["accel"], ctx["machine"],
                ["-device", "virtio-rng-pci,disable-modern=on,addr=6.0"], ctx["tmp"])
    try:
        s.wait_for(r"^VIRTIO-RND OK \d+$")
        assert s.finish() == 1
    finally:
        s.close()


def check_iostress(rom: str, ctx: dict) -> None:
    tmp: Path = ctx["tmp"]
    imgs = [make_image(tmp / "io0.img", 1 << 20), make_image(tmp / "io1.img", 1 << 20)]
    cd = cd_image(tmp / "io.iso", 20, 1)
    args = vblk_args(imgs) + ahci_args([("cd", cd)])
    s = Session(GUESTS / "out" / rom, ctx["accel"], ctx["machine"], args, tmp)
    iters = im.ITERATIONS
    sums = im.checksums(iters)
    try:
        s.wait_for(r"^IOSTRESS cd port 0 blocks=20 ")
        for i in (0, 1, iters // 2, iters - 1):
            s.wait_for(rf"^ITER {i} {sums[i]:08x}$", timeout=300)
        s.wait_for(rf"^IOSTRESS CD port=0 fnv={im.cd_checksum(cd.read_bytes(), iters):08x}$",
                   timeout=300)
        s.wait_for(rf"^IOSTRESS DONE {sums[-1]:08x}$", timeout=300)
        assert s.finish() == 1
    finally:
        s.close()
    for d, img in enumerate(imgs):
        data = img.read_bytes()
        for lba, want in im.disk_contents(d, iters).items():
            assert data[lba * 512:(lba + 1) * 512] == want, f"disk {d} lba {lba}"


def check_counter(rom: str, ctx: dict) -> None:
    s = Session(GUESTS / "out" / rom, ctx["accel"], ctx["machine"], [], ctx["tmp"])
    try:
        s.wait_for(r"^tick 2$", timeout=60)
        s.send(b"a")
        s.wait_for(r"^key a$")
        s.send(b"Zq")
        s.wait_for(r"^key Z$")
        s.wait_for(r"^key q$")
        assert s.finish() == 1
    finally:
        s.close()


CHECKS: dict[str, Callable[[str, dict], None]] = {
    "virtio_blk": check_virtio_blk,
    "virtio_blk_intx": check_virtio_blk,
    "ahci": check_ahci,
    "ahci_intx": check_ahci,
    "virtio_net": check_virtio_net,
    "virtio_rnd": check_virtio_rnd,
    "iostress": check_iostress,
    "counter": check_counter,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accel", choices=("kvm", "tcg"),
                    default="kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg")
    ap.add_argument("--machine", default="pc")
    ap.add_argument("guests", nargs="*", default=list(CHECKS))
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(GUESTS)], check=True)
    failed = []
    for g in args.guests:
        print(f"== {g} ({args.machine}, {args.accel})")
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gq-") as tmp:
            try:
                CHECKS[g](f"{g}.rom", {"tmp": Path(tmp), "accel": args.accel,
                                       "machine": args.machine})
                print(f"   ok ({time.monotonic() - start:.1f}s)")
            except AssertionError as e:
                print(f"   FAILED: {e}")
                failed.append(g)
    print("all ok" if not failed else f"failed: {' '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
