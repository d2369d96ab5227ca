"""virtio-blk: a disk on the legacy virtio PCI transport (bhyve's
``pci_virtio_block.c``).

What the guest sees is bhyve's: one queue of 128 entries; features
SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY and indirect descriptors, plus DISCARD
when the backing store can deallocate (bhyve offers neither RO nor
WRITE_ZEROES: a read-only disk fails writes with an I/O error, as bhyve's
blockif returns EROFS); the 60-byte configuration with capacity in
512-byte units, ``seg_max`` = min(ring - 2, 128), no geometry, the logical
block size, the topology derived from the physical sector size and offset,
and the discard limits (16 MiB, one segment); request types IN, OUT,
FLUSH (and FLUSH_OUT), GET_ID and DISCARD, anything else UNSUPP.  GET_ID
answers ``ser=``/``serial=`` (at most 20 characters) or bhyve's
``BHYVE-XXXX-XXXX-XXXX`` from the MD5 of the path.

Where bhyve asserts on a malformed request, this model fails the request:
the status byte (the last byte of the last descriptor, which must be
device-writable) gets IOERR, or -- with no usable status byte -- the chain
is returned with length 0.  A request is parsed from the chain as a byte
stream (header = first 16 readable bytes, data = what follows, status =
last writable byte), so drivers that merge buffers work too.  Requests
outside the disk get IOERR instead of growing the image file.

I/O goes through :class:`bhyvepy.block.BlockBackend`; completions arrive on
its worker threads and take the device lock before touching the ring.
``pause()`` drains the backend and flushes it, so a snapshot never holds
I/O in flight; a device reset waits for requests already running (their
buffers belong to the guest driver being reset) and drops queued ones.
"""

from __future__ import annotations

import errno
import struct
import threading
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from bhyvepy.block import BLOCKIF_IOV_MAX, BlockBackend, BlockRequest, default_serial
from bhyvepy.dev.virtio.queue import (VIRTIO_RING_F_INDIRECT_DESC, DescriptorChain, Virtqueue,
                                      slice_views)
from bhyvepy.dev.virtio.transport import (VIRTIO_DEV_BLOCK, VIRTIO_ID_BLOCK,
                                          VirtioDeviceState, VirtioPciDevice)
from bhyvepy.pci import PciContext
from bhyvepy.registry import pci_emul
from bhyvepy.snapshot.state import U32, U64, Str, StateError, device_state

VTBLK_BSIZE = 512
VTBLK_RINGSZ = 128
VTBLK_S_OK, VTBLK_S_IOERR, VTBLK_S_UNSUPP = 0, 1, 2
VTBLK_BLK_ID_BYTES = 20

VTBLK_F_BARRIER = 1 << 0
VTBLK_F_SIZE_MAX = 1 << 1
VTBLK_F_SEG_MAX = 1 << 2
VTBLK_F_GEOMETRY = 1 << 4
VTBLK_F_RO = 1 << 5
VTBLK_F_BLK_SIZE = 1 << 6
VTBLK_F_FLUSH = 1 << 9
VTBLK_F_TOPOLOGY = 1 << 10
VTBLK_F_DISCARD = 1 << 13
VTBLK_F_WRITE_ZEROES = 1 << 14
VTBLK_S_HOSTCAPS = (VTBLK_F_SEG_MAX | VTBLK_F_BLK_SIZE | VTBLK_F_FLUSH | VTBLK_F_TOPOLOGY
                    | VIRTIO_RING_F_INDIRECT_DESC)

VBH_OP_READ = 0
VBH_OP_WRITE = 1
VBH_OP_FLUSH = 4
VBH_OP_FLUSH_OUT = 5
VBH_OP_IDENT = 8
VBH_OP_DISCARD = 11
VBH_OP_WRITE_ZEROES = 13
VBH_FLAG_BARRIER = 0x80000000

VTBLK_MAX_DISCARD_SEG = 1
VTBLK_MAX_DISCARD_SECT = (16 << 20) // VTBLK_BSIZE

PCIC_STORAGE = 0x01

_HDR = struct.Struct("<IIQ")            # type, ioprio, sector
_DISCARD = struct.Struct("<QII")        # sector, num_sectors, flags
#: struct vtblk_config, packed (60 bytes).
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


