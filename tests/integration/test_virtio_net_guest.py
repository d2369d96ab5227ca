"""The virtio_net guest (tests/guests/virtio_net.c) on a real hypervisor:
frames both ways through the unixgram backend, and through a tap device in
a private network namespace when running as root."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid

import pytest

from harness import guest_rom

pytestmark = pytest.mark.guest

ETH_P = 0x88B5
ETH_TYPE = ETH_P.to_bytes(2, "big")
HOST_MAC = bytes.fromhex("020000000009")
#: bhyve's offer: MAC, STATUS, MRG_RXBUF, NOTIFY_ON_EMPTY, INDIRECT_DESC.
HOST_FEATURES = (1 << 5) | (1 << 16) | (1 << 15) | (1 << 24) | (1 << 28)
GUEST_FEATURES = (1 << 5) | (1 << 16)          # what the guest accepts of it


def guest_frame(mac: bytes, i: int) -> bytes:
    """What the guest sends as its i-th frame (README: virtio_net)."""
    payload = f"bhyvepy-guest-frame {i}".encode()
    return (b"\xff" * 6 + mac + ETH_TYPE + payload).ljust(60, b"\0")


def host_frames(mac: bytes) -> tuple[list[bytes], bytes]:
    """Frames for the guest: two it prints, then the one that ends it; plus
    one of another ethertype that it only counts."""
    shown = [mac + HOST_MAC + ETH_TYPE + b"hello guest".ljust(46, b"."),
             mac + HOST_MAC + ETH_TYPE + bytes(range(256)) * 4]
    other = mac + HOST_MAC + b"\x88\xb6" + b"not for printing".ljust(46, b"-")
    quit_ = mac + HOST_MAC + ETH_TYPE + b"quit".ljust(46, b"\0")
    return shown + [quit_], other


def check_console(out: str, mac: bytes, sent: list[bytes], *, features: int,
                  exact_ignored: bool = True) -> None:
    assert "FAIL" not in out, out
    m = re.search(r"^NET pci=00:05\.0 host-features=([0-9a-f]{8}) features=([0-9a-f]{8}) "
                  r"irq=(\w+) rx-size=(\d+) tx-size=(\d+)$", out, re.M)
    assert m, out
    assert int(m.group(1), 16) == features
    assert int(m.group(2), 16) == GUEST_FEATURES
    assert m.group(3) == "msix" and m.group(4) == m.group(5) == "1024"
    mac_text = ":".join(f"{b:02x}" for b in mac)
    assert f"NET MAC {mac_text} link=up\n" in out
    for i in range(3):
        assert f"NET TX {i} len=60\n" in out
    rx = re.findall(r"^NET RX len=(\d+) ([0-9a-f]+)$", out, re.M)
    assert [(int(n), h) for n, h in rx] == [(len(f), f[:32].hex()) for f in sent]
    done = re.search(r"^VIRTIO-NET DONE tx=3 rx=(\d+) ignored=(\d+)$", out, re.M)
    assert done and int(done.group(1)) == len(sent), out
    # Our one frame of another ethertype; a tap also carries the host
    # kernel's own traffic (IPv6 router solicitations and the like).
    assert int(done.group(2)) == 1 if exact_ignored else int(done.group(2)) >= 1


def test_frames_both_ways_through_unixgram(guest) -> None:
    mac = bytes.fromhex("589cfc000001")
    sockdir = tempfile.mkdtemp(prefix="vn-")
    sw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        path = os.path.join(sockdir, "sw")
        sw.bind(path)
        sw.settimeout(60)
        run = guest(guest_rom("virtio_net"), name="netvm",
                    slots=[f"5,virtio-net,unixgram={path},mac=58:9c:fc:00:00:01"])
        got, addrs = [], set()
        for _ in range(3):
            data, addr = sw.recvfrom(65536)
            got.append(data)
            addrs.add(addr)
        assert got == [guest_frame(mac, i) for i in range(3)]
        assert len(addrs) == 1
        run.read_until("NET READY\n")
        sent, other = host_frames(mac)
        nic = addrs.pop()
        sw.sendto(sent[0], nic)
        sw.sendto(other, nic)
        for f in sent[1:]:
            sw.sendto(f, nic)
        run.read_until("VIRTIO-NET DONE", timeout=60)
        assert run.wait(60) == 1, run.stderr
        check_console(run.output.decode(errors="replace"), mac, sent, features=HOST_FEATURES)
    finally:
        sw.close()
        shutil.rmtree(sockdir, ignore_errors=True)


# --------------------------------------------------------------------------
# tap, inside a network namespace made for the test
# --------------------------------------------------------------------------

CLONE_NEWNET = 0x40000000


def _tap_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "the tap test needs root (network namespace, tap device)"
    if shutil.which("ip") is None:
        return "the tap test needs ip(8) to make a network namespace"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this host"
    return None


def _in_netns(name: str, fn):
    """Run ``fn`` on a thread that has entered network namespace ``name``.

    Namespaces belong to threads: processes started and sockets created on
    that thread live in the namespace, the test process stays outside.
    """
    box: dict = {}

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def netns():
    why = _tap_prerequisites()
    if why:
        pytest.skip(why)
    name = f"bhyvepy-{uuid.uuid4().hex[:8]}"
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {p.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_frames_both_ways_through_a_tap(guest, netns) -> None:
    from bhyvepy.net import generate_mac

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)

    # A persistent tap that exists before the guest runs, so the packet
    # socket is listening when the guest's first frames come out.
    ip("tuntap", "add", "dev", "tap0", "mode", "tap")
    ip("link", "set", "tap0", "up")

    def start():
        pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P))
        pkt.bind(("tap0", ETH_P))
        pkt.settimeout(60)
        run = guest(guest_rom("virtio_net"), name="tapvm", slots=["5,virtio-net,tap0"])
        return pkt, run

    pkt, run = _in_netns(netns, start)
    mac = generate_mac(5, 0, "tapvm")          # no mac=: bhyve's derived address
    try:
        got = []
        while len(got) < 3:
            data, addr = pkt.recvfrom(65536)
            if addr[2] != socket.PACKET_OUTGOING and data[6:12] == mac:
                got.append(data)
        assert got == [guest_frame(mac, i) for i in range(3)]
        run.read_until("NET READY\n")
        sent, other = host_frames(mac)
        pkt.send(sent[0])
        pkt.send(other)
        for f in sent[1:]:
            pkt.send(f)
        run.read_until("VIRTIO-NET DONE", timeout=60)
        assert run.wait(60) == 1, run.stderr
        check_console(run.output.decode(errors="replace"), mac, sent, features=HOST_FEATURES,
                      exact_ignored=False)
    finally:
        pkt.close()
