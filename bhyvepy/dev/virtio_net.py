"""virtio-net: a NIC on the legacy virtio PCI transport (bhyve's
``pci_virtio_net.c``).

What the guest sees is bhyve's: vendor 1af4, device 1000, class network,
subsystem 1; two queues of 1024 entries, receive (0) and transmit (1), and
no control queue (bhyve never enabled its own); features MAC, STATUS,
MRG_RXBUF, NOTIFY_ON_EMPTY and indirect descriptors, plus MTU when
``mtu=`` is given.  No checksum or segmentation offload is offered:
bhyvepy's backends carry plain Ethernet frames (no vnet header crosses
them, as with bhyve's tap backend), so an offload would have to be
completed in software here, and a guest that never asks for it sends
finished frames anyway.  The 12-byte configuration is the MAC, status
(LINK_UP, always), ``max_virtqueue_pairs`` = 1 and the MTU (1500 unless
``mtu=`` says otherwise; the value is there even without VIRTIO_NET_F_MTU,
as in bhyve).  The guest may write the MAC; other configuration writes are
ignored.

The virtio-net header is 10 bytes, or 12 when the guest negotiated
mergeable receive buffers; it is all zeros on receive except
``num_buffers``, and skipped on transmit.

Receive runs on the backend's thread (its ``on_rx_ready`` callback) under
the device lock: the next frame's length is peeked, enough guest chains
are taken for header plus frame -- one, or with MRG_RXBUF as many as it
takes, up to bhyve's 256 buffers -- the frame is read straight into guest
memory, and the chains are published in one used-index update (so a guest
never sees part of a merged frame).  A frame that does not fit is dropped
and counted (:attr:`VirtioNet.rx_too_big`) and the chains go back to the
ring.  With no buffers left the device turns the receive kick back on and
stops the backend until the guest kicks (bhyve's ``netbe_rx_disable`` /
``ping_rxq``).  Transmit is done on the kick itself: each chain, header
skipped, goes to the backend (which never blocks; frames the host cannot
take are dropped there), then the used ring and one interrupt.  bhyve uses
a transmit thread for the same work; since the backends never block, doing
it on the vCPU thread costs the guest nothing it would not wait for anyway.

Guest errors never raise into the vCPU or backend thread: a ring that
cannot be trusted breaks the queue and sets NEEDS_RESET (the transport); a
receive buffer outside RAM or readable-only is a broken driver and does the
same; a receive chain too small for the header is returned empty (as in
bhyve); a transmit chain with a bad buffer, a header cut short, no frame,
more than 256 buffers or a frame over 64 KiB is returned with length 0 and
counted (:attr:`VirtioNet.tx_bad`).

Pause (bhyve's ``pci_vtnet_pause``): receive delivery stops and any
callback in progress finishes; transmit is synchronous, so none is in
flight once the device lock is free.  Frames arriving meanwhile wait in the
host socket.  Snapshots carry the common virtio part plus the configuration
(MAC, status, MTU) and whether features were negotiated; nothing is in
flight to save.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from bhyvepy.dev.virtio.queue import (VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_INDIRECT_DESC,
                                      DescriptorChain, Virtqueue, slice_views, used_bytes)
from bhyvepy.dev.virtio.transport import (VIRTIO_DEV_NET, VIRTIO_ID_NETWORK, VirtioDeviceState,
                                          VirtioPciDevice)
from bhyvepy.errors import GuestMemoryError
from bhyvepy.net import (ETHERMTU, MAX_MTU, MIN_MTU, NetBackend, format_mac, mac_from_config,
                         mtu_from_config, open_net_backend)
from bhyvepy.pci import PciContext
from bhyvepy.registry import pci_emul
from bhyvepy.snapshot.state import BOOL, U16, Blob, StateError, device_state

log = logging.getLogger("bhyvepy.virtio")

VTNET_RINGSZ = 1024
VTNET_RXQ = 0
VTNET_TXQ = 1
#: Most buffers one frame may use in either direction (bhyve's VTNET_MAXSEGS).
VTNET_MAXSEGS = 256
#: Largest frame accepted from the guest (bhyve's VTNET_MAX_PKT_LEN).
VTNET_MAX_PKT_LEN = 65536 + 64
#: Frames moved per receive callback before the lock is let go (the backend
#: calls again at once while frames wait).
RX_BUDGET = 64

# Feature bits (virtio_net.h).
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_F_CTRL_VQ = 1 << 17
VIRTIO_NET_F_MQ = 1 << 22

VTNET_S_HOSTCAPS = (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_F_NOTIFY_ON_EMPTY
                    | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_NET_F_MRG_RXBUF)

VIRTIO_NET_S_LINK_UP = 1
PCIC_NETWORK = 0x02

#: struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu (packed).
_CONFIG = struct.Struct("<6sHHH")
MAC_LEN = 6
#: struct virtio_net_hdr, and the mergeable-buffers variant with num_buffers.
VTNET_HDR_LEN = 10
VTNET_MRG_HDR_LEN = 12
_NUM_BUFFERS = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def header_length(features: int) -> int:
    """Bytes of virtio-net header in every buffer for these negotiated features."""
    return VTNET_MRG_HDR_LEN if features & VIRTIO_NET_F_MRG_RXBUF else VTNET_HDR_LEN


def publish_used(vq: Virtqueue, entries: list[tuple[DescriptorChain, int]]) -> bool:
    """Return several chains to the guest with a single used-index update.

    bhyve's ``vq_relchain_prepare`` + ``vq_relchain_publish``: the elements
    are written first and the index moved once, so a driver reading the
    ring concurrently sees either none or all of a merged frame.  Chains
    from an earlier incarnation of the queue (reset meanwhile) are dropped.
    """
    if not entries or not vq.ready:
        return False
    if any(c.generation != vq.generation for c, _ in entries):
        return False
    q = vq.size
    try:
        ring = vq.mem.view(vq.used_addr, used_bytes(q))    # type: ignore[attr-defined]
    except GuestMemoryError:
        return False
    idx = vq.next_used
    for chain, length in entries:
        _USED_ELEM.pack_into(ring, 4 + 8 * (idx & (q - 1)), chain.head & 0xFFFFFFFF,
                             length & 0xFFFFFFFF)
        idx = (idx + 1) & 0xFFFF
    vq.next_used = idx
    _NUM_BUFFERS.pack_into(ring, 2, idx)
    return True


def _scatter(views: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in views:
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos:pos + n]
        pos += n


# ----------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------

@device_state("virtio-net", version=1)
@dataclass
class VirtioNetState(VirtioDeviceState):
    """bhyve saves the configuration and whether features were negotiated
    (``pci_vtnet_snapshot``); the header length and merge flag follow from
    the negotiated features in the virtio part."""

    mac: Annotated[bytes, Blob(exact=MAC_LEN)] = bytes(MAC_LEN)
    link_status: U16 = VIRTIO_NET_S_LINK_UP
    mtu: U16 = ETHERMTU
    features_negotiated: BOOL = False

    def validate(self) -> None:
        if self.link_status & ~VIRTIO_NET_S_LINK_UP:
            raise StateError(f"virtio-net status {self.link_status:#x} invalid")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise StateError(f"virtio-net MTU {self.mtu} out of range")


# ----------------------------------------------------------------------------
# the device
# ----------------------------------------------------------------------------

@pci_emul("virtio-net")
class VirtioNet(VirtioPciDevice):
    state_class: ClassVar[type] = VirtioNetState
    vc_name: ClassVar[str] = "vtnet"

    def __init__(self, ctx: PciContext, *, backend: NetBackend | None = None) -> None:
        node = ctx.config
        tree = getattr(node, "tree", None)
        vmname = tree.get_value("name") if tree is not None else None
        # bhyve's order: MAC, MTU, then the backend.
        mac = mac_from_config(node, slot=ctx.slot, func=ctx.func, vmname=vmname)
        mtu = mtu_from_config(node)
        caps = VTNET_S_HOSTCAPS | (VIRTIO_NET_F_MTU if mtu is not None else 0)
        be = backend if backend is not None else open_net_backend(node)
        try:
            super().__init__(ctx, device_id=VIRTIO_DEV_NET, class_code=PCIC_NETWORK << 16,
                             subdevice=VIRTIO_ID_NETWORK, queue_sizes=[VTNET_RINGSZ] * 2,
                             host_features=caps, cfgsize=_CONFIG.size)
        except BaseException:
            if backend is None:
                be.close()
            raise
        self.backend = be
        self.mac = bytearray(mac)
        self.link_status = VIRTIO_NET_S_LINK_UP
        self.mtu = ETHERMTU if mtu is None else mtu
        self.features_negotiated = False
        self.hdrlen = VTNET_HDR_LEN
        self.rx_merge = False
        self._paused = False
        # Counters (diagnostics and tests).
        self.rx_delivered = 0
        self.rx_too_big = 0
        self.rx_bad = 0
        self.tx_sent = 0
        self.tx_bad = 0
        be.set_rx_callback(self._on_rx_ready)

    # --- configuration -----------------------------------------------------------
    def device_config(self) -> bytes:
        return _CONFIG.pack(bytes(self.mac), self.link_status, 1, self.mtu)

    def cfg_write_dev(self, offset: int, size: int, value: int) -> bool:
        if offset < MAC_LEN:
            if offset + size > MAC_LEN:
                self.complain(f"config write of {size} bytes at {offset} crosses the MAC")
            else:
                self.mac[offset:offset + size] = value.to_bytes(size, "little")
        return True         # other registers: writes silently ignored, as in bhyve

    @property
    def mac_text(self) -> str:
        return format_mac(bytes(self.mac))

    def apply_features(self, features: int) -> None:
        """bhyve's ``pci_vtnet_neg_features``: header size, merging, and RX
        may start once the guest posts buffers."""
        self.rx_merge = bool(features & VIRTIO_NET_F_MRG_RXBUF)
        self.hdrlen = header_length(features)
        self.features_negotiated = True

    def reset_device(self) -> None:
        with self._lock:
            # No receive until features are negotiated again (bhyve's
            # pci_vtnet_reset); transmit is synchronous, nothing to wait for.
            self.features_negotiated = False
            self.backend.rx_disable()
            self.rx_merge = False
            self.hdrlen = VTNET_HDR_LEN
            super().reset_device()

    # --- queues ------------------------------------------------------------------
    def queue_notify(self, vq: Virtqueue) -> None:
        with self._lock:
            if vq.index == VTNET_RXQ:
                # bhyve's ping_rxq: buffers are there, let the backend deliver.
                if self.features_negotiated:
                    vq.kick_disable()
                    self.backend.rx_enable()
            elif not self._paused:
                self._transmit(vq)

    # --- transmit -----------------------------------------------------------------
    def _transmit(self, vq: Virtqueue) -> None:
        done = False
        while not self._paused:
            chain = self.pop(vq)
            if chain is None:
                break
            vq.push(chain, self._send_chain(chain))
            done = True
        if done:
            self.end_chains(vq, True)

    def _send_chain(self, chain: DescriptorChain) -> int:
        """Send one guest frame; returns the used length (0: dropped)."""
        problem = None
        if chain.error is not None:
            problem = chain.error
        elif chain.writable:
            problem = "transmit chain with device-writable buffers"
        elif len(chain.segments) > VTNET_MAXSEGS:
            problem = f"transmit chain of {len(chain.segments)} buffers"
        else:
            total = chain.readable_len
            if total <= self.hdrlen:
                problem = f"transmit chain of {total} bytes: no frame after the header"
            elif total - self.hdrlen > VTNET_MAX_PKT_LEN:
                problem = f"transmit frame of {total - self.hdrlen} bytes"
        if problem is not None:
            self.tx_bad += 1
            self.complain(problem)
            return 0
        length = total - self.hdrlen
        frame = slice_views(chain.readable, self.hdrlen, length)
        be = self.backend
        dropped = be.tx_dropped
        be.send(frame)
        if be.tx_dropped != dropped:
            return 0
        self.tx_sent += 1
        return length

    # --- receive ------------------------------------------------------------------
    def _on_rx_ready(self) -> None:
        """The backend has a frame (its thread; bhyve's ``pci_vtnet_rx_callback``)."""
        with self._lock:
            if self._paused or not self.features_negotiated:
                return
            vq = self.queues[VTNET_RXQ]
            try:
                self._receive(vq)
            except Exception as e:      # a device bug must not kill the backend thread
                log.exception("%s: receive failed", self.name)
                self.needs_reset(f"internal error on the receive queue: {e}", vq)

    def _receive(self, vq: Virtqueue) -> None:
        be = self.backend
        for _ in range(RX_BUDGET):
            plen = be.peek_len()
            if plen == 0:
                self.end_chains(vq)
                return
            chains = self._take_buffers(vq, plen + self.hdrlen)
            if chains is None:
                return
            if not chains:
                continue            # frame dropped (too big); try the next one
            self._deliver(vq, chains, plen)
        self.end_chains(vq)

    def _take_buffers(self, vq: Virtqueue, need: int) -> list[DescriptorChain] | None:
        """Chains for ``need`` bytes; [] if the frame was dropped, None to stop."""
        chains: list[DescriptorChain] = []
        have = nsegs = 0
        while not chains or (self.rx_merge and have < need and nsegs < VTNET_MAXSEGS):
            chain = self.pop(vq)
            if chain is None:
                if not vq.ready:
                    return None                 # the ring broke: NEEDS_RESET is set
                # No buffers: ask for a kick, and look once more (bhyve).
                vq.kick_enable()
                if not vq.has_descs():
                    vq.unpop(len(chains))
                    self.end_chains(vq, True)
                    self.backend.rx_disable()
                    return None
                vq.kick_disable()
                continue
            if chain.error is not None or chain.readable:
                self.rx_bad += 1
                self.needs_reset(f"receive buffer unusable: "
                                 f"{chain.error or 'device-readable buffer'}", vq)
                return None
            size = chain.writable_len
            if not chains and size < self.hdrlen:
                # bhyve: a chain without room for the header is dropped.
                self.rx_bad += 1
                self.complain(f"receive chain of {size} bytes cannot hold the header")
                vq.push(chain, 0)
                continue
            chains.append(chain)
            have += size
            nsegs += len(chain.segments)
        if have < need:
            vq.unpop(len(chains))
            self.rx_too_big += 1
            self.backend.rx_discard()
            return []
        return chains

    def _deliver(self, vq: Virtqueue, chains: list[DescriptorChain], plen: int) -> None:
        hdrlen = self.hdrlen
        views = [v for c in chains for v in c.writable if len(v)]
        n = self.backend.recv_into(slice_views(views, hdrlen, plen))
        if n != plen:
            # The frame went elsewhere (or could not be stored): keep the buffers.
            self.complain(f"backend delivered {n} bytes of a {plen}-byte frame")
            vq.unpop(len(chains))
            return
        header = bytearray(hdrlen)
        if self.rx_merge:
            _NUM_BUFFERS.pack_into(header, 10, len(chains))
        _scatter(slice_views(views, 0, hdrlen), bytes(header))
        left = hdrlen + plen
        entries = []
        for c in chains:
            used = min(c.writable_len, left) if self.rx_merge else left
            entries.append((c, used))
            left -= used
        if publish_used(vq, entries):
            self.rx_delivered += 1

    # --- lifecycle ----------------------------------------------------------------
    def pause(self) -> None:
        """Stop receive delivery; transmit has nothing in flight (bhyve's
        ``pci_vtnet_pause``).  The backend is paused without the device lock
        held: its receive callback takes that lock."""
        with self._lock:
            self._paused = True
        self.backend.pause()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            txq = self.queues[VTNET_TXQ]
            if txq.has_descs():
                self._transmit(txq)
        self.backend.resume()

    def close(self) -> None:
        self.backend.close()

    # --- snapshots -----------------------------------------------------------------
    def save_dev_fields(self) -> dict[str, Any]:
        return {"mac": bytes(self.mac), "link_status": self.link_status, "mtu": self.mtu,
                "features_negotiated": self.features_negotiated}

    def load_dev_fields(self, state: Any) -> None:
        self.mac = bytearray(state.mac)
        self.link_status = state.link_status
        self.mtu = state.mtu
        self.features_negotiated = state.features_negotiated
        self.rx_merge = bool(self.features & VIRTIO_NET_F_MRG_RXBUF)
        self.hdrlen = header_length(self.features)
        if self.features_negotiated:
            # bhyve re-applies the features and enables receive on restore.
            self.backend.rx_enable()
        else:
            self.backend.rx_disable()
