"""Network backends for NIC models (bhyve's ``net_backends``), MAC and MTU.

A NIC's config node names its backend with ``backend`` (the first token of
``-s S,virtio-net,<backend>,...``); the backend type is the value of ``type``
if given, else found by the *prefix* of ``backend``, as bhyve does:

``tapN`` / ``vmnetN``
    A tap interface.  Linux: ``/dev/net/tun`` with ``IFF_TAP|IFF_NO_PI``,
    interface named by the backend value (created if absent, removed again
    on close unless it was made persistent); FreeBSD: ``/dev/tapN`` or
    ``/dev/vmnetN``.  The interface is set up (IFF_UP) like bhyve does.
``unixgram=PATH`` (bhyvepy extension, for tests and unprivileged use)
    Ethernet frames as AF_UNIX ``SOCK_DGRAM`` datagrams, one datagram per
    frame, exchanged with the socket already bound at ``PATH`` (a switch or
    a test).  bhyvepy connects to it from its own address: an autobound
    abstract address on Linux, a fresh socket file in a private temporary
    directory elsewhere (see :attr:`UnixgramBackend.local_address`); the
    peer learns it from the first frame (``recvfrom``) or from the harness.
    ``unixgram=fd:N`` uses an inherited, already connected datagram socket
    instead (one end of a ``socketpair``), e.g. with ``pass_fds``.
    Example: ``-s 5,virtio-net,unixgram=/tmp/sw.sock,mac=58:9c:fc:00:00:01``.
``netgraph``, ``netmap:...``, ``vale...``, ``slirp``
    Refused: ``net backend 'slirp' is not supported by bhyvepy`` (exit 4).

Without ``backend`` a NIC has no link (bhyve permits that): frames sent are
dropped and nothing is received (:class:`NullBackend`).

Offloads: none.  Like bhyve's tap backend, no virtio-net header crosses the
backend (``vnet_hdr_len`` is 0) and no checksum/TSO capability is offered;
device models must hand over and accept plain Ethernet frames.

Receive path: one thread per backend waits for frames and calls the
device's ``on_rx_ready()`` callback -- from that thread, so devices must be
thread-safe -- while receive is enabled.  The device then calls
:meth:`NetBackend.peek_len` / :meth:`NetBackend.recv_into` until they return
0.  If the callback returns without receiving anything (the guest has no
buffers), the backend stops calling it until the device calls
:meth:`NetBackend.rx_enable` again, which it does when the guest posts
receive buffers (bhyve's ``netbe_rx_enable`` in ``ping_rxq``).  Receive
starts disabled, as in bhyve.

Errors are never raised into a device at run time: a frame the host cannot
take is dropped and counted (``tx_dropped``), as bhyve drops it when the
non-blocking write fails.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
from typing import Any, Callable, Sequence

from bhyvepy.config import (ULONG_MAX, ConfigNode, PlainBhyveExit, c_scan_integer,
                            c_strtoul)
from bhyvepy.errors import ExitStatus

log = logging.getLogger("bhyvepy.net")

ETHER_ADDR_LEN = 6
#: bhyve's default MAC prefix (net_utils.c ``net_genmac``: the NetApp OUI).
GENMAC_OUI = bytes((0x00, 0xA0, 0x98))
#: Default MTU (ETHERMTU) and the range virtio-net accepts for ``mtu=``.
ETHERMTU = 1500
MIN_MTU = 46                  # ETHERMIN
MAX_MTU = 65535
#: Largest frame a backend reads (bhyve sizes its discard buffer so).
MAX_FRAME = 65536 + 64

_LINUX = sys.platform.startswith("linux")
_UNSUPPORTED = ("netgraph", "netmap", "vale", "slirp")

RxCallback = Callable[[], None]
Buffers = Sequence[Any]       # bytes-like objects (memoryviews of guest memory)


class NetConfigError(PlainBhyveExit):
    """A NIC's ``mac``, ``mtu`` or backend cannot be used (exit status 4).

    ``errno`` is what bhyve's device init would return; the message is
    printed as is.
    """

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message, ExitStatus.ERROR)
        self.errno = err


# --------------------------------------------------------------------------
# MAC and MTU (net_utils.c)
# --------------------------------------------------------------------------

def _scanf_hex(text: str, pos: int) -> tuple[int, int] | None:
    """One ``%x`` conversion of ``sscanf(3)`` into an octet (truncated)."""
    parsed = c_scan_integer(text, pos, 16)
    if parsed is None:
        return None
    value, end, negative = parsed
    magnitude = -value if negative else value
    if magnitude > ULONG_MAX:
        wide = ULONG_MAX
    else:
        wide = (-magnitude) & ULONG_MAX if negative else magnitude
    return wide & 0xFF, end


def parse_mac(text: str) -> bytes:
    """``net_parsemac``: ``ether_aton(3)`` syntax, unicast and non-zero.

    ``ether_aton`` is ``sscanf(a, "%x:%x:%x:%x:%x:%x")``: each part is hex
    with optional blanks, sign and ``0x``, truncated to a byte; anything
    after the sixth part is ignored.
    """
    octets = []
    pos = 0
    for index in range(ETHER_ADDR_LEN):
        if index:
            if pos >= len(text) or text[pos] != ":":
                break
            pos += 1
        scanned = _scanf_hex(text, pos)
        if scanned is None:
            break
        octet, pos = scanned
        octets.append(octet)
    mac = bytes(octets)
    if len(mac) != ETHER_ADDR_LEN or mac[0] & 1 or not any(mac):
        raise NetConfigError(f"Invalid MAC {text}")
    return mac


def generate_mac(slot: int, func: int, vmname: str | None) -> bytes:
    """``net_genmac``: the OUI 00:a0:98, then the first three bytes of the
    MD5 of ``"<slot>-<func>-<vmname>"`` (cut to 79 bytes like bhyve's
    ``snprintf`` into 80)."""
    name = "(null)" if vmname is None else vmname
    text = f"{slot}-{func}-".encode() + name.encode("utf-8", "surrogateescape")
    digest = hashlib.md5(text[:79]).digest()
    return GENMAC_OUI + digest[:3]


def mac_from_config(node: ConfigNode, *, slot: int, func: int, vmname: str | None) -> bytes:
    """The NIC's MAC: ``mac`` if set (validated), else bhyve's derivation."""
    value = node.get_value("mac")
    if value is not None:
        return parse_mac(value)
    return generate_mac(slot, func, vmname)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mtu(text: str) -> int:
    """``net_parsemtu`` plus virtio-net's range check (46..65535).

    bhyve itself prints nothing for a bad MTU (only the generic device
    initialization error); bhyvepy says which value was refused.
    """
    err = errno.EINVAL
    if not text.startswith("-"):
        value, end, overflow = c_strtoul(text, 0)
        if end == len(text) and end > 0:
            if overflow or value == ULONG_MAX:
                err = errno.ERANGE
            elif MIN_MTU <= value <= MAX_MTU:
                return value
    raise NetConfigError(f"Invalid MTU {text}", err)


def mtu_from_config(node: ConfigNode) -> int | None:
    """``mtu`` if set (validated), else None: the device then uses
    :data:`ETHERMTU` and does not offer VIRTIO_NET_F_MTU."""
    value = node.get_value("mtu")
    return None if value is None else parse_mtu(value)


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------

class NetBackend:
    """The host end of one NIC.  Subclasses provide the I/O primitives.

    State kept here: the receive bounce buffer (for :meth:`peek_len`), the
    enable/pause flags of the receive thread, and counters.
    """

    kind = "none"

    def __init__(self, name: str) -> None:
        self.name = name
        self.rx_frames = 0
        self.tx_frames = 0
        self.tx_dropped = 0
        self._bounce = bytearray(MAX_FRAME)
        self._bounce_len = 0
        self._rx_lock = threading.Lock()        # bounce buffer and reads
        self._tx_lock = threading.Lock()        # one send at a time
        self._cb_lock = threading.RLock()       # held while on_rx_ready runs
        self._state = threading.Lock()
        self._on_rx: RxCallback | None = None
        self._enabled = False
        self._paused = False
        self._stalled = False
        self._kicks = 0
        self._received = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

    # -- what subclasses implement ------------------------------------------

    def fileno(self) -> int:
        """Descriptor that polls readable when a frame waits (-1: never)."""
        return -1

    def _raw_send(self, iov: list[Any]) -> None:
        """Send one frame; raise OSError when the host refuses it."""

    def _raw_recv(self, buffers: list[Any]) -> int:
        """Read one frame into ``buffers``; 0 when none is waiting."""
        return 0

    def _close_io(self) -> None:
        pass

    def describe(self) -> str:
        return "no backend"

    # -- transmit --------------------------------------------------------------

    def send(self, iov: Buffers) -> None:
        """Send one Ethernet frame made of the buffers in ``iov``.

        Never blocks and never raises: a frame the host cannot take now is
        dropped and counted in ``tx_dropped``.
        """
        frame = list(iov)
        if len(frame) > 512:
            frame = [b"".join(bytes(b) for b in frame)]
        with self._tx_lock:
            if self._closed:
                self.tx_dropped += 1
                return
            try:
                self._raw_send(frame)
            except OSError as exc:
                self.tx_dropped += 1
                log.debug("%s: frame dropped: %s", self.name, exc)
                return
            except (TypeError, ValueError, BufferError):
                self.tx_dropped += 1
                return
            self.tx_frames += 1

    # -- receive ---------------------------------------------------------------

    def set_rx_callback(self, on_rx_ready: RxCallback) -> None:
        """Register the device's receive callback and start the receive thread."""
        self._on_rx = on_rx_ready
        if self._thread is None and self.fileno() >= 0 and not self._closed:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._thread = threading.Thread(target=self._rx_loop, daemon=True,
                                            name=f"net-{self.name}")
            self._thread.start()

    def rx_enable(self) -> None:
        """Deliver receive callbacks (again); call when the guest adds buffers."""
        with self._state:
            self._enabled = True
            self._stalled = False
            self._kicks += 1
        self._wake()

    def rx_disable(self) -> None:
        with self._state:
            self._enabled = False

    def peek_len(self) -> int:
        """Length of the next waiting frame (0: none), without consuming it."""
        with self._rx_lock:
            if self._bounce_len == 0 and not self._closed:
                self._bounce_len = self._safe_recv([memoryview(self._bounce)])
            return self._bounce_len

    def recv_into(self, buffers: Buffers) -> int:
        """Move the next frame into ``buffers``; returns the bytes stored.

        0 means no frame is waiting.  A frame longer than the buffers is
        cut (check :meth:`peek_len` first to avoid that).
        """
        with self._rx_lock:
            if self._closed:
                return 0
            if self._bounce_len:
                try:
                    n = _scatter(memoryview(self._bounce)[:self._bounce_len], buffers)
                except (TypeError, ValueError, BufferError):
                    n = 0                     # unusable buffers: the frame is lost
                self._bounce_len = 0
            else:
                n = self._safe_recv(list(buffers))
            if n:
                self.rx_frames += 1
                self._received += 1
            return n

    def rx_discard(self) -> int:
        """Drop the next frame (no guest buffer for it); returns its length."""
        n = self.peek_len()
        with self._rx_lock:
            if n:
                self._bounce_len = 0
                self._received += 1
        return n

    def _safe_recv(self, buffers: list[Any]) -> int:
        try:
            return self._raw_recv(buffers)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            log.debug("%s: receive failed: %s", self.name, exc)
            return 0
        except (TypeError, ValueError, BufferError):
            return 0

    def _frame_waiting(self, poller: select.poll) -> tuple[bool, bool]:
        """(frame waiting, woken) after waiting on the descriptors."""
        with self._state:
            watch = self._enabled and not self._paused and not self._stalled
        fd = self.fileno()
        poller.register(self._wake_r, select.POLLIN)
        if watch and fd >= 0:
            poller.register(fd, select.POLLIN)
        try:
            if watch and self._bounce_len:
                events = [(fd, select.POLLIN)]
            else:
                events = poller.poll()
        finally:
            poller.unregister(self._wake_r)
            if watch and fd >= 0:
                poller.unregister(fd)
        ready = any(f == fd and ev & (select.POLLIN | select.POLLERR | select.POLLHUP)
                    for f, ev in events)
        woken = any(f == self._wake_r for f, _ in events)
        return ready, woken

    def _rx_loop(self) -> None:
        poller = select.poll()
        while not self._closed:
            try:
                ready, woken = self._frame_waiting(poller)
            except (OSError, ValueError):
                if self._closed:
                    return
                raise
            if woken:
                try:
                    while os.read(self._wake_r, 64):
                        pass
                except (BlockingIOError, OSError):
                    pass
            if not ready:
                continue
            with self._cb_lock:
                with self._state:
                    if not self._enabled or self._paused or self._closed:
                        continue
                    kicks, received = self._kicks, self._received
                callback = self._on_rx
                if callback is None:
                    continue
                try:
                    callback()
                except Exception:
                    log.exception("%s: receive callback failed", self.name)
                with self._state:
                    if self._received == received and self._kicks == kicks:
                        self._stalled = True

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    # -- pause / resume / close -------------------------------------------------

    def pause(self) -> None:
        """Stop receive callbacks and wait for a running callback or send.

        Transmission is synchronous (nothing is queued in the backend), so
        once this returns no frame is in flight either way.  Call it without
        holding a lock that ``on_rx_ready`` takes, or the two wait for each
        other (bhyve's virtio-net takes its RX lock for the same reason).
        """
        with self._state:
            self._paused = True
        with self._cb_lock:
            pass
        with self._tx_lock:
            pass

    def resume(self) -> None:
        with self._state:
            self._paused = False
            self._stalled = False
        self._wake()

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Stop the receive thread and release the host resources.

        Like :meth:`pause`, not to be called while holding a lock the
        receive callback takes.
        """
        with self._state:
            if self._closed:
                return
            self._closed = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._tx_lock, self._rx_lock:
            self._close_io()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> "NetBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class NullBackend(NetBackend):
    """A NIC without ``backend``: no link, transmitted frames vanish."""

    def __init__(self) -> None:
        super().__init__("")

    def _raw_send(self, iov: list[Any]) -> None:
        raise OSError(errno.ENETDOWN, "no backend")


def _scatter(src: memoryview, buffers: Buffers) -> int:
    done = 0
    for buf in buffers:
        if done >= len(src):
            break
        view = memoryview(buf).cast("B")
        n = min(len(view), len(src) - done)
        view[:n] = src[done:done + n]
        done += n
    return done


# -- tap ---------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFNAMSIZ = 16
#: FreeBSD <net/if_tap.h>: _IOWINT('V', 0).
VMIO_SIOCSIFFLAGS = 0x20000000 | (4 << 16) | (ord("V") << 8)


class TapBackend(NetBackend):
    """A tap interface (``tapN``/``vmnetN``); frames without any header."""

    kind = "tap"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._fd = self._open_linux(name) if _LINUX else self._open_bsd(name)

    @staticmethod
    def _open_linux(name: str) -> int:
        raw = name.encode("utf-8", "surrogateescape")
        if not raw or len(raw) >= IFNAMSIZ or b"/" in raw:
            raise NetConfigError(f"open of tap device {name} failed: invalid interface name")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NetConfigError(f"open of tap device {name} failed: /dev/net/tun: "
                                 f"{os.strerror(exc.errno or errno.EIO)}", exc.errno or errno.EIO)
        try:
            ifr = struct.pack("16sH22x", raw, IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            os.set_blocking(fd, False)
        except OSError as exc:
            os.close(fd)
            raise NetConfigError(f"open of tap device {name} failed: "
                                 f"{os.strerror(exc.errno or errno.EIO)}", exc.errno or errno.EIO)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                ifr = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sH22x", raw, 0))
                flags = struct.unpack_from("H", ifr, 16)[0]
                if not flags & IFF_UP:
                    fcntl.ioctl(s.fileno(), SIOCSIFFLAGS,
                                struct.pack("16sH22x", raw, flags | IFF_UP))
        except OSError as exc:
            if exc.errno != errno.EPERM:
                os.close(fd)
                raise NetConfigError("tap device link up failed", exc.errno or errno.EIO)
            # A persistent tap owned by the user: whoever created it manages its state.
            log.debug("%s: cannot set the interface up: %s", name, exc)
        return fd

    @staticmethod
    def _open_bsd(name: str) -> int:
        path = "/dev/" + name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NetConfigError(f"open of tap device {path} failed", exc.errno or errno.EIO)
        try:
            os.set_blocking(fd, False)
        except OSError as exc:
            os.close(fd)
            raise NetConfigError("tap device O_NONBLOCK failed", exc.errno or errno.EIO)
        try:
            fcntl.ioctl(fd, VMIO_SIOCSIFFLAGS, IFF_UP)
        except OSError as exc:
            os.close(fd)
            raise NetConfigError("tap device link up failed", exc.errno or errno.EIO)
        return fd

    def fileno(self) -> int:
        return self._fd

    def _raw_send(self, iov: list[Any]) -> None:
        os.writev(self._fd, iov)

    def _raw_recv(self, buffers: list[Any]) -> int:
        return os.readv(self._fd, buffers)

    def _close_io(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def describe(self) -> str:
        return f"tap {self.name}"


# -- unixgram ------------------------------------------------------------------

_PEER_GONE = (errno.ECONNREFUSED, errno.ENOTCONN, errno.ENOENT, errno.ENOTDIR,
              errno.ECONNRESET)


class UnixgramBackend(NetBackend):
    """Frames as datagrams on an AF_UNIX socket (see the module docstring)."""

    kind = "unixgram"

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name)
        self.peer: str | None = None
        self._tmpdir: str | None = None
        if target.startswith("fd:"):
            self._sock = self._adopt(target)
        else:
            self.peer = target
            self._sock = self._connect(target)
        self._sock.setblocking(False)

    @staticmethod
    def _adopt(target: str) -> socket.socket:
        text = target[3:]
        if not text.isdigit():
            raise NetConfigError(f"unixgram: invalid descriptor '{text}'")
        try:
            sock = socket.socket(fileno=int(text))
        except OSError as exc:
            code = exc.errno or errno.EBADF
            raise NetConfigError(f"unixgram: descriptor {text}: {os.strerror(code)}", code)
        if sock.family != socket.AF_UNIX or sock.type not in (socket.SOCK_DGRAM,
                                                              socket.SOCK_SEQPACKET):
            sock.detach()
            raise NetConfigError(f"unixgram: descriptor {text} is not a UNIX datagram socket")
        return sock

    def _connect(self, path: str) -> socket.socket:
        if not path:
            raise NetConfigError("unixgram backend needs a socket path: unixgram=/path/to/socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if _LINUX:
                sock.bind("")                  # autobind: a unique abstract address
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="bhyvepy-net-")
                sock.bind(os.path.join(self._tmpdir, "s"))
            sock.connect(path)
        except OSError as exc:
            sock.close()
            self._remove_tmpdir()
            raise NetConfigError(f"unixgram: cannot connect to {path}: "
                                 f"{os.strerror(exc.errno or errno.EIO)}", exc.errno or errno.EIO)
        return sock

    @property
    def local_address(self) -> Any:
        """The address frames come from (what the peer sends replies to)."""
        return self._sock.getsockname()

    def fileno(self) -> int:
        return self._sock.fileno()

    def _raw_send(self, iov: list[Any]) -> None:
        try:
            self._sock.sendmsg(iov)
        except OSError as exc:
            # The peer went away (Linux then also drops the association); it
            # may have come back at the same path.
            if self.peer is None or exc.errno not in _PEER_GONE:
                raise
            self._sock.connect(self.peer)
            self._sock.sendmsg(iov)

    def _raw_recv(self, buffers: list[Any]) -> int:
        n, _, _, _ = self._sock.recvmsg_into(buffers)
        return n

    def _close_io(self) -> None:
        self._sock.close()
        self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def describe(self) -> str:
        return f"unixgram {self.peer if self.peer is not None else self.name}"


# -- selection -------------------------------------------------------------------

def open_net_backend(node: ConfigNode) -> NetBackend:
    """``netbe_init``: the backend a NIC's config node asks for.

    Raises :class:`NetConfigError` (exit status 4) for a backend that is
    unknown, unsupported here, or cannot be opened.
    """
    value = node.get_value("backend")
    if value is None:
        return NullBackend()
    kind = node.get_value("type")
    if kind is None:
        kind = value
    if kind.startswith("tap") or kind.startswith("vmnet"):
        return TapBackend(value)
    if kind.startswith("unixgram"):
        if value.startswith("unixgram="):
            target = value[len("unixgram="):]
        else:
            # Only an explicit ``type=unixgram`` lets ``backend`` be the bare path.
            target = value if node.get_value("type") is not None else ""
        return UnixgramBackend(value, target)
    for prefix in _UNSUPPORTED:
        if kind.startswith(prefix):
            raise NetConfigError(f"net backend '{prefix}' is not supported by bhyvepy")
    raise NetConfigError(f"net backend '{value}' is unknown")
