"""A recording interrupt line for device tests (a test double of bhyvepy.irq's lines)."""

from __future__ import annotations


class RecordingLine:
    """Records what a device does to its interrupt line.

    ``pulsed=True`` makes level changes a test failure (edge devices such as
    the RTC or the i8042), ``pulsed=False`` makes pulses one (level devices
    such as the SCI); ``why`` is the failure message.
    """

    def __init__(self, *, pulsed: bool | None = None, why: str = "") -> None:
        self.level = False
        self.events: list[str] = []
        self.pulses = 0
        self._pulsed = pulsed
        self._why = why

    def assert_(self) -> None:
        if self._pulsed:
            raise AssertionError(self._why or "this line is pulsed")
        self.level = True
        self.events.append("assert")

    def deassert(self) -> None:
        if self._pulsed:
            raise AssertionError(self._why or "this line is pulsed")
        self.level = False
        self.events.append("deassert")

    def pulse(self) -> None:
        if self._pulsed is False:
            raise AssertionError(self._why or "this line is level-triggered")
        self.pulses += 1
        self.events.append("pulse")
