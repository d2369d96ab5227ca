"""What the PS/2 keyboard and mouse share: the output FIFO towards the i8042.

Both devices answer commands and report events by queueing bytes the
controller then reads one at a time; the queue is small (16 bytes, as in
bhyve) and a byte that does not fit is lost, as on the real device.
"""

from __future__ import annotations

from collections import deque

FIFO_SIZE = 16


class Ps2Output:
    """Base class holding a PS/2 device's output FIFO."""

    def __init__(self) -> None:
        self._q: deque[int] = deque()

    def _put(self, *data: int) -> None:
        for b in data:
            if len(self._q) < FIFO_SIZE:
                self._q.append(b)

    def pending(self) -> int:
        return len(self._q)
