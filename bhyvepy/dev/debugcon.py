"""QEMU-style debug console: bytes written to one port go to a host file.

SeaBIOS (Debian's build included) writes its log to port 0x402 after checking
that reading the port returns 0xE9, QEMU's debugcon read-back value.  The
model appends every byte written to a host file, unbuffered, so a log
survives a VM that dies; wider writes are taken a byte at a time, low byte
first.  It is a bhyvepy extension for tests, off unless configured, e.g.
``-o debugcon.path=/tmp/seabios.log`` (port ``debugcon.port``, default 0x402).

Under bhyve's port layout 0x402 is the upper half of the PM1a event block
(PM1a_EN, a 16-bit register), so the VM hands this model to
:class:`bhyvepy.dev.pm.PowerManagement` as ``narrow_0x402``: byte accesses
there reach the console, word accesses the PM register.  At any other port
it is placed on the port bus directly.  Stateless: nothing to snapshot.
"""

from __future__ import annotations

import os
import threading

DEBUGCON_PORT = 0x402
DEBUGCON_READBACK = 0xE9


class DebugConError(Exception):
    """The debug console file cannot be opened (a start-up error)."""


class DebugCon:
    def __init__(self, fd: int) -> None:
        """``fd``: a writable descriptor the console owns (closed by :meth:`close`)."""
        self._fd = fd
        self._lock = threading.Lock()
        self.dropped = 0

    @classmethod
    def open(cls, path: str) -> "DebugCon":
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DebugConError(f"debugcon: {path}: {e.strerror}") from None
        return cls(fd)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(bytes([DEBUGCON_READBACK]) * size, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.write(self._fd, data)
            except OSError:
                self.dropped += len(data)     # a full disk must not stop the guest

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


__all__ = ["DebugCon", "DebugConError", "DEBUGCON_PORT", "DEBUGCON_READBACK"]
