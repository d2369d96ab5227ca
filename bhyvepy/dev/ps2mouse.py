"""PS/2 mouse on the i8042's auxiliary port (bhyve's ``ps2mouse.c`` command set).

A standard three-button mouse (device ID 0).  Host motion arrives as
relative deltas with :meth:`Ps2Mouse.movement`; in stream mode with data
reporting on, each event becomes a three-byte packet.  A command from the
guest cancels packets not yet read, as on real mice.  Not thread-safe on its
own: the controller calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Annotated

from bhyvepy.dev.ps2 import FIFO_SIZE, Ps2Output
from bhyvepy.snapshot.state import U8, Blob, StateError, UInt, device_state

ACK, BAT_OK, MOUSE_ID = 0xFA, 0xAA, 0x00
CMD_SCALING_1, CMD_SCALING_2, CMD_RESOLUTION, CMD_STATUS = 0xE6, 0xE7, 0xE8, 0xE9
CMD_STREAM, CMD_READ_DATA, CMD_REMOTE, CMD_GET_ID = 0xEA, 0xEB, 0xF0, 0xF2
CMD_SAMPLE_RATE, CMD_ENABLE, CMD_DISABLE, CMD_DEFAULTS, CMD_RESET = 0xF3, 0xF4, 0xF5, 0xF6, 0xFF

STS_REMOTE, STS_ENABLE, STS_SCALING_21 = 0x40, 0x20, 0x10
BUTTONS = 0x07          # left 0x01, right 0x02, middle 0x04 in status and packets
PKT_ALWAYS_ONE, PKT_X_SIGN, PKT_Y_SIGN, PKT_X_OVF, PKT_Y_OVF = 0x08, 0x10, 0x20, 0x40, 0x80
I32 = Annotated[int, UInt(4, signed=True)]
DELTA_LIMIT = 1 << 20    # accumulated motion is clamped; a packet carries +-255 anyway


@device_state("ps2mouse", version=1)
@dataclass
class Ps2MouseState:
    status: U8 = STS_ENABLE
    resolution: U8 = 4
    sample_rate: U8 = 100
    curcmd: U8 = 0
    delta_x: I32 = 0
    delta_y: I32 = 0
    queue: Annotated[bytes, Blob(max_len=FIFO_SIZE)] = b""

    def validate(self) -> None:
        if self.curcmd not in (0, CMD_RESOLUTION, CMD_SAMPLE_RATE):
            raise StateError(f"ps2mouse: pending command {self.curcmd:#x}")
        if abs(self.delta_x) > DELTA_LIMIT or abs(self.delta_y) > DELTA_LIMIT:
            raise StateError("ps2mouse: accumulated motion out of range")

    @classmethod
    def hypothesis_strategy(cls):  # pragma: no cover - exercised by tests
        from hypothesis import strategies as st
        d = st.integers(-DELTA_LIMIT, DELTA_LIMIT)
        return st.builds(cls, status=st.integers(0, 0x77), resolution=st.integers(0, 3),
                         sample_rate=st.integers(0, 255),
                         curcmd=st.sampled_from([0, CMD_RESOLUTION, CMD_SAMPLE_RATE]),
                         delta_x=d, delta_y=d, queue=st.binary(max_size=FIFO_SIZE))


class Ps2Mouse(Ps2Output):
    state_class = Ps2MouseState

    def __init__(self) -> None:
        self._s = Ps2MouseState()
        super().__init__()

    def pop(self) -> int | None:
        return self._q.popleft() if self._q else None

    def clear(self) -> None:
        self._q.clear()

    def _reset(self) -> None:
        self._q.clear()
        s = self._s
        s.status = STS_ENABLE | (s.status & BUTTONS)
        s.resolution, s.sample_rate = 4, 100
        s.delta_x = s.delta_y = 0

    def _packet(self) -> None:
        """Report and consume accumulated motion, if three bytes fit."""
        s = self._s
        b0 = PKT_ALWAYS_ONE | (s.status & BUTTONS)
        dx, dy = s.delta_x, s.delta_y
        if dx < 0:
            b0 |= PKT_X_SIGN
        if dy < 0:
            b0 |= PKT_Y_SIGN
        if not -256 < dx < 256:
            b0 |= PKT_X_OVF
            dx = -255 if dx < 0 else 255
        if not -256 < dy < 256:
            b0 |= PKT_Y_OVF
            dy = -255 if dy < 0 else 255
        s.delta_x = s.delta_y = 0
        if len(self._q) + 3 <= FIFO_SIZE:
            self._put(b0, dx & 0xFF, dy & 0xFF)

    def command(self, val: int) -> None:
        s = self._s
        self._q.clear()                  # a command cancels unread packets
        if s.curcmd:
            cmd, s.curcmd = s.curcmd, 0
            if cmd == CMD_SAMPLE_RATE:
                s.sample_rate = val
            else:
                s.resolution = val & 0x03
            self._put(ACK)
            return
        if val == CMD_RESET:
            self._reset()
            self._put(ACK, BAT_OK, MOUSE_ID)
        elif val == CMD_DEFAULTS:
            self._reset()
            self._put(ACK)
        elif val == CMD_DISABLE:
            s.status &= ~STS_ENABLE
            self._put(ACK)
        elif val == CMD_ENABLE:
            s.status |= STS_ENABLE
            self._put(ACK)
        elif val in (CMD_SAMPLE_RATE, CMD_RESOLUTION):
            s.curcmd = val
            self._put(ACK)
        elif val == CMD_GET_ID:
            self._put(ACK, MOUSE_ID)
        elif val == CMD_REMOTE:
            s.status |= STS_REMOTE
            self._put(ACK)
        elif val == CMD_STREAM:
            s.status &= ~STS_REMOTE
            self._put(ACK)
        elif val == CMD_READ_DATA:
            self._put(ACK)
            self._packet()
        elif val == CMD_STATUS:
            self._put(ACK, s.status, s.resolution, s.sample_rate)
        elif val == CMD_SCALING_2:
            s.status |= STS_SCALING_21
            self._put(ACK)
        elif val == CMD_SCALING_1:
            s.status &= ~STS_SCALING_21
            self._put(ACK)
        else:
            self._put(ACK)               # bhyve acknowledges what it does not know

    def inject(self, val: int) -> None:
        """Controller command 0xD3: a byte appears as if the mouse sent it."""
        self._put(val)

    def movement(self, dx: int, dy: int, buttons: int, reporting: bool) -> bool:
        """Host motion (dy positive = up) and button state; True if a packet was queued."""
        s = self._s
        s.delta_x = max(-DELTA_LIMIT, min(DELTA_LIMIT, s.delta_x + dx))
        s.delta_y = max(-DELTA_LIMIT, min(DELTA_LIMIT, s.delta_y + dy))
        s.status = (s.status & ~BUTTONS) | (buttons & BUTTONS)
        if not reporting or not s.status & STS_ENABLE or s.status & STS_REMOTE:
            return False
        before = len(self._q)
        self._packet()
        return len(self._q) > before

    @property
    def streaming(self) -> bool:
        return bool(self._s.status & STS_ENABLE) and not self._s.status & STS_REMOTE

    def save_state(self) -> Ps2MouseState:
        s = self._s
        return Ps2MouseState(s.status, s.resolution, s.sample_rate, s.curcmd, s.delta_x, s.delta_y,
                             bytes(self._q))

    def restore_state(self, state: Ps2MouseState) -> None:
        state.validate()
        self._s = Ps2MouseState(state.status, state.resolution, state.sample_rate, state.curcmd,
                                state.delta_x, state.delta_y, state.queue)
        self._q = deque(state.queue)
