"""Network backends (bhyve's net_backends), MAC derivation and MTU parsing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from bhyvepy.config import ConfigTree, PlainBhyveExit
from bhyvepy.net import (ETHERMTU, NetConfigError, NullBackend, UnixgramBackend,
                         format_mac, generate_mac, mac_from_config, mtu_from_config,
                         open_net_backend, parse_mac, parse_mtu)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT = 5.0


def nic_node(**values: str):
    tree = ConfigTree(warn=lambda m: None)
    tree.set_value("pci.0.5.0.device", "virtio-net")
    for key, value in values.items():
        tree.set_value(f"pci.0.5.0.{key}", value)
    return tree.node("pci.0.5.0")


# --------------------------------------------------------------------------
# MAC
# --------------------------------------------------------------------------

@pytest.mark.parametrize("slot,func,name,expected", [
    # printf '3-0-testvm' | md5sum -> c5d7f004...
    (3, 0, "testvm", "00:a0:98:c5:d7:f0"),
    # printf '2-1-freebsd-guest' | md5sum -> e2f052b5...
    (2, 1, "freebsd-guest", "00:a0:98:e2:f0:52"),
    # printf '31-7-a' | md5sum -> e53e9751...
    (31, 7, "a", "00:a0:98:e5:3e:97"),
    # snprintf into 80 bytes keeps 79: printf '3-0-' + 75 x | md5sum -> 90ca04a8...
    (3, 0, "x" * 200, "00:a0:98:90:ca:04"),
])
def test_generated_mac_matches_hand_computed_vectors(slot, func, name, expected):
    assert format_mac(generate_mac(slot, func, name)) == expected


def test_mac_from_config_prefers_mac():
    assert mac_from_config(nic_node(mac="58:9c:fc:00:00:01"), slot=3, func=0,
                           vmname="vm") == bytes.fromhex("589cfc000001")
    assert mac_from_config(nic_node(), slot=3, func=0, vmname="testvm") == \
        bytes.fromhex("00a098c5d7f0")


@pytest.mark.parametrize("text,expected", [
    ("58:9c:fc:00:00:01", "589cfc000001"),
    ("0:a0:98:1:2:3", "00a098010203"),                  # one digit per part
    ("00:A0:98:01:02:03", "00a098010203"),              # upper case
    ("00:a0:98:01:02:03junk", "00a098010203"),          # sscanf ignores the rest
    ("0x2:0:0:0:0:1", "020000000001"),                  # %x takes a 0x prefix
    (" 2: 0:0:0:0:1", "020000000001"),                  # and leading blanks
    ("102:0:0:0:0:1", "020000000001"),                  # octets are truncated
])
def test_mac_syntax_follows_ether_aton(text, expected):
    assert parse_mac(text) == bytes.fromhex(expected)


@pytest.mark.parametrize("text", ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff",
                                  "00:00:00:00:00:00", "zz", "", "00:11:22:33:44",
                                  "00-11-22-33-44-55", "00:11:22:33:44:"])
def test_bad_mac(text):
    with pytest.raises(NetConfigError) as info:
        parse_mac(text)
    assert info.value.message == f"Invalid MAC {text}"
    assert info.value.status == 4
    assert isinstance(info.value, PlainBhyveExit)


# --------------------------------------------------------------------------
# MTU
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("1500", 1500), ("0x5dc", 1500), ("46", 46),
                                        ("65535", 65535), (" 9000", 9000), ("010", None)])
def test_mtu(text, value):
    if value is None:                      # octal 010 = 8: below the minimum
        with pytest.raises(NetConfigError):
            parse_mtu(text)
    else:
        assert parse_mtu(text) == value


@pytest.mark.parametrize("text,err", [("45", errno.EINVAL), ("65536", errno.EINVAL),
                                      ("-1500", errno.EINVAL), ("abc", errno.EINVAL),
                                      ("", errno.EINVAL), ("1500x", errno.EINVAL),
                                      ("18446744073709551615", errno.ERANGE),
                                      ("99999999999999999999999", errno.ERANGE)])
def test_bad_mtu(text, err):
    with pytest.raises(NetConfigError) as info:
        parse_mtu(text)
    assert info.value.errno == err
    assert info.value.message == f"Invalid MTU {text}"
    assert info.value.status == 4


def test_mtu_from_config():
    assert mtu_from_config(nic_node()) is None
    assert mtu_from_config(nic_node(mtu="9000")) == 9000
    assert ETHERMTU == 1500


# --------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------

@pytest.mark.parametrize("values,name", [
    ({"backend": "slirp"}, "slirp"),
    ({"backend": "slirp", "hostfwd": "tcp::2222-:22"}, "slirp"),
    ({"backend": "netgraph", "path": "vmbridge:", "peerhook": "link2"}, "netgraph"),
    ({"backend": "netmap:em0"}, "netmap"),
    ({"backend": "vale0:vm1"}, "vale"),
    ({"backend": "mine", "type": "slirp"}, "slirp"),
])
def test_unsupported_backends_name_themselves(values, name):
    with pytest.raises(NetConfigError) as info:
        open_net_backend(nic_node(**values))
    assert info.value.message == f"net backend '{name}' is not supported by bhyvepy"
    assert info.value.status == 4


def test_unknown_backend():
    with pytest.raises(NetConfigError) as info:
        open_net_backend(nic_node(backend="em0"))
    assert info.value.message == "net backend 'em0' is unknown"


def test_no_backend_means_no_link():
    be = open_net_backend(nic_node())
    assert isinstance(be, NullBackend)
    be.send([b"\xff" * 14])
    assert be.tx_dropped == 1 and be.tx_frames == 0
    assert be.peek_len() == 0 and be.recv_into([bytearray(64)]) == 0
    be.close()


# --------------------------------------------------------------------------
# unixgram backend against a real peer socket
# --------------------------------------------------------------------------

@pytest.fixture
def switch(tmp_path):
    path = str(tmp_path / "sw.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(WAIT)
    yield sock, path
    sock.close()


@pytest.fixture
def nic(switch):
    _, path = switch
    be = open_net_backend(nic_node(backend=f"unixgram={path}", mac="58:9c:fc:00:00:01"))
    yield be
    be.close()


class Rx:
    """A device-like receiver: drains frames in the backend's callback."""

    def __init__(self, be, consume: bool = True) -> None:
        self.be = be
        self.consume = consume
        self.frames: list[bytes] = []
        self.calls = 0
        self.threads: set[str] = set()
        self.cond = threading.Condition()
        be.set_rx_callback(self)

    def __call__(self) -> None:
        with self.cond:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
            while self.consume:
                n = self.be.peek_len()
                if n == 0:
                    break
                buf = bytearray(n)
                assert self.be.recv_into([memoryview(buf)[:10], memoryview(buf)[10:]]) == n
                self.frames.append(bytes(buf))
            self.cond.notify_all()

    def wait_frames(self, count: int) -> list[bytes]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.frames) >= count, WAIT), self.frames
            return list(self.frames)


