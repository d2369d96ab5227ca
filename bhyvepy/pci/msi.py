"""MSI and MSI-X capabilities: their config-space layout, state and delivery.

The capabilities are laid out as bhyve lays them out (so guests and
snapshots see the same bytes): MSI is the 14-byte 64-bit form without
per-vector masking; MSI-X puts the table at offset 0 of its BAR and the
pending-bit array (PBA) at the next 4 KiB boundary after the table.

Masking follows the PCI specification rather than bhyve (which drops a
message raised while masked): a vector raised while its entry or the whole
function is masked sets its pending bit, and the message is sent when the
mask is lifted.  Delivery goes through an injected :class:`MsiSender`, so
tests record messages instead of needing a kernel.
"""

from __future__ import annotations

import struct

from bhyvepy.irq import MsiSender
from bhyvepy.pci.config_space import PciConfigSpace, ones

PCIY_MSI = 0x05
PCIY_EXPRESS = 0x10
PCIY_MSIX = 0x11

MSICTRL_ENABLE = 0x0001
MSICTRL_MMC_MASK = 0x000E
MSICTRL_MME_MASK = 0x0070
MSICTRL_64BIT = 0x0080

MSIXCTRL_TABLE_SIZE = 0x07FF
MSIXCTRL_FUNCTION_MASK = 0x4000
MSIXCTRL_ENABLE = 0x8000
MSIX_BIR_MASK = 0x7
MSIX_VCTRL_MASK = 0x1
MSIX_ENTRY_SIZE = 16
MAX_MSIX_ENTRIES = 2048

_ENTRY = struct.Struct("<QII")   # message address, message data, vector control


def pba_size(nvec: int) -> int:
    """Bytes of pending bits for ``nvec`` vectors: whole qwords (bhyve's PBA_SIZE)."""
    return (nvec + 63) // 64 * 8


class MsiCapability:
    """The MSI capability of one function; state is read back from config space."""

    LENGTH = 14

    def __init__(self, nvec: int) -> None:
        if nvec not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"MSI supports 1, 2, 4, 8, 16 or 32 messages, not {nvec}")
        self.nvec = nvec
        self.offset = 0
        self.enabled = False
        self.addr = 0
        self.data = 0
        self.maxmsgnum = 0

    def image(self) -> bytes:
        mmc = (self.nvec.bit_length() - 1) << 1
        return struct.pack("<BBHIIH", PCIY_MSI, 0, MSICTRL_64BIT | mmc, 0, 0, 0)

    def install(self, cfg: PciConfigSpace, offset: int) -> None:
        """Set the write masks once the capability sits at ``offset``."""
        self.offset = offset
        cfg.set_wmask(offset + 2, 2, MSICTRL_MME_MASK | MSICTRL_ENABLE)
        cfg.set_wmask(offset + 4, 4, 0xFFFFFFFC)
        cfg.set_wmask(offset + 8, 4, 0xFFFFFFFF)
        cfg.set_wmask(offset + 12, 2, 0xFFFF)

    def overlaps(self, off: int, size: int) -> bool:
        return self.offset < off + size and off < self.offset + self.LENGTH

    def derive(self, cfg: PciConfigSpace) -> tuple[bool, int, int, int]:
        """(enabled, addr, data, maxmsgnum) as the registers now say."""
        o = self.offset
        ctrl = cfg.get16(o + 2)
        addr = cfg.get32(o + 4) | (cfg.get32(o + 8) << 32)
        data = cfg.get16(o + 12)
        enabled = bool(ctrl & MSICTRL_ENABLE)
        # bhyve grants what the guest enabled (MME), not min(MME, MMC).
        maxmsg = 1 << ((ctrl & MSICTRL_MME_MASK) >> 4) if enabled else 0
        return enabled, addr, data, maxmsg

    def refresh(self, cfg: PciConfigSpace) -> None:
        self.enabled, self.addr, self.data, self.maxmsgnum = self.derive(cfg)

    def send(self, sender: MsiSender, n: int) -> bool:
        if not self.enabled or not 0 <= n < self.maxmsgnum:
            return False
        sender.send(self.addr, (self.data + n) & 0xFFFFFFFF)
        return True


