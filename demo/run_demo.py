#!/usr/bin/env python3
"""`make demo`: boot a demo VM, suspend it to a file, resume it, show its console.

The guest (tests/guests/counter.c) counts on COM1.  The demo runs it under
bhyvepy with two virtio-blk disks, suspends it with ``bhyvepyctl --suspend``
(bhyvepy exits with status 5), prints what the snapshot holds, resumes it
with ``bhyvepy -r FILE`` alone in a new process, shows that the counter
continues where it stopped, and powers the guest off by typing ``q``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROM = REPO / "tests" / "guests" / "out" / "counter.rom"
VM = "bhyvepy-demo"


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m" if sys.stdout.isatty() else f"==> {msg}", flush=True)


class Console:
    """The guest's COM1: a UNIX socket bhyvepy connects to."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.text = ""
        self._line = ""

    def accept(self, proc: subprocess.Popen, timeout: float = 60) -> None:
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(0.2)
        self.text = ""

    def wait_for(self, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text)
            if m:
                return m
            if time.monotonic() > end or proc.poll() is not None:
                raise SystemExit(f"demo failed: no {pattern!r} on the console "
                                 f"(bhyvepy status {proc.poll()})")
            try:
                chunk = self.conn.recv(4096).decode(errors="replace")  # type: ignore[union-attr]
            except socket.timeout:
                continue
            if chunk:
                self.text += chunk
                self._line += chunk
                *full, self._line = self._line.split("\n")
                for ln in full:
                    if ln.strip():
                        print(f"    | {ln.rstrip()}", flush=True)

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)  # type: ignore[union-attr]


def bhyvepy(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "bhyvepy", *args], env=env,
                            stdin=subprocess.DEVNULL)


def ctl(*args: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.call([sys.executable, "-c", "from bhyvepy.ctl import main; raise SystemExit(main())",
                            *args], env=env)


def main() -> int:
    if not ROM.exists():
        subprocess.run(["make", "-s", "-C", str(REPO / "tests" / "guests")], check=True)
    work = Path(tempfile.mkdtemp(prefix="bhyvepy-demo-"))
    try:
        rundir = str(work / "run")
        com1 = str(work / "com1")
        snap = str(work / "demo.snapshot")
        for i in (0, 1):
            (work / f"disk{i}.img").write_bytes(bytes(1 << 20))
        console = Console(com1)

        say("booting the demo VM: bhyvepy -c 1 -m 64M ... -s 3:0,virtio-blk -s 3:1,virtio-blk "
            f"-l com1,<socket> -l bootrom,{ROM.name} {VM}")
        vm = bhyvepy("-c", "1", "-m", "64M", "-H", "-P", "-s", "0,hostbridge", "-s", "31,lpc",
                     "-s", f"3:0,virtio-blk,{work / 'disk0.img'}", "-s", f"3:1,virtio-blk,{work / 'disk1.img'}",
                     "-l", f"com1,{com1}", "-l", f"bootrom,{ROM}", "-o", f"rundir={rundir}", VM)
        console.accept(vm)
        before = int(console.wait_for(r"tick (\d+)\n(?:.*\n)*?.*tick (\d*[3-9])\n", vm).group(2))

        say(f"suspending: bhyvepyctl --vm={VM} --suspend={snap}")
        rc = ctl(f"--vm={VM}", f"--suspend={snap}", f"--rundir={rundir}")
        status = vm.wait(60)
        say(f"bhyvepyctl status {rc}, bhyvepy exited with status {status} (5 = suspended)")
        if rc != 0 or status != 5:
            return 1
        ticks = [int(t) for t in re.findall(r"tick (\d+)", console.text)]
        last = max(ticks) if ticks else before

        say(f"the snapshot: bhyvepyctl --snapshot-info={snap}")
        ctl(f"--snapshot-info={snap}")

        say(f"resuming in a new process: bhyvepy -r {snap}")
        console.conn.close()  # type: ignore[union-attr]
        vm = bhyvepy("-r", snap)
        console.accept(vm)
        m = console.wait_for(r"tick (\d+)", vm)
        first = int(m.group(1))
        say(f"the counter went on from {last} to {first}: it did not restart")
        console.wait_for(rf"tick {first + 2}\b", vm)
        say("typing 'q' on the console: the guest powers off")
        console.send(b"q")
        status = vm.wait(60)
        say(f"bhyvepy exited with status {status} (1 = powered off)")
        return 0 if status == 1 and first > last - 1 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
