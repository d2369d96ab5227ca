"""virtio-console: bhyve's multiport console (``pci_virtio_console.c``).

Up to 16 ports, each configured as ``port.N.name`` / ``port.N.path`` (the
legacy ``-s S,virtio-console,name=/path,...`` form numbers them 0, 1, ...).
For every port bhyvepy creates a UNIX stream socket at ``path`` and
listens on it, as bhyve does; one client at a time is the port's host side.

Queues follow the virtio multiport layout bhyve uses: port 0 on queues 0
(to the guest) and 1 (from the guest), the control queues 2 (to the
guest) and 3 (from the guest), port N on queues 2N+2 / 2N+3; 64 entries
each, 34 queues.  The configuration is 80 columns, 25 rows,
``max_nr_ports`` 16.  bhyve's feature word is ``VTCON_F_SIZE |
VTCON_F_MULTIPORT | VTCON_F_EMERG_WRITE`` with the constants written as
bit *numbers* (0, 1, 2), so what it offers is 0x3 -- SIZE and MULTIPORT --
and that is what is offered here.

Control protocol, as in bhyve: on DEVICE_READY every configured port is
announced with PORT_ADD and PORT_NAME, and ports whose socket already has
a client get PORT_OPEN 1; a client connecting later sends PORT_OPEN 1 at
once; PORT_READY for a console port is answered with CONSOLE_PORT (bhyve
has no way to mark a port as console; ``port.N.console=true`` is a
bhyvepy extension that does).  Where bhyvepy differs, on purpose:

* control messages for which the guest has posted no buffer yet wait in
  a bounded queue instead of being dropped;
* a client's disconnect is reported with PORT_OPEN 0 (bhyve reports
  nothing, so the guest keeps writing into the void);
* input is never discarded: the socket is read only while the guest has
  receive buffers posted (flow control), where bhyve reads and drops
  whatever arrives while the guest is not ready;
* output never blocks a vCPU: what the socket cannot take now is sent
  by the background thread when it can, and the guest's buffer is
  returned only then (no copy, bounded memory);
* a device reset also forgets the control-protocol state, and the socket
  files are removed when the device is closed.

The background thread (one per device) accepts clients, moves input into
the guest's receive buffers and finishes pending output; it touches guest
memory only under the device lock and not while the device is paused.

Snapshots.  bhyve cannot snapshot a VM with virtio-console (the device has
no ``pe_snapshot``, so the checkpoint fails).  bhyvepy saves the virtio
state and the control-protocol state (ready, per-port flags, undelivered
control messages, progress through a partially sent output buffer).
Socket connections are host state and are not saved: after a restore every
port is unconnected -- ports the guest believed connected get PORT_OPEN 0
-- and clients reconnect to the same paths.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from bhyvepy.config import c_strtol, parse_bool
from bhyvepy.dev.virtio.queue import DescriptorChain, Virtqueue
from bhyvepy.dev.virtio.transport import (VIRTIO_DEV_CONSOLE, VIRTIO_ID_CONSOLE,
                                          VirtioDeviceState, VirtioPciDevice)
from bhyvepy.pci import PciContext, PciInitError
from bhyvepy.registry import pci_emul
from bhyvepy.snapshot.state import (BOOL, U32, Blob, ListOf, Nested, StateError,
                                    device_state)

log = logging.getLogger("bhyvepy.virtio")

VTCON_RINGSZ = 64
VTCON_MAXPORTS = 16
VTCON_MAXQ = VTCON_MAXPORTS * 2 + 2

VTCON_DEVICE_READY = 0
VTCON_DEVICE_ADD = 1            # PORT_ADD in the virtio specification
VTCON_DEVICE_REMOVE = 2
VTCON_PORT_READY = 3
VTCON_CONSOLE_PORT = 4
VTCON_CONSOLE_RESIZE = 5
VTCON_PORT_OPEN = 6
VTCON_PORT_NAME = 7

VTCON_F_SIZE = 0
VTCON_F_MULTIPORT = 1
VTCON_F_EMERG_WRITE = 2
#: bhyve ORs the bit numbers, so it offers bits 0 and 1 (see the module doc).
VTCON_S_HOSTCAPS = VTCON_F_SIZE | VTCON_F_MULTIPORT | VTCON_F_EMERG_WRITE

PCIC_SIMPLECOMM = 0x07
CONTROL_RX_QUEUE = 2            # device -> guest control messages
CONTROL_TX_QUEUE = 3            # guest -> device control messages

_CONFIG = struct.Struct("<HHII")        # cols, rows, max_nr_ports, emerg_wr
_CONTROL = struct.Struct("<IHH")        # id, event, value
#: Undelivered control messages kept for a guest that posted no buffers.
MAX_PENDING_CONTROL = 256
MAX_NAME = 1024
_IOV_MAX = 1024
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


def to_guest_queue(port: int) -> int:
    """Queue the device fills for port ``port`` (bhyve's ``vsp_txq``)."""
    return 0 if port == 0 else (port + 1) * 2


def port_of_queue(index: int) -> int | None:
    """Port a queue belongs to, None for the control queues."""
    if index in (CONTROL_RX_QUEUE, CONTROL_TX_QUEUE):
        return None
    return 0 if index < 2 else index // 2 - 1


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


# ----------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------

@device_state("virtio-console-port", version=1)
@dataclass
class ConsolePortState:
    enabled: BOOL = False
    rx_ready: BOOL = False          # the guest posted receive buffers
    open_pending: BOOL = False      # host side connected before DEVICE_READY
    host_open: BOOL = False         # the guest was told PORT_OPEN 1
    guest_open: BOOL = False        # the guest said PORT_OPEN 1
    tx_skip: U32 = 0                # bytes of the next output chain already sent


def _no_ports() -> list:
    return [ConsolePortState() for _ in range(VTCON_MAXPORTS)]


@device_state("virtio-console", version=1)
@dataclass
class VirtioConsoleState(VirtioDeviceState):
    ready: BOOL = False
    ports: Annotated[list, ListOf(Nested(cls=ConsolePortState), exact=VTCON_MAXPORTS)] = \
        field(default_factory=_no_ports)
    pending: Annotated[list, ListOf(Blob(max_len=_CONTROL.size + MAX_NAME),
                                    max_len=MAX_PENDING_CONTROL)] = field(default_factory=list)


# ----------------------------------------------------------------------------
# ports
# ----------------------------------------------------------------------------

class _Port:
    """One port: its socket, host connection and protocol flags."""

    def __init__(self, pid: int, name: str = "", path: str = "", console: bool = False) -> None:
        self.id = pid
        self.name = name
        self.path = path
        self.console = console
        self.enabled = False
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.rx_ready = False
        self.rx_parked = False      # input waits for the guest to post buffers
        self.open_pending = False
        self.host_open = False
        self.guest_open = False
        self.tx_chain: DescriptorChain | None = None
        self.tx_views: list[memoryview] = []
        self.tx_sent = 0
        self.tx_skip = 0

    @property
    def to_guest(self) -> int:
        return to_guest_queue(self.id)

    @property
    def from_guest(self) -> int:
        return to_guest_queue(self.id) + 1


def _parse_ports(ctx: PciContext) -> list[_Port]:
    ports = [_Port(i) for i in range(VTCON_MAXPORTS)]
    node = ctx.config.find_node("port") if hasattr(ctx.config, "find_node") else None
    if node is None:
        return ports
    for key, sub in node.items():
        if isinstance(sub, str):
            continue                         # bhyve skips non-node entries
        value, end, overflow = c_strtol(key, 0)
        if end != len(key) or overflow or not 0 <= value < VTCON_MAXPORTS:
            raise PciInitError(f"vtcon: Invalid port {key}")
        path = sub.get_value("path")
        if path is None:
            raise PciInitError(f"vtcon: required path missing for port {value}")
        name = sub.get_value("name")
        if name is None:
            raise PciInitError(f"vtcon: required name missing for port {value}")
        p = ports[value]
        if p.enabled:
            raise PciInitError(f"cannot create port {key}: {os.strerror(errno.EBUSY)}")
        console = sub.get_value("console")
        p.name, p.path = name, path
        p.console = parse_bool("console", console) if console is not None else False
        if len(name.encode()) > MAX_NAME:
            raise PciInitError(f"cannot create port {key}: {os.strerror(errno.ENAMETOOLONG)}")
        p.enabled = True
    return ports


def _listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.setblocking(False)
        s.listen(1)
    except BaseException:
        s.close()
        raise
    return s


# ----------------------------------------------------------------------------
# the device
# ----------------------------------------------------------------------------

@pci_emul("virtio-console")
class VirtioConsole(VirtioPciDevice):
    state_class: ClassVar[type] = VirtioConsoleState
    vc_name: ClassVar[str] = "vtcon"

    def __init__(self, ctx: PciContext) -> None:
        super().__init__(ctx, device_id=VIRTIO_DEV_CONSOLE, class_code=PCIC_SIMPLECOMM << 16,
                         subdevice=VIRTIO_ID_CONSOLE, queue_sizes=[VTCON_RINGSZ] * VTCON_MAXQ,
                         host_features=VTCON_S_HOSTCAPS, cfgsize=_CONFIG.size)
        self.ports = _parse_ports(ctx)
        self.ready = False
        self._pending: deque[bytes] = deque()
        self._paused = False
        self._closed = False
        self._closing: list[socket.socket] = []     # connections the thread must close
        created: list[_Port] = []
        try:
            for p in self.ports:
                if p.enabled:
                    try:
                        p.listener = _listen(p.path)
                    except (OSError, ValueError) as e:
                        err = getattr(e, "errno", None) or (
                            errno.ENAMETOOLONG if "too long" in str(e) else errno.EINVAL)
                        raise PciInitError(f"cannot create port {p.id}: "
                                           f"{os.strerror(err)}") from None
                    created.append(p)
        except BaseException:
            for p in created:
                self._unlink(p)
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._io_loop, daemon=True,
                                        name=f"vtcon-{ctx.slot}:{ctx.func}")
        self._thread.start()

    # --- configuration ------------------------------------------------------------
    def device_config(self) -> bytes:
        return _CONFIG.pack(80, 25, VTCON_MAXPORTS, 0)

    def cfg_write_dev(self, offset: int, size: int, value: int) -> bool:
        return True                     # accepted and ignored, as in bhyve

    # --- queues ------------------------------------------------------------------
    def queue_notify(self, vq: Virtqueue) -> None:
        with self._lock:
            if self._paused:
                return
            idx = vq.index
            if idx == CONTROL_RX_QUEUE:
                self._flush_control()
            elif idx == CONTROL_TX_QUEUE:
                self._control_from_guest(vq)
            elif idx % 2 == 0:
                p = self.ports[port_of_queue(idx)]      # type: ignore[index]
                p.rx_ready = True
                if p.rx_parked:
                    p.rx_parked = False
                    self._wake()
            else:
                self._pump_tx(self.ports[port_of_queue(idx)])    # type: ignore[index]

    def reset_device(self) -> None:
        with self._lock:
            super().reset_device()
            self.ready = False
            self._pending.clear()
            for p in self.ports:
                p.rx_ready = False
                p.host_open = p.guest_open = False
                p.open_pending = p.conn is not None
                p.tx_chain, p.tx_views, p.tx_sent, p.tx_skip = None, [], 0, 0
            self._wake()

    # --- control protocol ------------------------------------------------------------
    def _control_from_guest(self, vq: Virtqueue) -> None:
        used = False
        while True:
            chain = self.pop(vq)
            if chain is None:
                break
            msg = chain.gather(_CONTROL.size)
            if chain.error is None and len(msg) == _CONTROL.size:
                self._control_event(*_CONTROL.unpack(msg))
            else:
                self.complain(f"bad control message ({chain.error or len(msg)} bytes)")
            vq.push(chain, 0)
            used = True
        if used:
            self.end_chains(vq, True)

    def _control_event(self, pid: int, event: int, value: int) -> None:
        if event == VTCON_DEVICE_READY:
            self.ready = True
            for p in self.ports:
                if p.enabled:
                    self._announce(p)
                if p.open_pending:
                    self._open_port(p, True)
        elif event == VTCON_PORT_READY:
            if pid >= VTCON_MAXPORTS or not self.ports[pid].enabled:
                self.complain(f"VTCON_PORT_READY event for unknown port {pid}")
                return
            if self.ports[pid].console:
                self._control_send(VTCON_CONSOLE_PORT, pid, 1)
        elif event == VTCON_PORT_OPEN:
            if pid < VTCON_MAXPORTS:
                self.ports[pid].guest_open = bool(value)

    def _announce(self, p: _Port) -> None:
        self._control_send(VTCON_DEVICE_ADD, p.id, 1)
        self._control_send(VTCON_PORT_NAME, p.id, 1, p.name.encode())

    def _open_port(self, p: _Port, is_open: bool) -> None:
        if not self.ready:
            p.open_pending = is_open
            return
        p.open_pending = False
        p.host_open = is_open
        self._control_send(VTCON_PORT_OPEN, p.id, int(is_open))

    def _control_send(self, event: int, pid: int, value: int, payload: bytes = b"") -> None:
        if len(self._pending) >= MAX_PENDING_CONTROL:
            self._pending.popleft()
            self.complain("control queue full: guest posts no control buffers")
        self._pending.append(_CONTROL.pack(pid, event, value) + payload)
        self._flush_control()

    def _flush_control(self) -> None:
        if self._paused:
            return
        vq = self.queues[CONTROL_RX_QUEUE]
        used = False
        while self._pending:
            chain = self.pop(vq)
            if chain is None:
                break
            msg = self._pending.popleft()
            if chain.error is None and not chain.readable and chain.writable_len >= len(msg):
                vq.push(chain, chain.scatter(msg))
            else:
                self.complain("control buffer unusable; message dropped")
                vq.push(chain, 0)
            used = True
        if used:
            self.end_chains(vq, True)

    # --- data: guest -> socket ----------------------------------------------------------
    def _pump_tx(self, p: _Port) -> None:
        """Send what the guest queued for port ``p``; never blocks."""
        vq = self.queues[p.from_guest]
        used = False
        while not self._paused:
            if p.tx_chain is None:
                chain = self.pop(vq)
                if chain is None:
                    break
                if chain.error is not None or p.conn is None or not p.enabled:
                    if chain.error is not None:
                        self.complain(f"port {p.id} output: {chain.error}")
                    vq.push(chain, 0)       # nobody to send to: dropped, as in bhyve
                    used = True
                    p.tx_skip = 0
                    continue
                p.tx_chain = chain
                p.tx_views = _advance([v for v in chain.readable if len(v)], p.tx_skip)
                p.tx_sent, p.tx_skip = p.tx_skip, 0
            conn = p.conn
            try:
                while conn is not None and p.tx_views:
                    n = conn.sendmsg(p.tx_views[:_IOV_MAX], [], _SEND_FLAGS)
                    p.tx_sent += n
                    p.tx_views = _advance(p.tx_views, n)
            except (BlockingIOError, InterruptedError):
                self._wake()                # the thread finishes when writable
                break
            except OSError:
                self._disconnect(p)
            vq.push(p.tx_chain, 0)
            p.tx_chain, p.tx_views, p.tx_sent = None, [], 0
            used = True
        if used:
            self.end_chains(vq, True)

    # --- data: socket -> guest ----------------------------------------------------------
    def _pump_rx(self, p: _Port) -> None:
        """Move available input into the guest's buffers (flow-controlled)."""
        if self._paused or p.conn is None:
            return
        vq = self.queues[p.to_guest]
        if not p.rx_ready or not vq.ready:
            p.rx_parked = True
            return
        used = False
        while True:
            chain = self.pop(vq)
            if chain is None:
                p.rx_parked = True
                break
            bufs = [v for v in chain.writable if len(v)]
            if chain.error is not None or chain.readable or not bufs:
                self.complain(f"port {p.id} input buffer unusable")
                vq.push(chain, 0)
                used = True
                continue
            try:
                n = p.conn.recvmsg_into(bufs)[0]
            except (BlockingIOError, InterruptedError):
                vq.unpop()
                break
            except OSError:
                n = 0
            if n == 0:
                vq.unpop()
                self._disconnect(p)
                break
            vq.push(chain, n)
            used = True
        if used:
            self.end_chains(vq, True)

    # --- connections ---------------------------------------------------------------------
    def _accept(self, p: _Port) -> None:
        assert p.listener is not None
        try:
            s, _ = p.listener.accept()
        except OSError:
            return
        with self._lock:
            if p.conn is not None and self._alive(p.conn):
                s.close()                   # one client at a time, as bhyve
                return
            if p.conn is not None:
                self._disconnect(p)
            s.setblocking(False)
            p.conn = s
            p.rx_parked = False
            self._open_port(p, True)
            self._pump_tx(p)

    @staticmethod
    def _alive(conn: socket.socket) -> bool:
        try:
            return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def _disconnect(self, p: _Port) -> None:
        if p.conn is None:
            return
        self._closing.append(p.conn)
        p.conn = None
        p.rx_parked = False
        if self.ready and p.host_open:
            self._open_port(p, False)
        p.open_pending = False
        self._wake()

    # --- the background thread ---------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError, AttributeError):
            pass

    def _desired(self) -> dict[Any, tuple[int, Any]]:
        want: dict[Any, tuple[int, Any]] = {self._wake_r: (selectors.EVENT_READ, None)}
        for p in self.ports:
            if p.listener is not None:
                want[p.listener] = (selectors.EVENT_READ, ("accept", p))
            if p.conn is not None and not self._paused:
                ev = 0 if p.rx_parked else selectors.EVENT_READ
                if p.tx_chain is not None:
                    ev |= selectors.EVENT_WRITE
                if ev:
                    want[p.conn] = (ev, ("conn", p))
        return want

    def _io_loop(self) -> None:
        sel = selectors.DefaultSelector()
        registered: dict[Any, int] = {}
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    want = self._desired()
                    closing, self._closing = self._closing, []
                for obj in list(registered):
                    if obj not in want or want[obj][0] != registered[obj]:
                        try:
                            sel.unregister(obj)
                        except (KeyError, ValueError, OSError):
                            pass
                        del registered[obj]
                for s in closing:
                    s.close()
                for obj, (ev, data) in want.items():
                    if obj not in registered:
                        try:
                            sel.register(obj, ev, data)
                            registered[obj] = ev
                        except (ValueError, OSError):
                            pass
                for key, mask in sel.select():
                    self._handle(key, mask)
        except Exception:
            log.exception("%s: console I/O thread failed", self.name)
        finally:
            sel.close()

    def _handle(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data is None:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass
            return
        kind, p = key.data
        if kind == "accept":
            self._accept(p)
            return
        with self._lock:
            if p.conn is not key.fileobj:
                return
            if mask & selectors.EVENT_WRITE:
                self._pump_tx(p)
            if mask & selectors.EVENT_READ and p.conn is key.fileobj:
                self._pump_rx(p)

    # --- lifecycle ----------------------------------------------------------------------------
    def pause(self) -> None:
        with self._lock:
            self._paused = True
            for p in self.ports:
                if p.tx_chain is not None:
                    # Hand the chain back; remember how much of it went out.
                    self.queues[p.from_guest].unpop()
                    p.tx_skip = p.tx_sent
                    p.tx_chain, p.tx_views, p.tx_sent = None, [], 0
            self._wake()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._flush_control()
            for p in self.ports:
                if p.enabled:
                    self._pump_tx(p)
                    p.rx_parked = False
            self._wake()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake()
        self._thread.join(timeout=5)
        for p in self.ports:
            for s in (p.conn, p.listener):
                if s is not None:
                    s.close()
            p.conn = None
            if p.listener is not None:
                p.listener = None
                self._unlink(p)
        for s in self._closing:
            s.close()
        self._closing = []
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    @staticmethod
    def _unlink(p: _Port) -> None:
        try:
            if p.listener is not None:
                p.listener.close()
            os.unlink(p.path)
        except OSError:
            pass

    # --- snapshots -------------------------------------------------------------------------------
    def save_dev_fields(self) -> dict[str, Any]:
        if any(p.tx_chain is not None for p in self.ports):
            raise StateError(f"{self.name}: output in progress; pause the device before saving it")
        ports = [ConsolePortState(p.enabled, p.rx_ready, p.open_pending, p.host_open,
                                  p.guest_open, p.tx_skip) for p in self.ports]
        return {"ready": self.ready, "ports": ports, "pending": list(self._pending)}

    def check_dev_fields(self, state: Any) -> None:
        mine = [p.enabled for p in self.ports]
        theirs = [ps.enabled for ps in state.ports]
        if mine != theirs:
            raise StateError(f"{self.name}: ports {self._ids(theirs)} in the snapshot, "
                             f"{self._ids(mine)} here")

    @staticmethod
    def _ids(flags: list[bool]) -> list[int]:
        return [i for i, on in enumerate(flags) if on]

    def load_dev_fields(self, state: Any) -> None:
        self.ready = state.ready
        self._pending = deque(state.pending)
        for p, ps in zip(self.ports, state.ports):
            p.rx_ready, p.guest_open, p.tx_skip = ps.rx_ready, ps.guest_open, ps.tx_skip
            p.tx_chain, p.tx_views, p.tx_sent = None, [], 0
            p.rx_parked = False
            connected = p.conn is not None
            p.open_pending = connected and not self.ready
            p.host_open = ps.host_open
            if self.ready and ps.host_open != connected:
                # The snapshot's client is gone (or a new one is here): say so.
                self._pending.append(_CONTROL.pack(p.id, VTCON_PORT_OPEN, int(connected)))
                p.host_open = connected
        self._wake()

