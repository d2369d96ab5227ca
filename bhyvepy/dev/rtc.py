"""MC146818-compatible RTC/CMOS, re-created after vmm.ko's ``vrtc`` for backends without one.

KVM has no in-kernel RTC, so on Linux this model answers ports 0x70/0x71
(offset 0 = index, 1 = data).  It keeps vrtc's design, because a guest (and
``bhyvectl --get-rtc-time``) must see what it would see under bhyve:

* time is ``base_time`` seconds plus whole seconds of the host monotonic
  clock elapsed since ``base_ns``; the date/time registers are rendered from
  it when read, in BCD or binary and 12- or 24-hour form as register B says;
* the guest owns the date/time registers while the SET bit (register B bit
  7) is on; clearing it takes the new time from them.  Invalid contents
  make the time "broken" and stop the clock until the guest fixes them;
* 128 bytes of CMOS: 14 clock/control registers, NVRAM 14..127, the century
  at 0x32 (written by the clock, not by ``nvram_write``);
* periodic (rate from register A, only while the divider runs), alarm and
  update-ended interrupts set flags in register C; IRQF rising pulses IRQ 8
  (vrtc pulses the 8259 and IOAPIC pin); reading register C clears it.
  As in vrtc, a flag is recorded only while its interrupt is enabled.

Differences from vrtc, all invisible to a correct guest: the update-in-progress
bit of register A is modelled (set for the 244 us before each second boundary
and the 1984 us update cycle after it, which vrtc never reports); when the
guest reads the clock, the sub-second phase is kept (vrtc restarts the second
on every access, so its clock drifts under frequent reads).

The index port reads 0xFF (as vrtc); its bit 7 (NMI disable) is recorded in
``nmi_disabled`` and otherwise ignored.  Accesses wider than a byte read all
ones and are otherwise ignored, like ports nobody claims under bhyve.
"""

from __future__ import annotations

import calendar
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from bhyvepy.dev.deadline import NS_PER_S, Clock, DeadlineWorker
from bhyvepy.irq import IrqLine
from bhyvepy.snapshot.state import BOOL, I64, U8, U32, Blob, StateError, device_state

NREGS = 128
RTC_SEC, RTC_ALARM_SEC, RTC_MIN, RTC_ALARM_MIN, RTC_HOUR, RTC_ALARM_HOUR = 0, 1, 2, 3, 4, 5
RTC_DOW, RTC_DOM, RTC_MONTH, RTC_YEAR = 6, 7, 8, 9
RTC_STATUSA, RTC_STATUSB, RTC_STATUSC, RTC_STATUSD = 0x0A, 0x0B, 0x0C, 0x0D
RTC_NVRAM_START = 0x0E
RTC_CENTURY = 0x32

RTCSA_TUP = 0x80
RTCSB_HALT, RTCSB_PINTR, RTCSB_AINTR, RTCSB_UINTR = 0x80, 0x40, 0x20, 0x10
RTCSB_SQWE, RTCSB_BIN, RTCSB_24HR = 0x08, 0x04, 0x02
RTCSB_ALL_INTRS = RTCSB_UINTR | RTCSB_AINTR | RTCSB_PINTR
RTCIR_UPDATE, RTCIR_ALARM, RTCIR_PERIOD, RTCIR_INT = 0x10, 0x20, 0x40, 0x80
RTCSD_PWR = 0x80

BROKEN_TIME = -1
MAX_TIME = 253402300799          # 9999-12-31 23:59:59 UTC: what 2 BCD digits x 2 can hold
UIP_BEFORE_NS = 244_000
UIP_AFTER_NS = 1_984_000

