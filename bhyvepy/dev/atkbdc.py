"""i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).

The controller has one output byte (status bit 0, plus bit 5 when it came
from the mouse) fed, in order of priority, by its own command replies, the
keyboard and the auxiliary (mouse) port; each byte from the keyboard pulses
IRQ 1 and each from the mouse IRQ 12 when the command byte enables them (bhyve
pulses, i.e. edge-triggered).  With command-byte bit 6 set, keyboard bytes
are translated from scan code set 2 to set 1 on their way through, as the
8042 does.  A disabled port (command byte bit 4/5, commands 0xAD/0xA7) holds
its device's bytes back until it is enabled again; writing a byte to a
device re-enables its port, as QEMU does.

The CPU reset line: command 0xFE (any "pulse output port" command 0xF0-0xFF
with bit 0 clear), or writing the output port (0xD1) with bit 0 clear, ends
in ``on_suspend(SuspendHow.RESET)``.  bhyve handles 0xFE only; the output
port write is what real controllers and QEMU also do.

Registered for snapshots under the singleton name ``atkbdc`` (the VM does
that); the keyboard and mouse are saved with it, as bhyve does.  Host input
enters through :meth:`Atkbdc.key_event` (set 2 scan codes) and
:meth:`Atkbdc.mouse_event`, from any thread.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Callable

from bhyvepy.dev.ps2kbd import Ps2Keyboard, Ps2KbdState
from bhyvepy.dev.ps2mouse import Ps2Mouse, Ps2MouseState
from bhyvepy.irq import IrqLine
from bhyvepy.snapshot.state import BOOL, U8, Blob, StateError, device_state
from bhyvepy.vmm.exits import SuspendHow

KBD_DATA_PORT = 0x60
KBD_STS_CTL_PORT = 0x64
KBD_IRQ, AUX_IRQ = 1, 12

# status register
STS_OBF, STS_SYS, STS_CMD, STS_AUX_OBF = 0x01, 0x04, 0x08, 0x20
# command byte (RAM byte 0)
CB_KBD_INT, CB_AUX_INT, CB_SYS, CB_KBD_DIS, CB_AUX_DIS, CB_XLATE = 0x01, 0x02, 0x04, 0x10, 0x20, 0x40
# controller commands
C_READ_RAM, C_WRITE_RAM = 0x20, 0x60
C_AUX_DISABLE, C_AUX_ENABLE, C_AUX_TEST, C_SELF_TEST, C_KBD_TEST = 0xA7, 0xA8, 0xA9, 0xAA, 0xAB
C_KBD_DISABLE, C_KBD_ENABLE, C_READ_INPORT = 0xAD, 0xAE, 0xC0
C_READ_OUTPORT, C_WRITE_OUTPORT, C_WRITE_KBD_OBUF, C_WRITE_AUX_OBUF, C_WRITE_AUX = 0xD0, 0xD1, 0xD2, 0xD3, 0xD4
C_PULSE_RESET = 0xFE
SELF_TEST_OK, PORT_TEST_OK = 0x55, 0x00
OUTPORT_RESET_N = 0x01          # output port bit 0: CPU reset line, active low
RAM_SIZE = 32
CTRL_QUEUE = 16

SRC_CTRL, SRC_KBD, SRC_AUX = 0, 1, 2
_DATA_CMDS = frozenset(range(0x60, 0x80)) | {C_WRITE_OUTPORT, C_WRITE_KBD_OBUF, C_WRITE_AUX_OBUF, C_WRITE_AUX}

# Scan code set 2 -> set 1, the 8042's translation (bytes >= 0x80 pass through
# except 0x83 (F7) and 0x84 (Alt+SysRq)).
_XLATE_LOW = bytes.fromhex(
    "ff 43 41 3f 3d 3b 3c 58 64 44 42 40 3e 0f 29 59 "
    "65 38 2a 70 1d 10 02 5a 66 71 2c 1f 1e 11 03 5b "
    "67 2e 2d 20 12 05 04 5c 68 39 2f 21 14 13 06 5d "
    "69 31 30 23 22 15 07 5e 6a 72 32 24 16 08 09 5f "
    "6b 33 25 17 18 0b 0a 60 6c 34 35 26 27 19 0c 61 "
    "6d 73 28 74 1a 0d 62 6e 3a 36 1c 1b 75 2b 63 76 "
    "55 56 77 78 79 7a 0e 7b 7c 4f 7d 4b 47 7e 7f 6f "
    "52 53 50 4c 4d 48 01 45 57 4e 51 4a 37 49 46 54"
)
XLATE = bytes(_XLATE_LOW[i] if i < 0x80 else {0x83: 0x41, 0x84: 0x54}.get(i, i) for i in range(256))


@device_state("atkbdc", version=1)
@dataclass
class AtkbdcState:
    status: U8 = 0
    outport: U8 = OUTPORT_RESET_N
    ram: Annotated[bytes, Blob(exact=RAM_SIZE)] = bytes(RAM_SIZE)
    curcmd: U8 = 0
    obf: U8 = 0
    obf_src: U8 = SRC_CTRL
    ctrl_queue: Annotated[bytes, Blob(max_len=CTRL_QUEUE)] = b""
    xlate_release: BOOL = False
    kbd: Ps2KbdState = field(default_factory=Ps2KbdState)
    mouse: Ps2MouseState = field(default_factory=Ps2MouseState)

    def validate(self) -> None:
        if self.curcmd and self.curcmd not in _DATA_CMDS:
            raise StateError(f"atkbdc: pending command {self.curcmd:#x} takes no data")
        if self.obf_src not in (SRC_CTRL, SRC_KBD, SRC_AUX):
            raise StateError(f"atkbdc: output buffer source {self.obf_src}")
        self.kbd.validate()
        self.mouse.validate()

    @classmethod
    def hypothesis_strategy(cls):  # pragma: no cover - exercised by tests
        from hypothesis import strategies as st
        from bhyvepy.snapshot.state import strategy
        byte = st.integers(0, 255)
        return st.builds(
            cls, status=byte, outport=byte, ram=st.binary(min_size=RAM_SIZE, max_size=RAM_SIZE),
            curcmd=st.sampled_from([0, *sorted(_DATA_CMDS)]), obf=byte,
            obf_src=st.sampled_from([SRC_CTRL, SRC_KBD, SRC_AUX]),
            ctrl_queue=st.binary(max_size=CTRL_QUEUE), xlate_release=st.booleans(),
            kbd=strategy(Ps2KbdState), mouse=strategy(Ps2MouseState))


class Atkbdc:
    state_class = AtkbdcState

    def __init__(self, kbd_irq: IrqLine, aux_irq: IrqLine,
                 on_suspend: Callable[[SuspendHow], None]) -> None:
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._on_suspend = on_suspend
        self._lock = threading.RLock()
        self.kbd = Ps2Keyboard()
        self.mouse = Ps2Mouse()
        self._status = 0
        self._outport = OUTPORT_RESET_N
        self._ram = bytearray(RAM_SIZE)
        self._curcmd = 0
        self._obf = 0
        self._obf_src = SRC_CTRL
        self._ctrl: deque[int] = deque()
        self._xlate_release = False

    # ------------------------------------------------------------ ports

    def read(self, offset: int, size: int) -> int:
        if size != 1 or offset not in (0, 4):
            return (1 << (8 * size)) - 1
        with self._lock:
            if offset == 4:
                return self._status
            val = self._obf
            self._status &= ~(STS_OBF | STS_AUX_OBF)
            self._refill()
            return val

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1 or offset not in (0, 4):
            return
        value &= 0xFF
        with self._lock:
            reset = self._command(value) if offset == 4 else self._data(value)
            self._refill()
        if reset:
            self._on_suspend(SuspendHow.RESET)

    # ------------------------------------------------------------ host input

    def key_event(self, codes: bytes) -> bool:
        """A key press or release as scan code set 2 bytes; False if it was dropped."""
        with self._lock:
            ok = self.kbd.queue_scancodes(codes)
            self._refill()
            return ok

    def mouse_event(self, dx: int, dy: int, buttons: int) -> None:
        """Relative motion (dy > 0 is up) and buttons (1 left, 2 right, 4 middle)."""
        with self._lock:
            self.mouse.movement(dx, dy, buttons, reporting=not self._ram[0] & CB_AUX_DIS)
            self._refill()

    # ------------------------------------------------------------ controller

    def _reply(self, *data: int) -> None:
        for b in data:
            if len(self._ctrl) < CTRL_QUEUE:
                self._ctrl.append(b)

    def _command(self, cmd: int) -> bool:
        self._status |= STS_CMD
        self._curcmd = 0
        ram = self._ram
        if C_READ_RAM <= cmd < C_READ_RAM + RAM_SIZE:
            self._reply(ram[cmd - C_READ_RAM])
        elif cmd in _DATA_CMDS:
            self._curcmd = cmd
        elif cmd == C_SELF_TEST:
            self._status |= STS_SYS
            self._reply(SELF_TEST_OK)
        elif cmd in (C_KBD_TEST, C_AUX_TEST):
            self._reply(PORT_TEST_OK)
        elif cmd == C_KBD_DISABLE:
            ram[0] |= CB_KBD_DIS
        elif cmd == C_KBD_ENABLE:
            ram[0] &= ~CB_KBD_DIS
        elif cmd == C_AUX_DISABLE:
            ram[0] |= CB_AUX_DIS
        elif cmd == C_AUX_ENABLE:
            ram[0] &= ~CB_AUX_DIS
        elif cmd == C_READ_INPORT:
            self._reply(0x00)
        elif cmd == C_READ_OUTPORT:
            self._reply(self._outport)
        elif cmd >= 0xF0:
            return not cmd & 0x01        # pulse output lines: bit 0 clear pulses reset
        return False

    def _data(self, val: int) -> bool:
        cmd = self._curcmd
        if not self._status & STS_CMD or not cmd:
            self._status &= ~STS_CMD
            self._ram[0] &= ~CB_KBD_DIS          # talking to the keyboard re-enables its port
            self.kbd.command(val)
            return False
        self._status &= ~STS_CMD
        self._curcmd = 0
        if C_WRITE_RAM <= cmd < C_WRITE_RAM + RAM_SIZE:
            self._ram[cmd - C_WRITE_RAM] = val
            if cmd == C_WRITE_RAM:
                self._status = (self._status & ~STS_SYS) | (STS_SYS if val & CB_SYS else 0)
        elif cmd == C_WRITE_OUTPORT:
            self._outport = val
            return not val & OUTPORT_RESET_N
        elif cmd == C_WRITE_KBD_OBUF:
            self.kbd.inject(val)          # appears as keyboard data, translated like it
        elif cmd == C_WRITE_AUX_OBUF:
            self.mouse.inject(val)
        elif cmd == C_WRITE_AUX:
            self._ram[0] &= ~CB_AUX_DIS
            self.mouse.command(val)
        return False

    # ------------------------------------------------------------ output buffer

    def _refill(self) -> None:
        if self._status & STS_OBF:
            return
        ram0 = self._ram[0]
        if self._ctrl:
            self._load(self._ctrl.popleft(), SRC_CTRL)
            if ram0 & CB_KBD_INT:
                self._kbd_irq.pulse()
            return
        if not ram0 & CB_KBD_DIS:
            while self.kbd.pending():
                b = self.kbd.pop()
                if ram0 & CB_XLATE:
                    if b == 0xF0:
                        self._xlate_release = True
                        continue
                    b = XLATE[b] | (0x80 if self._xlate_release else 0)
                    self._xlate_release = False
                self._load(b, SRC_KBD)
                if ram0 & CB_KBD_INT:
                    self._kbd_irq.pulse()
                return
        if not ram0 & CB_AUX_DIS and self.mouse.pending():
            self._load(self.mouse.pop(), SRC_AUX)
            if ram0 & CB_AUX_INT:
                self._aux_irq.pulse()

    def _load(self, val: int, src: int) -> None:
        self._obf = val
        self._obf_src = src
        self._status |= STS_OBF
        if src == SRC_AUX:
            self._status |= STS_AUX_OBF
        else:
            self._status &= ~STS_AUX_OBF

    # ------------------------------------------------------------ snapshot

    def save_state(self) -> AtkbdcState:
        with self._lock:
            return AtkbdcState(
                status=self._status, outport=self._outport, ram=bytes(self._ram),
                curcmd=self._curcmd, obf=self._obf, obf_src=self._obf_src,
                ctrl_queue=bytes(self._ctrl), xlate_release=self._xlate_release,
                kbd=self.kbd.save_state(), mouse=self.mouse.save_state())

    def restore_state(self, state: AtkbdcState) -> None:
        state.validate()
        with self._lock:
            self._status, self._outport = state.status, state.outport
            self._ram[:] = state.ram
            self._curcmd, self._obf, self._obf_src = state.curcmd, state.obf, state.obf_src
            self._ctrl = deque(state.ctrl_queue)
            self._xlate_release = state.xlate_release
            self.kbd.restore_state(state.kbd)
            self.mouse.restore_state(state.mouse)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


__all__ = ["Atkbdc", "AtkbdcState", "XLATE", "KBD_DATA_PORT", "KBD_STS_CTL_PORT", "KBD_IRQ", "AUX_IRQ"]
