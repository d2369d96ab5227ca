"""Config-space masks: read-only, read/write and write-1-to-clear bits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bhyvepy.pci.config_space import (CMD_WRITABLE, EXT_SIZE, PCIR_COMMAND, PCIR_STATUS,
                                      PCIR_VENDOR, STATUS_W1C, PciConfigSpace)


def test_read_only_bytes_ignore_guest_writes() -> None:
    c = PciConfigSpace()
    c.set32(PCIR_VENDOR, 0x12345678)
    c.write(PCIR_VENDOR, 4, 0xFFFFFFFF)
    assert c.read(PCIR_VENDOR, 4) == 0x12345678
    c.write(PCIR_VENDOR + 1, 1, 0)
    assert c.read(PCIR_VENDOR, 4) == 0x12345678


def test_command_register_keeps_only_writable_bits() -> None:
    c = PciConfigSpace()
    c.write(PCIR_COMMAND, 2, 0xFFFF)
    assert c.read(PCIR_COMMAND, 2) == CMD_WRITABLE
    c.write(PCIR_COMMAND, 1, 0x00)
    assert c.read(PCIR_COMMAND, 2) == CMD_WRITABLE & 0xFF00


def test_status_error_bits_are_write_one_to_clear() -> None:
    c = PciConfigSpace()
    c.set16(PCIR_STATUS, 0xF910)           # errors + capability list (read-only)
    c.write(PCIR_STATUS, 2, 0x0100)        # clear one error bit
    assert c.read(PCIR_STATUS, 2) == 0xF810
    c.write(PCIR_STATUS, 2, 0x0000)        # writing 0 changes nothing
    assert c.read(PCIR_STATUS, 2) == 0xF810
    c.write(PCIR_STATUS, 2, 0xFFFF)        # all error bits clear, cap bit stays
    assert c.read(PCIR_STATUS, 2) == 0x0010 & ~STATUS_W1C


def test_dword_write_to_command_and_status_in_one_go() -> None:
    c = PciConfigSpace()
    c.set16(PCIR_STATUS, 0x8010)
    c.write(PCIR_COMMAND, 4, 0x8000_0007)
    assert c.read(PCIR_COMMAND, 2) == 0x0007
    assert c.read(PCIR_STATUS, 2) == 0x0010


def test_extended_space_reads_zero_header_then_ones_and_ignores_writes() -> None:
    c = PciConfigSpace()
    assert c.read(0x100, 4) == 0
    assert c.read(0x104, 4) == 0xFFFFFFFF
    c.write(0x200, 4, 0)
    assert c.read(0x200, 4) == 0xFFFFFFFF


def test_out_of_range_access_is_harmless() -> None:
    c = PciConfigSpace()
    assert c.read(EXT_SIZE - 2, 4) == 0xFFFFFFFF
    c.write(EXT_SIZE - 2, 4, 0)
    c.write(-1, 1, 0)
    assert c.read(-1, 1) == 0xFF


def test_fixed_mismatch_ignores_writable_and_volatile_bits() -> None:
    c = PciConfigSpace()
    c.set16(PCIR_VENDOR, 0x1AF4)
    img = bytearray(c.image())
    img[PCIR_COMMAND] = 0x07          # writable
    img[PCIR_STATUS] |= 0x08          # INTx status (volatile)
    img[0x10:0x14] = b"\x01\x20\x00\x00"   # BAR register (volatile)
    assert c.fixed_mismatch(bytes(img)) is None
    img[PCIR_VENDOR] = 0x00
    assert c.fixed_mismatch(bytes(img)) == PCIR_VENDOR


@settings(max_examples=200)
@given(off=st.integers(0, EXT_SIZE - 1), size=st.sampled_from([1, 2, 4]),
       value=st.integers(0, 2**32 - 1))
def test_any_write_respects_masks(off: int, size: int, value: int) -> None:
    c = PciConfigSpace()
    c.set16(PCIR_STATUS, 0xFFFF)
    before = c.image()
    c.write(off, size, value)
    after = c.image()
    for o in range(EXT_SIZE):
        changed = before[o] ^ after[o]
        allowed = c.wmask[o] | c.w1c[o]
        assert changed & ~allowed == 0
        # write-1-to-clear bits can only go from 1 to 0
        assert (after[o] & ~before[o]) & c.w1c[o] & ~c.wmask[o] == 0