def test_unixgram_transmit_keeps_frame_boundaries(switch, nic):
    sock, _ = switch
    assert isinstance(nic, UnixgramBackend) and nic.kind == "unixgram"
    nic.send([b"\xff" * 6, memoryview(b"\x58\x9c\xfc\x00\x00\x01"), bytearray(b"\x88\xb5one")])
    nic.send([b"\xff" * 12 + b"\x88\xb5" + b"two" * 500])
    first, addr = sock.recvfrom(65536)
    second, _ = sock.recvfrom(65536)
    assert first == b"\xff" * 6 + b"\x58\x9c\xfc\x00\x00\x01" + b"\x88\xb5one"
    assert second == b"\xff" * 12 + b"\x88\xb5" + b"two" * 500
    assert addr == nic.local_address
    assert nic.tx_frames == 2 and nic.tx_dropped == 0


def test_unixgram_receive_through_callback(switch, nic):
    sock, _ = switch
    rx = Rx(nic)
    nic.rx_enable()
    frames = [b"\x02" * 12 + b"\x88\xb5" + bytes([i]) * (60 + i) for i in range(5)]
    for frame in frames:
        sock.sendto(frame, nic.local_address)
    assert rx.wait_frames(5) == frames
    assert rx.threads and threading.current_thread().name not in rx.threads
    assert nic.rx_frames == 5


def test_receive_starts_disabled_and_pause_holds_it(switch, nic):
    sock, _ = switch
    rx = Rx(nic)
    sock.sendto(b"early-frame", nic.local_address)
    time.sleep(0.2)
    assert rx.calls == 0                       # nothing until the device enables RX
    nic.rx_enable()
    assert rx.wait_frames(1) == [b"early-frame"]
    nic.pause()
    assert nic.paused
    sock.sendto(b"during-pause", nic.local_address)
    time.sleep(0.2)
    assert len(rx.frames) == 1
    nic.resume()
    assert rx.wait_frames(2)[1] == b"during-pause"


def test_callback_that_cannot_receive_waits_for_rx_enable(switch, nic):
    sock, _ = switch
    rx = Rx(nic, consume=False)                # a guest without receive buffers
    nic.rx_enable()
    sock.sendto(b"waiting-frame", nic.local_address)
    deadline = time.monotonic() + WAIT
    while rx.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert rx.calls == 1                       # not spinning on the readable socket
    rx.consume = True                          # the guest posts buffers ...
    nic.rx_enable()                            # ... and the device says so
    assert rx.wait_frames(1) == [b"waiting-frame"]


def test_recv_into_cuts_long_frames_and_discard(switch, nic):
    sock, _ = switch
    sock.sendto(b"A" * 100, nic.local_address)
    sock.sendto(b"B" * 50, nic.local_address)
    sock.sendto(b"C" * 70, nic.local_address)
    time.sleep(0.05)
    assert nic.peek_len() == 100
    small = bytearray(30)
    assert nic.recv_into([small]) == 30 and small == b"A" * 30
    assert nic.rx_discard() == 50
    buf = bytearray(200)
    assert nic.recv_into([buf]) == 70 and buf[:70] == b"C" * 70
    assert nic.peek_len() == 0 and nic.recv_into([buf]) == 0


