"""HPET at 0xFED00000 (0x400 bytes), re-created after vmm.ko's ``vhpet``.

What a guest sees is bhyve's HPET: vendor 0x8086, revision 1, 8 timers, a
32-bit main counter at 2^24 Hz (16.777216 MHz, period 59604644 fs), every
timer periodic-capable and FSB (MSI) capable, IOAPIC routing restricted to
the top pins (24..31 with bhyve's 32-pin IOAPIC; on a 24-pin IOAPIC such as
KVM's, pins 20..23).  Registers are 64 bits wide and may be accessed as
aligned 4- or 8-byte quantities; the main counter reads zero in its upper
half.  Other sizes and misaligned accesses read 0 and are ignored, as vhpet
does.

Legacy replacement routing is not offered by vhpet and so not by default
(the capability bit reads 0 and LEG_RT cannot be set).  A VM may pass
``legacy_irqs=(irq0_line, irq8_line)`` to offer it: then timer 0 drives ISA
IRQ 0 and timer 1 ISA IRQ 8 while LEG_RT is set.

Timers fire from one :class:`~bhyvepy.dev.deadline.DeadlineWorker` thread.
The counter keeps running while the VM is paused (as the kernel's does);
only interrupt delivery stops, and a deadline missed meanwhile fires on
resume (periodic timers skip the periods they missed, as vhpet).  A
snapshot stores the counter value; a restore continues counting from it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Protocol, Sequence

from bhyvepy.dev.deadline import NS_PER_S, Clock, DeadlineWorker
from bhyvepy.irq import IrqLine, MsiSender
from bhyvepy.snapshot.state import U32, U64, ListOf, Nested, StateError, device_state

HPET_BASE = 0xFED00000
HPET_SIZE = 0x400
HPET_FREQ = 1 << 24
FS_PER_S = 10 ** 15
NUM_TIMERS = 8

HPET_CAPABILITIES = 0x000
HPET_CONFIG = 0x010
HPET_ISR = 0x020
HPET_MAIN_COUNTER = 0x0F0

HPET_CAP_LEG_RT = 0x8000
HPET_CNF_ENABLE = 0x1
HPET_CNF_LEG_RT = 0x2

HPET_TCAP_INT_ROUTE = 0xFFFFFFFF00000000
HPET_TCAP_FSB_INT_DEL = 0x8000
HPET_TCNF_FSB_EN = 0x4000
HPET_TCNF_INT_ROUTE = 0x3E00
HPET_TCNF_32MODE = 0x0100
HPET_TCNF_VAL_SET = 0x0040
HPET_TCAP_SIZE = 0x0020
HPET_TCAP_PER_INT = 0x0010
HPET_TCNF_TYPE = 0x0008
HPET_TCNF_INT_ENB = 0x0004
HPET_TCNF_INT_TYPE = 0x0002
HPET_TCAP_RO_MASK = HPET_TCAP_INT_ROUTE | HPET_TCAP_FSB_INT_DEL | HPET_TCAP_SIZE | HPET_TCAP_PER_INT

MIN_REARM_NS = 50_000     # a guest's 1-tick period must not turn into a busy loop
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def timer_cap_cnf(n: int) -> int:
    return 0x100 + 0x20 * n


def timer_comparator(n: int) -> int:
    return 0x108 + 0x20 * n


def timer_fsb_val(n: int) -> int:
    return 0x110 + 0x20 * n


def timer_fsb_addr(n: int) -> int:
    return 0x114 + 0x20 * n


class IoapicPins(Protocol):
    """Pin-level IOAPIC access (the VM object provides these)."""

    def ioapic_assert(self, pin: int) -> None: ...
    def ioapic_deassert(self, pin: int) -> None: ...
    def ioapic_pulse(self, pin: int) -> None: ...


def allowed_irqs(ioapic_pins: int) -> int:
    """vhpet's choice of routable IOAPIC pins for an IOAPIC with ``ioapic_pins`` pins."""
    if ioapic_pins >= 32:
        return 0xFF000000
    if ioapic_pins >= 20:
        return 0xF << (ioapic_pins - 4)
    return 0


@device_state("vhpet-timer", version=1)
@dataclass
class HpetTimerState:
    cap_config: U64 = 0
    msireg: U64 = 0
    compval: U32 = _M32
    comprate: U32 = 0


