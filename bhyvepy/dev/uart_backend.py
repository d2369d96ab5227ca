"""Host ends of the emulated serial ports, chosen by bhyve's ``lpc.comN.path`` syntax.

``open_backend(path)`` understands what bhyve(8) accepts for ``-l comN,...``:

``stdio``
    The process's stdin/stdout.  A terminal is put in raw mode (plus CLOCAL)
    and restored on close and at exit; when stdin is not a terminal it is
    simply read until end of file.  Only one port may use stdio.
``tcp=IP:PORT`` / ``tcp=[IPV6]:PORT``
    Listen (numeric address and port only); one client at a time, a second
    one is told ``Socket already connected`` and dropped; output while nobody
    is connected is discarded.  Port 0 picks a free port (see ``address``).
a path
    A terminal device (e.g. ``/dev/nmdm0A``) is opened read/write in raw
    mode.  bhyvepy extensions, for tests and logs: a path naming an existing
    UNIX-domain stream socket is *connected to*; an existing regular file
    receives the output only (appended); other character devices (e.g.
    ``/dev/null``) are read and written as they are.  A missing path, a
    directory or a FIFO is an error (bhyve only accepts terminals).

One thread per backend moves bytes.  Input is read only as far as the UART's
RX FIFO has room (flow control: nothing is ever dropped on the way in); the
UART calls :meth:`UartBackend.rx_ready` when the guest frees a slot.  Output
goes into a buffer of at most ``OUT_LIMIT`` bytes that the thread drains
when the host side is writable; what does not fit is dropped and counted in
``tx_dropped`` (bhyve drops a byte whenever the non-blocking write fails), so
a slow or absent peer never stalls a vCPU.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import select
import socket
import stat
import termios
import threading
import time
from typing import Protocol

OUT_LIMIT = 64 * 1024
WRITE_CHUNK = 256            # small enough that a blocking stdout rarely blocks
CLOSE_FLUSH_SECONDS = 1.0    # how long close() keeps writing buffered output
RETRY_SECONDS = 0.2          # terminal with no peer (EIO/HUP): poll again later


class UartBackendError(Exception):
    """The backend named by ``lpc.comN.path`` cannot be opened (start-up error)."""


class Frontend(Protocol):
    def rx_room(self) -> int: ...
    def receive(self, data: bytes) -> int: ...


_stdio_lock = threading.Lock()
_stdio_in_use = False


def _make_raw(attrs: list) -> list:
    """The termios changes of cfmakeraw(3), plus CLOCAL as bhyve sets."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB)
    cflag |= termios.CS8 | termios.CLOCAL
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class UartBackend:
    """Moves bytes between one UART model and one host stream.

    Subclasses set ``_rfd`` (may be None: output only) and ``_wfd`` (may be
    None: nothing connected) and override the hooks for end of input and
    write errors.
    """

    describe = "backend"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frontend: Frontend | None = None
        self._rfd: int | None = None
        self._wfd: int | None = None
        self._out = bytearray()
        self._pending = b""             # read but not yet taken by the UART
        self._rx_lock = threading.Lock()  # held while input moves host -> UART
        self._rx_paused = False
        self._stop = False
        self._rfd_eof = False
        self._rfd_retry_at = 0.0
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.tx_dropped = 0
        self.closed = False

    # ------------------------------------------------------------ UART side

    def start(self, frontend: Frontend) -> None:
        self._frontend = frontend
        self._thread = threading.Thread(target=self._run, name=f"uart-{self.describe}", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        """Queue guest output; never blocks."""
        with self._lock:
            if self._wfd is None or self.closed:
                self.tx_dropped += len(data)
                return
            room = OUT_LIMIT - len(self._out)
            if room < len(data):
                self.tx_dropped += len(data) - max(room, 0)
                data = data[:max(room, 0)]
            was_empty = not self._out
            self._out += data
        if was_empty and data:
            self._wake()

    def rx_ready(self) -> None:
        self._wake()

    def discard_input(self) -> None:
        """Drop host input that is already waiting (the guest reset its RX FIFO).

        Done synchronously, so input sent after the guest's reset survives.  If
        the thread is just handing freshly read bytes to the UART, those are
        left alone: they are not older than the reset.
        """
        if self._rx_lock.acquire(blocking=False):
            try:
                if not self.closed:
                    self._drain_input()
            finally:
                self._rx_lock.release()

    def pause_rx(self) -> None:
        with self._lock:
            self._rx_paused = True
        self._wake()

    def resume_rx(self) -> None:
        with self._lock:
            self._rx_paused = False
        self._wake()

    def close(self) -> None:
        """Stop the thread after flushing what output it can, release the host side."""
        with self._lock:
            if self.closed:
                return
            self._stop = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(CLOSE_FLUSH_SECONDS + 1.0)
        with self._rx_lock, self._lock:
            self.closed = True
            self._release()
            self._rfd = self._wfd = None
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1

    # ----------------------------------------------------------- hooks

    def _release(self) -> None:
        """Close host descriptors and undo terminal changes."""

    def _on_input_end(self) -> None:
        """Read returned end-of-file: by default stop reading for good."""
        self._rfd_eof = True

    def _on_write_error(self, err: OSError) -> None:
        with self._lock:
            self.tx_dropped += len(self._out)
            self._out.clear()

    def _extra_poll(self) -> dict[int, int]:
        return {}

    def _on_extra_event(self, fd: int, ev: int) -> None:
        pass

    # ---------------------------------------------------------- the thread

    def _wake(self) -> None:
        with self._lock:
            if self._wake_w < 0:
                return          # closed: the descriptor number may belong to someone else now
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass            # already awake (pipe full)

    def _run(self) -> None:
        flush_deadline: float | None = None
        while True:
            with self._lock:
                stopping = self._stop
                rx_paused = self._rx_paused
                want_write = bool(self._out) and self._wfd is not None
            if stopping:
                if flush_deadline is None:
                    flush_deadline = time.monotonic() + CLOSE_FLUSH_SECONDS
                if not want_write or time.monotonic() >= flush_deadline:
                    return
            room = 0
            if not (stopping or rx_paused):
                with self._rx_lock:
                    room = self._deliver_pending()

            fds: dict[int, int] = {self._wake_r: select.POLLIN}
            timeout_ms: float | None = None
            rfd = self._rfd
            if rfd is not None and room > 0 and not self._rfd_eof:
                wait = self._rfd_retry_at - time.monotonic()
                if wait > 0:
                    timeout_ms = wait * 1000
                else:
                    fds[rfd] = fds.get(rfd, 0) | select.POLLIN
            wfd = self._wfd
            if want_write and wfd is not None:
                fds[wfd] = fds.get(wfd, 0) | select.POLLOUT
            if not stopping:
                for fd, ev in self._extra_poll().items():
                    fds[fd] = fds.get(fd, 0) | ev
            if stopping:
                left = (flush_deadline or 0) - time.monotonic()
                timeout_ms = max(0.0, left * 1000)
            poller = select.poll()
            for fd, ev in fds.items():
                poller.register(fd, ev)
            try:
                events = poller.poll(timeout_ms)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self._wake_r:
                    self._drain_wake()
                    continue
                if ev & select.POLLNVAL:            # descriptor closed under us
                    if fd == self._rfd:
                        self._on_input_end()
                    if fd == self._wfd:
                        self._on_write_error(OSError(errno.EBADF, "bad file descriptor"))
                    continue
                if fd == self._rfd and ev & (select.POLLIN | select.POLLHUP | select.POLLERR) \
                        and fds.get(fd, 0) & select.POLLIN:
                    with self._rx_lock:
                        self._read_input(room)
                if fd == self._wfd and ev & (select.POLLOUT | select.POLLERR | select.POLLHUP) \
                        and fds.get(fd, 0) & select.POLLOUT:
                    self._write_output()
                if fd not in (self._rfd, self._wfd, self._wake_r):
                    self._on_extra_event(fd, ev)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _deliver_pending(self) -> int:
        """Hand leftovers to the UART; return the room left for a new read."""
        fe = self._frontend
        if fe is None:
            return 0
        if self._pending:
            n = fe.receive(self._pending)
            self._pending = self._pending[n:]
            if self._pending:
                return 0
        return fe.rx_room()

    def _read_input(self, room: int) -> None:
        rfd = self._rfd
        if rfd is None or room <= 0:
            return
        try:
            data = os.read(rfd, room)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.EIO:       # terminal whose other side is closed
                self._rfd_retry_at = time.monotonic() + RETRY_SECONDS
                return
            self._on_input_end()
            return
        if not data:
            self._on_input_end()
            return
        fe = self._frontend
        n = fe.receive(data) if fe is not None else len(data)
        self._pending = data[n:]

    def _write_output(self) -> None:
        wfd = self._wfd
        if wfd is None:
            return
        with self._lock:
            chunk = bytes(self._out[:WRITE_CHUNK])
        if not chunk:
            return
        try:
            n = os.write(wfd, chunk)
        except BlockingIOError:
            return
        except OSError as e:
            self._on_write_error(e)
            return
        with self._lock:
            del self._out[:n]

    def _drain_input(self) -> None:
        """Throw away input already waiting on the host side (FIFO reset)."""
        self._pending = b""
        rfd = self._rfd
        if rfd is None or self._rfd_eof:
            return
        for _ in range(64):
            r, _w, _x = select.select([rfd], [], [], 0)
            if not r:
                return
            try:
                if not os.read(rfd, 4096):
                    self._on_input_end()
                    return
            except BlockingIOError:
                return
            except OSError:
                return


class StdioBackend(UartBackend):
    describe = "stdio"

    def __init__(self) -> None:
        global _stdio_in_use
        with _stdio_lock:
            if _stdio_in_use:
                raise UartBackendError("stdio is already used by another serial port")
            _stdio_in_use = True
        super().__init__()
        self._rfd, self._wfd = 0, 1
        self._saved_tio: list | None = None
        try:
            if os.isatty(0):
                self._saved_tio = termios.tcgetattr(0)
                termios.tcsetattr(0, termios.TCSANOW, _make_raw(termios.tcgetattr(0)))
                atexit.register(self._restore_tty)
        except termios.error:
            self._saved_tio = None

    def _restore_tty(self) -> None:
        if self._saved_tio is not None:
            try:
                termios.tcsetattr(0, termios.TCSANOW, self._saved_tio)
            except termios.error:
                pass

    def _release(self) -> None:
        global _stdio_in_use
        self._restore_tty()
        self._saved_tio = None
        with _stdio_lock:
            _stdio_in_use = False


class FileBackend(UartBackend):
    """A terminal or other character device (read/write) or a regular file (output only)."""

    def __init__(self, path: str, st: os.stat_result) -> None:
        super().__init__()
        self.describe = path
        self._saved_tio: list | None = None
        if stat.S_ISREG(st.st_mode):
            flags = os.O_WRONLY | os.O_APPEND
        elif stat.S_ISCHR(st.st_mode):
            flags = os.O_RDWR
        else:
            raise UartBackendError(f"{path}: not a terminal, socket or regular file")
        try:
            fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            raise UartBackendError(f"{path}: {e.strerror}") from None
        self._fd = fd
        self._wfd = fd
        if flags & os.O_RDWR:
            self._rfd = fd
        if os.isatty(fd):
            try:
                self._saved_tio = termios.tcgetattr(fd)
                termios.tcsetattr(fd, termios.TCSANOW, _make_raw(termios.tcgetattr(fd)))
            except termios.error:
                self._saved_tio = None

    def _release(self) -> None:
        if self._saved_tio is not None:
            try:
                termios.tcsetattr(self._fd, termios.TCSANOW, self._saved_tio)
            except termios.error:
                pass
        try:
            os.close(self._fd)
        except OSError:
            pass


class UnixSocketBackend(UartBackend):
    """bhyvepy extension: connect to an existing UNIX stream socket (tests, consoles)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.describe = path
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise UartBackendError(f"connect({path}): {e.strerror}") from None
        s.setblocking(False)
        self._sock = s
        self._rfd = self._wfd = s.fileno()

    def _disconnect(self) -> None:
        with self._lock:
            self._wfd = None
            self.tx_dropped += len(self._out)
            self._out.clear()
        self._rfd_eof = True

    def _on_input_end(self) -> None:
        self._disconnect()

    def _on_write_error(self, err: OSError) -> None:
        self._disconnect()

    def _release(self) -> None:
        self._sock.close()


_TCP6 = re.compile(r"tcp=\[([^\]]{1,255})\]:(\S{1,5})")
_TCP4 = re.compile(r"tcp=([^:]{1,255}):(\S{1,5})")
_BUSY_MSG = b"Socket already connected\n\0"


class TcpBackend(UartBackend):
    """Listen on a TCP address; serve one client at a time (as bhyve)."""

    def __init__(self, spec: str) -> None:
        super().__init__()
        self.describe = spec
        m = _TCP6.match(spec)
        family = socket.AF_INET6
        if m is None:
            m = _TCP4.match(spec)
            family = socket.AF_INET
        if m is None:
            raise UartBackendError("Invalid number of parameter")
        addr, port = m.group(1), m.group(2)
        try:
            infos = socket.getaddrinfo(
                addr, port, family, socket.SOCK_STREAM, 0,
                socket.AI_NUMERICHOST | socket.AI_NUMERICSERV | socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError):
            raise UartBackendError(f"Invalid address {addr}:{port}") from None
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(infos[0][4])
            lsock.listen(1)
        except OSError as e:
            lsock.close()
            raise UartBackendError(f"bind({addr}:{port}): {e.strerror}") from None
        lsock.setblocking(False)
        self._listener = lsock
        self._client: socket.socket | None = None
        self.address = lsock.getsockname()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _extra_poll(self) -> dict[int, int]:
        return {self._listener.fileno(): select.POLLIN}

    def _on_extra_event(self, fd: int, ev: int) -> None:
        if fd != self._listener.fileno():
            return
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        if self._client is not None:
            try:
                conn.send(_BUSY_MSG)
            except OSError:
                pass
            conn.close()
            return
        conn.setblocking(False)
        self._client = conn
        self._rfd_eof = False
        with self._lock:
            self._out.clear()
            self._rfd = self._wfd = conn.fileno()

    def _disconnect(self) -> None:
        c = self._client
        self._client = None
        with self._lock:
            self._rfd = self._wfd = None
            self.tx_dropped += len(self._out)
            self._out.clear()
        self._pending = b""
        if c is not None:
            c.close()

    def _on_input_end(self) -> None:
        self._disconnect()

    def _on_write_error(self, err: OSError) -> None:
        self._disconnect()

    def _release(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._listener.close()


def open_backend(path: str) -> UartBackend:
    """Open the host end named by a ``lpc.comN.path`` value.

    Raises :class:`UartBackendError` with a one-line reason; the caller
    reports bhyve's ``Unable to initialize backend '%s' for LPC device %s``
    and exits with status 4.
    """
    if path == "stdio":
        return StdioBackend()
    if path.startswith("tcp"):
        return TcpBackend(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise UartBackendError(f"{path}: {e.strerror}") from None
    if stat.S_ISSOCK(st.st_mode):
        return UnixSocketBackend(path)
    return FileBackend(path, st)


__all__ = [
    "UartBackend", "UartBackendError", "StdioBackend", "FileBackend", "UnixSocketBackend",
    "TcpBackend", "open_backend", "OUT_LIMIT",
]
