"""i8042 controller with its PS/2 keyboard and mouse, driven as a guest driver does."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bhyvepy.dev import atkbdc as K
from bhyvepy.dev.atkbdc import Atkbdc, AtkbdcState
from bhyvepy.snapshot.state import decode, encode, strategy
from bhyvepy.vmm.exits import SuspendHow
from irq_testkit import RecordingLine


def Line() -> RecordingLine:
    return RecordingLine(pulsed=True, why="i8042 interrupts are pulsed")


class Harness:
    def __init__(self) -> None:
        self.irq1, self.irq12 = Line(), Line()
        self.suspends: list[SuspendHow] = []
        self.c = Atkbdc(self.irq1, self.irq12, self.suspends.append)

    def status(self) -> int:
        return self.c.read(4, 1)

    def cmd(self, val: int) -> None:
        self.c.write(4, 1, val)

    def data_out(self, val: int) -> None:
        self.c.write(0, 1, val)

    def data_in(self) -> int:
        return self.c.read(0, 1)

    def read_all(self) -> list[int]:
        got = []
        while self.status() & K.STS_OBF:
            got.append(self.data_in())
        return got

    def set_command_byte(self, val: int) -> None:
        self.cmd(K.C_WRITE_RAM)
        self.data_out(val)


@pytest.fixture
def h():
    return Harness()


def test_self_test_and_interface_tests(h):
    h.cmd(K.C_SELF_TEST)
    assert h.status() & K.STS_OBF and h.status() & K.STS_CMD
    assert h.data_in() == 0x55
    assert not h.status() & K.STS_OBF
    h.cmd(K.C_KBD_TEST)
    assert h.read_all() == [0x00]
    h.cmd(K.C_AUX_TEST)
    assert h.read_all() == [0x00]
    assert h.irq1.pulses == 0                          # interrupts not enabled yet


def test_command_byte_and_sys_flag(h):
    h.set_command_byte(0x47)
    assert not h.status() & K.STS_CMD                  # last write was data
    assert h.status() & K.STS_SYS
    h.cmd(K.C_READ_RAM)
    assert h.read_all() == [0x47]
    assert h.irq1.pulses == 1                           # KBD_INT enabled in 0x47
    h.cmd(0x65)                                         # write RAM byte 5
    h.data_out(0x99)
    h.cmd(0x25)
    assert h.read_all() == [0x99]
    h.set_command_byte(0x00)
    assert not h.status() & K.STS_SYS


def test_keyboard_reset_identify_leds_scancode_set(h):
    h.set_command_byte(K.CB_KBD_INT)
    h.data_out(0xFF)
    assert h.read_all() == [0xFA, 0xAA]
    assert h.irq1.pulses == 2                           # one per byte
    h.data_out(0xF2)
    assert h.read_all() == [0xFA, 0xAB, 0x83]
    h.data_out(0xED)
    h.data_out(0x07)
    assert h.read_all() == [0xFA, 0xFA] and h.c.kbd.leds == 7
    h.data_out(0xF0)
    h.data_out(0x00)
    assert h.read_all() == [0xFA, 0xFA, 2]
    h.data_out(0xF0)
    h.data_out(0x03)
    h.data_out(0xF0)
    h.data_out(0x00)
    assert h.read_all() == [0xFA, 0xFA, 0xFA, 0xFA, 3]
    h.data_out(0xEE)
    assert h.read_all() == [0xEE]
    h.data_out(0xF5)                                    # disable scanning
    assert h.read_all() == [0xFA]
    assert not h.c.key_event(b"\x1c")
    h.data_out(0xF4)
    assert h.read_all() == [0xFA]
    assert h.c.key_event(b"\x1c")
    assert h.read_all() == [0x1C]                       # untranslated set 2


def test_translation_to_set_1(h):
    h.set_command_byte(K.CB_XLATE | K.CB_KBD_INT)
    h.c.key_event(b"\x1c")                              # 'A' pressed (set 2)
    h.c.key_event(b"\xf0\x1c")                          # released
    h.c.key_event(b"\xe0\x75")                          # up arrow
    assert h.read_all() == [0x1E, 0x9E, 0xE0, 0x48]
    assert h.irq1.pulses == 4


def test_disabled_keyboard_port_holds_data(h):
    h.set_command_byte(K.CB_KBD_INT)
    h.cmd(K.C_KBD_DISABLE)
    h.c.key_event(b"\x29")
    assert not h.status() & K.STS_OBF
    h.cmd(K.C_KBD_ENABLE)
    assert h.read_all() == [0x29]


def test_mouse_reset_id_and_stream(h):
    h.set_command_byte(K.CB_KBD_INT | K.CB_AUX_INT)
    h.cmd(K.C_AUX_ENABLE)
    h.cmd(K.C_WRITE_AUX)
    h.data_out(0xFF)
    assert h.status() & K.STS_AUX_OBF
    assert h.read_all() == [0xFA, 0xAA, 0x00]
    assert h.irq12.pulses == 3 and h.irq1.pulses == 0
    h.cmd(K.C_WRITE_AUX)
    h.data_out(0xF2)
    assert h.read_all() == [0xFA, 0x00]
    h.cmd(K.C_WRITE_AUX)
    h.data_out(0xF4)                                    # enable data reporting
    assert h.read_all() == [0xFA]
    h.c.mouse_event(5, -3, 0x01)
    assert h.read_all() == [0x08 | 0x01 | 0x20, 5, 0xFD]
    h.c.mouse_event(300, 0, 0)
    b0, b1, _ = h.read_all()
    assert b0 & 0x40 and b1 == 255                       # X overflow, clamped
    h.cmd(K.C_WRITE_AUX)
    h.data_out(0xE9)                                    # status request
    assert h.read_all() == [0xFA, 0x20, 4, 100]
    h.cmd(K.C_WRITE_AUX)
    h.data_out(0xF5)
    assert h.read_all() == [0xFA]
    h.c.mouse_event(1, 1, 0)
    assert h.read_all() == []                           # reporting off


def test_disabled_aux_port_holds_mouse_data(h):
    h.set_command_byte(K.CB_AUX_INT)
    h.cmd(K.C_WRITE_AUX)
    h.data_out(0xF4)
    assert h.read_all() == [0xFA]
    h.cmd(K.C_AUX_DISABLE)
    h.c.mouse_event(1, 1, 0)                            # not reported while disabled
    assert h.read_all() == []
    h.cmd(K.C_AUX_ENABLE)
    h.c.mouse_event(2, 0, 0)
    assert h.read_all() == [0x08, 3, 1]                  # motion accumulated meanwhile


def test_write_output_buffers(h):
    h.set_command_byte(K.CB_KBD_INT | K.CB_AUX_INT)
    h.cmd(K.C_WRITE_KBD_OBUF)
    h.data_out(0x42)
    assert not h.status() & K.STS_AUX_OBF
    assert h.read_all() == [0x42] and h.irq1.pulses == 1
    h.cmd(K.C_WRITE_AUX_OBUF)
    h.data_out(0x43)
    assert h.status() & K.STS_AUX_OBF
    assert h.read_all() == [0x43] and h.irq12.pulses == 1


def test_cpu_reset_line(h):
    h.cmd(K.C_PULSE_RESET)
    assert h.suspends == [SuspendHow.RESET]
    h.cmd(0xFF)                                         # pulse nothing
    assert h.suspends == [SuspendHow.RESET]
    h.cmd(K.C_WRITE_OUTPORT)
    h.data_out(0xDF)                                    # A20 on, reset line high
    assert h.suspends == [SuspendHow.RESET]
    h.cmd(K.C_READ_OUTPORT)
    assert h.read_all() == [0xDF]
    h.cmd(K.C_WRITE_OUTPORT)
    h.data_out(0xDE)                                    # reset line driven low
    assert h.suspends == [SuspendHow.RESET, SuspendHow.RESET]


def test_state_round_trip_keeps_pending_bytes():
    a = Harness()
    a.set_command_byte(K.CB_XLATE)
    a.data_out(0xF2)
    assert a.data_in() == 0xFA                          # 0xAB 0x83 still pending
    state = decode(AtkbdcState, encode(a.c.save_state()))
    b = Harness()
    b.c.restore_state(state)
    assert b.read_all() == a.read_all()


@settings(max_examples=60, deadline=None)
@given(strategy(AtkbdcState))
def test_state_round_trip(state):
    decoded = decode(AtkbdcState, encode(state))
    assert decoded == state
    a, b = Harness(), Harness()
    a.c.restore_state(decoded)
    b.c.restore_state(decode(AtkbdcState, encode(a.c.save_state())))
    assert a.c.save_state() == b.c.save_state()
    assert a.status() == b.status()
    assert [a.data_in() for _ in range(8)] == [b.data_in() for _ in range(8)]


access = st.tuples(st.booleans(), st.sampled_from([0, 4]), st.sampled_from([1, 2, 4]),
                   st.integers(0, 0xFFFFFFFF))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(access, max_size=80), st.binary(max_size=12))
def test_random_accesses_never_raise(ops, keys):
    h = Harness()
    for i, (is_write, off, size, val) in enumerate(ops):
        if is_write:
            h.c.write(off, size, val & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= h.c.read(off, size) < 1 << (8 * size)
        if i % 7 == 3:
            h.c.key_event(keys)
            h.c.mouse_event(i, -i, i)
    decode(AtkbdcState, encode(h.c.save_state()))