@device_state("vhpet", version=1)
@dataclass
class HpetState:
    config: U64 = 0
    isr: U64 = 0
    counter: U32 = 0
    timers: Annotated[list, ListOf(Nested(cls=HpetTimerState), exact=NUM_TIMERS)] = field(
        default_factory=lambda: [HpetTimerState() for _ in range(NUM_TIMERS)])

    def validate(self) -> None:
        if len(self.timers) != NUM_TIMERS:
            raise StateError(f"hpet: {len(self.timers)} timers, expected {NUM_TIMERS}")
        if self.isr >> NUM_TIMERS:
            raise StateError(f"hpet: interrupt status {self.isr:#x} names absent timers")
        if self.config & ~(HPET_CNF_ENABLE | HPET_CNF_LEG_RT):
            raise StateError(f"hpet: reserved configuration bits in {self.config:#x}")

    @classmethod
    def hypothesis_strategy(cls):  # pragma: no cover - exercised by tests
        from hypothesis import strategies as st
        u32, u64 = st.integers(0, _M32), st.integers(0, _M64)
        timer = st.builds(HpetTimerState, cap_config=u64, msireg=u64, compval=u32, comprate=u32)
        return st.builds(cls, config=st.integers(0, 3), isr=st.integers(0, (1 << NUM_TIMERS) - 1),
                         counter=u32, timers=st.lists(timer, min_size=NUM_TIMERS, max_size=NUM_TIMERS))


@dataclass
class _Timer:
    cap_config: int
    msireg: int = 0
    compval: int = _M32
    comprate: int = 0
    deadline: int | None = None            # host ns at which counter == compval
    asserted: object = None                # the level target currently held


