"""POST diagnostic ports.

Firmware writes progress codes to port 0x80; bhyve leaves that port to its
catch-all handler (reads all ones, writes dropped) and claims port 0x84 for
reads only, returning 0xFF (``post.c``).  One :class:`PostPort` models either:
reads return all ones, writes are otherwise ignored but the last byte written
is kept (``last``) so a hung firmware can be diagnosed.  It has no guest-visible
state, so nothing is saved in snapshots.
"""

from __future__ import annotations

import threading

POST_PORT = 0x80          # where firmware writes POST codes
BHYVE_POST_PORT = 0x84    # what bhyve's post.c registers (IN only)


class PostPort:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last: int | None = None
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.last = value & ((1 << (8 * size)) - 1)
            self.writes += 1

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


__all__ = ["PostPort", "POST_PORT", "BHYVE_POST_PORT"]
