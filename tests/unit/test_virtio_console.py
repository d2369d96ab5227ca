"""virtio-console with real UNIX sockets, driven like the Linux multiport driver."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from bhyvepy.dev.hostbridge import HostBridge
from bhyvepy.dev.virtio_console import VirtioConsole, VirtioConsoleState
from bhyvepy.pci import PciInitError
from bhyvepy.snapshot.state import StateError, decode, encode

from pci_testkit import Machine
from virtio_driver import Allocator, LegacyDriver, make_memory

RAM = (0x100000, 0x800000)
DEVICE_READY, PORT_ADD, PORT_READY, CONSOLE_PORT, PORT_OPEN, PORT_NAME = 0, 1, 3, 4, 6, 7
F_SIZE, F_MULTIPORT = 1, 2


def wait_for(pred, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class Guest:
    """The guest side: queues, buffers and the control protocol."""

    def __init__(self, m: Machine, dev, mem, nports: int = 2) -> None:
        self.m, self.dev, self.mem = m, dev, mem
        self.drv = LegacyDriver(m, dev, mem, Allocator(*RAM))
        self.features = self.drv.negotiate()
        nq = 2 + 2 * nports
        self.q = {i: self.drv.setup_queue(i) for i in range(nq)}
        self.drv.driver_ok()
        self.bufs: dict[tuple[int, int], int] = {}        # (queue, head) -> address
        self.ctl: list[tuple[int, int, int, bytes]] = []

    def post(self, qi: int, n: int, size: int = 4096) -> None:
        for _ in range(n):
            addr = self.drv.buf(size)
            head = self.q[qi].add([(addr, size, True)])
            self.bufs[(qi, head)] = addr
        self.drv.kick(qi)

    def received(self, qi: int) -> list[bytes]:
        out = []
        for head, ln in self.q[qi].collect():
            out.append(self.mem.read(self.bufs.pop((qi, head)), ln))
        return out

    def send(self, qi: int, data: bytes, kick: bool = True) -> None:
        self.q[qi].add([(self.drv.buf(data), len(data), False)])
        if kick:
            self.drv.kick(qi)

    def control(self, pid: int, event: int, value: int = 1) -> None:
        self.send(3, struct.pack("<IHH", pid, event, value))

    def poll_control(self) -> list[tuple[int, int, int, bytes]]:
        got = self.received(2)
        for raw in got:
            pid, ev, val = struct.unpack("<IHH", raw[:8])
            self.ctl.append((pid, ev, val, raw[8:]))
        if got:
            self.post(2, len(got))                      # give the buffers back, like Linux
        return self.ctl

    def wait_control(self, msg: tuple, timeout: float = 5.0) -> None:
        wait_for(lambda: msg in [(p, e, v) for p, e, v, _ in self.poll_control()], timeout,
                 f"control message {msg}")


@pytest.fixture
def rig(tmp_path):
    made = []

    def build(ports: dict[str, dict[str, str]] | None = None, slot: int = 5):
        mem = make_memory(RAM)
        m = Machine(mem=mem)
        m.add(HostBridge, 0, 0, 0)
        if ports is None:
            ports = {"0": {"name": "org.bhyve.console", "path": str(tmp_path / "c0.sock"),
                           "console": "true"},
                     "1": {"name": "org.test.agent", "path": str(tmp_path / "c1.sock")}}
        values = {f"port.{n}.{k}": v for n, kv in ports.items() for k, v in kv.items()}
        dev = m.add(VirtioConsole, 0, slot, 0, config=m.node(0, slot, 0, **values))
        made.append(dev)
        m.pci.finalize()
        return m, dev, mem

    yield build
    for d in made:
        d.close()


def connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(5)
    return s


def ready_guest(m, dev, mem) -> Guest:
    g = Guest(m, dev, mem)
    assert g.features == F_SIZE | F_MULTIPORT           # bhyve's 0|1|2 == 0x3
    g.post(2, 8)
    g.post(0, 4)
    g.post(4, 4)
    g.control(0xFFFFFFFF, DEVICE_READY)
    return g


def test_identity_and_config(rig) -> None:
    m, dev, mem = rig()
    assert m.cfg1_read(0, 5, 0, 0, 4) == 0x1003_1AF4
    assert m.cfg1_read(0, 5, 0, 0x2C, 4) == 0x0003_1AF4
    assert m.cfg1_read(0, 5, 0, 0x0B, 1) == 0x07
    drv = LegacyDriver(m, dev, mem, Allocator(*RAM))
    assert (drv.cfg_read(0, 2), drv.cfg_read(2, 2), drv.cfg_read(4, 4)) == (80, 25, 16)
    assert len(dev.queues) == 34 and dev.msix.nvec == 35
    assert os.path.exists(dev.ports[0].path) and os.path.exists(dev.ports[1].path)


def test_device_ready_announces_ports_and_console(rig) -> None:
    g = ready_guest(*rig())
    g.wait_control((1, PORT_NAME, 1))
    msgs = g.ctl
    assert [(p, e) for p, e, _, _ in msgs] == [(0, PORT_ADD), (0, PORT_NAME),
                                                 (1, PORT_ADD), (1, PORT_NAME)]
    assert msgs[1][3] == b"org.bhyve.console" and msgs[3][3] == b"org.test.agent"
    g.control(0, PORT_READY)
    g.wait_control((0, CONSOLE_PORT, 1))
    g.control(1, PORT_READY)                            # not a console: no answer
    g.control(9, PORT_READY)                            # unknown port: ignored
    time.sleep(0.02)
    assert [e for _, e, _, _ in g.poll_control()].count(CONSOLE_PORT) == 1


def test_data_both_ways(rig) -> None:
    m, dev, mem = rig()
    g = ready_guest(m, dev, mem)
    c = connect(dev.ports[0].path)
    g.wait_control((0, PORT_OPEN, 1))
    g.send(1, b"hello from the guest\n")
    assert c.recv(100) == b"hello from the guest\n"
    c.sendall(b"typed on the host")
    got = wait_for(lambda: g.received(0), what="input")
    assert b"".join(got) == b"typed on the host"
    # port 1 on queues 4/5 is separate
    c1 = connect(dev.ports[1].path)
    g.wait_control((1, PORT_OPEN, 1))
    g.send(5, b"to agent")
    assert c1.recv(100) == b"to agent"
    c1.sendall(b"from agent")
    assert b"".join(wait_for(lambda: g.received(4), what="port 1 input")) == b"from agent"
    assert g.received(0) == []


def test_input_waits_for_guest_buffers(rig) -> None:
    m, dev, mem = rig()
    g = Guest(m, dev, mem)
    g.post(2, 8)
    g.control(0, DEVICE_READY)
    c = connect(dev.ports[0].path)
    g.wait_control((0, PORT_OPEN, 1))
    c.sendall(b"early bytes")                           # no receive buffers yet
    time.sleep(0.05)
    g.post(0, 4, size=4)                                # small buffers: input is split
    data = bytearray()
    wait_for(lambda: data.extend(b"".join(g.received(0))) or len(data) >= 11, what="early input")
    assert bytes(data) == b"early bytes"


def test_disconnect_reconnect_and_one_client_at_a_time(rig) -> None:
    m, dev, mem = rig()
    g = ready_guest(m, dev, mem)
    c = connect(dev.ports[1].path)
    g.wait_control((1, PORT_OPEN, 1))
    second = connect(dev.ports[1].path)
    assert second.recv(10) == b""                       # refused while the first is connected
    c.close()
    g.wait_control((1, PORT_OPEN, 0))
    g.ctl.clear()
    c2 = connect(dev.ports[1].path)
    g.wait_control((1, PORT_OPEN, 1))
    g.send(5, b"again")
    assert c2.recv(10) == b"again"


def test_connection_before_device_ready(rig) -> None:
    m, dev, mem = rig()
    c = connect(dev.ports[0].path)
    wait_for(lambda: dev.ports[0].conn is not None, what="accept")
    g = ready_guest(m, dev, mem)
    g.wait_control((0, PORT_OPEN, 1))
    kinds = [(p, e) for p, e, _, _ in g.ctl]
    assert kinds.index((0, PORT_OPEN)) > kinds.index((0, PORT_NAME))
    c.close()


def test_output_never_blocks_the_vcpu(rig) -> None:
    m, dev, mem = rig()
    g = ready_guest(m, dev, mem)
    c = connect(dev.ports[0].path)
    g.wait_control((0, PORT_OPEN, 1))
    chunk = bytes(range(256)) * 256                     # 64 KiB per buffer
    t0 = time.monotonic()
    for _ in range(32):                                 # 2 MiB, far more than a socket buffer
        g.send(1, chunk)
    assert time.monotonic() - t0 < 2.0                  # kicks returned without a reader
    got = bytearray()
    while len(got) < 32 * len(chunk):
        got += c.recv(1 << 20)
    assert bytes(got) == chunk * 32
    returned = []
    wait_for(lambda: returned.extend(g.q[1].collect()) or len(returned) == 32,
             what="output buffers returned")


def test_output_without_client_is_dropped(rig) -> None:
    m, dev, mem = rig()
    g = ready_guest(m, dev, mem)
    g.send(1, b"nobody listens")
    assert g.q[1].collect()                             # returned at once, as bhyve does


def test_reset_forgets_protocol_state(rig) -> None:
    m, dev, mem = rig()
    g = ready_guest(m, dev, mem)
    g.wait_control((1, PORT_NAME, 1))
    g.drv.w(18, 1, 0)
    assert not dev.ready and not dev.ports[0].rx_ready
    g2 = ready_guest(m, dev, mem)
    g2.wait_control((1, PORT_NAME, 1))


@pytest.mark.parametrize("ports,message", [
    ({"x": {"name": "a", "path": "/tmp/x"}}, "vtcon: Invalid port x"),
    ({"16": {"name": "a", "path": "/tmp/x"}}, "vtcon: Invalid port 16"),
    ({"0": {"name": "a"}}, "vtcon: required path missing for port 0"),
    ({"0": {"path": "/tmp/x"}}, "vtcon: required name missing for port 0"),
])
def test_bad_configuration(rig, ports, message) -> None:
    with pytest.raises(PciInitError, match=message):
        rig(ports)


def test_existing_socket_path_is_refused(rig, tmp_path) -> None:
    p = tmp_path / "taken.sock"
    p.write_text("")
    with pytest.raises(PciInitError, match="cannot create port 0: Address already in use"):
        rig({"0": {"name": "a", "path": str(p)}})


def test_close_removes_sockets(rig, tmp_path) -> None:
    m, dev, mem = rig()
    paths = [dev.ports[0].path, dev.ports[1].path]
    dev.close()
    assert not any(os.path.exists(p) for p in paths)


def test_snapshot_round_trip(rig, tmp_path) -> None:
    m, dev, mem = rig()
    g = ready_guest(m, dev, mem)
    c = connect(dev.ports[0].path)
    g.wait_control((0, PORT_OPEN, 1))
    dev.pause()
    state = decode(VirtioConsoleState, encode(dev.save_state()))
    dev.resume()
    assert state.ready and state.ports[0].host_open and state.ports[0].rx_ready
    # the restored VM has new sockets and no clients: the guest hears PORT_OPEN 0
    other = {"0": {"name": "org.bhyve.console", "path": str(tmp_path / "n0.sock")},
             "1": {"name": "org.test.agent", "path": str(tmp_path / "n1.sock")}}
    m2, dev2, mem2 = rig(other)
    mem2.write(RAM[0], mem.read(RAM[0], RAM[1]))
    dev2.pause()
    dev2.restore_state(state)
    dev2.resume()
    g.m, g.dev, g.mem, g.drv.m, g.drv.fn, g.drv.mem = m2, dev2, mem2, m2, dev2, mem2
    for q in g.q.values():
        q.mem = mem2
    g.ctl.clear()
    g.wait_control((0, PORT_OPEN, 0))
    c2 = connect(dev2.ports[0].path)
    g.wait_control((0, PORT_OPEN, 1))
    c2.sendall(b"after restore")
    assert b"".join(wait_for(lambda: g.received(0), what="input after restore")) == \
        b"after restore"
    c.close()
    # a device with other ports refuses the snapshot
    m3, dev3, _ = rig({"3": {"name": "z", "path": str(tmp_path / "z.sock")}})
    with pytest.raises(StateError, match="ports"):
        dev3.restore_state(state)


def test_socket_path_too_long(rig, tmp_path) -> None:
    with pytest.raises(PciInitError, match="File name too long"):
        rig({"0": {"name": "a", "path": str(tmp_path / ("x" * 120))}})
