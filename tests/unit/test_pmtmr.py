"""ACPI PM timer (vpmtmr re-created)."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from bhyvepy.dev.pmtmr import PMTMR_FREQ, PmTimer, PmTimerState
from bhyvepy.snapshot.state import decode, encode, strategy

NS = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 5 * NS

    def __call__(self) -> int:
        return self.now


def test_counts_at_3_579545_mhz():
    clock = FakeClock()
    t = PmTimer(clock)
    a = t.read(0, 4)
    clock.now += NS
    assert (t.read(0, 4) - a) & 0xFFFFFFFF == PMTMR_FREQ
    clock.now += NS // 1000
    assert (t.read(0, 4) - a) & 0xFFFFFFFF == PMTMR_FREQ + PMTMR_FREQ // 1000


def test_counter_increases_with_real_time():
    t = PmTimer()
    a = t.read(0, 4)
    time.sleep(0.01)
    b = t.read(0, 4)
    assert 0 < (b - a) & 0xFFFFFFFF < PMTMR_FREQ * 10     # some ticks, not absurdly many


def test_32_bit_wrap():
    clock = FakeClock()
    t = PmTimer(clock)
    t.restore_state(PmTimerState(value=0xFFFFFFF0))
    clock.now += NS // 100
    assert t.read(0, 4) == (0xFFFFFFF0 + PMTMR_FREQ // 100) & 0xFFFFFFFF


def test_only_dword_reads():
    t = PmTimer()
    assert t.read(0, 1) == 0xFF
    assert t.read(0, 2) == 0xFFFF
    assert t.read(1, 4) == 0xFFFFFFFF
    t.write(0, 4, 0)                                   # read-only, ignored


def test_snapshot_continuity():
    clock = FakeClock()
    t = PmTimer(clock)
    clock.now += 3 * NS
    state = decode(PmTimerState, encode(t.save_state()))
    clock2 = FakeClock()
    clock2.now = 999 * NS                               # another host, another uptime
    u = PmTimer(clock2)
    u.restore_state(state)
    assert u.read(0, 4) == 3 * PMTMR_FREQ
    clock2.now += NS
    assert u.read(0, 4) == 4 * PMTMR_FREQ


@settings(max_examples=50, deadline=None)
@given(strategy(PmTimerState))
def test_state_round_trip(state):
    assert decode(PmTimerState, encode(state)) == state
    clock = FakeClock()
    t = PmTimer(clock)
    t.restore_state(state)
    assert t.save_state() == state


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF)), max_size=40))
def test_random_accesses_never_raise(ops):
    t = PmTimer()
    for is_write, off, size, val in ops:
        if is_write:
            t.write(off, size, val)
        else:
            assert 0 <= t.read(off, size) < 1 << (8 * size)
