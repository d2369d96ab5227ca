#!/usr/bin/env python3
"""Boot a guest ROM under QEMU, for developing guests without bhyvepy.

QEMU's own ACPI registers are elsewhere, so an ``isa-debug-exit`` device is
put at bhyve's PM1a control port (0x404): the guest's poweroff write then
ends QEMU with status 1 (QEMU exits with ``(value << 1) | 1``, truncated to
8 bits).  ``-no-reboot`` turns a reset or a triple fault into exit status 0;
a halted guest runs until the timeout.  None of this is used by the test
suite, which boots the ROMs under bhyvepy itself.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import tempfile
import time


def _accel_default() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def _connect(path: str, proc: subprocess.Popen[bytes], deadline: float) -> socket.socket:
    """QEMU creates the socket only once it is up: retry until then."""
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run(rom: str, accel: str, machine: str, timeout: float, ready: bytes | None,
        send: bytes, extra: list[str]) -> tuple[int | None, bytes]:
    """Return QEMU's exit status (None on timeout) and the COM1 output."""
    with tempfile.TemporaryDirectory() as tmp:
        sock_path = os.path.join(tmp, "com1")
        cmd = [
            "qemu-system-x86_64", "-machine", f"{machine},accel={accel}", "-m", "64",
            "-bios", rom, "-display", "none", "-no-reboot", "-monitor", "none",
            "-chardev", f"socket,id=com1,path={sock_path},server=on,wait=on",
            "-serial", "chardev:com1",
            "-device", "isa-debug-exit,iobase=0x404,iosize=2",
            # bhyve has no default NIC; QEMU's would take slot 3.
            "-nic", "none",
            *extra,
        ]
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        output = b""
        sent = ready is None and not send
        try:
            sock = _connect(sock_path, proc, deadline)
            if ready is None and send:
                sock.sendall(send)
                sent = True
            while time.monotonic() < deadline:
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    try:
                        data = sock.recv(4096)
                    except ConnectionResetError:
                        # QEMU quit (e.g. poweroff) with our input unread.
                        break
                    if not data:
                        break
                    output += data
                    if not sent and ready is not None and ready in output:
                        sock.sendall(send)
                        sent = True
                elif proc.poll() is not None:
                    break
            sock.close()
            try:
                return proc.wait(max(0.1, deadline - time.monotonic())), output
            except subprocess.TimeoutExpired:
                return None, output
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rom")
    ap.add_argument("--accel", choices=("kvm", "tcg"), default=_accel_default())
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--ready", help="wait for this text before sending")
    ap.add_argument("--send", default="", help="text to write to COM1")
    ap.add_argument("--machine", default="pc", help="QEMU machine type")
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    ap.epilog = "Arguments after -- go to QEMU unchanged."
    args = ap.parse_args(argv)
    start = time.monotonic()
    status, output = run(args.rom, args.accel, args.machine, args.timeout,
                         args.ready.encode() if args.ready else None,
                         args.send.encode(), extra)
    sys.stdout.write(output.decode(errors="replace"))
    print(f"[qemu_run] status={'timeout' if status is None else status}"
          f" elapsed={time.monotonic() - start:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
