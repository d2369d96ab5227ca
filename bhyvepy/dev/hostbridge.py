"""The host bridge at 0:0:0 (``-s 0,hostbridge``), as bhyve presents it.

A PCI header of class "host bridge" with a PCIe root-port capability; it has
no BARs and no interrupts.  Its IDs default to NetApp's 0x1275/0x1275 and may
be overridden with ``pcireg.vendor``/``pcireg.device`` (hexadecimal) or the
older ``vendor``/``devid`` (C number syntax), which bhyve 14 still reads
first.  ``amd_hostbridge`` is not registered here: bhyve turns it into
``hostbridge`` with AMD IDs while parsing ``-s``.

Unlike upstream bhyve, bhyvepy can snapshot it: its state is the common PCI
part (config space, mostly the command register and interrupt line).
"""

from __future__ import annotations

from bhyvepy.pci.device import PCIEM_TYPE_ROOT_PORT, PciContext, PciFunction, config_read_reg
from bhyvepy.registry import pci_emul

HOSTBRIDGE_VENDOR = 0x1275    # NetApp
HOSTBRIDGE_DEVICE = 0x1275
CLASS_HOST_BRIDGE = 0x060000  # bridge, host bridge, prog-if 0


def _legacy_id(ctx: PciContext, name: str) -> int | None:
    from bhyvepy.config import c_strtol

    value = ctx.get_value(name)
    return None if value is None else c_strtol(value, 0)[0] & 0xFFFF


@pci_emul("hostbridge")
class HostBridge(PciFunction):
    def __init__(self, ctx: PciContext) -> None:
        super().__init__(ctx)
        vendor = _legacy_id(ctx, "vendor")
        if vendor is None:
            vendor = config_read_reg(ctx, "vendor", 2, HOSTBRIDGE_VENDOR)
        device = _legacy_id(ctx, "devid")
        if device is None:
            device = config_read_reg(ctx, "device", 2, HOSTBRIDGE_DEVICE)
        self.set_ids(vendor, device, CLASS_HOST_BRIDGE)
        self.add_pcie_cap(PCIEM_TYPE_ROOT_PORT)
