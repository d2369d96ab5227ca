"""Assemble the machine's devices from the config tree.

bhyve's ``init_*`` calls, in bhyve's order: the LPC/ISA platform (power
management, POST port, keyboard controller, COM ports, and on KVM the RTC,
PM timer and HPET that vmm.ko would emulate in the kernel), then every
``pci.B.S.F`` node in bus/slot/function order.  Devices are built here and
placed on the buses; they never learn where they sit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bhyvepy.errors import PlainBhyveExit
from bhyvepy.errors import BhyveExit, ExitStatus
from bhyvepy.irq import IsaIrq
from bhyvepy.layout import (COM_PORTS, PORT_ATKBDC_CMD, PORT_ATKBDC_DATA, PORT_DEBUGCON, PORT_POST,
                            SCI_IRQ)
from bhyvepy.legacy import PCI_ALIASES
from bhyvepy.pci.bus import PciBus
from bhyvepy.registry import find_pci_emulation
from bhyvepy.vmm.exits import SuspendHow

log = logging.getLogger("bhyvepy.platform")


class _BackendRtc:
    """The NVRAM/time half of the RTC as the start-up code needs it, on any backend."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm

    def nvram_write(self, off: int, val: int) -> None:
        self.vm.rtc_write(off, val)

    def settime(self, secs: int) -> None:
        self.vm.rtc_settime(secs)


def _add_ports(m: Any, name: str, base: int, length: int, dev: Any) -> None:
    m.ports.register(name, base, length, dev.read, dev.write)


def build_platform(m: Any) -> None:
    """ISA devices and the PCI bus object (finalized later by :func:`build_pci`)."""
    from bhyvepy.dev.atkbdc import Atkbdc
    from bhyvepy.dev.pm import PowerManagement
    from bhyvepy.dev.post import PostPort
    from bhyvepy.dev.rtc import rtc_init_nvram

    cfg, vm = m.config, m.vm

    def suspend(how: SuspendHow) -> None:
        m.request_exit(int(how), f"guest {how.name.lower()}")

    lowmem = sum(r.size for r in m.mem.regions if r.gpa < (4 << 30))
    highmem = sum(r.size for r in m.mem.regions if r.gpa >= (4 << 30))
    m.pci = PciBus(m.ports, m.mmio, vm=vm, mem=m.mem, bootrom=m.bootrom is not None,
                   enable_bars=cfg.get_bool("pci.enable_bars", m.bootrom is None),
                   highmem_size=highmem, ioapic_pincount=vm.ioapic_pincount())
    router = m.pci.router

    debugcon = _open_debugcon(m)

    # Power management: PM1 event/control, GPE0, SMI_CMD, reset port, SCI.
    router.use(SCI_IRQ)
    m.pm = PowerManagement(IsaIrq(vm, SCI_IRQ), suspend,
                           narrow_0x402=debugcon if debugcon is not None and
                           debugcon_port(cfg) == PORT_DEBUGCON else None)
    if debugcon is not None and debugcon_port(cfg) != PORT_DEBUGCON:
        _add_ports(m, "debugcon", debugcon_port(cfg), 1, debugcon)
    for name, base, length, read, write in m.pm.ports():
        m.ports.register(name, base, length, read, write)
    m.snapshots.register("pm", "pm", m.pm)
    m.devices.append(m.pm)

    post = PostPort()
    _add_ports(m, "post", PORT_POST, 1, post)

    # Keyboard controller (also the CPU reset line, command 0xFE).
    router.reserve(1)
    router.reserve(12)
    kbc = Atkbdc(IsaIrq(vm, 1), IsaIrq(vm, 12), suspend)
    m.ports.register("atkbdc-data", PORT_ATKBDC_DATA, 1, kbc.read, lambda o, s, v: kbc.write(0, s, v))
    m.ports.register("atkbdc-cmd", PORT_ATKBDC_CMD, 1,
                     lambda o, s: kbc.read(4, s), lambda o, s, v: kbc.write(4, s, v))
    m.snapshots.register("atkbdc", "atkbdc", kbc)
    m.devices.append(kbc)

    build_com_ports(m)

    # Devices vmm.ko keeps in the kernel; on KVM the backend serves them from
    # Python models.  They pause with the rest and are saved as kernel sections.
    platform_devices = getattr(vm, "platform_devices", None)
    if platform_devices is not None:
        m.devices.extend(platform_devices().values())
    rtc_init_nvram(_BackendRtc(vm), lowmem, highmem,  # type: ignore[arg-type]
                   cfg.get_bool("rtc.use_localtime", True), now=time.time())