class MsixCapability:
    """The MSI-X capability, its table and its pending bits."""

    LENGTH = 12

    def __init__(self, nvec: int, bar: int, table_offset: int, pba_offset: int) -> None:
        if not 1 <= nvec <= MAX_MSIX_ENTRIES:
            raise ValueError(f"MSI-X supports 1..{MAX_MSIX_ENTRIES} vectors, not {nvec}")
        if not 0 <= bar <= 5:
            raise ValueError(f"MSI-X BAR index {bar} out of range")
        if table_offset & 7 or pba_offset & 7:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.nvec = nvec
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table_bytes = nvec * MSIX_ENTRY_SIZE
        self.pba_bytes = pba_size(nvec)
        if (table_offset < pba_offset + self.pba_bytes and
                pba_offset < table_offset + self.table_bytes):
            raise ValueError("MSI-X table and PBA overlap")
        self.offset = 0
        self.enabled = False
        self.function_mask = False
        self.table = bytearray(self.table_bytes)
        self.pending = bytearray(self.pba_bytes)
        self.reset_table()

    @property
    def span(self) -> int:
        """Bytes of the BAR the table and PBA occupy."""
        return max(self.table_offset + self.table_bytes, self.pba_offset + self.pba_bytes)

    def reset_table(self) -> None:
        """Every vector starts masked (PCI 3.0 6.8.2.9)."""
        self.table[:] = bytes(self.table_bytes)
        for i in range(self.nvec):
            self.table[i * MSIX_ENTRY_SIZE + 12] = MSIX_VCTRL_MASK
        self.pending[:] = bytes(self.pba_bytes)

    def image(self) -> bytes:
        return struct.pack("<BBHII", PCIY_MSIX, 0, self.nvec - 1,
                           self.table_offset | self.bar, self.pba_offset | self.bar)

    def install(self, cfg: PciConfigSpace, offset: int) -> None:
        self.offset = offset
        cfg.set_wmask(offset + 2, 2, MSIXCTRL_ENABLE | MSIXCTRL_FUNCTION_MASK)

    def overlaps(self, off: int, size: int) -> bool:
        return self.offset < off + size and off < self.offset + self.LENGTH

    def derive(self, cfg: PciConfigSpace) -> tuple[bool, bool]:
        ctrl = cfg.get16(self.offset + 2)
        return bool(ctrl & MSIXCTRL_ENABLE), bool(ctrl & MSIXCTRL_FUNCTION_MASK)

    def refresh(self, cfg: PciConfigSpace) -> None:
        self.enabled, self.function_mask = self.derive(cfg)

    # --- table and PBA as seen through the BAR ------------------------------
    def in_table(self, off: int) -> bool:
        return self.table_offset <= off < self.table_offset + self.table_bytes

    def in_pba(self, off: int) -> bool:
        return self.pba_offset <= off < self.pba_offset + self.pba_bytes

    def table_read(self, off: int, size: int) -> int:
        """1-, 4- or 8-byte aligned reads (bhyve allows bytes for ddb)."""
        rel = off - self.table_offset
        if size not in (1, 4, 8) or rel % size or rel + size > self.table_bytes:
            return ones(size)
        return int.from_bytes(self.table[rel:rel + size], "little")

    def table_write(self, off: int, size: int, value: int) -> list[int]:
        """4- or 8-byte aligned writes; returns entries whose mask was lifted."""
        rel = off - self.table_offset
        if size not in (4, 8) or rel % size or rel + size > self.table_bytes:
            return []
        idx = rel // MSIX_ENTRY_SIZE
        was_masked = self.entry_masked(idx)
        self.table[rel:rel + size] = (value & ones(size)).to_bytes(size, "little")
        return [idx] if was_masked and not self.entry_masked(idx) else []

    def pba_read(self, off: int, size: int) -> int:
        rel = off - self.pba_offset
        if size not in (1, 2, 4, 8) or rel % size:
            return ones(size)
        chunk = bytes(self.pending[rel:rel + size]).ljust(size, b"\0")
        return int.from_bytes(chunk, "little")

    # --- vectors -------------------------------------------------------------
    def entry(self, idx: int) -> tuple[int, int, int]:
        return _ENTRY.unpack_from(self.table, idx * MSIX_ENTRY_SIZE)

    def entry_masked(self, idx: int) -> bool:
        return bool(self.table[idx * MSIX_ENTRY_SIZE + 12] & MSIX_VCTRL_MASK)

    def is_pending(self, idx: int) -> bool:
        return bool(self.pending[idx >> 3] & (1 << (idx & 7)))

    def _set_pending(self, idx: int, on: bool) -> None:
        if on:
            self.pending[idx >> 3] |= 1 << (idx & 7)
        else:
            self.pending[idx >> 3] &= ~(1 << (idx & 7)) & 0xFF

    def fire(self, sender: MsiSender, idx: int) -> bool:
        """Send vector ``idx`` or, while masked, latch it as pending."""
        if not 0 <= idx < self.nvec:
            return False
        if self.function_mask or self.entry_masked(idx):
            self._set_pending(idx, True)
            return False
        self._set_pending(idx, False)
        addr, data, _ = self.entry(idx)
        sender.send(addr, data)
        return True

    def flush(self, sender: MsiSender, only: list[int] | None = None) -> None:
        """Send pending vectors that are no longer masked."""
        if self.function_mask or not any(self.pending):
            return
        for idx in (only if only is not None else range(self.nvec)):
            if self.is_pending(idx) and not self.entry_masked(idx):
                self.fire(sender, idx)