def vtblk_config(size: int, sectsz: int, psectsz: int, psectoff: int) -> bytes:
    """The device configuration bhyve's ``pci_vtblk_init`` fills in."""
    if psectsz > sectsz:
        ratio = psectsz // sectsz
        phys_exp = (ratio & -ratio).bit_length() - 1          # ffsll() - 1
    else:
        phys_exp = 0
    align_off = (psectsz - psectoff) // sectsz if psectoff else 0
    return _CONFIG.pack(
        size // VTBLK_BSIZE,                    # capacity in 512-byte units
        0,                                      # size_max: not offered
        min(VTBLK_RINGSZ - 2, BLOCKIF_IOV_MAX),  # seg_max
        0, 0, 0,                                # no geometry
        sectsz,                                 # blk_size
        phys_exp & 0xFF, align_off & 0xFF, 0, 0,  # topology: min/opt io size 0
        0, 0, 0,                                # writeback, unused, num_queues
        VTBLK_MAX_DISCARD_SECT, VTBLK_MAX_DISCARD_SEG,
        (max(sectsz, psectsz) // VTBLK_BSIZE) & 0xFFFFFFFF,
        0, 0, 0)                                # write zeroes: not offered


def status_for(err: int) -> int:
    """bhyve's errno -> virtio-blk status mapping."""
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return VTBLK_S_UNSUPP
    return VTBLK_S_IOERR if err else VTBLK_S_OK


@device_state("virtio-blk", version=1)
@dataclass
class VirtioBlkState(VirtioDeviceState):
    """bhyve saves the configuration and the identifier; the configuration
    is the disk's, so here it is compared (a snapshot of another disk is
    refused) and the identifier is restored."""

    capacity: U64 = 0
    blk_size: U32 = 0
    ident: Annotated[str, Str(max_len=VTBLK_BLK_ID_BYTES)] = ""


class _Io:
    """One request in flight: where its status byte goes."""

    __slots__ = ("chain", "status", "vq")

    def __init__(self, vq: Virtqueue, chain: DescriptorChain, status: memoryview) -> None:
        self.vq, self.chain, self.status = vq, chain, status


@pci_emul("virtio-blk")
class VirtioBlk(VirtioPciDevice):
    state_class: ClassVar[type] = VirtioBlkState
    vc_name: ClassVar[str] = "vtblk"

    def __init__(self, ctx: PciContext, *, backend: BlockBackend | None = None) -> None:
        bc = backend if backend is not None else BlockBackend.open(ctx.config,
                                                                   f"{ctx.slot}:{ctx.func}")
        try:
            caps = VTBLK_S_HOSTCAPS | (VTBLK_F_DISCARD if bc.can_delete else 0)
            super().__init__(ctx, device_id=VIRTIO_DEV_BLOCK, class_code=PCIC_STORAGE << 16,
                             subdevice=VIRTIO_ID_BLOCK, queue_sizes=[VTBLK_RINGSZ],
                             host_features=caps, cfgsize=_CONFIG.size)
        except BaseException:
            if backend is None:
                bc.close()
            raise
        self.backend = bc
        serial = ctx.get_value("serial")
        if serial is None:
            serial = ctx.get_value("ser")
        if serial is not None:
            ident = serial.encode()[:VTBLK_BLK_ID_BYTES].decode(errors="ignore")
        else:
            ident = default_serial(ctx.get_value("path") or "")
        self.ident = ident
        self.config = vtblk_config(bc.size, bc.sector_size, *bc.physical_sector)
        self._inflight: dict[BlockRequest, _Io] = {}
        self._idle = threading.Condition(self._lock)

    # --- configuration -----------------------------------------------------------
    def device_config(self) -> bytes:
        return self.config

    @property
    def capacity(self) -> int:
        return _CONFIG.unpack(self.config)[0]

    @property
    def blk_size(self) -> int:
        return _CONFIG.unpack(self.config)[6]

    # --- requests ---------------------------------------------------------------
    def queue_notify(self, vq: Virtqueue) -> None:
        with self._lock:
            while True:
                chain = self.pop(vq)
                if chain is None:
                    return
                self._proc(vq, chain)

    def _proc(self, vq: Virtqueue, chain: DescriptorChain) -> None:
        writable = chain.writable
        if not writable or not len(writable[-1]):
            self.complain(f"invalid chain: no status byte ({chain.error or 'layout'})")
            vq.push(chain, 0)
            self.end_chains(vq)
            return
        status = writable[-1][-1:]
        io = _Io(vq, chain, status)
        if chain.error is not None:
            self.complain(f"bad request: {chain.error}")
            self._finish(io, errno.EFAULT)
            return
        readable = chain.readable
        rlen = sum(len(v) for v in readable)
        wlen = sum(len(v) for v in writable) - 1
        if rlen < _HDR.size:
            self.complain(f"control header of {rlen} bytes")
            self._finish(io, errno.EINVAL)
            return
        hdr = chain.gather(_HDR.size)
        rtype, _ioprio, sector = _HDR.unpack(hdr)
        op = rtype & ~VBH_FLAG_BARRIER
        in_data = slice_views(readable, _HDR.size, rlen - _HDR.size)
        out_data = slice_views(writable, 0, wlen)
        offset = sector * VTBLK_BSIZE
        bc = self.backend

        if op == VBH_OP_READ or op == VBH_OP_WRITE:
            if (in_data if op == VBH_OP_READ else out_data):
                # The data buffers point the wrong way for the request.
                self.complain(f"{'read' if op == VBH_OP_READ else 'write'} request with "
                              "data buffers of the wrong direction")
                self._finish(io, errno.EINVAL)
                return
            req = BlockRequest(self._done, offset, out_data if op == VBH_OP_READ else in_data)
            self._submit(io, req, bc.read if op == VBH_OP_READ else bc.write)
        elif op in (VBH_OP_FLUSH, VBH_OP_FLUSH_OUT):
            self._submit(io, BlockRequest(self._done), bc.flush)
        elif op == VBH_OP_IDENT:
            ident = self.ident.encode()
            for v in out_data:
                v[:] = bytes(len(v))
            n = min(wlen, len(ident) + 1)
            chain_bytes = (ident + b"\0")[:n]
            pos = 0
            for v in out_data:
                k = min(len(v), len(chain_bytes) - pos)
                if k <= 0:
                    break
                v[:k] = chain_bytes[pos:pos + k]
                pos += k
            self._finish(io, 0)
        elif op == VBH_OP_DISCARD:
            if rlen - _HDR.size != _DISCARD.size:
                self.complain("bad discard message")
                self._finish(io, errno.EINVAL)
                return
            dsector, nsect, flags = _DISCARD.unpack(b"".join(bytes(v) for v in in_data))
            if flags:
                # No discard flags exist; unmap is reserved for write-zeroes.
                self._finish(io, errno.EOPNOTSUPP)
                return
            if nsect > VTBLK_MAX_DISCARD_SECT:
                self._finish(io, errno.EINVAL)
                return
            req = BlockRequest(self._done, dsector * VTBLK_BSIZE, length=nsect * VTBLK_BSIZE)
            self._submit(io, req, bc.discard)
        else:
            self._finish(io, errno.EOPNOTSUPP)

    def _submit(self, io: _Io, req: BlockRequest, call) -> None:
        req.param = io
        self._inflight[req] = io
        err = call(req)
        if err:
            del self._inflight[req]
            self.complain(f"block backend refused a request: {errno.errorcode.get(err, err)}")
            self._finish(io, err)

    def _done(self, req: BlockRequest, err: int) -> None:
        """Completion, on a backend worker thread."""
        with self._lock:
            io = self._inflight.pop(req, None)
            if io is not None:
                self._finish(io, err)
            if not self._inflight:
                self._idle.notify_all()

    def _finish(self, io: _Io, err: int) -> None:
        """bhyve's ``pci_vtblk_done_locked``: status byte, used ring, interrupt."""
        vq = io.vq
        if io.chain.generation != vq.generation:
            return          # the queue was reset meanwhile: its memory is not ours
        io.status[0] = status_for(err)
        vq.push(io.chain, 1)
        self.end_chains(vq)

    # --- lifecycle ---------------------------------------------------------------
    def reset_device(self) -> None:
        with self._lock:
            for req in list(self._inflight):
                if self.backend.cancel(req) == 0:
                    del self._inflight[req]
            while self._inflight:
                self._idle.wait()
            super().reset_device()

    def pause(self) -> None:
        """Drain in-flight requests and flush (bhyve's ``blockif_pause``)."""
        self.backend.pause()

    def resume(self) -> None:
        self.backend.resume()

    def close(self) -> None:
        self.backend.close()

    # --- snapshots -----------------------------------------------------------------
    def save_dev_fields(self) -> dict[str, Any]:
        if self._inflight:
            raise StateError(f"{self.name}: {len(self._inflight)} requests in flight; "
                             "pause the device before saving it")
        return {"capacity": self.capacity, "blk_size": self.blk_size, "ident": self.ident}

    def check_dev_fields(self, state: Any) -> None:
        if (state.capacity, state.blk_size) != (self.capacity, self.blk_size):
            raise StateError(f"{self.name}: disk of {state.capacity} sectors of "
                             f"{state.blk_size} bytes in the snapshot, {self.capacity} of "
                             f"{self.blk_size} here")

    def load_dev_fields(self, state: Any) -> None:
        self.ident = state.ident