def debugcon_port(cfg: Any) -> int:
    return cfg.get_int("debugcon.port", PORT_DEBUGCON)


def _open_debugcon(m: Any) -> Any:
    """The QEMU-style debug console (``-o debugcon.path=FILE``), a bhyvepy extension.

    At its default port 0x402 it shares PM1a_EN's port: byte accesses go to
    the console, word accesses to the PM register (SeaBIOS logs there)."""
    path = m.config.get_value("debugcon.path", None)
    if not path:
        return None
    from bhyvepy.dev.debugcon import DebugCon, DebugConError

    try:
        dbg = DebugCon.open(path)
    except DebugConError as e:
        raise BhyveExit(str(e), ExitStatus.ERROR) from None
    m.devices.append(dbg)
    return dbg


def build_com_ports(m: Any) -> None:
    from bhyvepy.dev.uart import Uart16550
    from bhyvepy.dev.uart_backend import UartBackendError, open_backend

    for n, (base, irq) in COM_PORTS.items():
        path = m.config.get_value(f"lpc.com{n}.path", None)
        if path is None:
            continue
        try:
            backend = open_backend(path)
        except UartBackendError as e:
            raise BhyveExit(f"Unable to initialize backend '{path}' for LPC device com{n}: {e}",
                            ExitStatus.ERROR) from None
        m.pci.router.reserve(irq)
        uart = Uart16550(IsaIrq(m.vm, irq), backend)
        backend.start(uart)
        # No host input until the vCPUs run: a restore replaces the RX FIFO,
        # and bytes typed while the machine is being built must not vanish.
        uart.pause()
        m.held_devices.append(uart)
        _add_ports(m, f"com{n}", base, 8, uart)
        m.snapshots.register(f"uart-com{n}", "uart", uart)
        m.devices.append(uart)
        m.devices.append(backend)


def _pci_nodes(cfg: Any) -> list[tuple[int, int, int, Any]]:
    """Every ``pci.B.S.F`` node, in bus/slot/function order (bhyve's init order)."""
    root = cfg.find_node("pci") if cfg.exists("pci") else None
    found: list[tuple[int, int, int, Any]] = []
    if root is None or isinstance(root, str):
        return found
    for bname, bnode in root.items():
        if isinstance(bnode, str) or not bname.isdigit():
            continue
        for sname, snode in bnode.items():
            if isinstance(snode, str) or not sname.isdigit():
                continue
            for fname, fnode in snode.items():
                if isinstance(fnode, str) or not fname.isdigit():
                    continue
                found.append((int(bname), int(sname), int(fname), fnode))
    found.sort(key=lambda t: t[:3])
    return found


def build_pci(m: Any) -> None:
    for bus, slot, func, node in _pci_nodes(m.config):
        where = f"pci slot {bus}:{slot}:{func}"
        emul = node.get_value("device", None)
        if emul is None:
            raise PlainBhyveExit(f'{where}: missing "device" value', ExitStatus.ERROR)
        if emul in PCI_ALIASES:
            raise PlainBhyveExit(f'{where}: legacy device "{emul}", use "{PCI_ALIASES[emul]}" instead',
                                 ExitStatus.ERROR)
        cls = find_pci_emulation(emul)
        if cls is None:
            raise PlainBhyveExit(f'{where}: unknown device "{emul}"', ExitStatus.ERROR)
        m.pci.create(cls, bus, slot, func, node)
    m.pci.finalize()
    m.pci.register_snapshots(m.snapshots)
    m.devices.extend(m.pci.functions())
