"""A device-owned thread that runs expiry work at the deadlines the device computes.

The in-kernel timers bhyvepy re-creates on KVM (RTC, HPET) need something
that wakes up at "the next interesting instant" and raises interrupts, like
vmm.ko's callouts.  Rather than one ``threading.Timer`` per armed comparator
(whose cancellation races with a vCPU re-arming it), each device owns one
:class:`DeadlineWorker` that shares the device's own lock:

* the device keeps its deadlines in its state and, after any change, calls
  :meth:`DeadlineWorker.kick` with its lock held;
* the worker waits on the device's condition until the earliest deadline the
  device reports (``next_deadline()``), then calls ``expire(now)`` with the
  lock held.

Because both run under the same lock, a deadline the guest changed a moment
ago can never fire with stale values, which is what ``callout_pending`` checks
are for in the kernel.  ``stop()`` must be called *without* the device lock
held, since it joins the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

Clock = Callable[[], int]
"""Monotonic nanoseconds; ``time.monotonic_ns`` unless a test injects another."""

NS_PER_S = 1_000_000_000

log = logging.getLogger(__name__)


class DeadlineWorker:
    def __init__(
        self,
        name: str,
        cond: threading.Condition,
        next_deadline: Callable[[], int | None],
        expire: Callable[[int], None],
        clock: Clock = time.monotonic_ns,
    ) -> None:
        self._name = name
        self._cond = cond
        self._next_deadline = next_deadline
        self._expire = expire
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the thread if it is not running (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            t = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread = t
        t.start()

    def stop(self) -> None:
        """Stop and join the thread; no expiry runs after this returns."""
        with self._cond:
            t = self._thread
            if t is None:
                return
            self._stopping = True
            self._cond.notify_all()
        if t is not threading.current_thread():
            t.join()
        with self._cond:
            if self._thread is t:
                self._thread = None

    def kick(self) -> None:
        """Deadlines changed: re-evaluate.  Call with the device lock held."""
        self._cond.notify_all()

    def poke(self) -> None:
        """Deadlines may have changed (device lock held): wake the thread, or
        start it the first time there is a deadline at all."""
        if self.running:
            self.kick()
        elif self._next_deadline() is not None:
            self.start()

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                deadline = self._next_deadline()
                now = self._clock()
                if deadline is not None and deadline <= now:
                    try:
                        self._expire(now)
                    except Exception:  # a model bug must not spin or kill the VM
                        log.exception("%s: timer expiry failed; timer stopped", self._name)
                        self._stopping = True
                    continue
                timeout = None if deadline is None else (deadline - now) / NS_PER_S
                self._cond.wait(timeout)
