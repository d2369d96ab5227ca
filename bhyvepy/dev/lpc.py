"""The PCI-ISA bridge (``-s N,lpc``): IDs and the PIRQ routing registers.

bhyve presents an Intel 82371SB (PIIX3) ISA bridge, 8086:7000, overridable
with ``pcireg.{vendor,device,revid,subvendor,subdevice}`` (hexadecimal, or
``host`` for the host's own ISA bridge).  Only one may exist, only on bus 0
(the DSDT places all legacy ports behind bus 0).

Its config bytes 0x60-0x63 and 0x68-0x6B are the routing registers of PIRQ
links A-H (:mod:`bhyvepy.pci.intx`); the guest's ACPI link devices write
them to move PCI interrupts between ISA IRQs.  bhyve routes only byte
writes; bhyvepy routes every write that lands there, byte by byte, so the
register and the routing can never disagree.

The UARTs, boot ROM and other ISA devices configured under ``lpc.*`` are
built by the VM builder, not here.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Annotated, Any

from bhyvepy.pci.bus import PciInitError
from bhyvepy.pci.device import PciContext, PciFunction, config_lookup, config_read_reg
from bhyvepy.pci.intx import NPIRQS, PIRQ_DIS, PIRQ_IRQ, PIRQ_OFFSETS
from bhyvepy.pci.state import PciDeviceState
from bhyvepy.registry import pci_emul
from bhyvepy.snapshot.state import Blob, StateError, device_state

LPC_VENDOR = 0x8086
LPC_DEVICE = 0x7000           # 82371SB PIIX3 ISA bridge
LPC_REVID = 0x00
CLASS_ISA_BRIDGE = 0x060100   # bridge, ISA bridge, prog-if 0
_PIRQ_PIN = {off: i + 1 for i, off in enumerate(PIRQ_OFFSETS)}
_PCIREGS = ("vendor", "device", "revid", "subvendor", "subdevice")


@device_state("lpc", version=1)
@dataclass
class LpcState(PciDeviceState):
    pirq: Annotated[bytes, Blob(exact=NPIRQS)] = bytes([PIRQ_DIS] * NPIRQS)

    def validate(self) -> None:
        for i, reg in enumerate(self.pirq):
            if reg & ~(PIRQ_DIS | PIRQ_IRQ):
                raise StateError(f"PIRQ{'ABCDEFGH'[i]} register {reg:#04x} has reserved bits set")


def host_isa_bridge(sysfs: str = "/sys/bus/pci/devices") -> dict[str, int] | None:
    """IDs of the host's ISA bridge (Linux sysfs), for ``pcireg.*=host``."""
    names = {"vendor": "vendor", "device": "device", "revid": "revision",
             "subvendor": "subsystem_vendor", "subdevice": "subsystem_device"}
    for dev in sorted(glob.glob(os.path.join(sysfs, "*"))):
        try:
            with open(os.path.join(dev, "class")) as f:
                if int(f.read(), 16) >> 8 != 0x0601:
                    continue
            ids = {}
            for key, fname in names.items():
                with open(os.path.join(dev, fname)) as f:
                    ids[key] = int(f.read(), 16)
            return ids
        except (OSError, ValueError):
            continue
    return None


@pci_emul("lpc")
class LpcBridge(PciFunction):
    state_class = LpcState

    def __init__(self, ctx: PciContext) -> None:
        super().__init__(ctx)
        if ctx.shared.get("lpc") is not None:
            raise PciInitError("Only one LPC bridge is allowed.")
        if ctx.bus != 0:
            raise PciInitError("LPC bridge can be present only on bus 0.")
        host: dict[str, Any] = {}
        if any(config_lookup(ctx.config, f"pcireg.{r}") == "host" for r in _PCIREGS):
            found = host_isa_bridge()
            if found is None:
                from bhyvepy.config import stderr_warn
                stderr_warn("pci_lpc_get_sel: Unable to find host selector of LPC bridge.")
            else:
                host = found
        self.set_ids(config_read_reg(ctx, "vendor", 2, LPC_VENDOR, host.get("vendor")),
                     config_read_reg(ctx, "device", 2, LPC_DEVICE, host.get("device")),
                     CLASS_ISA_BRIDGE,
                     revid=config_read_reg(ctx, "revid", 1, LPC_REVID, host.get("revid")),
                     subvendor=config_read_reg(ctx, "subvendor", 2, 0, host.get("subvendor")),
                     subdevice=config_read_reg(ctx, "subdevice", 2, 0, host.get("subdevice")))
        self.router = ctx.intx_router
        self._sync_pirq()
        ctx.shared["lpc"] = self

    def _sync_pirq(self) -> None:
        if self.router is not None:
            for pin, off in enumerate(PIRQ_OFFSETS, 1):
                self.cfg.set8(off, self.router.pirq_read(pin))

    def cfg_read(self, offset: int, size: int) -> int:
        if offset < 0x6C and offset + size > 0x60:
            self._sync_pirq()       # the router's routing happens after construction
        return super().cfg_read(offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        if self.router is None or not any(offset + i in _PIRQ_PIN for i in range(size)):
            super().cfg_write(offset, size, value)
            return
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            pin = _PIRQ_PIN.get(offset + i)
            if pin is None:
                super().cfg_write(offset + i, 1, byte)
            else:
                self.router.pirq_write(pin, byte)
                self.cfg.set8(offset + i, self.router.pirq_read(pin))

    # --- snapshots ---------------------------------------------------------------
    def save_state(self) -> Any:
        with self._lock:
            self._sync_pirq()           # the config image carries the live registers
            return super().save_state()

    def save_device_fields(self) -> dict[str, Any]:
        regs = self.router.pirq_regs() if self.router is not None else \
            bytes(self.cfg.get8(off) for off in PIRQ_OFFSETS)
        return {"pirq": regs}

    def check_device_fields(self, state: Any) -> None:
        state.validate()

    def load_device_fields(self, state: Any) -> None:
        if self.router is not None:
            self.router.load_pirq_regs(state.pirq)
        for off, reg in zip(PIRQ_OFFSETS, state.pirq):
            self.cfg.set8(off, reg)
