"""bhyve's ACPI PM registers: power off, reset, power button and the SCI."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bhyvepy.dev import pm as P
from bhyvepy.dev.pm import PmState, PowerManagement
from bhyvepy.snapshot.state import decode, encode, strategy
from bhyvepy.vmm.exits import SuspendHow
from irq_testkit import RecordingLine


def Line() -> RecordingLine:
    return RecordingLine(pulsed=False, why="the SCI is level-triggered")


class Harness:
    def __init__(self, narrow=None) -> None:
        self.sci = Line()
        self.suspends: list[SuspendHow] = []
        self.acpi: list[bool] = []
        self.pm = PowerManagement(self.sci, self.suspends.append, self.acpi.append, narrow)
        self.ports = {name: (base, length, rd, wr) for name, base, length, rd, wr in self.pm.ports()}

    def out(self, port: int, size: int, value: int) -> None:
        for base, length, _rd, wr in self.ports.values():
            if base <= port < base + length:
                wr(port - base, size, value)
                return
        raise AssertionError(f"port {port:#x} not claimed")

    def inp(self, port: int, size: int) -> int:
        for base, length, rd, _wr in self.ports.values():
            if base <= port < base + length:
                return rd(port - base, size)
        raise AssertionError(f"port {port:#x} not claimed")


@pytest.fixture
def h():
    return Harness()


def test_port_layout(h):
    assert {n: (b, l) for n, (b, l, _r, _w) in h.ports.items()} == {
        "pm1_evt": (0x400, 4), "pm1_cnt": (0x404, 2), "gpe0": (0x40C, 2),
        "smi_cmd": (0xB2, 1), "reset_reg": (0xCF9, 1)}


def test_s5_powers_off(h):
    h.out(0x404, 2, (5 << 10) | P.PM1_SLP_EN)
    assert h.suspends == [SuspendHow.POWEROFF]
    assert not h.inp(0x404, 2) & P.PM1_SLP_EN          # SLP_EN is write-only


def test_other_sleep_types_are_ignored(h):
    for typ in (0, 1, 3, 4, 7):
        h.out(0x404, 2, (typ << 10) | P.PM1_SLP_EN)
    h.out(0x404, 2, 5 << 10)                          # S5 type without SLP_EN
    assert h.suspends == []


def test_sci_en_belongs_to_smi_cmd(h):
    assert not h.pm.acpi_enabled
    h.out(0x404, 2, P.PM1_SCI_EN)
    assert not h.inp(0x404, 2) & P.PM1_SCI_EN           # the OS cannot set it
    h.out(0xB2, 1, P.BHYVE_ACPI_ENABLE)
    assert h.pm.acpi_enabled and h.acpi == [True]
    h.out(0x404, 2, 0)
    assert h.inp(0x404, 2) & P.PM1_SCI_EN               # nor clear it
    h.out(0xB2, 1, P.BHYVE_ACPI_ENABLE)                 # no change, no callback
    h.out(0xB2, 1, P.BHYVE_ACPI_DISABLE)
    assert not h.pm.acpi_enabled and h.acpi == [True, False]
    assert h.inp(0xB2, 1) == 0xFF                       # write-only port


def test_reset_port(h):
    h.out(0xCF9, 1, 0x02)                               # select hard reset: nothing yet
    assert h.suspends == [] and h.inp(0xCF9, 1) == 0x02
    h.out(0xCF9, 1, 0x06)                               # what the FADT reset value does
    assert h.suspends == [SuspendHow.RESET]
    h.out(0xCF9, 2, 0x0606)                              # wrong width: ignored
    assert h.suspends == [SuspendHow.RESET]


def test_power_button_raises_sci_when_enabled(h):
    h.out(0xB2, 1, P.BHYVE_ACPI_ENABLE)
    h.out(0x402, 2, P.PM1_PWRBTN_EN)
    assert h.inp(0x402, 2) == P.PM1_PWRBTN_EN
    h.pm.power_button()
    assert h.inp(0x400, 2) & P.PM1_PWRBTN_STS
    assert h.sci.level
    h.pm.power_button()                                  # pressing again changes nothing
    assert h.sci.events == ["assert"]
    h.out(0x400, 2, P.PM1_PWRBTN_STS)                    # the OS acknowledges (W1C)
    assert not h.inp(0x400, 2) & P.PM1_PWRBTN_STS
    assert not h.sci.level


def test_power_button_without_enable_sets_status_only(h):
    h.pm.power_button()
    assert h.inp(0x400, 2) & P.PM1_PWRBTN_STS
    assert not h.sci.level
    h.out(0x402, 2, P.PM1_PWRBTN_EN)                     # enabling later raises it
    assert h.sci.level
    h.out(0x402, 2, 0)
    assert not h.sci.level


def test_enable_register_keeps_only_bhyve_bits(h):
    h.out(0x402, 2, 0xFFFF)
    assert h.inp(0x402, 2) == P.PM1_RTC_EN | P.PM1_PWRBTN_EN | P.PM1_GBL_EN
    h.out(0x400, 2, 0xFFFF)                              # clearing nothing set is harmless
    assert h.inp(0x400, 2) == 0


def test_gpe0_vm_generation_event(h):
    h.pm.raise_gpe(P.GPE_VMGENC)
    assert h.inp(0x40C, 1) == 1 and not h.sci.level
    h.out(0x40D, 1, 0xFF)
    assert h.inp(0x40D, 1) == 1 and h.sci.level
    h.out(0x40C, 1, 1)
    assert not h.sci.level
    with pytest.raises(ValueError):
        h.pm.raise_gpe(3)


def test_wrong_widths_do_not_end_the_vm(h):
    assert h.inp(0x400, 4) == 0xFFFFFFFF
    assert h.inp(0x401, 1) == 0xFF
    h.out(0x400, 1, 0xFF)
    h.out(0x404, 4, (5 << 10) | P.PM1_SLP_EN)
    assert h.suspends == []


def test_narrow_access_at_0x402_goes_to_overlay():
    class Console:
        def __init__(self) -> None:
            self.data = bytearray()

        def read(self, off: int, size: int) -> int:
            return 0xE9

        def write(self, off: int, size: int, value: int) -> None:
            self.data.append(value)

    con = Console()
    h = Harness(narrow=con)
    assert h.inp(0x402, 1) == 0xE9
    h.out(0x402, 1, ord("A"))
    h.out(0x402, 2, P.PM1_PWRBTN_EN)
    assert con.data == b"A" and h.inp(0x402, 2) == P.PM1_PWRBTN_EN


def test_restore_reasserts_sci_and_reports_acpi_mode():
    src = Harness()
    src.out(0xB2, 1, P.BHYVE_ACPI_ENABLE)
    src.out(0x402, 2, P.PM1_PWRBTN_EN)
    src.pm.power_button()
    state = decode(PmState, encode(src.pm.save_state()))
    dst = Harness()
    dst.pm.restore_state(state)
    assert dst.sci.level and dst.acpi == [True] and dst.pm.acpi_enabled
    assert dst.inp(0x400, 2) & P.PM1_PWRBTN_STS


@settings(max_examples=60, deadline=None)
@given(strategy(PmState))
def test_state_round_trip(state):
    decoded = decode(PmState, encode(state))
    assert decoded == state
    a, b = Harness(), Harness()
    a.pm.restore_state(decoded)
    b.pm.restore_state(decode(PmState, encode(a.pm.save_state())))
    regs = lambda x: [x.inp(0x400, 2), x.inp(0x402, 2), x.inp(0x404, 2), x.inp(0x40C, 1),
                      x.inp(0x40D, 1), x.inp(0xCF9, 1)]
    assert regs(a) == regs(b)
    assert a.sci.level == b.sci.level


def test_restore_refuses_bad_state(h):
    with pytest.raises(ValueError):
        h.pm.restore_state(PmState(pm1_control=P.PM1_SLP_EN))


ports = [0x400, 0x401, 0x402, 0x403, 0x404, 0x405, 0x40C, 0x40D, 0xB2, 0xCF9]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(ports), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF)), max_size=60))
def test_random_accesses_never_raise(ops):
    h = Harness()
    for is_write, port, size, val in ops:
        if is_write:
            h.out(port, size, val & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= h.inp(port, size) < 1 << (8 * size)
    decode(PmState, encode(h.pm.save_state()))
    assert all(isinstance(s, SuspendHow) for s in h.suspends)
