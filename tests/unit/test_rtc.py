"""RTC/CMOS model (vrtc re-created), driven through ports 0x70/0x71 as a guest does."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bhyvepy.dev import rtc as R
from bhyvepy.dev.rtc import Rtc, RtcError, RtcState, rtc_init_nvram
from bhyvepy.snapshot.state import decode, encode, strategy
from irq_testkit import RecordingLine

NS = 1_000_000_000


def Line() -> RecordingLine:
    return RecordingLine(pulsed=True, why="the RTC pulses its IRQ")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * NS

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * NS)


@pytest.fixture
def fake():
    clock = FakeClock()
    line = Line()
    rtc = Rtc(line, clock=clock)
    yield rtc, line, clock
    rtc.close()


def rd(rtc: Rtc, reg: int) -> int:
    rtc.write(0, 1, reg)
    return rtc.read(1, 1)


def wr(rtc: Rtc, reg: int, val: int) -> None:
    rtc.write(0, 1, reg)
    rtc.write(1, 1, val)


def bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


T0 = calendar.timegm((2024, 2, 29, 13, 45, 7, 0, 0, 0))     # a Thursday


def test_power_on_state(fake):
    rtc, _, _ = fake
    assert rd(rtc, R.RTC_STATUSA) & 0x7F == 0x20
    assert rd(rtc, R.RTC_STATUSB) == R.RTCSB_24HR
    assert rd(rtc, R.RTC_STATUSD) == R.RTCSD_PWR
    assert rtc.gettime() == 0
    assert rtc.read(0, 1) == 0xFF                   # the index port reads 0xFF


def test_time_in_bcd_24h(fake):
    rtc, _, _ = fake
    rtc.settime(T0)
    fields = [bcd(rd(rtc, r)) for r in (R.RTC_SEC, R.RTC_MIN, R.RTC_HOUR, R.RTC_DOW, R.RTC_DOM,
                                        R.RTC_MONTH, R.RTC_YEAR, R.RTC_CENTURY)]
    assert fields == [7, 45, 13, 5, 29, 2, 24, 20]  # day of week 5 = Thursday (1 = Sunday)
    assert rd(rtc, R.RTC_SEC) == 0x07 and rd(rtc, R.RTC_MIN) == 0x45


def test_time_in_binary_and_12_hour(fake):
    rtc, _, clock = fake
    rtc.settime(T0)
    wr(rtc, R.RTC_STATUSB, R.RTCSB_BIN | R.RTCSB_24HR)
    assert [rd(rtc, r) for r in (R.RTC_SEC, R.RTC_MIN, R.RTC_HOUR, R.RTC_YEAR, R.RTC_CENTURY)] == \
        [7, 45, 13, 24, 20]
    wr(rtc, R.RTC_STATUSB, R.RTCSB_BIN)             # 12-hour: 1 PM
    assert rd(rtc, R.RTC_HOUR) == 0x80 | 1
    wr(rtc, R.RTC_STATUSB, 0)                       # BCD 12-hour
    assert rd(rtc, R.RTC_HOUR) == 0x81
    rtc.settime(T0 - 13 * 3600)                     # 00:45 is 12 AM
    assert rd(rtc, R.RTC_HOUR) == 0x12


def test_clock_advances_with_host_time(fake):
    rtc, _, clock = fake
    rtc.settime(T0)
    clock.advance(61.5)
    assert rtc.gettime() == T0 + 61
    assert rd(rtc, R.RTC_MIN) == 0x46 and rd(rtc, R.RTC_SEC) == 0x08
    clock.advance(0.6)                               # the phase is kept across reads
    assert rd(rtc, R.RTC_SEC) == 0x09


def test_guest_sets_time_with_set_bit(fake):
    rtc, _, clock = fake
    rtc.settime(T0)
    wr(rtc, R.RTC_STATUSB, R.RTCSB_HALT | R.RTCSB_24HR)
    clock.advance(5)
    assert rtc.gettime() == -1                      # "in flux" while the guest holds SET
    for reg, val in ((R.RTC_SEC, 0x30), (R.RTC_MIN, 0x15), (R.RTC_HOUR, 0x08), (R.RTC_DOM, 0x31),
                     (R.RTC_MONTH, 0x12), (R.RTC_YEAR, 0x99), (R.RTC_CENTURY, 0x19)):
        wr(rtc, reg, val)
    with pytest.raises(RtcError):
        rtc.settime(T0)
    wr(rtc, R.RTC_STATUSB, R.RTCSB_24HR)
    assert rtc.gettime() == calendar.timegm((1999, 12, 31, 8, 15, 30, 0, 0, 0))
    clock.advance(1)
    assert rtc.gettime() == calendar.timegm((1999, 12, 31, 8, 15, 31, 0, 0, 0))


def test_invalid_programming_stops_the_clock(fake):
    rtc, _, clock = fake
    rtc.settime(T0)
    wr(rtc, R.RTC_STATUSB, R.RTCSB_HALT | R.RTCSB_24HR)
    wr(rtc, R.RTC_DOM, 0x30)
    wr(rtc, R.RTC_MONTH, 0x02)                      # February 30th
    wr(rtc, R.RTC_STATUSB, R.RTCSB_24HR)
    clock.advance(3)
    assert rtc.gettime() == -1
    rtc.settime(T0)                                 # the host can repair it
    assert rtc.gettime() == T0


def test_divider_reset_freezes_time(fake):
    rtc, _, clock = fake
    rtc.settime(T0)
    wr(rtc, R.RTC_STATUSA, 0x70)                    # dividers held in reset
    clock.advance(10)
    assert rtc.gettime() == T0
    wr(rtc, R.RTC_STATUSA, 0x26)
    clock.advance(2)
    assert rtc.gettime() == T0 + 2


def test_update_and_alarm_interrupts(fake):
    rtc, line, clock = fake
    rtc.settime(T0)
    wr(rtc, R.RTC_ALARM_SEC, 0x09)
    wr(rtc, R.RTC_ALARM_MIN, 0xC0)                  # don't care
    wr(rtc, R.RTC_ALARM_HOUR, 0xFF)                 # don't care
    wr(rtc, R.RTC_STATUSB, R.RTCSB_24HR | R.RTCSB_UINTR | R.RTCSB_AINTR)
    clock.advance(1)
    c = rd(rtc, R.RTC_STATUSC)
    assert c == R.RTCIR_INT | R.RTCIR_UPDATE         # :08, no alarm yet
    assert line.pulses == 1
    assert rd(rtc, R.RTC_STATUSC) == 0              # read-to-clear
    clock.advance(1)
    assert rd(rtc, R.RTC_STATUSC) == R.RTCIR_INT | R.RTCIR_UPDATE | R.RTCIR_ALARM
    assert line.pulses == 2
    clock.advance(120)                              # :09 again two minutes later
    assert rd(rtc, R.RTC_STATUSC) & R.RTCIR_ALARM


def test_interrupt_flags_need_their_enable(fake):
    rtc, line, clock = fake
    rtc.settime(T0)
    clock.advance(3)
    assert rd(rtc, R.RTC_STATUSC) == 0
    assert line.pulses == 0


def test_update_in_progress_bit(fake):
    rtc, _, clock = fake
    rtc.settime(T0)
    clock.advance(0.5)
    assert not rd(rtc, R.RTC_STATUSA) & R.RTCSA_TUP
    clock.advance(0.4999)                           # 100 us before the update
    assert rd(rtc, R.RTC_STATUSA) & R.RTCSA_TUP
    clock.advance(0.0011)                           # 1 ms into the update cycle
    assert rd(rtc, R.RTC_STATUSA) & R.RTCSA_TUP
    clock.advance(0.01)
    assert not rd(rtc, R.RTC_STATUSA) & R.RTCSA_TUP


def test_periodic_interrupt_rate_roughly_right():
    line = Line()
    rtc = Rtc(line)
    try:
        wr(rtc, R.RTC_STATUSA, 0x20 | 0x0B)        # rate 11: 32 Hz
        wr(rtc, R.RTC_STATUSB, R.RTCSB_24HR | R.RTCSB_PINTR)
        start = time.monotonic()
        while time.monotonic() - start < 0.5:       # the guest's handler acknowledges
            rd(rtc, R.RTC_STATUSC)
            time.sleep(0.002)
        n = line.pulses
        assert 6 <= n <= 24, n                      # about 16
        wr(rtc, R.RTC_STATUSB, R.RTCSB_24HR)        # periodic off: no more
        rd(rtc, R.RTC_STATUSC)
        time.sleep(0.1)
        assert line.pulses <= n + 1
    finally:
        rtc.close()


def test_pause_stops_interrupts():
    line = Line()
    rtc = Rtc(line)
    try:
        rtc.pause()
        wr(rtc, R.RTC_STATUSA, 0x20 | 0x06)        # 1024 Hz
        wr(rtc, R.RTC_STATUSB, R.RTCSB_24HR | R.RTCSB_PINTR)
        time.sleep(0.05)
        assert rd(rtc, R.RTC_STATUSC) == 0 and line.pulses == 0
        rtc.resume()
        deadline = time.monotonic() + 2
        while line.pulses == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert line.pulses >= 1
    finally:
        rtc.close()


def test_index_port_masks_nmi_bit(fake):
    rtc, _, _ = fake
    rtc.nvram_write(0x40, 0xA5)
    rtc.write(0, 1, 0x80 | 0x40)
    assert rtc.read(1, 1) == 0xA5
    assert rtc.nmi_disabled
    wr(rtc, 0x41, 0x3C)                             # NVRAM is guest-writable too
    assert rtc.nvram_read(0x41) == 0x3C


def test_nvram_interface_limits(fake):
    rtc, _, _ = fake
    for bad in (-1, 0, 0x0D, R.RTC_CENTURY, 128):
        with pytest.raises(ValueError):
            rtc.nvram_write(bad, 1)
    with pytest.raises(ValueError):
        rtc.nvram_read(128)
    rtc.nvram_write(0x0E, 0x11)
    rtc.nvram_write(0x7F, 0x22)
    assert (rtc.nvram_read(0x0E), rtc.nvram_read(0x7F)) == (0x11, 0x22)
    rtc.settime(T0)
    assert rtc.nvram_read(R.RTC_CENTURY) == 0x20


@pytest.mark.parametrize("lowmem,highmem", [
    (256 << 20, 0),
    (2 << 30, 0),
    (3 << 30, 1 << 30),
    (3 << 30, 61 << 30),
    (8 << 20, 0),                                   # below 16 MiB: no extended memory
])
def test_nvram_memory_sizes(fake, lowmem, highmem):
    rtc, _, _ = fake
    rtc_init_nvram(rtc, lowmem, highmem, use_localtime=False, now=T0)
    lo = rtc.nvram_read(0x34) | rtc.nvram_read(0x35) << 8
    hi = rtc.nvram_read(0x5B) | rtc.nvram_read(0x5C) << 8 | rtc.nvram_read(0x5D) << 16
    assert lo * (64 << 10) + (16 << 20) == max(lowmem, 16 << 20)
    assert hi * (64 << 10) == highmem
    assert rtc.gettime() == T0
    assert rtc.nvram_read(0x32) == 0x20


def test_nvram_localtime(fake, monkeypatch):
    rtc, _, _ = fake
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        rtc_init_nvram(rtc, 1 << 30, 0, use_localtime=True, now=T0)
        assert rtc.gettime() == T0 - 5 * 3600
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_snapshot_keeps_time_and_registers(fake):
    rtc, _, clock = fake
    rtc.settime(T0)
    wr(rtc, R.RTC_STATUSB, R.RTCSB_24HR | R.RTCSB_BIN)
    rtc.nvram_write(0x50, 0x77)
    clock.advance(3.25)
    state = decode(RtcState, encode(rtc.save_state()))
    other = Rtc(Line(), clock=clock)
    try:
        other.restore_state(state)
        assert other.gettime() == T0 + 3
        clock.advance(0.8)                           # phase carried over: next second now
        assert other.gettime() == T0 + 4
        assert [rd(other, r) for r in (R.RTC_SEC, R.RTC_STATUSB, 0x50)] == \
            [rd(rtc, r) for r in (R.RTC_SEC, R.RTC_STATUSB, 0x50)]
    finally:
        other.close()


@settings(max_examples=60, deadline=None)
@given(strategy(RtcState))
def test_state_round_trip(state):
    decoded = decode(RtcState, encode(state))
    assert decoded == state
    clock = FakeClock()
    a, b = Rtc(Line(), clock=clock), Rtc(Line(), clock=clock)
    try:
        a.restore_state(decoded)
        b.restore_state(decode(RtcState, encode(a.save_state())))
        assert a.save_state() == b.save_state()
        assert [a.nvram_read(i) for i in range(128)] == [b.nvram_read(i) for i in range(128)]
    finally:
        a.close()
        b.close()


def test_restore_refuses_bad_state(fake):
    rtc, _, _ = fake
    with pytest.raises(ValueError):
        rtc.restore_state(RtcState(addr=200))


access = st.tuples(st.booleans(), st.integers(0, 1), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(access, max_size=80), st.lists(st.floats(0, 90000), max_size=5))
def test_random_accesses_never_raise(ops, advances):
    clock = FakeClock()
    rtc = Rtc(Line(), clock=clock)
    try:
        for i, (is_write, off, size, val) in enumerate(ops):
            if is_write:
                rtc.write(off, size, val & ((1 << (8 * size)) - 1))
            else:
                assert 0 <= rtc.read(off, size) < 1 << (8 * size)
            if advances and i % 10 == 0:
                clock.advance(advances[i % len(advances)])
        decode(RtcState, encode(rtc.save_state()))
    finally:
        rtc.close()