class Hpet:
    state_class = HpetState

    def __init__(self, ioapic: IoapicPins, msi: MsiSender, ioapic_pins: int = 32,
                 legacy_irqs: Sequence[IrqLine] | None = None,
                 clock: Clock = time.monotonic_ns) -> None:
        if legacy_irqs is not None and len(legacy_irqs) != 2:
            raise ValueError("legacy_irqs needs the IRQ 0 and IRQ 8 lines")
        self._ioapic = ioapic
        self._msi = msi
        self._legacy = tuple(legacy_irqs) if legacy_irqs is not None else None
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._ro_bits = (allowed_irqs(ioapic_pins) << 32) | HPET_TCAP_PER_INT | HPET_TCAP_FSB_INT_DEL
        self._config = 0
        self._isr = 0
        self._countbase = 0
        self._countbase_ns = clock()
        self._timers = [_Timer(cap_config=self._ro_bits) for _ in range(NUM_TIMERS)]
        self._paused = False
        self._worker = DeadlineWorker("vhpet", self._cond, self._next_deadline, self._expire, clock)

    # ------------------------------------------------------------ capabilities

    def capabilities(self) -> int:
        """GCAP_ID, also what ``vm_get_hpet_capabilities`` returns for the ACPI HPET table."""
        cap = (0x8086 << 16) | ((NUM_TIMERS - 1) << 8) | 1
        if self._legacy is not None:
            cap |= HPET_CAP_LEG_RT
        return cap | ((FS_PER_S // HPET_FREQ) << 32)

    # ------------------------------------------------------------ counter

    @property
    def _enabled(self) -> bool:
        return bool(self._config & HPET_CNF_ENABLE)

    def _counter(self, now: int) -> int:
        if not self._enabled:
            return self._countbase
        return (self._countbase + (now - self._countbase_ns) * HPET_FREQ // NS_PER_S) & _M32

    # ------------------------------------------------------------ MMIO

    def read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset & (size - 1) or not 0 <= offset < HPET_SIZE:
            return 0
        with self._cond:
            reg = offset & ~7
            if reg == HPET_CAPABILITIES:
                data = self.capabilities()
            elif reg == HPET_CONFIG:
                data = self._config
            elif reg == HPET_ISR:
                data = self._isr
            elif reg == HPET_MAIN_COUNTER:
                data = self._counter(self._clock())
            elif 0x100 <= reg < 0x100 + 0x20 * NUM_TIMERS:
                t = self._timers[(reg - 0x100) // 0x20]
                sub = (reg - 0x100) % 0x20
                data = {0x00: t.cap_config, 0x08: t.compval, 0x10: t.msireg}.get(sub, 0)
            else:
                data = 0
        if size == 4 and offset & 4:
            data >>= 32
        return data & (_M32 if size == 4 else _M64)

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset & (size - 1) or not 0 <= offset < HPET_SIZE:
            return
        if size == 8:
            mask, data = _M64, value & _M64
        else:
            mask, data = _M32, value & _M32
            if offset & 4:
                mask, data = mask << 32, data << 32
        with self._cond:
            reg = offset & ~7
            now = self._clock()
            if reg == HPET_CONFIG:
                self._write_config(data, mask, now)
            elif reg == HPET_ISR:
                for n in range(NUM_TIMERS):
                    if self._isr & data & (1 << n):
                        self._clear_isr(n)
            elif reg == HPET_MAIN_COUNTER:
                val = (self._counter(now) & ~mask) | (data & mask)
                self._countbase = val & _M32
                if self._enabled:
                    self._start_counting(now)
            elif 0x100 <= reg < 0x100 + 0x20 * NUM_TIMERS:
                n, sub = divmod(reg - 0x100, 0x20)
                if sub == 0x00:
                    self._update_timer_config(n, data, mask)
                elif sub == 0x08:
                    self._write_comparator(n, data, mask, now)
                elif sub == 0x10:
                    t = self._timers[n]
                    t.msireg = (t.msireg & ~mask) | (data & mask)
            self._kick()

    def _write_config(self, data: int, mask: int, now: int) -> None:
        counter = self._counter(now)
        old = self._config
        new = (old & ~mask) | (data & mask)
        new &= HPET_CNF_ENABLE | (HPET_CNF_LEG_RT if self._legacy is not None else 0)
        self._config = new
        if (old ^ new) & HPET_CNF_LEG_RT:
            # Timers 0 and 1 change their wiring: drop what they hold on the old one.
            for n in (0, 1):
                self._clear_isr(n)
        if (old ^ new) & HPET_CNF_ENABLE:
            if new & HPET_CNF_ENABLE:
                self._start_counting(now)
            else:
                self._stop_counting(counter, now)

    def _write_comparator(self, n: int, data: int, mask: int, now: int) -> None:
        t = self._timers[n]
        old_val, old_rate = t.compval, t.comprate
        if t.cap_config & HPET_TCNF_TYPE:
            # Periodic: the write sets the period, and the next match only with VAL_SET.
            t.comprate = ((t.comprate & ~mask) | (data & mask)) & _M32
            if t.cap_config & HPET_TCNF_VAL_SET:
                t.compval = t.comprate
        else:
            t.compval = ((t.compval & ~mask) | (data & mask)) & _M32
        t.cap_config &= ~HPET_TCNF_VAL_SET
        if (t.compval != old_val or t.comprate != old_rate) and self._enabled:
            self._start_timer(n, self._counter(now), now)

    def _update_timer_config(self, n: int, data: int, mask: int) -> None:
        t = self._timers[n]
        old_target = self._level_target(n)
        old = t.cap_config
        new = (old & ~mask) | (data & mask)
        new &= ~(HPET_TCAP_RO_MASK | HPET_TCNF_32MODE)
        new |= self._ro_bits
        if new == old:
            return
        pin = (new & HPET_TCNF_INT_ROUTE) >> 9
        if pin and not (new >> 32) & (1 << pin):
            new &= ~HPET_TCNF_INT_ROUTE           # not routable here: back to "none"
        t.cap_config = new
        if not new & HPET_TCNF_TYPE:
            t.comprate = 0
        if self._isr & (1 << n) and self._level_target(n) != old_target:
            self._release(n)
            self._isr &= ~(1 << n)

    # ------------------------------------------------------------ interrupts

    def _target(self, n: int):
        """Where timer ``n`` delivers: ("msi",), ("legacy", line), ("pin", n) or None."""
        t = self._timers[n]
        if t.cap_config & HPET_TCNF_FSB_EN and t.cap_config & HPET_TCAP_FSB_INT_DEL:
            return ("msi",)
        if self._legacy is not None and self._config & HPET_CNF_LEG_RT and n < 2:
            return ("legacy", n)
        pin = (t.cap_config & HPET_TCNF_INT_ROUTE) >> 9
        return ("pin", pin) if pin else None

    def _level_target(self, n: int):
        """The target a level interrupt would be held on, or None (edge, MSI, disabled)."""
        t = self._timers[n]
        target = self._target(n)
        if target is None or target[0] == "msi":
            return None
        if not t.cap_config & HPET_TCNF_INT_ENB or not t.cap_config & HPET_TCNF_INT_TYPE:
            return None
        return target

    def _timer_interrupt(self, n: int) -> None:
        t = self._timers[n]
        if not t.cap_config & HPET_TCNF_INT_ENB or self._isr & (1 << n):
            return
        target = self._target(n)
        if target is None:
            return
        if target[0] == "msi":
            self._msi.send(t.msireg >> 32, t.msireg & _M32)
            return
        if not t.cap_config & HPET_TCNF_INT_TYPE:       # edge
            if target[0] == "pin":
                self._ioapic.ioapic_pulse(target[1])
            else:
                self._legacy[target[1]].pulse()
            return
        self._isr |= 1 << n
        self._hold(n, target)

    def _hold(self, n: int, target) -> None:
        self._timers[n].asserted = target
        if target[0] == "pin":
            self._ioapic.ioapic_assert(target[1])
        else:
            self._legacy[target[1]].assert_()

    def _release(self, n: int) -> None:
        t = self._timers[n]
        target, t.asserted = t.asserted, None
        if target is None:
            return
        if target[0] == "pin":
            self._ioapic.ioapic_deassert(target[1])
        else:
            self._legacy[target[1]].deassert()

    def _clear_isr(self, n: int) -> None:
        if self._isr & (1 << n):
            self._release(n)
            self._isr &= ~(1 << n)

    # ------------------------------------------------------------ timers

    def _start_timer(self, n: int, counter: int, now: int, fired: bool = False) -> None:
        t = self._timers[n]
        ahead = (t.compval - counter) & _M32
        if t.comprate and (fired or not 0 < ahead <= t.comprate):
            # Move the match to the next period boundary after the counter, skipping
            # periods missed (vhpet's rule).  vhpet applies it whenever a periodic
            # timer is (re)started; a match already due within one period is kept
            # here, so a freshly programmed first period is not shortened and a
            # restore does not move the match again.
            behind = (counter - t.compval) & _M32
            t.compval = (t.compval + (behind // t.comprate + 1) * t.comprate) & _M32
        delta = (t.compval - counter) & _M32
        t.deadline = now + -(-delta * NS_PER_S // HPET_FREQ)

    def _start_counting(self, now: int) -> None:
        self._countbase_ns = now
        for n in range(NUM_TIMERS):
            self._start_timer(n, self._countbase, now)

    def _stop_counting(self, counter: int, now: int) -> None:
        self._countbase = counter
        for n, t in enumerate(self._timers):
            overdue = t.deadline is not None and t.deadline < now
            t.deadline = None
            if overdue:
                self._timer_interrupt(n)     # don't lose an expiry the thread had no time to run

    def _kick(self) -> None:
        if not self._paused:
            self._worker.poke()

    def _next_deadline(self) -> int | None:
        if self._paused or not self._enabled:
            return None
        ds = [t.deadline for t in self._timers if t.deadline is not None]
        return min(ds) if ds else None

    def _expire(self, now: int) -> None:
        for n, t in enumerate(self._timers):
            if t.deadline is None or t.deadline > now:
                continue
            counter = self._counter(now)
            self._start_timer(n, counter, now, fired=True)
            if t.deadline <= now:                  # one-shot still matching: next match is a wrap away
                t.deadline = now + (1 << 32) * NS_PER_S // HPET_FREQ
            t.deadline = max(t.deadline, now + MIN_REARM_NS)
            self._timer_interrupt(n)

    # ------------------------------------------------------------ snapshot

    def save_state(self) -> HpetState:
        with self._cond:
            return HpetState(
                config=self._config, isr=self._isr, counter=self._counter(self._clock()),
                timers=[HpetTimerState(cap_config=t.cap_config, msireg=t.msireg,
                                       compval=t.compval, comprate=t.comprate)
                        for t in self._timers])

    def restore_state(self, state: HpetState) -> None:
        state.validate()
        with self._cond:
            for n in range(NUM_TIMERS):
                self._release(n)
            now = self._clock()
            self._config = state.config & (HPET_CNF_ENABLE | (HPET_CNF_LEG_RT if self._legacy else 0))
            self._countbase = state.counter
            self._countbase_ns = now
            self._isr = 0
            for n, ts in enumerate(state.timers):
                t = self._timers[n]
                cfg = (ts.cap_config & ~(HPET_TCAP_RO_MASK | HPET_TCNF_32MODE)) | self._ro_bits
                pin = (cfg & HPET_TCNF_INT_ROUTE) >> 9
                if pin and not (cfg >> 32) & (1 << pin):
                    cfg &= ~HPET_TCNF_INT_ROUTE
                t.cap_config, t.msireg = cfg, ts.msireg
                t.compval = ts.compval
                t.comprate = ts.comprate if cfg & HPET_TCNF_TYPE else 0
                t.deadline = None
            # Level interrupts held at save time are held again (idempotent on
            # the interrupt controller, whose own state is restored separately).
            for n in range(NUM_TIMERS):
                target = self._level_target(n)
                if state.isr & (1 << n) and target is not None:
                    self._isr |= 1 << n
                    self._hold(n, target)
            if self._enabled:
                self._start_counting(now)
            self._kick()

    def pause(self) -> None:
        with self._cond:
            self._paused = True
        self._worker.stop()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._kick()

    def close(self) -> None:
        """Stop the timer thread for good (the VM is going away)."""
        self.pause()


__all__ = ["Hpet", "HpetState", "HpetTimerState", "HPET_BASE", "HPET_SIZE", "HPET_FREQ",
           "allowed_irqs", "timer_cap_cnf", "timer_comparator", "timer_fsb_val", "timer_fsb_addr"]
