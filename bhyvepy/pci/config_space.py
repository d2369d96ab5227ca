"""One PCI function's configuration space as bytes plus write masks.

A guest may write any byte of config space with any value; what the device
keeps is decided per bit by three masks rather than by code paths per
register, so no guest write can change a read-only field (IDs, class code,
capability links) and every write is handled the same way whatever its size:

* ``wmask``  -- bits the guest may set and clear;
* ``w1c``    -- bits the guest clears by writing 1 (status bits);
* ``volatile`` -- bits the device changes at run time although the guest
  cannot (BAR registers, the INTx status bit).  Only snapshot validation
  uses it: every other read-only bit must be the same in a restored image as
  in the freshly built device, which is how a snapshot of one device type is
  refused for another.

Device set-up code writes through :meth:`set8`/:meth:`set16`/:meth:`set32`,
which ignore the masks.
"""

from __future__ import annotations

# --- type 0 header offsets (PCI Local Bus 3.0 section 6.1) -------------------
PCIR_VENDOR = 0x00
PCIR_DEVICE = 0x02
PCIR_COMMAND = 0x04
PCIR_STATUS = 0x06
PCIR_REVID = 0x08
PCIR_PROGIF = 0x09
PCIR_SUBCLASS = 0x0A
PCIR_CLASS = 0x0B
PCIR_CACHELNSZ = 0x0C
PCIR_LATTIMER = 0x0D
PCIR_HDRTYPE = 0x0E
PCIR_BIST = 0x0F
PCIR_BAR0 = 0x10
PCIR_CIS = 0x28
PCIR_SUBVEND_0 = 0x2C
PCIR_SUBDEV_0 = 0x2E
PCIR_BIOS = 0x30
PCIR_CAP_PTR = 0x34
PCIR_INTLINE = 0x3C
PCIR_INTPIN = 0x3D
PCIR_MINGNT = 0x3E
PCIR_MAXLAT = 0x3F

PCI_NUM_BARS = 6
CAP_START = 0x40          # first capability (bhyve's CAP_START_OFFSET)
STD_SIZE = 0x100          # conventional config space
EXT_SIZE = 0x1000         # with PCIe extended config space

# command register bits
CMD_PORTEN = 0x0001
CMD_MEMEN = 0x0002
CMD_BUSMASTER = 0x0004
CMD_INTX_DISABLE = 0x0400
#: Writable command bits: bits 0-6 and 8-10 (bit 7 is reserved since PCI 3.0);
#: bhyve's read-only mask for the command/status dword is 0xFFFFF880.
CMD_WRITABLE = 0x077F

# status register bits
STATUS_INTX = 0x0008
STATUS_CAPLIST = 0x0010
#: Error bits the guest clears by writing 1 (8, 11-15).
STATUS_W1C = 0xF900

HDRTYPE_MFDEV = 0x80


def ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class PciConfigSpace:
    """4 KiB of config space (256 conventional + extended) with bit masks."""

    __slots__ = ("data", "wmask", "w1c", "volatile")

    def __init__(self) -> None:
        self.data = bytearray(EXT_SIZE)
        self.wmask = bytearray(EXT_SIZE)
        self.w1c = bytearray(EXT_SIZE)
        self.volatile = bytearray(EXT_SIZE)
        # Extended space: no extended capabilities (a zero header at 0x100),
        # all-ones beyond, nothing writable -- what bhyve answers there.
        self.data[STD_SIZE + 4:] = b"\xff" * (EXT_SIZE - STD_SIZE - 4)
        self._default_masks()

    def _default_masks(self) -> None:
        self.set_wmask(PCIR_COMMAND, 2, CMD_WRITABLE)
        self.set_w1c(PCIR_STATUS, 2, STATUS_W1C)
        self.volatile[PCIR_STATUS] = STATUS_INTX
        self.set_wmask(PCIR_CACHELNSZ, 1, 0xFF)
        self.set_wmask(PCIR_LATTIMER, 1, 0xFF)
        self.set_wmask(PCIR_INTLINE, 1, 0xFF)
        # BAR registers are emulated by the BAR logic (no expansion ROM yet:
        # its register reads as zero).
        for off in range(PCIR_BAR0, PCIR_BAR0 + 4 * PCI_NUM_BARS):
            self.volatile[off] = 0xFF
        # Device-specific registers after the header are plain storage in
        # bhyve (chipset registers such as the LPC's PIRQ routing live
        # there); capabilities tighten their own bytes when added.
        for off in range(CAP_START, STD_SIZE):
            self.wmask[off] = 0xFF

    # --- raw access for device set-up ---------------------------------------
    def get(self, off: int, size: int) -> int:
        return int.from_bytes(self.data[off:off + size], "little")

    def set(self, off: int, size: int, value: int) -> None:
        self.data[off:off + size] = (value & ones(size)).to_bytes(size, "little")

    def get8(self, off: int) -> int:
        return self.data[off]

    def get16(self, off: int) -> int:
        return self.get(off, 2)

    def get32(self, off: int) -> int:
        return self.get(off, 4)

    def set8(self, off: int, value: int) -> None:
        self.data[off] = value & 0xFF

    def set16(self, off: int, value: int) -> None:
        self.set(off, 2, value)

    def set32(self, off: int, value: int) -> None:
        self.set(off, 4, value)

    def set_wmask(self, off: int, size: int, mask: int) -> None:
        self.wmask[off:off + size] = (mask & ones(size)).to_bytes(size, "little")

    def set_w1c(self, off: int, size: int, mask: int) -> None:
        self.w1c[off:off + size] = (mask & ones(size)).to_bytes(size, "little")

    def set_volatile(self, off: int, size: int, mask: int) -> None:
        self.volatile[off:off + size] = (mask & ones(size)).to_bytes(size, "little")

    # --- guest access ----------------------------------------------------------
    @staticmethod
    def in_range(off: int, size: int) -> bool:
        return 0 <= off and size > 0 and off + size <= EXT_SIZE

    def read(self, off: int, size: int) -> int:
        """A guest read; outside the 4 KiB it reads all-ones."""
        if not self.in_range(off, size):
            return ones(size)
        return self.get(off, size)

    def write(self, off: int, size: int, value: int) -> None:
        """A guest write through the masks; outside the 4 KiB it is dropped."""
        if not self.in_range(off, size):
            return
        data, wm, w1c = self.data, self.wmask, self.w1c
        for i in range(size):
            v = (value >> (8 * i)) & 0xFF
            o = off + i
            m = wm[o]
            b = (data[o] & ~m) | (v & m)
            c = w1c[o] & v
            data[o] = b & ~c & 0xFF

    # --- snapshots --------------------------------------------------------------
    def image(self) -> bytes:
        return bytes(self.data)

    def fixed_mismatch(self, image: bytes) -> int | None:
        """First offset where ``image`` differs from this space in a bit that
        neither the guest nor the device can change, or None."""
        data, wm, w1c, vol = self.data, self.wmask, self.w1c, self.volatile
        for o in range(EXT_SIZE):
            fixed = ~(wm[o] | w1c[o] | vol[o]) & 0xFF
            if (image[o] ^ data[o]) & fixed:
                return o
        return None

    def load(self, image: bytes) -> None:
        if len(image) != EXT_SIZE:
            raise ValueError(f"config space image of {len(image)} bytes, expected {EXT_SIZE}")
        self.data[:] = image