#: Periodic interrupt period in ns for register A rate select 1..15 (0 = off).
#: Rates 1 and 2 are 256 and 128 Hz with the 32.768 kHz time base, as in vrtc.
_PERIOD_NS = [0, NS_PER_S // 256, NS_PER_S // 128] + [NS_PER_S >> (16 - r) for r in range(3, 16)]


class RtcError(Exception):
    """A host request the RTC refuses (bhyvectl reports it), e.g. EBUSY while SET."""


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


@device_state("vrtc", version=1)
@dataclass
class RtcState:
    addr: U8 = RTC_STATUSD
    nmi_disabled: BOOL = False
    rtc_time: I64 = 0                 # seconds since the epoch in RTC time, -1 = broken
    subsec_ns: U32 = 0                # phase within the current second
    regs: Annotated[bytes, Blob(exact=NREGS)] = bytes(NREGS)

    def validate(self) -> None:
        if self.addr >= NREGS:
            raise StateError(f"rtc: index {self.addr:#x} out of range")
        if not (self.rtc_time == BROKEN_TIME or 0 <= self.rtc_time <= MAX_TIME):
            raise StateError(f"rtc: time {self.rtc_time} out of range")
        if self.subsec_ns >= NS_PER_S:
            raise StateError(f"rtc: sub-second phase {self.subsec_ns} ns out of range")

    @classmethod
    def hypothesis_strategy(cls):  # pragma: no cover - exercised by tests
        from hypothesis import strategies as st
        return st.builds(
            cls, addr=st.integers(0, NREGS - 1), nmi_disabled=st.booleans(),
            rtc_time=st.one_of(st.just(BROKEN_TIME), st.integers(0, MAX_TIME)),
            subsec_ns=st.integers(0, NS_PER_S - 1),
            regs=st.binary(min_size=NREGS, max_size=NREGS))


class Rtc:
    """The RTC/CMOS at ports 0x70 (index) and 0x71 (data)."""

    state_class = RtcState

    def __init__(self, irq: IrqLine, clock: Clock = time.monotonic_ns,
                 flag_broken_time: bool = True) -> None:
        self._irq = irq
        self._clock = clock
        self._flag_broken_time = flag_broken_time
        self._cond = threading.Condition(threading.RLock())
        self._regs = bytearray(NREGS)
        self._addr = RTC_STATUSD
        self._nmi_disabled = False
        self._base_time = BROKEN_TIME
        self._base_ns = self._started_ns = clock()
        self._periodic_next: int | None = None
        self._paused = False
        self._worker = DeadlineWorker("vrtc", self._cond, self._next_deadline, self._expire, clock)
        with self._cond:
            self._regs[RTC_STATUSA] = 0x20          # divider running, no periodic rate
            self._regs[RTC_STATUSB] = RTCSB_24HR
            self._regs[RTC_STATUSD] = RTCSD_PWR
            now = clock()
            self._time_update(0, now, elapsed=False)
            self._render(0)

    # ------------------------------------------------------------ ports

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            return (1 << (8 * size)) - 1
        if offset == 0:
            return 0xFF
        if offset != 1:
            return 0xFF
        with self._cond:
            now = self._clock()
            reg = self._addr
            self._sync(now, reg)
            if reg == RTC_STATUSC:
                val = self._regs[RTC_STATUSC]
                self._set_reg_c(0)
            elif reg == RTC_STATUSA:
                val = self._regs[RTC_STATUSA] | (RTCSA_TUP if self._update_in_progress(now) else 0)
            else:
                val = self._regs[reg]
            return val

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            return
        value &= 0xFF
        with self._cond:
            if offset == 0:
                self._addr = value & 0x7F
                self._nmi_disabled = bool(value & 0x80)
                return
            if offset != 1:
                return
            now = self._clock()
            reg = self._addr
            self._sync(now, reg)
            if reg == RTC_STATUSA:
                self._set_reg_a(value, now)
            elif reg == RTC_STATUSB:
                self._set_reg_b(value, now)
            elif reg in (RTC_STATUSC, RTC_STATUSD):
                pass                                    # read-only
            else:
                if reg == RTC_SEC:
                    value &= 0x7F                       # bit 7 of seconds is read-only
                self._regs[reg] = value
                # Some guests (OpenBSD) write the century outside SET: re-read the time.
                if reg == RTC_CENTURY and not self._halted:
                    self._time_update(self._fields_to_secs(), now, elapsed=False)
            self._kick()

    # -------------------------------------------------- host-side interface

    def settime(self, secs: int) -> None:
        """Set the RTC time (seconds since the epoch, in RTC time: UTC or local)."""
        if not 0 <= secs <= MAX_TIME:
            raise RtcError(f"RTC time {secs} out of range")
        with self._cond:
            if self._halted:
                raise RtcError("RTC update halted by guest")
            self._time_update(int(secs), self._clock(), elapsed=False)
            self._kick()

    def gettime(self) -> int:
        """Current RTC time in seconds, or -1 while the guest's time is broken."""
        with self._cond:
            return self._curtime(self._clock())

    def nvram_read(self, offset: int) -> int:
        """Any CMOS byte (0..127), date/time refreshed first; no side effects."""
        if not 0 <= offset < NREGS:
            raise ValueError(f"RTC nvram offset {offset} out of range")
        with self._cond:
            if offset < 10 or offset == RTC_CENTURY:
                self._render(self._curtime(self._clock()))
            return self._regs[offset]

    def nvram_write(self, offset: int, value: int) -> None:
        """NVRAM only: clock, control registers and the century are refused (EINVAL)."""
        if not RTC_NVRAM_START <= offset < NREGS or offset == RTC_CENTURY:
            raise ValueError(f"RTC nvram offset {offset:#x} is not writable")
        if not 0 <= value <= 0xFF:
            raise ValueError(f"RTC nvram value {value} is not a byte")
        with self._cond:
            self._regs[offset] = value

    # ------------------------------------------------------------ time keeping

    @property
    def _halted(self) -> bool:
        return bool(self._regs[RTC_STATUSB] & RTCSB_HALT)

    def _divider_enabled(self, reg_a: int | None = None) -> bool:
        a = self._regs[RTC_STATUSA] if reg_a is None else reg_a
        return (a & 0x70) == 0x20

    def _update_enabled(self) -> bool:
        return self._divider_enabled() and not self._halted and self._base_time != BROKEN_TIME

    def _curtime(self, now: int) -> int:
        t = self._base_time
        if self._update_enabled():
            t += (now - self._base_ns) // NS_PER_S
        return t

    def _update_in_progress(self, now: int) -> bool:
        if not self._update_enabled():
            return False
        phase = (now - self._base_ns) % NS_PER_S
        if phase >= NS_PER_S - UIP_BEFORE_NS:
            return True
        # The update cycle after a boundary, unless the clock was (re)started since.
        return phase < UIP_AFTER_NS and now - phase > self._started_ns

    def _sync(self, now: int, reg: int) -> None:
        """Every data-port access first brings the clock up to date (as vrtc)."""
        cur = self._curtime(now)
        self._time_update(cur, now, elapsed=True)
        if reg < 10 or reg == RTC_CENTURY:
            self._render(cur)

    def _time_update(self, newtime: int, now: int, elapsed: bool) -> bool:
        """Move the clock to ``newtime``; False if the guest holds SET.

        ``elapsed`` means the move is just time passing: the second boundary
        phase is kept.  Otherwise the new time starts a fresh second now.
        """
        old = self._base_time
        if newtime == old:
            return True
        if newtime == BROKEN_TIME:
            self._base_time = BROKEN_TIME
            return True
        if self._halted:
            return False
        b = self._regs[RTC_STATUSB]
        if b & RTCSB_AINTR:
            # Any second in (old, new] may match; a day holds every time of day.
            first = newtime if old == BROKEN_TIME or newtime < old else max(old + 1, newtime - 86399)
            if any(self._alarm_matches(t) for t in range(first, newtime + 1)):
                self._set_reg_c(self._regs[RTC_STATUSC] | RTCIR_ALARM)
            self._render(newtime)
        if b & RTCSB_UINTR:
            self._set_reg_c(self._regs[RTC_STATUSC] | RTCIR_UPDATE)
        if elapsed and old != BROKEN_TIME and newtime > old:
            self._base_ns += (newtime - old) * NS_PER_S
        else:
            self._base_ns = self._started_ns = now
        self._base_time = newtime
        return True

    def _alarm_matches(self, secs: int) -> bool:
        sec, mn, hour = self._tod_fields(secs)
        r = self._regs
        return ((r[RTC_ALARM_SEC] >= 0xC0 or r[RTC_ALARM_SEC] == sec)
                and (r[RTC_ALARM_MIN] >= 0xC0 or r[RTC_ALARM_MIN] == mn)
                and (r[RTC_ALARM_HOUR] >= 0xC0 or r[RTC_ALARM_HOUR] == hour))

    def _enc(self, v: int) -> int:
        return v if self._regs[RTC_STATUSB] & RTCSB_BIN else _bcd(v)

    def _tod_fields(self, secs: int) -> tuple[int, int, int]:
        """Seconds, minutes and hour registers for ``secs`` in the current format."""
        tod = secs % 86400
        h, rem = divmod(tod, 3600)
        m, s = divmod(rem, 60)
        if self._regs[RTC_STATUSB] & RTCSB_24HR:
            hour = self._enc(h)
        else:
            hour = self._enc(12 if h % 12 == 0 else h % 12) | (0x80 if h >= 12 else 0)
        return self._enc(s), self._enc(m), hour

    def _render(self, secs: int, force: bool = False) -> None:
        """Write the date/time registers for ``secs`` (not while the guest holds SET)."""
        if secs < 0 or (self._halted and not force):
            return
        tm = time.gmtime(min(secs, MAX_TIME))
        r = self._regs
        r[RTC_SEC], r[RTC_MIN], r[RTC_HOUR] = self._tod_fields(secs)
        r[RTC_DOW] = self._enc((tm.tm_wday + 1) % 7 + 1)      # 1 = Sunday
        r[RTC_DOM] = self._enc(tm.tm_mday)
        r[RTC_MONTH] = self._enc(tm.tm_mon)
        r[RTC_YEAR] = self._enc(tm.tm_year % 100)
        r[RTC_CENTURY] = self._enc(tm.tm_year // 100)

    def _dec(self, raw: int) -> int | None:
        if self._regs[RTC_STATUSB] & RTCSB_BIN:
            return raw
        lo, hi = raw & 0xF, raw >> 4
        if lo > 9 or hi > 9:
            return None
        return hi * 10 + lo

    def _fields_to_secs(self) -> int:
        """The time the guest programmed, or BROKEN_TIME if it is not a valid date."""
        r = self._regs
        b = r[RTC_STATUSB]
        sec, mn = self._dec(r[RTC_SEC]), self._dec(r[RTC_MIN])
        if sec is None or not 0 <= sec <= 59 or mn is None or not 0 <= mn <= 59:
            return BROKEN_TIME
        raw_hour, pm = r[RTC_HOUR], False
        if not b & RTCSB_24HR and raw_hour & 0x80:
            raw_hour &= 0x7F
            pm = True
        hour = self._dec(raw_hour)
        if hour is None:
            return BROKEN_TIME
        if not b & RTCSB_24HR:
            if not 1 <= hour <= 12:
                return BROKEN_TIME
            hour = (0 if hour == 12 else hour) + (12 if pm else 0)
        if not 0 <= hour <= 23:
            return BROKEN_TIME
        day, mon = self._dec(r[RTC_DOM]), self._dec(r[RTC_MONTH])
        year, century = self._dec(r[RTC_YEAR]), self._dec(r[RTC_CENTURY])
        if day is None or mon is None or year is None or century is None:
            return BROKEN_TIME
        if not 1 <= mon <= 12 or not 0 <= year <= 99:
            return BROKEN_TIME
        full_year = century * 100 + year
        if full_year < 1970 or not 1 <= day <= calendar.monthrange(full_year, mon)[1]:
            return BROKEN_TIME
        return calendar.timegm((full_year, mon, day, hour, mn, sec, 0, 0, 0))

    # --------------------------------------------------------- control registers

    def _set_reg_a(self, value: int, now: int) -> None:
        value &= ~RTCSA_TUP & 0xFF
        old = self._regs[RTC_STATUSA]
        if not self._divider_enabled(old) and self._divider_enabled(value):
            self._base_ns = self._started_ns = now   # time was frozen while the divider was in reset
        self._regs[RTC_STATUSA] = value
        if (old ^ value) & 0x7F:
            self._restart_periodic(now)

    def _set_reg_b(self, value: int, now: int) -> None:
        old = self._regs[RTC_STATUSB]
        self._regs[RTC_STATUSB] = value
        changed = old ^ value
        if changed & RTCSB_HALT:
            if not value & RTCSB_HALT:
                newtime = self._fields_to_secs()
                if newtime == BROKEN_TIME and self._flag_broken_time:
                    # vrtc fails the access here; the clock stays stopped.
                    self._restart_periodic(now)
                    return
            else:
                self._render(self._base_time, force=True)
                newtime = BROKEN_TIME
                self._regs[RTC_STATUSB] &= ~RTCSB_UINTR
            self._time_update(newtime, now, elapsed=False)
        if changed & RTCSB_ALL_INTRS:
            self._set_reg_c(self._regs[RTC_STATUSC])
        if changed & RTCSB_PINTR:
            self._restart_periodic(now)

    def _set_reg_c(self, value: int) -> None:
        b = self._regs[RTC_STATUSB]
        value &= RTCIR_ALARM | RTCIR_PERIOD | RTCIR_UPDATE
        old_irqf = self._regs[RTC_STATUSC] & RTCIR_INT
        new_irqf = RTCIR_INT if ((b & RTCSB_AINTR and value & RTCIR_ALARM)
                                 or (b & RTCSB_PINTR and value & RTCIR_PERIOD)
                                 or (b & RTCSB_UINTR and value & RTCIR_UPDATE)) else 0
        self._regs[RTC_STATUSC] = new_irqf | value
        if new_irqf and not old_irqf:
            self._irq.pulse()

    # --------------------------------------------------------------- the timer

    def _kick(self) -> None:
        if not self._paused:
            self._worker.poke()

    def _period_ns(self) -> int:
        if not self._regs[RTC_STATUSB] & RTCSB_PINTR or not self._divider_enabled():
            return 0
        return _PERIOD_NS[self._regs[RTC_STATUSA] & 0x0F]

    def _restart_periodic(self, now: int) -> None:
        p = self._period_ns()
        self._periodic_next = now + p if p else None

    def _next_deadline(self) -> int | None:
        if self._paused:
            return None
        deadlines = []
        if self._periodic_next is not None:
            deadlines.append(self._periodic_next)
        if self._regs[RTC_STATUSB] & (RTCSB_AINTR | RTCSB_UINTR) and self._update_enabled():
            now = self._clock()
            deadlines.append(self._base_ns + ((now - self._base_ns) // NS_PER_S + 1) * NS_PER_S)
        return min(deadlines) if deadlines else None

    def _expire(self, now: int) -> None:
        p = self._period_ns()
        if self._periodic_next is not None and now >= self._periodic_next:
            if p:
                self._set_reg_c(self._regs[RTC_STATUSC] | RTCIR_PERIOD)
                nxt = self._periodic_next + p
                self._periodic_next = nxt if nxt > now else now + p
            else:
                self._periodic_next = None
        if self._regs[RTC_STATUSB] & (RTCSB_AINTR | RTCSB_UINTR) and self._update_enabled():
            self._time_update(self._curtime(now), now, elapsed=True)

    # --------------------------------------------------------------- snapshot

    def save_state(self) -> RtcState:
        with self._cond:
            now = self._clock()
            cur = self._curtime(now)
            phase = (now - self._base_ns) % NS_PER_S if self._update_enabled() else 0
            return RtcState(addr=self._addr, nmi_disabled=self._nmi_disabled,
                            rtc_time=cur, subsec_ns=phase, regs=bytes(self._regs))

    def restore_state(self, state: RtcState) -> None:
        state.validate()
        with self._cond:
            now = self._clock()
            self._regs[:] = state.regs
            self._regs[RTC_STATUSA] &= ~RTCSA_TUP & 0xFF
            self._addr = state.addr
            self._nmi_disabled = state.nmi_disabled
            self._base_time = state.rtc_time
            self._base_ns = now - state.subsec_ns
            self._started_ns = self._base_ns
            self._restart_periodic(now)
            self._kick()

    def pause(self) -> None:
        """Stop raising interrupts; the clock itself keeps time, as vrtc's does."""
        with self._cond:
            self._paused = True
        self._worker.stop()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            if self._periodic_next is not None and self._periodic_next < self._clock():
                self._restart_periodic(self._clock())
            self._kick()

    def close(self) -> None:
        """Stop the timer thread for good (the VM is going away)."""
        self.pause()

    # ------------------------------------------------------------- debugging

    @property
    def nmi_disabled(self) -> bool:
        return self._nmi_disabled


def rtc_init_nvram(rtc: Rtc, lowmem: int, highmem: int, use_localtime: bool,
                   now: float | None = None) -> None:
    """What bhyve's userland ``rtc_init`` writes at start-up.

    Memory sizes for firmware (UEFI, SeaBIOS read them): 0x34/0x35 = 64 KiB
    units of lowmem above 16 MiB, 0x5b..0x5d = 64 KiB units of highmem above
    4 GiB, little-endian.  Then the clock: UTC, or with ``use_localtime`` (the
    ``rtc.use_localtime`` default) the host's local wall time written as if it
    were UTC.  The century byte 0x32 follows from the time.
    """
    lo = max(0, lowmem - (16 << 20)) // (64 << 10)
    hi = max(0, highmem) // (64 << 10)
    rtc.nvram_write(0x34, lo & 0xFF)
    rtc.nvram_write(0x35, (lo >> 8) & 0xFF)
    rtc.nvram_write(0x5B, hi & 0xFF)
    rtc.nvram_write(0x5C, (hi >> 8) & 0xFF)
    rtc.nvram_write(0x5D, (hi >> 16) & 0xFF)
    t = int(time.time() if now is None else now)
    if use_localtime:
        t = calendar.timegm(time.localtime(t))
    rtc.settime(t)


__all__ = ["Rtc", "RtcState", "RtcError", "rtc_init_nvram", "BROKEN_TIME"]