def test_peer_gone_drops_frames_without_raising(tmp_path):
    path = str(tmp_path / "gone.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(path)
    be = open_net_backend(nic_node(backend=f"unixgram={path}"))
    try:
        peer.close()
        os.unlink(path)
        be.send([b"x" * 64])
        assert be.tx_dropped == 1
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # it comes back
        peer.bind(path)
        peer.settimeout(WAIT)
        be.send([b"y" * 64])
        assert peer.recv(100) == b"y" * 64
    finally:
        be.close()
        peer.close()


def test_unixgram_over_an_inherited_socketpair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.settimeout(WAIT)
    be = open_net_backend(nic_node(backend=f"unixgram=fd:{ours.detach()}"))
    try:
        be.send([b"to-peer"])
        assert theirs.recv(100) == b"to-peer"
        rx = Rx(be)
        be.rx_enable()
        theirs.send(b"to-guest")
        assert rx.wait_frames(1) == [b"to-guest"]
    finally:
        be.close()
        theirs.close()


@pytest.mark.parametrize("backend,message", [
    ("unixgram=", "unixgram backend needs a socket path: unixgram=/path/to/socket"),
    ("unixgram", "unixgram backend needs a socket path: unixgram=/path/to/socket"),
    ("unixgram=fd:x", "unixgram: invalid descriptor 'x'"),
])
def test_unixgram_config_errors(backend, message):
    with pytest.raises(NetConfigError) as info:
        open_net_backend(nic_node(backend=backend))
    assert info.value.message == message


def test_unixgram_missing_peer(tmp_path):
    path = str(tmp_path / "absent.sock")
    with pytest.raises(NetConfigError) as info:
        open_net_backend(nic_node(backend=f"unixgram={path}"))
    assert info.value.message == f"unixgram: cannot connect to {path}: {os.strerror(errno.ENOENT)}"
    assert info.value.status == 4


# --------------------------------------------------------------------------
# tap, inside a private network namespace
# --------------------------------------------------------------------------

TAP_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys, threading
    from bhyvepy.config import ConfigTree
    from bhyvepy.net import open_net_backend
    ETH_P = 0x88B5                      # local experimental ethertype: no kernel chatter
    tree = ConfigTree()
    tree.set_value("pci.0.2.0.backend", "tap0")
    be = open_net_backend(tree.node("pci.0.2.0"))
    import fcntl, struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH22x", b"tap0", 0))
    flags = struct.unpack_from("H", ifr, 16)[0]
    pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P))
    pkt.bind(("tap0", ETH_P))
    pkt.settimeout(5)
    guest = bytes.fromhex("589cfc000001")
    out = b"\\xff" * 6 + guest + ETH_P.to_bytes(2, "big") + b"from-guest" * 5
    be.send([out[:14], out[14:]])
    seen = pkt.recv(2048)
    got, ready = [], threading.Event()
    def on_rx():
        n = be.peek_len()
        if n:
            buf = bytearray(n)
            be.recv_into([buf])
            if buf[12:14] == ETH_P.to_bytes(2, "big"):
                got.append(bytes(buf)); ready.set()
    be.set_rx_callback(on_rx)
    be.rx_enable()
    into = guest + b"\\x02" * 6 + ETH_P.to_bytes(2, "big") + b"to-guest" * 8
    pkt.send(into)
    ready.wait(5)
    be.close()
    try:
        socket.if_nametoindex("tap0")
        gone = False
    except OSError:
        gone = True
    print(json.dumps({"up": bool(flags & 1), "seen": seen.hex(), "sent": out.hex(),
                      "got": [g.hex() for g in got], "into": into.hex(),
                      "gone": gone}))
""")


def test_tap_in_a_network_namespace():
    if os.geteuid() != 0:
        pytest.skip("the tap test needs root (to create a network namespace and a tap)")
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        pytest.skip("needs unshare(1) and ip(8) to make a private network namespace")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this host")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([unshare, "--net", sys.executable, "-c", TAP_SCRIPT],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"cannot create a network namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["up"], "bhyve sets the tap interface up"
    assert result["seen"] == result["sent"]
    assert result["got"] == [result["into"]]
    assert result["gone"], "a non-persistent tap goes away with its descriptor"


def test_tap_open_failure_names_the_device():
    if sys.platform.startswith("linux"):
        with pytest.raises(NetConfigError) as info:
            open_net_backend(nic_node(backend="tap-name-far-too-long-for-linux"))
        assert info.value.message.startswith(
            "open of tap device tap-name-far-too-long-for-linux failed")
    else:
        with pytest.raises(NetConfigError) as info:
            open_net_backend(nic_node(backend="tap99999"))
        assert info.value.message == "open of tap device /dev/tap99999 failed"
    assert info.value.status == 4
