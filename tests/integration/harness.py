"""Run bhyvepy as a separate process on a real hypervisor and talk to its COM1.

The guest's console is a UNIX socket the test listens on (bhyvepy connects
to an existing socket named as a com port path), so a test reads exactly
what the guest printed and can type into it, like an admin on a serial
console.
"""

from __future__ import annotations

import os
import socket
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "tests" / "guests"
GUEST_OUT = GUEST_DIR / "out"


def kvm_usable() -> tuple[bool, str]:
    """Whether this host can run guests: KVM on Linux, vmm.ko on FreeBSD (the
    same tests then exercise the vmm backend)."""
    if sys.platform.startswith("freebsd"):
        from bhyvepy.vmm.vmmapi import VmmapiBackend

        return VmmapiBackend.available()
    if not sys.platform.startswith("linux"):
        return False, f"no supported hypervisor backend on {sys.platform}"
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist (no KVM on this host)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    return True, ""


def guest_rom(name: str) -> Path:
    rom = GUEST_OUT / f"{name}.rom"
    if not rom.exists():
        subprocess.run(["make", "-s", "-C", str(GUEST_DIR)], check=True)
    return rom


class GuestRun:
    """One bhyvepy process with COM1 on a socket this object listens on."""

    def __init__(self, workdir: Path, rom: Path | str, *, name: str = "testvm", mem: str = "64M",
                 cpus: str = "1", extra: list[str] | None = None, slots: list[str] | None = None,
                 env: dict[str, str] | None = None, args: list[str] | None = None,
                 base_slots: tuple[str, ...] = ("0,hostbridge", "31,lpc")) -> None:
        self.workdir = Path(workdir)
        # UNIX socket paths are limited to ~104 bytes: keep them short.
        self.sockdir = tempfile.mkdtemp(prefix="bp-")
        self.sock_path = os.path.join(self.sockdir, "com1")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.sock_path)
        self.listener.listen(1)
        if args is None:
            # Each VM gets its own control-socket directory, so parallel runs
            # of the same test VM name never collide in /var/run/bhyve.
            args = ["-c", cpus, "-m", mem, "-l", f"com1,{self.sock_path}", "-l", f"bootrom,{rom}",
                    "-o", f"rundir={self.sockdir}"]
            for s in (*base_slots, *(slots or [])):
                args += ["-s", s]
            args += list(extra or [])
            args.append(name)
        self.argv = [sys.executable, "-m", "bhyvepy", *args]
        e = dict(os.environ)
        e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
        e.update(env or {})
        self.proc = subprocess.Popen(self.argv, cwd=str(self.workdir), env=e,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.conn: socket.socket | None = None
        self.output = bytearray()

    def _accept(self, timeout: float) -> None:
        if self.conn is not None:
            return
        self.listener.settimeout(timeout)
        try:
            self.conn, _ = self.listener.accept()
        except socket.timeout:
            raise AssertionError(f"bhyvepy did not connect to COM1 within {timeout}s; "
                                 f"stderr: {self._stderr_now()}") from None
        self.conn.settimeout(0.2)

    def _stderr_now(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""

    def read_until(self, text: str, timeout: float = 60.0) -> str:
        """Console output up to and including ``text``; fails with what was seen."""
        deadline = time.monotonic() + timeout
        self._accept(timeout)
        needle = text.encode()
        while needle not in self.output:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {text!r}; console so far:\n"
                                     f"{self.output.decode(errors='replace')}")
            try:
                chunk = self.conn.recv(4096)  # type: ignore[union-attr]
            except socket.timeout:
                if self.proc.poll() is not None and not self._drain():
                    raise AssertionError(f"bhyvepy exited ({self.proc.returncode}) before {text!r}; "
                                         f"console:\n{self.output.decode(errors='replace')}\n"
                                         f"stderr: {self._stderr_now()}") from None
                continue
            if not chunk:
                if self.proc.poll() is None:
                    time.sleep(0.05)
                    continue
                raise AssertionError(f"console closed before {text!r}; console:\n"
                                     f"{self.output.decode(errors='replace')}\nstderr: {self._stderr_now()}")
            self.output += chunk
        return self.output.decode(errors="replace")

    def _drain(self) -> bool:
        got = False
        try:
            while True:
                chunk = self.conn.recv(4096)  # type: ignore[union-attr]
                if not chunk:
                    break
                self.output += chunk
                got = True
        except (socket.timeout, OSError):
            pass
        return got

    def send(self, data: bytes) -> None:
        self._accept(30)
        self.conn.sendall(data)  # type: ignore[union-attr]

    def wait(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"bhyvepy did not exit within {timeout}s; console:\n"
                                 f"{self.output.decode(errors='replace')}") from None
        if self.conn is not None:
            self._drain()
        return rc

    @property
    def stderr(self) -> str:
        return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
