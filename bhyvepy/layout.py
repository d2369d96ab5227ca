"""The guest-physical and I/O-port map of a bhyve amd64 VM, in one place.

Guests (firmware, FreeBSD, Linux) find devices where bhyve puts them, and
snapshots taken by one bhyvepy must restore into another, so these numbers
are part of the ABI.  Values follow bhyve's amd64 sources.
"""

from __future__ import annotations

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# --- memory -----------------------------------------------------------------
LOWMEM_LIMIT = 3 * GiB            # RAM above this moves to HIGHMEM_BASE
HIGHMEM_BASE = 4 * GiB
BOOTROM_SEG_SIZE = 16 * MiB       # [4G-16M, 4G) is reserved for the boot ROM (+ vars)
BOOTROM_SHADOW_TOP = 0x100000     # the ROM's top is copied to RAM ending here ...
BOOTROM_SHADOW_SIZE = 128 * KiB   # ... at most this much (0xE0000-0xFFFFF)
MPTABLE_BASE = 0xF0000            # bhyve's MP table (x86.mptable)
ACPI_BASE = 0xF2400               # bhyve's ACPI tables in guest memory (acpi_tables_in_memory)
ACPI_MAX_SIZE = 0xDC00            # bhyve: tables must end below 0x100000

PCI_MEMBASE32 = LOWMEM_LIMIT      # 32-bit BARs from 3 GiB ...
PCI_ECFG_BASE = 0xE0000000        # ... to the PCIe ECAM window
PCI_ECFG_SIZE = 256 * MiB
IOAPIC_BASE = 0xFEC00000
HPET_BASE = 0xFED00000
HPET_SIZE = 0x400
LAPIC_BASE = 0xFEE00000

# --- I/O ports ----------------------------------------------------------------
# (PM1, SMI_CMD, reset and PCI configuration ports live with their devices:
# bhyvepy/dev/pm.py and bhyvepy/pci/bus.py.)
PORT_POST = 0x84                  # bhyve's post.c claims 0x84 (reads 0xFF); 0x80 is unclaimed
PORT_ATKBDC_DATA = 0x60
PORT_ATKBDC_CMD = 0x64
PORT_RTC = 0x70
PORT_PMTMR = 0x408                # 4 bytes
PORT_DEBUGCON = 0x402             # QEMU-style debug console (bhyvepy, off by default)
PCI_IOBASE = 0x2000               # I/O BARs from here ...
PCI_IOLIMIT = 0x10000             # ... to the top of port space

#: COM1..COM4: (port base, ISA IRQ), the PC convention bhyve follows.
COM_PORTS = {1: (0x3F8, 4), 2: (0x2F8, 3), 3: (0x3E8, 4), 4: (0x2E8, 3)}
SCI_IRQ = 9
