"""16550A UART register model (bhyve's ``uart_emul.c`` behaviour, in Python).

The model knows nothing of ports or host files: the VM places it at a COM
base on the port bus and hands it an interrupt line and, optionally, a host
backend (:mod:`bhyvepy.dev.uart_backend`).  Between the two runs a small
contract so that a slow guest never loses input and a slow peer never stalls
a vCPU:

* the backend's reader asks :meth:`Uart16550.rx_room` and reads no more than
  that, then calls :meth:`Uart16550.receive`; when the RX FIFO is full it stops
  reading (flow control, as bhyve disables its mevent) and the model calls
  ``backend.rx_ready()`` once the guest frees a slot;
* transmitted bytes go to ``backend.write()``, which must never block (the
  backend buffers with a bound and counts what it drops).

Behaviour follows bhyve where the two differ from a datasheet: the
transmitter is always ready (THRE/TEMT always set), DCD and DSR are always
asserted outside loopback, and the interrupt output is not gated by MCR.OUT2.
What bhyve lacks and is modelled here: FIFO trigger levels.  The IIR reports
"received data available" (0x04) once the FIFO holds at least the trigger
level and "character timeout" (0x0C) below it; the timeout is treated as
already elapsed, so an interrupt is never delayed waiting for more input.
In 16450 mode (FIFO off) pending data is reported as 0x04.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Protocol

from bhyvepy.irq import IrqLine
from bhyvepy.snapshot.state import BOOL, U8, Blob, StateError, device_state

# Register offsets (DLAB selects DLL/DLH at 0/1).
REG_DATA, REG_IER, REG_IIR, REG_LCR, REG_MCR, REG_LSR, REG_MSR, REG_SCR = range(8)
REG_FCR = REG_IIR
REG_DLL, REG_DLH = 0, 1
NREGS = 8

IER_ERXRDY, IER_ETXRDY, IER_ERLS, IER_EMSC = 0x01, 0x02, 0x04, 0x08

IIR_NOPEND, IIR_MLSC, IIR_TXRDY, IIR_RXRDY, IIR_RLS, IIR_RXTOUT = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_MASK = 0xC0

FCR_ENABLE, FCR_RCV_RST, FCR_XMT_RST, FCR_DMA = 0x01, 0x02, 0x04, 0x08
FCR_RX_MASK = 0xC0
FCR_STORED = FCR_ENABLE | FCR_DMA | FCR_RX_MASK

LCR_DLAB = 0x80

MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOPBACK = 0x01, 0x02, 0x04, 0x08, 0x10

LSR_RXRDY, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40

MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DELTA_MASK = 0x0F

FIFO_SIZE = 16
TRIGGER_LEVELS = (1, 4, 8, 14)           # FCR bits 7:6

DEFAULT_RCLK = 1843200
DEFAULT_BAUD = 115200                     # newer bhyve; older used 9600

#: bhyve's legacy COM resources: name -> (I/O base, ISA IRQ).
COM_PORTS = {
    "com1": (0x3F8, 4),
    "com2": (0x2F8, 3),
    "com3": (0x3E8, 4),
    "com4": (0x2E8, 3),
}


class UartBackendPort(Protocol):
    """What the model needs from a host backend (see :mod:`uart_backend`)."""

    def write(self, data: bytes) -> None: ...
    def rx_ready(self) -> None: ...
    def discard_input(self) -> None: ...
    def pause_rx(self) -> None: ...
    def resume_rx(self) -> None: ...


def _modem_status(mcr: int) -> int:
    if mcr & MCR_LOOPBACK:
        msr = 0
        if mcr & MCR_RTS:
            msr |= MSR_CTS
        if mcr & MCR_DTR:
            msr |= MSR_DSR
        if mcr & MCR_OUT1:
            msr |= MSR_RI
        if mcr & MCR_OUT2:
            msr |= MSR_DCD
        return msr
    # Carrier and data-set-ready always on, so a guest's open() never blocks.
    return MSR_DCD | MSR_DSR


@device_state("uart", version=1)
@dataclass
class UartState:
    ier: U8 = 0
    lcr: U8 = 0
    mcr: U8 = 0
    lsr: U8 = 0
    msr: U8 = MSR_DCD | MSR_DSR
    fcr: U8 = 0
    scr: U8 = 0
    dll: U8 = (DEFAULT_RCLK // DEFAULT_BAUD // 16) & 0xFF
    dlh: U8 = (DEFAULT_RCLK // DEFAULT_BAUD // 16) >> 8
    fifo_size: U8 = 1
    rx_fifo: Annotated[bytes, Blob(max_len=FIFO_SIZE)] = b""
    thre_pending: BOOL = False

    def validate(self) -> None:
        if self.fifo_size not in (1, FIFO_SIZE):
            raise StateError(f"uart: FIFO size {self.fifo_size} is neither 1 nor {FIFO_SIZE}")
        if len(self.rx_fifo) > self.fifo_size:
            raise StateError(f"uart: {len(self.rx_fifo)} bytes in a FIFO of {self.fifo_size}")
        if self.ier & ~0x0F or self.mcr & ~0x1F or self.fcr & ~FCR_STORED:
            raise StateError("uart: reserved bits set in IER, MCR or FCR")
        if (self.fcr & FCR_ENABLE) != (self.fifo_size == FIFO_SIZE):
            raise StateError("uart: FIFO size does not match FCR enable bit")

    @classmethod
    def hypothesis_strategy(cls):  # pragma: no cover - exercised by tests
        from hypothesis import strategies as st

        def build(fifo_on: bool, ier: int, mcr: int, fcr_rest: int, data: bytes, **kw):
            size = FIFO_SIZE if fifo_on else 1
            fcr = (FCR_ENABLE | fcr_rest) if fifo_on else 0
            return cls(ier=ier, mcr=mcr, fcr=fcr, fifo_size=size, rx_fifo=data[:size], **kw)

        byte = st.integers(0, 255)
        return st.builds(
            build, fifo_on=st.booleans(), ier=st.integers(0, 0x0F), mcr=st.integers(0, 0x1F),
            fcr_rest=st.sampled_from([0, 0x40, 0x80, 0xC0, 0x08, 0xC8]),
            data=st.binary(max_size=FIFO_SIZE), lcr=byte, lsr=byte, msr=byte, scr=byte,
            dll=byte, dlh=byte, thre_pending=st.booleans())


class Uart16550:
    """One 16550A.  ``read``/``write`` take offsets 0..7 from the COM base."""

    state_class = UartState

    def __init__(self, irq: IrqLine, backend: UartBackendPort | None = None) -> None:
        self._irq = irq
        self._backend = backend
        self._lock = threading.RLock()
        self._irq_level = False
        self._rx: deque[int] = deque()
        self._s = UartState()
        self._paused = False

    # ------------------------------------------------------------------ wiring

    def attach_backend(self, backend: UartBackendPort | None) -> None:
        with self._lock:
            self._backend = backend

    # ------------------------------------------------------------ guest access

    def read(self, offset: int, size: int) -> int:
        """Wider accesses are split into byte accesses, low byte first."""
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        with self._lock:
            s = self._s
            if s.lcr & LCR_DLAB and offset in (REG_DLL, REG_DLH):
                return s.dll if offset == REG_DLL else s.dlh
            if offset == REG_DATA:
                reg = self._rx_get()
            elif offset == REG_IER:
                reg = s.ier
            elif offset == REG_IIR:
                reason = self._intr_reason()
                if reason == IIR_TXRDY:
                    s.thre_pending = False     # reading IIR acknowledges THRE
                reg = reason | (IIR_FIFO_MASK if s.fcr & FCR_ENABLE else 0)
            elif offset == REG_LCR:
                reg = s.lcr
            elif offset == REG_MCR:
                reg = s.mcr
            elif offset == REG_LSR:
                s.lsr |= LSR_TEMT | LSR_THRE
                if self._rx:
                    s.lsr |= LSR_RXRDY
                else:
                    s.lsr &= ~LSR_RXRDY
                reg = s.lsr
                s.lsr &= ~LSR_OE
            elif offset == REG_MSR:
                reg = s.msr
                s.msr &= ~MSR_DELTA_MASK
            elif offset == REG_SCR:
                reg = s.scr
            else:
                reg = 0xFF
            self._update_irq()
            return reg

    def _write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            s = self._s
            if s.lcr & LCR_DLAB and offset in (REG_DLL, REG_DLH):
                if offset == REG_DLL:
                    s.dll = value
                else:
                    s.dlh = value
            elif offset == REG_DATA:
                if s.mcr & MCR_LOOPBACK:
                    if len(self._rx) < s.fifo_size:
                        self._rx.append(value)
                    else:
                        s.lsr |= LSR_OE
                elif self._backend is not None:
                    self._backend.write(bytes((value,)))
                s.thre_pending = True
            elif offset == REG_IER:
                if not s.ier & IER_ETXRDY and value & IER_ETXRDY:
                    s.thre_pending = True      # THRE is level-like: re-enabling reports it
                s.ier = value & 0x0F
            elif offset == REG_FCR:
                self._write_fcr(value)
            elif offset == REG_LCR:
                s.lcr = value
            elif offset == REG_MCR:
                self._write_mcr(value)
            elif offset == REG_SCR:
                s.scr = value
            # LSR and MSR are read-only.
            self._update_irq()

    def _write_fcr(self, value: int) -> None:
        s = self._s
        if (s.fcr ^ value) & FCR_ENABLE:
            self._rx_reset(FIFO_SIZE if value & FCR_ENABLE else 1)
        if not value & FCR_ENABLE:
            s.fcr = 0
            return
        if value & FCR_RCV_RST:
            self._rx_reset(FIFO_SIZE)
        s.fcr = value & FCR_STORED

    def _write_mcr(self, value: int) -> None:
        s = self._s
        was_loopback = bool(s.mcr & MCR_LOOPBACK)
        s.mcr = value & 0x1F
        new = _modem_status(s.mcr)
        old = s.msr
        if (new ^ old) & MSR_CTS:
            s.msr |= MSR_DCTS
        if (new ^ old) & MSR_DSR:
            s.msr |= MSR_DDSR
        if (new ^ old) & MSR_DCD:
            s.msr |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:
            s.msr |= MSR_TERI
        s.msr = (s.msr & MSR_DELTA_MASK) | new
        if was_loopback and not s.mcr & MCR_LOOPBACK:
            self._notify_room()

    # ------------------------------------------------------------- RX FIFO

    def _rx_reset(self, size: int) -> None:
        self._rx.clear()
        self._s.fifo_size = size
        if self._backend is not None:
            # As bhyve: host input typed before the guest set the FIFO up is flushed.
            self._backend.discard_input()
            self._notify_room()

    def _rx_get(self) -> int:
        if not self._rx:
            return 0xFF
        was_full = len(self._rx) >= self._s.fifo_size
        c = self._rx.popleft()
        if was_full:
            self._notify_room()
        return c

    def _notify_room(self) -> None:
        if self._backend is not None and not self._paused:
            self._backend.rx_ready()

    # ---------------------------------------------------- backend interface

    def rx_room(self) -> int:
        """How many bytes :meth:`receive` would accept now (loopback: discards)."""
        with self._lock:
            if self._paused:
                return 0
            if self._s.mcr & MCR_LOOPBACK:
                return FIFO_SIZE
            return max(0, self._s.fifo_size - len(self._rx))

    def receive(self, data: bytes) -> int:
        """Host input arrived; returns how many bytes were taken.

        In loopback mode the UART is disconnected from the line, so input is
        consumed and dropped (bhyve reads and discards it too).
        """
        with self._lock:
            if self._paused:
                return 0
            if self._s.mcr & MCR_LOOPBACK:
                return len(data)
            n = min(len(data), self._s.fifo_size - len(self._rx))
            if n > 0:
                self._rx.extend(data[:n])
                self._update_irq()
            return max(n, 0)

    # ------------------------------------------------------------ interrupts

    def _intr_reason(self) -> int:
        s = self._s
        if s.lsr & LSR_OE and s.ier & IER_ERLS:
            return IIR_RLS
        if self._rx and s.ier & IER_ERXRDY:
            if s.fcr & FCR_ENABLE and len(self._rx) < TRIGGER_LEVELS[s.fcr >> 6]:
                return IIR_RXTOUT
            return IIR_RXRDY
        if s.thre_pending and s.ier & IER_ETXRDY:
            return IIR_TXRDY
        if s.msr & MSR_DELTA_MASK and s.ier & IER_EMSC:
            return IIR_MLSC
        return IIR_NOPEND

    def _update_irq(self) -> None:
        level = self._intr_reason() != IIR_NOPEND
        if level != self._irq_level:
            self._irq_level = level
            if level:
                self._irq.assert_()
            else:
                self._irq.deassert()

    # --------------------------------------------------------------- snapshot

    def save_state(self) -> UartState:
        with self._lock:
            s = self._s
            return UartState(
                ier=s.ier, lcr=s.lcr, mcr=s.mcr, lsr=s.lsr, msr=s.msr, fcr=s.fcr, scr=s.scr,
                dll=s.dll, dlh=s.dlh, fifo_size=s.fifo_size, rx_fifo=bytes(self._rx),
                thre_pending=s.thre_pending)

    def restore_state(self, state: UartState) -> None:
        state.validate()
        with self._lock:
            self._s = UartState(**{k: getattr(state, k) for k in state.__dataclass_fields__})
            self._rx = deque(state.rx_fifo)
            # Re-drive the line from the restored registers; the interrupt
            # controller's own state is restored separately.
            self._irq_level = not (self._intr_reason() != IIR_NOPEND)
            self._update_irq()
            self._notify_room()

    def pause(self) -> None:
        """Stop accepting host input so the saved FIFO is the FIFO the guest sees."""
        with self._lock:
            self._paused = True
            backend = self._backend
        if backend is not None:
            backend.pause_rx()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            backend = self._backend
        if backend is not None:
            backend.resume_rx()
            backend.rx_ready()

    # ------------------------------------------------------------- debugging

    @property
    def irq_asserted(self) -> bool:
        return self._irq_level

    @property
    def divisor(self) -> int:
        return self._s.dll | (self._s.dlh << 8)
