"""Boot ROM loading (``-l bootrom,ROM[,VARS]``).

bhyve maps the ROM read-only so that it ends at 4 GiB, where the CPU's reset
vector is.  bhyvepy also copies the ROM's top 128 KiB into RAM at
0xE0000-0xFFFFF, as a PC chipset's shadow RAM would, so that legacy BIOS
images (Debian's SeaBIOS) that jump to or relocate into the F-segment run
as well as UEFI images that never look there.  A variables file (UEFI NVRAM)
sits directly below the ROM, writable by the guest, and is written back to
its file when the VM ends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bhyvepy.errors import BhyveExit, ExitStatus
from bhyvepy.layout import BOOTROM_SEG_SIZE, BOOTROM_SHADOW_SIZE, BOOTROM_SHADOW_TOP, HIGHMEM_BASE
from bhyvepy.memory import GuestMemory
from bhyvepy.vmm import MemoryRegion, VirtualMachine

PAGE = 4096


@dataclass
class LoadedBootrom:
    rom: MemoryRegion
    vars: MemoryRegion | None
    vars_path: str | None

    def flush_vars(self) -> None:
        """Persist guest changes to the variables file (UEFI NVRAM)."""
        if self.vars is None or self.vars_path is None:
            return
        data = bytes(memoryview(self.vars.buf)[: self.vars.size])  # type: ignore[arg-type]
        tmp = self.vars_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.vars_path)


def _read_image(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(BOOTROM_SEG_SIZE + 1)
    except OSError as e:
        raise BhyveExit(f"Error opening {what} \"{path}\": {e.strerror}", ExitStatus.ERROR) from None
    if not data:
        raise BhyveExit(f"Invalid {what} size 0", ExitStatus.ERROR)
    if len(data) % PAGE != 0:
        raise BhyveExit(f"Invalid {what} size {len(data)}: not a multiple of the page size", ExitStatus.ERROR)
    return data


def load_bootrom(vm: VirtualMachine, mem: GuestMemory, rom_path: str, vars_path: str | None) -> LoadedBootrom:
    rom = _read_image(rom_path, "bootrom")
    vars_data = _read_image(vars_path, "bootvars") if vars_path else b""
    if len(rom) + len(vars_data) > BOOTROM_SEG_SIZE:
        raise BhyveExit(
            f"Invalid bootrom size {len(rom) + len(vars_data)}: larger than {BOOTROM_SEG_SIZE >> 20} MiB",
            ExitStatus.ERROR)

    rom_gpa = HIGHMEM_BASE - len(rom)
    rom_region = vm.map_devmem("bootrom", rom_gpa, len(rom), readonly=True)
    memoryview(rom_region.buf)[: len(rom)] = rom  # type: ignore[index]

    vars_region = None
    if vars_data:
        vars_region = vm.map_devmem("bootvars", rom_gpa - len(vars_data), len(vars_data), readonly=False)
        memoryview(vars_region.buf)[: len(vars_data)] = vars_data  # type: ignore[index]

    shadow = rom[-BOOTROM_SHADOW_SIZE:]
    shadow_gpa = BOOTROM_SHADOW_TOP - len(shadow)
    if mem.contains(shadow_gpa, len(shadow)):
        mem.write(shadow_gpa, shadow)
    return LoadedBootrom(rom_region, vars_region, vars_path)
