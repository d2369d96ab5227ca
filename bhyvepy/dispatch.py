"""The IoHandler the backends call: port I/O and MMIO to device handlers.

This is the hottest Python code in bhyvepy (every port or MMIO exit passes
through it), so it does one list index or one bisect and calls the device.
A device that raises on guest input is a device bug, not a reason to kill
the VM: the exception is logged once per device and the access completes as
an unclaimed one would (reads all-ones, writes dropped).
"""

from __future__ import annotations

import logging
import sys

from bhyvepy.bus import MmioBus, PortBus

log = logging.getLogger("bhyvepy.dispatch")


class StrictIoViolation(Exception):
    """``-e`` (x86.strictio): the guest touched an unemulated I/O port."""


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class Dispatcher:
    """Routes exits to the :class:`PortBus` and :class:`MmioBus`."""

    def __init__(self, ports: PortBus, mmio: MmioBus, *, strictio: bool = False) -> None:
        self._port_table = ports._ports      # direct list: one index per exit
        self._mmio = mmio
        self.strictio = strictio
        self._complained: set[str] = set()

    def _device_error(self, name: str, what: str) -> None:
        if name not in self._complained:
            self._complained.add(name)
            log.error("device %s failed on guest access %s", name, what, exc_info=sys.exc_info())

    def _unhandled(self, kind: str, addr: int, size: int, is_write: bool) -> None:
        if kind == "port" and self.strictio:
            raise StrictIoViolation(
                f"Unhandled {'out' if is_write else 'in'}{'bwl'[size >> 1] if size in (1, 2, 4) else ''} "
                f"{addr:#x}")
        key = f"{kind}:{addr:#x}"
        if key not in self._complained and len(self._complained) < 256:
            self._complained.add(key)
            log.debug("unhandled %s %s at %#x size %d", kind, "write" if is_write else "read", addr, size)

    def pio_in(self, vcpu: int, port: int, size: int) -> int:
        r = self._port_table[port & 0xFFFF]
        if r is None:
            self._unhandled("port", port, size, False)
            return _ones(size)
        try:
            return r.read(port - r.base, size) & _ones(size)
        except Exception:
            self._device_error(r.name, f"in port {port:#x}/{size}")
            return _ones(size)

    def pio_out(self, vcpu: int, port: int, size: int, value: int) -> None:
        r = self._port_table[port & 0xFFFF]
        if r is None:
            self._unhandled("port", port, size, True)
            return
        try:
            r.write(port - r.base, size, value & _ones(size))
        except Exception:
            self._device_error(r.name, f"out port {port:#x}/{size} value {value:#x}")

    def mmio_read(self, vcpu: int, gpa: int, size: int) -> int:
        r = self._mmio.lookup(gpa)
        if r is None:
            self._unhandled("mmio", gpa, size, False)
            return _ones(size)
        try:
            return r.read(gpa - r.base, size) & _ones(size)
        except Exception:
            self._device_error(r.name, f"read {gpa:#x}/{size}")
            return _ones(size)

    def mmio_write(self, vcpu: int, gpa: int, size: int, value: int) -> None:
        r = self._mmio.lookup(gpa)
        if r is None:
            self._unhandled("mmio", gpa, size, True)
            return
        try:
            r.write(gpa - r.base, size, value & _ones(size))
        except Exception:
            self._device_error(r.name, f"write {gpa:#x}/{size} value {value:#x}")
