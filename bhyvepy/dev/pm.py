"""bhyve's ACPI fixed hardware: PM1a event/control, SMI_CMD, GPE0, reset port 0xCF9.

One :class:`PowerManagement` holds the state; its register blocks are small
objects the VM places on the port bus (see :meth:`PowerManagement.ports`):

=========  ======  ====  ===========================================================
block      base    len   registers
=========  ======  ====  ===========================================================
pm1_evt    0x400   4     PM1a_STS (+0, RW1C), PM1a_EN (+2); 16-bit accesses
pm1_cnt    0x404   2     PM1a_CNT: SCI_EN (read-only to the OS), SLP_TYP, SLP_EN
gpe0       0x40C   2     GPE0_STS (+0, RW1C), GPE0_EN (+1); byte accesses
smi_cmd    0xB2    1     write 0xA0 = ACPI enable, 0xA1 = ACPI disable
reset      0xCF9   1     bit 2 written as 1 = reset (hard and soft alike)
=========  ======  ====  ===========================================================

The SCI is ISA IRQ 9, level-triggered: held while any enabled status bit is
set.  Outcomes the VM must act on go through ``on_suspend(how)``: S5 (SLP_EN
with SLP_TYP 5, bhyve's ``_S5`` value) is ``SuspendHow.POWEROFF``, 0xCF9 is
``SuspendHow.RESET``.  Other sleep types are ignored, as in bhyve.

Accesses of a width bhyve does not answer (it aborts the VM for them) are
ignored here and read as all ones; a guest cannot end the VM that way.  One
exception serves the tests: byte accesses to PM1a_EN's port 0x402 are handed
to ``narrow_0x402`` if given, so QEMU's debug console (which SeaBIOS expects
at 0x402) can share the port with the 16-bit register.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from bhyvepy.irq import IrqLine
from bhyvepy.snapshot.state import BOOL, U8, U16, StateError, device_state
from bhyvepy.vmm.exits import SuspendHow

SCI_INT = 9
SMI_CMD = 0xB2
BHYVE_ACPI_ENABLE = 0xA0
BHYVE_ACPI_DISABLE = 0xA1
PM1A_EVT_ADDR = 0x400
PM1A_CNT_ADDR = 0x404
IO_GPE0_BLK = 0x40C
IO_GPE0_LEN = 2
RESET_PORT = 0xCF9
GPE_VMGENC = 0

PM1_TMR_STS, PM1_BM_STS, PM1_GBL_STS = 0x0001, 0x0010, 0x0020
PM1_PWRBTN_STS, PM1_SLPBTN_STS, PM1_RTC_STS, PM1_WAK_STS = 0x0100, 0x0200, 0x0400, 0x8000
PM1_TMR_EN, PM1_GBL_EN, PM1_PWRBTN_EN, PM1_SLPBTN_EN, PM1_RTC_EN = 0x0001, 0x0020, 0x0100, 0x0200, 0x0400
PM1_STS_W1C = PM1_WAK_STS | PM1_RTC_STS | PM1_SLPBTN_STS | PM1_PWRBTN_STS | PM1_BM_STS
PM1_EN_WRITABLE = PM1_RTC_EN | PM1_PWRBTN_EN | PM1_GBL_EN   # GBL_EN only so ACPICA stops complaining

PM1_SCI_EN, PM1_SLP_TYP, PM1_SLP_EN, PM1_ALWAYS_ZERO = 0x0001, 0x1C00, 0x2000, 0xC003
SLP_TYP_S5 = 5
GPE0_VALID = 1 << GPE_VMGENC

_SCI_SOURCES = ((PM1_TMR_EN, PM1_TMR_STS), (PM1_GBL_EN, PM1_GBL_STS), (PM1_PWRBTN_EN, PM1_PWRBTN_STS),
                (PM1_SLPBTN_EN, PM1_SLPBTN_STS), (PM1_RTC_EN, PM1_RTC_STS))

SuspendCallback = Callable[[SuspendHow], None]
Port = Callable[[int, int], int]


@device_state("pm", version=1)
@dataclass
class PmState:
    pm1_status: U16 = 0
    pm1_enable: U16 = 0
    pm1_control: U16 = 0
    gpe0_active: U8 = 0
    gpe0_enabled: U8 = 0
    reset_control: U8 = 0
    sci_active: BOOL = False

    def validate(self) -> None:
        if self.pm1_enable & ~PM1_EN_WRITABLE:
            raise StateError(f"pm: PM1 enable {self.pm1_enable:#x} has bits bhyve never sets")
        if self.pm1_control & (PM1_SLP_EN | (PM1_ALWAYS_ZERO & ~PM1_SCI_EN)):
            raise StateError(f"pm: PM1 control {self.pm1_control:#x} has write-only or reserved bits")
        if (self.gpe0_active | self.gpe0_enabled) & ~GPE0_VALID:
            raise StateError("pm: GPE0 bits outside the allocated ones")

    @classmethod
    def hypothesis_strategy(cls):  # pragma: no cover - exercised by tests
        from hypothesis import strategies as st
        ctl_bits = 0xFFFF & ~(PM1_SLP_EN | (PM1_ALWAYS_ZERO & ~PM1_SCI_EN))
        return st.builds(
            cls, pm1_status=st.integers(0, 0xFFFF),
            pm1_enable=st.integers(0, 0xFFFF).map(lambda v: v & PM1_EN_WRITABLE),
            pm1_control=st.integers(0, 0xFFFF).map(lambda v: v & ctl_bits),
            gpe0_active=st.integers(0, GPE0_VALID), gpe0_enabled=st.integers(0, GPE0_VALID),
            reset_control=st.integers(0, 0xFF), sci_active=st.booleans())


class _Block:
    """One register block: ``read(offset, size)`` / ``write(offset, size, value)``."""

    def __init__(self, read: Port, write: Callable[[int, int, int], None]) -> None:
        self.read = read
        self.write = write


class PowerManagement:
    """ACPI PM1a/GPE0/SMI_CMD/reset registers and the SCI.

    The power button (SIGTERM under bhyve): bhyve installs its SIGTERM handler
    only when the guest writes ACPI_ENABLE to SMI_CMD, and puts the previous
    disposition back on ACPI_DISABLE.  So before the guest's OS has taken over
    ACPI (firmware, loaders, non-ACPI guests) SIGTERM keeps its default action
    and kills the VM process; afterwards it presses the power button and the
    guest shuts down cleanly (S5, exit status 1).  The VM follows this by
    watching ``on_acpi_enable(enabled)`` (called at each change and after a
    restore) or the :attr:`acpi_enabled` property, and calls
    :meth:`power_button` from its SIGTERM handler.
    """

    state_class = PmState

    def __init__(self, sci: IrqLine, on_suspend: SuspendCallback,
                 on_acpi_enable: Callable[[bool], None] | None = None,
                 narrow_0x402: object | None = None) -> None:
        self._sci = sci
        self._on_suspend = on_suspend
        self._on_acpi_enable = on_acpi_enable
        self._narrow = narrow_0x402
        self._lock = threading.RLock()
        self._s = PmState()
        self.pm1_evt = _Block(self._pm1_evt_read, self._pm1_evt_write)
        self.pm1_cnt = _Block(self._pm1_cnt_read, self._pm1_cnt_write)
        self.gpe0 = _Block(self._gpe0_read, self._gpe0_write)
        self.smi_cmd = _Block(lambda off, size: (1 << (8 * size)) - 1, self._smi_write)
        self.reset = _Block(self._reset_read, self._reset_write)

    def ports(self) -> list[tuple[str, int, int, Port, Callable[[int, int, int], None]]]:
        """(name, base, length, read, write) for each block, for the port bus."""
        return [
            ("pm1_evt", PM1A_EVT_ADDR, 4, self.pm1_evt.read, self.pm1_evt.write),
            ("pm1_cnt", PM1A_CNT_ADDR, 2, self.pm1_cnt.read, self.pm1_cnt.write),
            ("gpe0", IO_GPE0_BLK, IO_GPE0_LEN, self.gpe0.read, self.gpe0.write),
            ("smi_cmd", SMI_CMD, 1, self.smi_cmd.read, self.smi_cmd.write),
            ("reset_reg", RESET_PORT, 1, self.reset.read, self.reset.write),
        ]

    # ------------------------------------------------------------ host side

    @property
    def acpi_enabled(self) -> bool:
        """Whether the guest has switched to ACPI mode (SCI_EN via SMI_CMD)."""
        with self._lock:
            return bool(self._s.pm1_control & PM1_SCI_EN)

    def power_button(self) -> None:
        """Press the power button: PWRBTN_STS, and the SCI if the guest enabled it."""
        with self._lock:
            if not self._s.pm1_status & PM1_PWRBTN_STS:
                self._s.pm1_status |= PM1_PWRBTN_STS
                self._sci_update()

    def raise_gpe(self, bit: int) -> None:
        """Signal a general-purpose event (bhyve allocates bit 0: VM generation ID)."""
        mask = 1 << bit
        if not mask & GPE0_VALID:
            raise ValueError(f"GPE bit {bit} is not allocated")
        with self._lock:
            self._s.gpe0_active |= mask
            self._sci_update()

    # ------------------------------------------------------------ SCI

    def _sci_update(self) -> None:
        s = self._s
        need = any(s.pm1_enable & en and s.pm1_status & sts for en, sts in _SCI_SOURCES)
        need = need or bool(s.gpe0_enabled & s.gpe0_active)
        if need and not s.sci_active:
            s.sci_active = True
            self._sci.assert_()
        elif not need and s.sci_active:
            s.sci_active = False
            self._sci.deassert()

    # ------------------------------------------------------------ registers

    def _pm1_evt_read(self, offset: int, size: int) -> int:
        if size == 1 and offset == 2 and self._narrow is not None:
            return self._narrow.read(0, 1)
        if size != 2 or offset not in (0, 2):
            return (1 << (8 * size)) - 1
        with self._lock:
            return self._s.pm1_status if offset == 0 else self._s.pm1_enable

    def _pm1_evt_write(self, offset: int, size: int, value: int) -> None:
        if size == 1 and offset == 2 and self._narrow is not None:
            self._narrow.write(0, 1, value)
            return
        if size != 2 or offset not in (0, 2):
            return
        with self._lock:
            if offset == 0:
                self._s.pm1_status &= ~(value & PM1_STS_W1C)
            else:
                self._s.pm1_enable = value & PM1_EN_WRITABLE
            self._sci_update()

    def _pm1_cnt_read(self, offset: int, size: int) -> int:
        if size != 2 or offset != 0:
            return (1 << (8 * size)) - 1
        with self._lock:
            return self._s.pm1_control

    def _pm1_cnt_write(self, offset: int, size: int, value: int) -> None:
        if size != 2 or offset != 0:
            return
        with self._lock:
            s = self._s
            # SCI_EN belongs to SMI_CMD; SLP_EN and reserved bits are write-only/zero.
            s.pm1_control = (s.pm1_control & PM1_SCI_EN) | (value & ~(PM1_SLP_EN | PM1_ALWAYS_ZERO) & 0xFFFF)
            poweroff = bool(value & PM1_SLP_EN) and (s.pm1_control & PM1_SLP_TYP) >> 10 == SLP_TYP_S5
        if poweroff:
            self._on_suspend(SuspendHow.POWEROFF)

    def _gpe0_read(self, offset: int, size: int) -> int:
        if size != 1 or offset not in (0, 1):
            return (1 << (8 * size)) - 1
        with self._lock:
            return self._s.gpe0_active if offset == 0 else self._s.gpe0_enabled

    def _gpe0_write(self, offset: int, size: int, value: int) -> None:
        if size != 1 or offset not in (0, 1):
            return
        with self._lock:
            if offset == 0:
                self._s.gpe0_active &= ~(value & GPE0_VALID)
            else:
                self._s.gpe0_enabled = value & GPE0_VALID
            self._sci_update()

    def _smi_write(self, offset: int, size: int, value: int) -> None:
        if size != 1 or offset != 0:
            return
        with self._lock:
            before = bool(self._s.pm1_control & PM1_SCI_EN)
            if value == BHYVE_ACPI_ENABLE:
                self._s.pm1_control |= PM1_SCI_EN
            elif value == BHYVE_ACPI_DISABLE:
                self._s.pm1_control &= ~PM1_SCI_EN
            after = bool(self._s.pm1_control & PM1_SCI_EN)
        if before != after and self._on_acpi_enable is not None:
            self._on_acpi_enable(after)

    def _reset_read(self, offset: int, size: int) -> int:
        if size != 1 or offset != 0:
            return (1 << (8 * size)) - 1
        with self._lock:
            return self._s.reset_control

    def _reset_write(self, offset: int, size: int, value: int) -> None:
        if size != 1 or offset != 0:
            return
        with self._lock:
            self._s.reset_control = value & 0xFF
        if value & 0x4:
            self._on_suspend(SuspendHow.RESET)

    # ------------------------------------------------------------ snapshot

    def save_state(self) -> PmState:
        with self._lock:
            s = self._s
            return PmState(s.pm1_status, s.pm1_enable, s.pm1_control, s.gpe0_active,
                           s.gpe0_enabled, s.reset_control, s.sci_active)

    def restore_state(self, state: PmState) -> None:
        state.validate()
        with self._lock:
            was_active = self._s.sci_active
            self._s = PmState(state.pm1_status, state.pm1_enable, state.pm1_control,
                              state.gpe0_active, state.gpe0_enabled, state.reset_control,
                              was_active)
            self._sci_update()
            enabled = bool(self._s.pm1_control & PM1_SCI_EN)
        if self._on_acpi_enable is not None:
            self._on_acpi_enable(enabled)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


__all__ = ["PowerManagement", "PmState", "SCI_INT", "SMI_CMD", "BHYVE_ACPI_ENABLE",
           "BHYVE_ACPI_DISABLE", "PM1A_EVT_ADDR", "PM1A_CNT_ADDR", "IO_GPE0_BLK", "RESET_PORT"]
