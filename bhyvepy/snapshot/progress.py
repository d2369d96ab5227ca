"""bhyve's checkpoint/restore progress line, drawn on a terminal.

bhyve(8) redraws one line while guest memory is written or read:
``\\r[<cur><unit> / <total><unit>] |####<spinner>____|`` with the unit GiB
when the total is over 10 GiB, MiB over 10 MiB and KiB otherwise, three
decimals, the current value right-aligned to the width of the total, the bar
filling the terminal width, and a ``/ - \\ |`` spinner at the head of the bar
until the end.  Users of bhyve know this line, so bhyvepy draws the same one.
Only a terminal gets it: a log file or a pipe gets nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

__all__ = ["render", "ProgressBar"]

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
SPINNER = "/-\\|"
#: bhyve's line buffer size bounds the drawn width.
MAX_WIDTH = 1024


def _unit(total: int) -> tuple[int, str]:
    if total > 10 * GIB:
        return GIB, "GiB"
    if total > 10 * MIB:
        return MIB, "MiB"
    return KIB, "KiB"


def render(done: int, total: int, width: int, spin: int = 0) -> str:
    """The progress line for ``done`` of ``total`` bytes on ``width`` columns.

    Pure, so that it can be checked without a terminal.  The result starts
    with a carriage return and is ``width - 1`` characters long, like
    bhyve's (which also counts the ``\\r``).
    """
    if total <= 0:
        return "[0B / 0B]"
    done = max(0, min(done, total))
    width = max(1, min(width, MAX_WIDTH))
    div, unit = _unit(total)
    cur, top = done / div, total / div
    top_text = f"{top:.3f}"
    line = f"\r[{cur:{len(top_text)}.3f}{unit} / {top_text}{unit}] |"
    if len(line) < width - 2:
        room = width - len(line) - 2
        filled = int(room * (cur / top))
        line += "#" * filled + (SPINNER[spin % len(SPINNER)] if done != total else "#")
        line = line.ljust(width - 2, "_")[:width - 2] + "|"
    return line[:width - 1]


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class ProgressBar:
    """A ``progress(done, total)`` callback that draws :func:`render` lines.

    Redraws at most every ``interval`` seconds (bhyve's spinner thread ticks
    every 50 ms) and always at completion; :meth:`finish` ends the line with
    ``\\r\\n`` as bhyve does.  Does nothing unless ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, width: int | None = None,
                 interval: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 force: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = force or _is_tty(self.stream)
        self.width = width
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self._spin = 0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if (done < total and self._last is not None
                and now - self._last < self.interval):
            return
        self._last = now
        width = self.width if self.width is not None else _columns(self.stream)
        self.stream.write(render(done, total, width, self._spin))
        self.stream.flush()
        self._spin += 1
        self._drawn = True

    def finish(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
