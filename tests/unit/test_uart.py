"""16550A UART model and its host backends, driven as a guest driver would."""

from __future__ import annotations

import os
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bhyvepy.dev import uart as U
from bhyvepy.dev.uart import Uart16550, UartState
from bhyvepy.dev.uart_backend import OUT_LIMIT, StdioBackend, UartBackendError, open_backend
from bhyvepy.snapshot.state import decode, encode, strategy
from irq_testkit import RecordingLine


Line = RecordingLine


class FakeBackend:
    def __init__(self) -> None:
        self.out = bytearray()
        self.ready = 0
        self.discards = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        self.out += data

    def rx_ready(self) -> None:
        self.ready += 1

    def discard_input(self) -> None:
        self.discards += 1

    def pause_rx(self) -> None:
        self.paused = True

    def resume_rx(self) -> None:
        self.paused = False


def wait_for(cond, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def program(u: Uart16550, divisor: int = 1, fcr: int = 0xC7, ier: int = 0) -> None:
    """What a driver does at open: 8N1 at 115200, FIFO on with trigger 14."""
    u.write(U.REG_LCR, 1, U.LCR_DLAB | 0x03)
    u.write(U.REG_DLL, 1, divisor & 0xFF)
    u.write(U.REG_DLH, 1, divisor >> 8)
    u.write(U.REG_LCR, 1, 0x03)
    u.write(U.REG_FCR, 1, fcr)
    u.write(U.REG_MCR, 1, U.MCR_DTR | U.MCR_RTS | U.MCR_OUT2)
    u.write(U.REG_IER, 1, ier)


def drain(u: Uart16550) -> bytes:
    got = bytearray()
    while u.read(U.REG_LSR, 1) & U.LSR_RXRDY:
        got.append(u.read(U.REG_DATA, 1))
    return bytes(got)


@pytest.fixture
def unix_peer(tmp_path):
    """A listening UNIX socket the backend connects to; yields (path, accept())."""
    path = str(tmp_path / "console.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    made = []

    def connect():
        be = open_backend(path)
        conn, _ = srv.accept()
        conn.settimeout(3)
        made.append((be, conn))
        return be, conn

    yield connect
    for be, conn in made:
        be.close()
        conn.close()
    srv.close()


# --------------------------------------------------------------------- registers

def test_divisor_latch_and_defaults():
    u = Uart16550(Line())
    assert u.divisor == 1                          # 1843200 / 115200 / 16
    u.write(U.REG_LCR, 1, U.LCR_DLAB)
    u.write(U.REG_DLL, 1, 0x0C)
    u.write(U.REG_DLH, 1, 0x01)
    assert (u.read(U.REG_DLL, 1), u.read(U.REG_DLH, 1)) == (0x0C, 0x01)
    u.write(U.REG_LCR, 1, 0x03)
    assert u.divisor == 0x10C
    assert u.read(U.REG_LCR, 1) == 0x03
    # With DLAB clear the same offsets are IER and RBR again.
    u.write(U.REG_IER, 1, 0xFF)
    assert u.read(U.REG_IER, 1) == 0x0F
    assert u.read(U.REG_MSR, 1) & (U.MSR_DCD | U.MSR_DSR) == U.MSR_DCD | U.MSR_DSR
    assert u.read(U.REG_LSR, 1) & (U.LSR_THRE | U.LSR_TEMT) == U.LSR_THRE | U.LSR_TEMT


def test_scratch_and_word_access():
    u = Uart16550(Line())
    u.write(U.REG_SCR, 1, 0x5A)
    assert u.read(U.REG_SCR, 1) == 0x5A
    u.write(U.REG_LCR, 2, 0x0B03)              # LCR and MCR in one 16-bit OUT
    assert u.read(U.REG_LCR, 1) == 0x03 and u.read(U.REG_MCR, 1) == 0x0B
    assert u.read(8, 1) == 0xFF


def test_thre_interrupt_is_reported_once_per_write():
    line = Line()
    u = Uart16550(line, FakeBackend())
    program(u, ier=U.IER_ETXRDY)
    assert line.level
    assert u.read(U.REG_IIR, 1) & 0x0F == U.IIR_TXRDY
    assert not line.level                           # reading IIR acknowledged it
    assert u.read(U.REG_IIR, 1) & 0x0F == U.IIR_NOPEND
    u.write(U.REG_DATA, 1, ord("x"))
    assert line.level
    assert u.read(U.REG_IIR, 1) == 0xC0 | U.IIR_TXRDY


def test_loopback_reflects_data_and_modem_lines():
    line = Line()
    be = FakeBackend()
    u = Uart16550(line, be)
    program(u, fcr=0x07, ier=U.IER_ERXRDY | U.IER_ERLS)
    u.write(U.REG_MCR, 1, U.MCR_LOOPBACK | U.MCR_RTS | U.MCR_OUT2)
    msr = u.read(U.REG_MSR, 1)
    assert msr & 0xF0 == U.MSR_CTS | U.MSR_DCD
    for c in b"loop":
        u.write(U.REG_DATA, 1, c)
    assert be.out == b""                            # nothing reaches the line
    assert line.level and u.read(U.REG_IIR, 1) & 0x0F == U.IIR_RXRDY
    assert drain(u) == b"loop"
    for i in range(U.FIFO_SIZE + 1):                # one more than fits: overrun
        u.write(U.REG_DATA, 1, i)
    assert u.read(U.REG_IIR, 1) & 0x0F == U.IIR_RLS
    assert u.read(U.REG_LSR, 1) & U.LSR_OE
    assert not u.read(U.REG_LSR, 1) & U.LSR_OE      # cleared by reading LSR
    assert drain(u) == bytes(range(U.FIFO_SIZE))
    # Host input is discarded while in loopback.
    assert u.receive(b"host") == 4 and not u.read(U.REG_LSR, 1) & U.LSR_RXRDY


def test_trigger_level_selects_iir_code():
    line = Line()
    u = Uart16550(line, FakeBackend())
    program(u, fcr=0x87, ier=U.IER_ERXRDY)         # trigger level 8
    assert u.receive(b"abc") == 3
    assert u.read(U.REG_IIR, 1) == 0xC0 | U.IIR_RXTOUT
    assert u.receive(b"defgh") == 5
    assert u.read(U.REG_IIR, 1) == 0xC0 | U.IIR_RXRDY
    assert drain(u) == b"abcdefgh"
    assert not line.level


def test_fifo_reset_and_16450_mode():
    be = FakeBackend()
    u = Uart16550(Line(), be)
    program(u, fcr=0x01)
    assert u.rx_room() == U.FIFO_SIZE
    u.receive(b"xy")
    u.write(U.REG_FCR, 1, 0x03)                     # reset RX FIFO
    assert u.rx_room() == U.FIFO_SIZE and be.discards >= 1
    u.write(U.REG_FCR, 1, 0x00)                     # 16450: one byte holding register
    assert u.rx_room() == 1
    assert u.receive(b"12") == 1
    u.write(U.REG_IER, 1, U.IER_ERXRDY)
    assert u.read(U.REG_IIR, 1) == U.IIR_RXRDY       # no FIFO bits, no timeout code


# --------------------------------------------------------------------- backends

def test_transmit_reaches_unix_socket(unix_peer):
    be, conn = unix_peer()
    u = Uart16550(Line(), be)
    be.start(u)
    program(u)
    for c in b"hello, world\n":
        u.write(U.REG_DATA, 1, c)
    assert recv_exact(conn, 13) == b"hello, world\n"


def test_receive_from_socket_raises_rx_interrupt(unix_peer):
    be, conn = unix_peer()
    line = Line()
    u = Uart16550(line, be)
    be.start(u)
    program(u, ier=U.IER_ERXRDY)
    conn.sendall(b"abc")
    assert wait_for(lambda: len(u.save_state().rx_fifo) == 3)
    assert line.level
    assert u.read(U.REG_IIR, 1) == 0xC0 | U.IIR_RXTOUT   # below the trigger level of 14
    assert u.read(U.REG_LSR, 1) & U.LSR_RXRDY
    assert drain(u) == b"abc"
    assert not line.level
    assert u.read(U.REG_IIR, 1) == 0xC0 | U.IIR_NOPEND
    conn.sendall(bytes(range(14)))
    assert wait_for(lambda: len(u.save_state().rx_fifo) == 14)
    assert u.read(U.REG_IIR, 1) == 0xC0 | U.IIR_RXRDY


def test_full_fifo_stops_reading_and_loses_nothing(unix_peer):
    be, conn = unix_peer()
    u = Uart16550(Line(), be)
    be.start(u)
    program(u, ier=U.IER_ERXRDY)
    payload = bytes(i % 251 for i in range(300))
    conn.sendall(payload)
    assert wait_for(lambda: len(u.save_state().rx_fifo) == U.FIFO_SIZE)
    time.sleep(0.05)
    assert len(u.save_state().rx_fifo) == U.FIFO_SIZE     # flow control, no overrun
    assert not u.read(U.REG_LSR, 1) & U.LSR_OE
    got = bytearray()
    end = time.monotonic() + 5
    while len(got) < len(payload) and time.monotonic() < end:
        got += drain(u)
        time.sleep(0.001)
    assert bytes(got) == payload


def test_pause_holds_input_until_resume(unix_peer):
    be, conn = unix_peer()
    u = Uart16550(Line(), be)
    be.start(u)
    program(u)
    u.pause()
    conn.sendall(b"later")
    time.sleep(0.1)
    assert u.save_state().rx_fifo == b""
    u.resume()
    assert wait_for(lambda: u.save_state().rx_fifo == b"later")


def test_slow_peer_never_blocks_and_drops_are_counted(unix_peer, monkeypatch):
    from bhyvepy.dev import uart_backend
    monkeypatch.setattr(uart_backend, "CLOSE_FLUSH_SECONDS", 0.1)
    be, conn = unix_peer()                          # the peer never reads
    u = Uart16550(Line(), be)
    be.start(u)
    chunk = b"x" * 4096
    start = time.monotonic()
    for _ in range(512):                           # 2 MiB, far beyond socket buffers
        be.write(chunk)
    assert time.monotonic() - start < 2.0
    assert wait_for(lambda: be.tx_dropped > 0)
    assert be.tx_dropped <= 512 * 4096 - OUT_LIMIT


def test_tcp_backend_one_client_at_a_time():
    be = open_backend("tcp=127.0.0.1:0")
    line = Line()
    u = Uart16550(line, be)
    be.start(u)
    program(u)
    try:
        host, port = be.address[:2]
        c1 = socket.create_connection((host, port), timeout=3)
        assert wait_for(lambda: be.connected)
        for ch in b"hi":
            u.write(U.REG_DATA, 1, ch)
        assert recv_exact(c1, 2) == b"hi"
        c2 = socket.create_connection((host, port), timeout=3)
        assert recv_exact(c2, 26) == b"Socket already connected\n\0"
        c2.close()
        c1.sendall(b"in")
        assert wait_for(lambda: u.save_state().rx_fifo == b"in")
        drain(u)
        c1.close()
        assert wait_for(lambda: not be.connected)
        u.write(U.REG_DATA, 1, ord("z"))            # nobody connected: dropped
        c3 = socket.create_connection((host, port), timeout=3)
        assert wait_for(lambda: be.connected)
        u.write(U.REG_DATA, 1, ord("!"))
        assert c3.recv(16) == b"!"
        c3.close()
    finally:
        be.close()


def test_tcp_backend_ipv6_syntax():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support on this host")
    try:
        be = open_backend("tcp=[::1]:0")
    except UartBackendError as e:
        pytest.skip(f"IPv6 loopback unavailable: {e}")
    try:
        assert be.address[0] == "::1"
    finally:
        be.close()


@pytest.mark.parametrize("spec,message", [
    ("tcp=localhost", "Invalid number of parameter"),
    ("tcp=localhost:23", "Invalid address localhost:23"),
    ("tcp=127.0.0.1:port", "Invalid address 127.0.0.1:port"),
    ("tcp=[::1:23", r"Invalid address \[::1:23"),    # read as IPv4 "[" port ":1:23", as sscanf does
    ("tcp", "Invalid number of parameter"),
])
def test_tcp_backend_errors(spec, message):
    with pytest.raises(UartBackendError, match=message):
        open_backend(spec)


def test_path_errors(tmp_path):
    with pytest.raises(UartBackendError, match="No such file"):
        open_backend(str(tmp_path / "missing"))
    with pytest.raises(UartBackendError, match="not a terminal"):
        open_backend(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UartBackendError, match="not a terminal"):
        open_backend(str(fifo))


def test_regular_file_gets_output_only(tmp_path):
    log = tmp_path / "com1.log"
    log.write_bytes(b"old\n")
    be = open_backend(str(log))
    u = Uart16550(Line(), be)
    be.start(u)
    for c in b"boot ok\n":
        u.write(U.REG_DATA, 1, c)
    be.close()
    assert log.read_bytes() == b"old\nboot ok\n"


def test_stdio_only_once():
    first = StdioBackend()
    try:
        with pytest.raises(UartBackendError, match="stdio"):
            open_backend("stdio")
    finally:
        first.close()
    StdioBackend().close()                           # released again after close


def test_pty_terminal_backend_is_raw():
    import pty
    import termios
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    try:
        be = open_backend(name)
        attrs = termios.tcgetattr(slave)
        assert not attrs[3] & (termios.ICANON | termios.ECHO)
        u = Uart16550(Line(), be)
        be.start(u)
        program(u)
        os.write(master, b"k")
        assert wait_for(lambda: u.save_state().rx_fifo == b"k")
        u.write(U.REG_DATA, 1, ord("o"))
        assert os.read(master, 1) == b"o"
        be.close()
    finally:
        os.close(master)
        os.close(slave)


# --------------------------------------------------------------------- snapshots

@settings(max_examples=60, deadline=None)
@given(strategy(UartState))
def test_state_round_trip(state):
    decoded = decode(UartState, encode(state))
    assert decoded == state
    u = Uart16550(Line())
    u.restore_state(decoded)
    assert u.save_state() == state
    v = Uart16550(Line())
    v.restore_state(u.save_state())
    # Same observable registers on the copy (LCR first: DLAB changes offsets 0/1).
    for dev in (u, v):
        dev.write(U.REG_LCR, 1, state.lcr & 0x7F)
    regs = lambda d: [d.read(r, 1) for r in (U.REG_IER, U.REG_LCR, U.REG_MCR, U.REG_SCR)]
    assert regs(u) == regs(v)


def test_restore_redrives_interrupt_line():
    src = Uart16550(Line())
    program(src, ier=U.IER_ERXRDY)
    src.receive(b"q")
    line = Line()
    dst = Uart16550(line)
    dst.restore_state(src.save_state())
    assert line.level and drain(dst) == b"q" and not line.level


access = st.tuples(st.booleans(), st.integers(0, 7), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(access, max_size=60), st.binary(max_size=40))
def test_random_accesses_never_raise(ops, host_input):
    u = Uart16550(Line(), FakeBackend())
    for i, (is_write, off, size, val) in enumerate(ops):
        if is_write:
            u.write(off, size, val & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= u.read(off, size) < 1 << (8 * size)
        if i == len(ops) // 2:
            u.receive(host_input)
    decode(UartState, encode(u.save_state()))        # whatever happened is a valid state
