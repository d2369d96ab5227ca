"""PS/2 keyboard behind the i8042 (bhyve's ``ps2kbd.c`` command set).

The device speaks bytes both ways: :meth:`Ps2Keyboard.command` takes a byte
the guest wrote to port 0x60 and queues the reply; :meth:`queue_scancodes`
takes host key events already encoded as scan code set 2 bytes (what the
VNC/console layer will produce); the controller drains :meth:`pop`.  It
identifies as an MF2 keyboard (0xAB 0x83).  Not thread-safe on its own: the
controller calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Annotated

from bhyvepy.dev.ps2 import FIFO_SIZE, Ps2Output
from bhyvepy.snapshot.state import BOOL, U8, Blob, StateError, device_state

ACK, RESEND, BAT_OK, ECHO = 0xFA, 0xFE, 0xAA, 0xEE
CMD_SET_LEDS, CMD_ECHO, CMD_SCANCODE_SET, CMD_IDENTIFY = 0xED, 0xEE, 0xF0, 0xF2
CMD_TYPEMATIC, CMD_ENABLE, CMD_DISABLE, CMD_DEFAULTS, CMD_RESEND, CMD_RESET = 0xF3, 0xF4, 0xF5, 0xF6, 0xFE, 0xFF
KBD_ID = (0xAB, 0x83)
DEFAULT_TYPEMATIC = 0x2B       # 10.9 cps, 500 ms delay: the power-on default


@device_state("ps2kbd", version=1)
@dataclass
class Ps2KbdState:
    enabled: BOOL = True
    scancode_set: U8 = 2
    leds: U8 = 0
    typematic: U8 = DEFAULT_TYPEMATIC
    curcmd: U8 = 0
    last_sent: U8 = 0
    queue: Annotated[bytes, Blob(max_len=FIFO_SIZE)] = b""

    def validate(self) -> None:
        if self.scancode_set not in (1, 2, 3):
            raise StateError(f"ps2kbd: scan code set {self.scancode_set}")
        if self.curcmd not in (0, CMD_SET_LEDS, CMD_SCANCODE_SET, CMD_TYPEMATIC):
            raise StateError(f"ps2kbd: pending command {self.curcmd:#x}")

    @classmethod
    def hypothesis_strategy(cls):  # pragma: no cover - exercised by tests
        from hypothesis import strategies as st
        byte = st.integers(0, 255)
        return st.builds(cls, enabled=st.booleans(), scancode_set=st.integers(1, 3), leds=st.integers(0, 7),
                         typematic=st.integers(0, 0x7F), last_sent=byte,
                         curcmd=st.sampled_from([0, CMD_SET_LEDS, CMD_SCANCODE_SET, CMD_TYPEMATIC]),
                         queue=st.binary(max_size=FIFO_SIZE))


class Ps2Keyboard(Ps2Output):
    state_class = Ps2KbdState

    def __init__(self) -> None:
        self._s = Ps2KbdState()
        super().__init__()

    # --------------------------------------------------------- queue

    def pop(self) -> int | None:
        if not self._q:
            return None
        b = self._q.popleft()
        self._s.last_sent = b
        return b

    # --------------------------------------------------------- guest commands

    def _defaults(self) -> None:
        self._s.scancode_set = 2
        self._s.typematic = DEFAULT_TYPEMATIC
        self._s.leds = 0

    def command(self, val: int) -> None:
        s = self._s
        if s.curcmd:
            cmd, s.curcmd = s.curcmd, 0
            if cmd == CMD_SET_LEDS:
                s.leds = val & 0x07
                self._put(ACK)
            elif cmd == CMD_TYPEMATIC:
                s.typematic = val & 0x7F
                self._put(ACK)
            elif cmd == CMD_SCANCODE_SET:
                if val == 0:
                    self._put(ACK, s.scancode_set)
                elif val in (1, 2, 3):
                    s.scancode_set = val
                    self._put(ACK)
                else:
                    self._put(RESEND)
            return
        if val == CMD_RESET:
            self._q.clear()
            self._defaults()
            s.enabled = True
            self._put(ACK, BAT_OK)
        elif val == CMD_DEFAULTS:
            self._q.clear()
            self._defaults()
            self._put(ACK)
        elif val == CMD_DISABLE:
            self._q.clear()
            self._defaults()
            s.enabled = False
            self._put(ACK)
        elif val == CMD_ENABLE:
            self._q.clear()
            s.enabled = True
            self._put(ACK)
        elif val == CMD_IDENTIFY:
            self._put(ACK, *KBD_ID)
        elif val == CMD_ECHO:
            self._put(ECHO)
        elif val == CMD_RESEND:
            self._put(s.last_sent)
        elif val in (CMD_SET_LEDS, CMD_TYPEMATIC, CMD_SCANCODE_SET):
            s.curcmd = val
            self._put(ACK)
        elif val == 0x00:
            self._put(ACK)              # bhyve acknowledges a stray zero
        else:
            self._put(RESEND)           # unknown command

    # --------------------------------------------------------- host input

    def inject(self, val: int) -> None:
        """Controller command 0xD2: a byte appears as if the keyboard sent it."""
        self._put(val)

    def queue_scancodes(self, codes: bytes) -> bool:
        """Queue one key event (set 2 bytes); dropped whole if scanning is off or no room."""
        if not self._s.enabled or len(self._q) + len(codes) > FIFO_SIZE:
            return False
        self._q.extend(codes)
        return True

    # --------------------------------------------------------- state

    @property
    def leds(self) -> int:
        return self._s.leds

    @property
    def enabled(self) -> bool:
        return self._s.enabled

    def save_state(self) -> Ps2KbdState:
        s = self._s
        return Ps2KbdState(s.enabled, s.scancode_set, s.leds, s.typematic, s.curcmd, s.last_sent,
                           bytes(self._q))

    def restore_state(self, state: Ps2KbdState) -> None:
        state.validate()
        self._s = Ps2KbdState(state.enabled, state.scancode_set, state.leds, state.typematic,
                              state.curcmd, state.last_sent, state.queue)
        self._q = deque(state.queue)
