"""HPET model (vhpet re-created), programmed as a guest's HPET driver does."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bhyvepy.dev import hpet as H
from bhyvepy.dev.hpet import Hpet, HpetState
from bhyvepy.snapshot.state import decode, encode, strategy
from irq_testkit import RecordingLine

NS = 1_000_000_000


class Ioapic:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, int]] = []
        self.levels: dict[int, bool] = {}

    def _ev(self, kind: str, pin: int) -> None:
        with self.lock:
            self.events.append((kind, pin))

    def ioapic_assert(self, pin: int) -> None:
        self.levels[pin] = True
        self._ev("assert", pin)

    def ioapic_deassert(self, pin: int) -> None:
        self.levels[pin] = False
        self._ev("deassert", pin)

    def ioapic_pulse(self, pin: int) -> None:
        self._ev("pulse", pin)

    def count(self, kind: str, pin: int) -> int:
        with self.lock:
            return sum(1 for e in self.events if e == (kind, pin))


class Msi:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def send(self, addr: int, data: int) -> None:
        self.sent.append((addr, data))


Line = RecordingLine


class FakeClock:
    def __init__(self) -> None:
        self.now = 7 * NS

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def dev():
    io, msi = Ioapic(), Msi()
    h = Hpet(io, msi, ioapic_pins=24)
    yield h, io, msi
    h.close()


def wait_for(cond, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


def counter(h: Hpet) -> int:
    return h.read(H.HPET_MAIN_COUNTER, 4)


def test_capabilities_as_vhpet(dev):
    h, _, _ = dev
    cap = h.read(H.HPET_CAPABILITIES, 8)
    assert cap & 0xFFFF0000 == 0x8086 << 16
    assert (cap >> 8) & 0x1F == H.NUM_TIMERS - 1
    assert cap & 0xFF == 1
    assert not cap & 0x2000                           # 32-bit main counter
    assert not cap & H.HPET_CAP_LEG_RT
    assert cap >> 32 == 10**15 // (1 << 24)          # 59604644 fs
    assert h.read(H.HPET_CAPABILITIES + 4, 4) == cap >> 32
    for n in range(H.NUM_TIMERS):
        tcap = h.read(H.timer_cap_cnf(n), 8)
        assert tcap >> 32 == 0xF << 20               # pins 20-23 on a 24-pin IOAPIC
        assert tcap & (H.HPET_TCAP_PER_INT | H.HPET_TCAP_FSB_INT_DEL) == \
            H.HPET_TCAP_PER_INT | H.HPET_TCAP_FSB_INT_DEL
        assert not tcap & H.HPET_TCAP_SIZE


def test_bhyve_ioapic_routes():
    h = Hpet(Ioapic(), Msi(), ioapic_pins=32)
    assert h.read(H.timer_cap_cnf(0) + 4, 4) == 0xFF000000
    assert H.allowed_irqs(16) == 0


def test_counter_rate_and_halves():
    clock = FakeClock()
    h = Hpet(Ioapic(), Msi(), clock=clock)
    assert counter(h) == 0
    clock.now += NS
    assert counter(h) == 0                            # not enabled yet
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_ENABLE)
    clock.now += NS
    assert counter(h) == 1 << 24
    assert h.read(H.HPET_MAIN_COUNTER, 8) == 1 << 24  # upper half zero
    assert h.read(H.HPET_MAIN_COUNTER + 4, 4) == 0
    h.write(H.HPET_CONFIG, 4, 0)
    clock.now += NS
    assert counter(h) == 1 << 24                      # frozen while disabled
    h.write(H.HPET_MAIN_COUNTER, 4, 0xFFFFFFF0)
    h.write(H.HPET_CONFIG, 8, H.HPET_CNF_ENABLE)
    clock.now += 1000                                 # 16.8 ticks: wraps to 0
    assert counter(h) == 0
    h.close()


def test_counter_increases_in_real_time(dev):
    h, _, _ = dev
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_ENABLE)
    a = counter(h)
    time.sleep(0.01)
    assert counter(h) > a


def test_bad_sizes_and_alignment_are_ignored(dev):
    h, _, _ = dev
    assert h.read(H.HPET_CAPABILITIES, 2) == 0
    assert h.read(H.HPET_CAPABILITIES + 2, 4) == 0
    h.write(H.HPET_CONFIG, 1, 1)
    h.write(H.HPET_CONFIG + 1, 4, 1)
    assert h.read(H.HPET_CONFIG, 4) == 0


def test_legacy_route_only_when_offered(dev):
    h, _, _ = dev
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_LEG_RT)
    assert h.read(H.HPET_CONFIG, 4) == 0               # vhpet: not supported
    irq0, irq8 = Line(), Line()
    g = Hpet(Ioapic(), Msi(), legacy_irqs=(irq0, irq8))
    try:
        assert g.read(H.HPET_CAPABILITIES, 4) & H.HPET_CAP_LEG_RT
        g.write(H.HPET_CONFIG, 4, H.HPET_CNF_LEG_RT | H.HPET_CNF_ENABLE)
        g.write(H.timer_cap_cnf(1), 4, H.HPET_TCNF_INT_ENB)
        g.write(H.timer_comparator(1), 4, (counter(g) + (1 << 24) // 50) & 0xFFFFFFFF)
        assert wait_for(lambda: irq8.events == ["pulse"])
        assert irq0.events == []
    finally:
        g.close()


def test_invalid_route_falls_back_to_none(dev):
    h, _, _ = dev
    h.write(H.timer_cap_cnf(0), 4, (5 << 9) | H.HPET_TCNF_INT_ENB)
    assert (h.read(H.timer_cap_cnf(0), 4) & H.HPET_TCNF_INT_ROUTE) == 0
    h.write(H.timer_cap_cnf(0), 4, (22 << 9) | H.HPET_TCNF_INT_ENB | H.HPET_TCNF_32MODE)
    cfg = h.read(H.timer_cap_cnf(0), 4)
    assert (cfg & H.HPET_TCNF_INT_ROUTE) >> 9 == 22
    assert not cfg & H.HPET_TCNF_32MODE               # 32MODE reads 0 on a 32-bit timer


def test_one_shot_edge(dev):
    h, io, _ = dev
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_ENABLE)
    h.write(H.timer_cap_cnf(0), 4, (20 << 9) | H.HPET_TCNF_INT_ENB)
    start = time.monotonic()
    h.write(H.timer_comparator(0), 4, (counter(h) + (1 << 24) // 20) & 0xFFFFFFFF)   # 50 ms
    assert wait_for(lambda: io.count("pulse", 20) == 1)
    assert time.monotonic() - start >= 0.04
    time.sleep(0.1)
    assert io.count("pulse", 20) == 1                 # one shot
    assert h.read(H.HPET_ISR, 4) == 0                 # edge: no status


def test_periodic_level_with_status_clear(dev):
    h, io, _ = dev
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_ENABLE)
    h.write(H.timer_cap_cnf(1), 4, (21 << 9) | H.HPET_TCNF_INT_ENB | H.HPET_TCNF_TYPE
            | H.HPET_TCNF_VAL_SET | H.HPET_TCNF_INT_TYPE)
    period = (1 << 24) // 100                           # 10 ms
    h.write(H.timer_comparator(1), 4, (counter(h) + period) & 0xFFFFFFFF)
    h.write(H.timer_comparator(1), 4, period)
    assert not h.read(H.timer_cap_cnf(1), 4) & H.HPET_TCNF_VAL_SET
    fired = 0
    start = time.monotonic()
    while time.monotonic() - start < 0.3:
        if h.read(H.HPET_ISR, 4) & 0x2:
            assert io.levels.get(21)
            fired += 1
            h.write(H.HPET_ISR, 4, 0x2)               # write 1 to clear
            assert not io.levels.get(21)
        time.sleep(0.001)
    assert 10 <= fired <= 40, fired                     # about 30
    h.write(H.timer_cap_cnf(1), 4, 0)                   # stop it


def test_msi_delivery(dev):
    h, io, msi = dev
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_ENABLE)
    h.write(H.timer_fsb_val(2), 4, 0x4041)
    h.write(H.timer_fsb_addr(2), 4, 0xFEE00000)
    assert h.read(H.timer_fsb_val(2), 8) == (0xFEE00000 << 32) | 0x4041
    h.write(H.timer_cap_cnf(2), 4, H.HPET_TCNF_FSB_EN | H.HPET_TCNF_INT_ENB | (23 << 9))
    h.write(H.timer_comparator(2), 4, (counter(h) + (1 << 24) // 100) & 0xFFFFFFFF)
    assert wait_for(lambda: msi.sent == [(0xFEE00000, 0x4041)])
    assert io.events == []


def test_disabling_interrupt_drops_level(dev):
    h, io, _ = dev
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_ENABLE)
    cfg = (20 << 9) | H.HPET_TCNF_INT_ENB | H.HPET_TCNF_INT_TYPE
    h.write(H.timer_cap_cnf(3), 4, cfg)
    h.write(H.timer_comparator(3), 4, (counter(h) + 1000) & 0xFFFFFFFF)
    assert wait_for(lambda: h.read(H.HPET_ISR, 4) == 0x8)
    assert io.levels[20]
    h.write(H.timer_cap_cnf(3), 4, cfg & ~H.HPET_TCNF_INT_ENB)
    assert h.read(H.HPET_ISR, 4) == 0 and not io.levels[20]


def test_pause_stops_firing_and_resume_catches_up(dev):
    h, io, _ = dev
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_ENABLE)
    h.write(H.timer_cap_cnf(0), 4, (20 << 9) | H.HPET_TCNF_INT_ENB)
    h.pause()
    h.write(H.timer_comparator(0), 4, (counter(h) + (1 << 24) // 100) & 0xFFFFFFFF)
    time.sleep(0.05)
    assert io.count("pulse", 20) == 0
    h.resume()
    assert wait_for(lambda: io.count("pulse", 20) == 1)


def test_snapshot_continues_counting_from_saved_value():
    clock = FakeClock()
    io = Ioapic()
    h = Hpet(io, Msi(), clock=clock)
    h.write(H.HPET_CONFIG, 4, H.HPET_CNF_ENABLE)
    lvl = (20 << 9) | H.HPET_TCNF_INT_ENB | H.HPET_TCNF_INT_TYPE
    h.write(H.timer_cap_cnf(4), 4, lvl)
    h.write(H.timer_comparator(4), 4, 0x1234)
    clock.now += NS
    state = decode(HpetState, encode(h.save_state()))
    h.close()
    clock2 = FakeClock()
    clock2.now = 1000 * NS
    io2 = Ioapic()
    g = Hpet(io2, Msi(), ioapic_pins=32, clock=clock2)
    try:
        g.restore_state(state)
        assert counter(g) == 1 << 24
        clock2.now += NS // 2
        assert counter(g) == (1 << 24) + (1 << 23)
        assert g.read(H.timer_comparator(4), 4) == 0x1234
        # Route 20 is not allowed with 32 pins (24-31): it falls back to none.
        assert g.read(H.timer_cap_cnf(4), 4) & H.HPET_TCNF_INT_ROUTE == 0
        assert g.read(H.timer_cap_cnf(4) + 4, 4) == 0xFF000000
    finally:
        g.close()


def test_restore_reasserts_held_level():
    io = Ioapic()
    h = Hpet(io, Msi(), ioapic_pins=24)
    try:
        st_ = HpetState(config=0, isr=0x1)
        st_.timers[0].cap_config = (21 << 9) | H.HPET_TCNF_INT_ENB | H.HPET_TCNF_INT_TYPE
        h.restore_state(st_)
        assert io.levels.get(21) and h.read(H.HPET_ISR, 4) == 1
        h.write(H.HPET_ISR, 4, 1)
        assert not io.levels[21]
    finally:
        h.close()


@settings(max_examples=60, deadline=None)
@given(strategy(HpetState))
def test_state_round_trip(state):
    decoded = decode(HpetState, encode(state))
    assert decoded == state
    clock = FakeClock()
    a, b = Hpet(Ioapic(), Msi(), clock=clock), Hpet(Ioapic(), Msi(), clock=clock)
    try:
        a.restore_state(decoded)
        b.restore_state(decode(HpetState, encode(a.save_state())))
        regs = lambda d: [d.read(off, 8) for off in range(0, H.HPET_SIZE, 8)]
        assert regs(a) == regs(b)
        assert a.save_state() == b.save_state()
    finally:
        a.close()
        b.close()


access = st.tuples(st.booleans(), st.integers(0, H.HPET_SIZE - 1), st.sampled_from([1, 2, 4, 8]),
                   st.integers(0, (1 << 64) - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(access, max_size=60))
def test_random_accesses_never_raise(ops):
    h = Hpet(Ioapic(), Msi(), ioapic_pins=24)
    try:
        for is_write, off, size, val in ops:
            if is_write:
                h.write(off, size, val & ((1 << (8 * size)) - 1))
            else:
                assert 0 <= h.read(off, size) < 1 << (8 * size)
        decode(HpetState, encode(h.save_state()))
    finally:
        h.close()
