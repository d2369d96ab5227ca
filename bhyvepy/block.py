"""Disk backends for block device models (bhyve's ``blockif``).

virtio-blk, AHCI and NVMe all reach their backing store through one
:class:`BlockBackend`, opened from the device's config node (``path`` plus
the block options of bhyve_config(5): ``nocache``, ``direct``/``sync``,
``ro``, ``nodelete``, ``sectorsize=logical[/physical]``, ``bootindex``).

Why a worker pool: a vCPU thread that touched the disk itself would stall
the guest for the length of every I/O.  Like bhyve, a device model submits a
:class:`BlockRequest` and returns at once; one of ``BLOCKIF_NUMTHR`` worker
threads performs it (``os.preadv``/``os.pwritev`` release the GIL, so disks
really run in parallel with the vCPUs) and then calls the request's
completion callback **from that worker thread**.  Requests complete out of
order.  Device models must therefore be thread-safe: take the device lock in
the callback before touching rings or raising interrupts, and never block in
it for long.

Rules every device can rely on:

* A submission never raises.  ``read``/``write``/... return 0 when queued,
  ``E2BIG`` when ``BLOCKIF_MAXREQ`` requests are already outstanding, and
  ``ENXIO`` once the backend is closed (bhyve returns the same ``E2BIG``).
* Every queued request completes exactly once with ``callback(req, err)``
  where ``err`` is 0 or an errno: ``EROFS`` for writes/discards on a
  read-only disk, ``EINVAL`` for a range that does not lie inside the disk
  (nothing is touched), ``EOPNOTSUPP`` for a discard the disk cannot do,
  ``EFAULT`` for a buffer that cannot be used, or what the host returned.
  ``req.resid`` is what was *not* transferred (bhyve's ``br_resid``).
* A request that starts exactly where a queued or running one ends waits for
  it (bhyve's rule, which keeps a sequential stream in order); everything
  else may overtake.  A flush covers the writes that completed before it was
  submitted, as with bhyve: guests wait for their writes before flushing.
* ``pause()`` stops starting new requests, waits until everything queued
  before it has completed and flushes the backing store (unless read-only);
  requests submitted while paused are held and start on ``resume()``.
  Nothing is ever in flight in a snapshot.
* ``cancel(req)`` removes a request that has not started (0, no callback);
  a running one cannot be interrupted from Python and completes normally
  (``EBUSY``), an unknown one gives ``EINVAL`` -- bhyve's answers.

Host specifics: regular files are sized by ``st_size``; disks are block
devices on Linux (``BLKGETSIZE64``/``BLKSSZGET``/``BLKPBSZGET``, discard
with ``BLKDISCARD`` when the queue advertises it) and character devices on
FreeBSD (``DIOCGMEDIASIZE``/``DIOCGSECTORSIZE``/``DIOCGSTRIPESIZE``,
``GEOM::candelete``, ``DIOCGDELETE``, ``DIOCGFLUSH``).  Discard on a file
punches a hole (``fallocate(PUNCH_HOLE|KEEP_SIZE)`` on Linux, ``fspacectl``
on FreeBSD where the file system deallocates natively).  ``nodelete`` turns
discard off for files as well as devices (bhyve only looks at it for
devices; the option's purpose is the same).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import hashlib
import logging
import os
import stat
import struct
import sys
import threading
from typing import Any, Callable, Sequence

from bhyvepy.config import ConfigNode, PlainBhyveExit, c_strtol, program_name, to_c_int
from bhyvepy.errors import ExitStatus

log = logging.getLogger("bhyvepy.block")

#: Worker threads per disk (bhyve's BLOCKIF_NUMTHR).
BLOCKIF_NUMTHR = 8
#: Pending requests a device may queue (block_if.h BLOCKIF_RING_MAX).
BLOCKIF_RING_MAX = 128
#: Scatter/gather entries a device should put in one request (BLOCKIF_IOV_MAX).
BLOCKIF_IOV_MAX = 128
#: Request slots per disk: the ring plus one per worker (BLOCKIF_MAXREQ).
BLOCKIF_MAXREQ = BLOCKIF_RING_MAX + BLOCKIF_NUMTHR
#: Sector size of a regular file unless ``sectorsize`` says otherwise.
DEV_BSIZE = 512

_LINUX = sys.platform.startswith("linux")
_FREEBSD = sys.platform.startswith("freebsd")
#: Buffers handed to one preadv/pwritev call (the host's IOV_MAX).
_IOV_BATCH = max(16, min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024))
_ZERO_CHUNK = 1 << 20


class BlockOp(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    WRITE_ZEROES = "write-zeroes"


Completion = Callable[["BlockRequest", int], None]


class BlockRequest:
    """One disk request, owned (and typically reused) by a device model.

    ``iov`` holds the guest-memory buffers (memoryviews from the guest
    memory accessor) for reads and writes; discard and write-zeroes give
    ``length`` instead.  ``param`` is the device's own cookie (bhyve's
    ``br_param``).  A request object must not be resubmitted before its
    callback has been called.
    """

    __slots__ = ("offset", "iov", "length", "callback", "param", "resid")

    def __init__(self, callback: Completion, offset: int = 0,
                 iov: Sequence[Any] = (), length: int | None = None,
                 param: Any = None) -> None:
        self.callback = callback
        self.offset = offset
        self.iov = iov
        self.length = length
        self.param = param
        self.resid = 0

    def __repr__(self) -> str:
        return (f"<BlockRequest offset={self.offset} segments={len(self.iov)} "
                f"length={self.length} resid={self.resid}>")


class BlockOpenError(PlainBhyveExit):
    """The backing store named by a device's config cannot be used.

    The message is what bhyve prints (``warn()`` texts carry the program
    name, ``EPRINTLN`` texts do not); the status is 4.
    """

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message, ExitStatus.ERROR)
        self.errno = err


def default_serial(path: str) -> str:
    """The identifier virtio-blk and AHCI show when no ``ser`` is given.

    bhyve formats the first six bytes of the MD5 of the ``path`` string as
    ``BHYVE-XXXX-XXXX-XXXX`` (20 characters, upper-case hex).
    """
    d = hashlib.md5(os.fsencode(path)).digest()
    return "BHYVE-%02X%02X-%02X%02X-%02X%02X" % tuple(d[:6])


# --------------------------------------------------------------------------
# Option parsing (blockif_open's order: options, path, open, sizes, checks).
# --------------------------------------------------------------------------

def _is_pow2(value: int) -> bool:
    return (value & (value - 1)) == 0


def parse_sectorsize(text: str) -> tuple[int, int]:
    """``sectorsize=logical[/physical]`` as bhyve parses it (``strtol``).

    Returns ``(logical, physical)``; ``(0, 0)`` means "not set" (bhyve
    ignores a logical size of 0).  Only the syntax is checked here; the
    values are checked by :func:`check_sectorsize` once the backing store
    is known, as in bhyve.
    """
    bad = BlockOpenError(f'Invalid sector size "{text}"')
    logical, end, _ = c_strtol(text, 10)
    if end == 0:
        raise bad
    logical = to_c_int(logical)
    rest = text[end:]
    if rest == "":
        return logical, logical
    if not rest.startswith("/"):
        raise bad
    physical, pend, _ = c_strtol(rest[1:], 10)
    if pend == 0 or pend != len(rest) - 1:
        raise bad
    return logical, to_c_int(physical)


def check_sectorsize(logical: int, physical: int, device_sector: int | None) -> None:
    """bhyve's value checks for an explicit ``sectorsize`` (logical != 0)."""
    if (not _is_pow2(logical) or not _is_pow2(physical) or logical < 512
            or logical > physical):
        raise BlockOpenError(f"Invalid sector size {logical}/{physical}")
    if device_sector is not None and (logical < device_sector or logical % device_sector):
        raise BlockOpenError(f"Sector size {logical} incompatible with underlying "
                             f"device sector size {device_sector}")


def _atoi(text: str) -> int:
    value, _, _ = c_strtol(text, 10)
    return to_c_int(value)


# --------------------------------------------------------------------------
# Host interfaces: ioctls and the hole-punching calls Python lacks.
# --------------------------------------------------------------------------

def _bsd_ioc(inout: int, group: str, num: int, length: int) -> int:
    return inout | ((length & 0x1FFF) << 16) | (ord(group) << 8) | num


_BSD_VOID, _BSD_OUT, _BSD_IN = 0x20000000, 0x40000000, 0x80000000
DIOCGSECTORSIZE = _bsd_ioc(_BSD_OUT, "d", 128, 4)
DIOCGMEDIASIZE = _bsd_ioc(_BSD_OUT, "d", 129, 8)
DIOCGFLUSH = _bsd_ioc(_BSD_VOID, "d", 135, 0)
DIOCGDELETE = _bsd_ioc(_BSD_IN, "d", 136, 16)
DIOCGSTRIPESIZE = _bsd_ioc(_BSD_OUT, "d", 139, 8)
DIOCGSTRIPEOFFSET = _bsd_ioc(_BSD_OUT, "d", 140, 8)
_DIOCGATTR_SIZE = 64 + 4 + 4 + 256       # name, len, pad, union aligned to off_t
DIOCGATTR = _bsd_ioc(_BSD_IN | _BSD_OUT, "d", 142, _DIOCGATTR_SIZE)
_PC_DEALLOC_PRESENT = 65                 # FreeBSD <sys/unistd.h>
SPACECTL_DEALLOC = 1

BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKALIGNOFF = 0x127A
BLKPBSZGET = 0x127B
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc_cache: list[Any] = []


def _libc() -> Any:
    if not _libc_cache:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
        except OSError:
            lib = None
        if lib is not None and hasattr(lib, "fallocate"):
            lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            lib.fallocate.restype = ctypes.c_int
        if lib is not None and hasattr(lib, "fspacectl"):
            lib.fspacectl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_void_p]
            lib.fspacectl.restype = ctypes.c_int
        _libc_cache.append(lib)
    return _libc_cache[0]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """Linux fallocate(2) with flags (os.posix_fallocate has none); errno or 0."""
    lib = _libc()
    if lib is None or not hasattr(lib, "fallocate"):
        return errno.EOPNOTSUPP
    if lib.fallocate(fd, mode, offset, length) != 0:
        return ctypes.get_errno()
    return 0


class _SpacectlRange(ctypes.Structure):
    _fields_ = [("r_offset", ctypes.c_int64), ("r_len", ctypes.c_int64)]


def _fspacectl_dealloc(fd: int, offset: int, length: int) -> int:
    """FreeBSD fspacectl(SPACECTL_DEALLOC), looping as the call may stop early."""
    lib = _libc()
    if lib is None or not hasattr(lib, "fspacectl"):
        return errno.EOPNOTSUPP
    rng = _SpacectlRange(offset, length)
    while rng.r_len > 0:
        if lib.fspacectl(fd, SPACECTL_DEALLOC, ctypes.byref(rng), 0, ctypes.byref(rng)) != 0:
            return ctypes.get_errno()
    return 0


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    buf = bytearray(struct.calcsize(fmt))
    fcntl.ioctl(fd, request, buf, True)
    return struct.unpack(fmt, buf)[0]


def _linux_discard_supported(st: os.stat_result) -> bool:
    path = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/queue/discard_max_bytes"
    try:
        with open(path) as fh:
            return int(fh.read().strip() or "0") > 0
    except (OSError, ValueError):
        return False


def _geom_candelete(fd: int) -> bool:
    arg = bytearray(_DIOCGATTR_SIZE)
    name = b"GEOM::candelete"
    arg[:len(name)] = name
    struct.pack_into("i", arg, 64, 4)
    try:
        fcntl.ioctl(fd, DIOCGATTR, arg, True)
    except OSError:
        return False
    return struct.unpack_from("i", arg, 72)[0] != 0


class _Geometry:
    """What opening the backing store found out (plain data)."""

    __slots__ = ("size", "sectsz", "psectsz", "psectoff", "candelete", "kind", "is_disk")

    def __init__(self) -> None:
        self.size = 0
        self.sectsz = DEV_BSIZE
        self.psectsz = 0
        self.psectoff = 0
        self.candelete = False
        self.kind = "regular file"
        self.is_disk = False


def _probe(fd: int, st: os.stat_result, nodelete: bool) -> _Geometry:
    """Size, sector sizes and discard ability of an open backing store."""
    g = _Geometry()
    g.size = st.st_size
    if stat.S_ISREG(st.st_mode):
        g.psectsz = st.st_blksize
        if _FREEBSD:
            try:
                g.candelete = os.fpathconf(fd, _PC_DEALLOC_PRESENT) == 1
            except (OSError, ValueError):
                g.candelete = False
        else:
            # fallocate(PUNCH_HOLE) works on every common Linux file system;
            # where it does not, discards become no-ops (see _discard).
            g.candelete = True
        g.candelete = g.candelete and not nodelete
        return g
    g.is_disk = True
    if _LINUX and stat.S_ISBLK(st.st_mode):
        g.kind = "block device"
        g.size = _ioctl_int(fd, BLKGETSIZE64, "Q")
        g.sectsz = _ioctl_int(fd, BLKSSZGET, "i")
        g.psectsz = _ioctl_int(fd, BLKPBSZGET, "I")
        try:
            g.psectoff = max(0, _ioctl_int(fd, BLKALIGNOFF, "i"))
        except OSError:
            g.psectoff = 0
        g.candelete = not nodelete and _linux_discard_supported(st)
        return g
    if stat.S_ISCHR(st.st_mode):
        g.kind = "disk device"
        g.size = _ioctl_int(fd, DIOCGMEDIASIZE, "q")
        g.sectsz = _ioctl_int(fd, DIOCGSECTORSIZE, "I")
        try:
            stripe = _ioctl_int(fd, DIOCGSTRIPESIZE, "q")
            if stripe > 0:
                g.psectsz = stripe
                g.psectoff = _ioctl_int(fd, DIOCGSTRIPEOFFSET, "q")
        except OSError:
            pass
        g.candelete = not nodelete and _geom_candelete(fd)
        return g
    raise OSError(errno.ENODEV, "not a regular file or disk device")


# --------------------------------------------------------------------------
# The backend.
# --------------------------------------------------------------------------

class _Status(enum.Enum):
    HELD = 0      # submitted while paused
    BLOCK = 1     # waits for the request that ends where it starts
    PEND = 2      # ready to start
    BUSY = 3      # a worker has it
    DONE = 4      # callback running


class _Elem:
    """A queued request together with the backend's bookkeeping for it."""

    __slots__ = ("req", "op", "views", "nbytes", "end", "status")

    def __init__(self, req: BlockRequest, op: BlockOp, views: list[memoryview] | None,
                 nbytes: int) -> None:
        self.req = req
        self.op = op
        self.views = views
        self.nbytes = nbytes
        # Where the request ends; a flush ends nowhere (bhyve's OFF_MAX).
        self.end = None if op is BlockOp.FLUSH else req.offset + nbytes
        self.status = _Status.PEND


class BlockBackend:
    """An open disk image or disk device with its worker threads.

    Build it with :meth:`open`.  Thread-safe: requests may be submitted
    from any thread, including from a completion callback.
    """

    def __init__(self, fd: int, path: str, geometry: _Geometry, *, read_only: bool,
                 bootindex: int | None, flags: tuple[str, ...], ident: str = "") -> None:
        self._fd = fd
        self.path = path
        self._geo = geometry
        self._ro = read_only
        self.bootindex = bootindex
        self._flags = flags
        self.ident = ident
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._pending: list[_Elem] = []
        self._busy: list[_Elem] = []
        self._held: list[_Elem] = []
        self._paused = False
        self._closed = False
        self._stopping = False
        self._punch_ok = True
        self._threads = [threading.Thread(target=self._worker, name=f"blk-{ident or path}-{i}",
                                          daemon=True) for i in range(BLOCKIF_NUMTHR)]
        for t in self._threads:
            t.start()

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, node: ConfigNode, ident: str = "") -> "BlockBackend":
        """``blockif_open``: the backing store a device's config node names.

        ``ident`` names the worker threads (bhyve passes ``slot:func`` or
        ``slot:func:port``).  Raises :class:`BlockOpenError` (exit status 4)
        with bhyve's message, or :class:`~bhyvepy.errors.BhyveExit` for a bad
        boolean option.
        """
        extra = 0
        if node.get_bool("nocache", False):
            extra |= getattr(os, "O_DIRECT", 0)
        nodelete = node.get_bool("nodelete", False)
        if node.get_bool("sync", False) or node.get_bool("direct", False):
            extra |= os.O_SYNC
        read_only = node.get_bool("ro", False)
        ssopt = pssopt = 0
        ssval = node.get_value("sectorsize")
        if ssval is not None:
            ssopt, pssopt = parse_sectorsize(ssval)
        bootval = node.get_value("bootindex")
        bootindex = _atoi(bootval) if bootval is not None else None
        path = node.get_value("path")
        if path is None:
            raise BlockOpenError('Missing "path" for block device.')

        prog = program_name()
        extra |= getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | extra)
            except OSError:
                if read_only:
                    raise
                # bhyve falls back to a read-only open when read/write fails.
                fd = os.open(path, os.O_RDONLY | extra)
                read_only = True
        except OSError as exc:
            raise BlockOpenError(f"{prog}: Could not open backing file: {path}: "
                                 f"{os.strerror(exc.errno or errno.EIO)}",
                                 exc.errno or errno.EIO) from None
        try:
            try:
                st = os.fstat(fd)
            except OSError as exc:
                code = exc.errno or errno.EIO
                raise BlockOpenError(f"{prog}: Could not stat backing file {path}: "
                                     f"{os.strerror(code)}", code)
            if stat.S_ISDIR(st.st_mode):
                raise BlockOpenError(f"{prog}: Could not open backing file: {path}: "
                                     f"{os.strerror(errno.EISDIR)}", errno.EISDIR)
            try:
                geo = _probe(fd, st, nodelete)
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    raise BlockOpenError(f"{prog}: {path}: not a regular file or disk device",
                                         errno.ENODEV)
                code = exc.errno or errno.EIO
                raise BlockOpenError(f"Could not fetch dev blk/sector size: {os.strerror(code)}",
                                     code)
            if ssopt != 0:
                check_sectorsize(ssopt, pssopt, geo.sectsz if geo.is_disk else None)
                geo.sectsz, geo.psectsz, geo.psectoff = ssopt, pssopt, 0
        except BaseException:
            os.close(fd)
            raise
        flags = tuple(name for name, on in (("nocache", extra & getattr(os, "O_DIRECT", 0)),
                                            ("sync", extra & os.O_SYNC)) if on)
        return cls(fd, path, geo, read_only=read_only, bootindex=bootindex, flags=flags,
                   ident=ident)

    # -- what device models read ----------------------------------------------

    @property
    def size(self) -> int:
        """Bytes the guest may address (``blockif_size``)."""
        return self._geo.size

    @property
    def sector_size(self) -> int:
        """Logical sector size (``blockif_sectsz``)."""
        return self._geo.sectsz

    @property
    def physical_sector(self) -> tuple[int, int]:
        """``(size, offset)`` of the physical sector (``blockif_psectsz``)."""
        return self._geo.psectsz, self._geo.psectoff

    @property
    def read_only(self) -> bool:
        return self._ro

    @property
    def can_delete(self) -> bool:
        """Whether discard (TRIM/UNMAP/DSM) is offered (``blockif_candelete``)."""
        return self._geo.candelete

    @property
    def queue_depth(self) -> int:
        """Requests a device may keep outstanding (``blockif_queuesz``)."""
        return BLOCKIF_MAXREQ - 1

    @property
    def in_flight(self) -> int:
        """Requests submitted whose callback has not yet returned."""
        with self._lock:
            return len(self._pending) + len(self._busy) + len(self._held)

    @property
    def is_disk(self) -> bool:
        """True for a host disk device, False for a regular file."""
        return self._geo.is_disk

    def chs(self) -> tuple[int, int, int]:
        """Virtual cylinders/heads/sectors for ATA IDENTIFY (``blockif_chs``).

        The VHD specification's algorithm, as bhyve uses it.
        """
        sectors = self._geo.size // self._geo.sectsz
        sectors = min(sectors, 65535 * 16 * 255)
        if sectors >= 65536 * 16 * 63:
            secpt, heads = 255, 16
            hcyl = sectors // secpt
        else:
            secpt = 17
            hcyl = sectors // secpt
            heads = max(4, (hcyl + 1023) // 1024)
            if hcyl >= heads * 1024 or heads > 16:
                secpt, heads = 31, 16
                hcyl = sectors // secpt
            if hcyl >= heads * 1024:
                secpt, heads = 63, 16
                hcyl = sectors // secpt
        return (hcyl // heads) & 0xFFFF, heads, secpt

    def describe(self) -> str:
        """One line for logs: what the disk is and how it was opened."""
        g = self._geo
        bits = [g.kind, f"{g.size} bytes", f"{g.sectsz}/{g.psectsz}-byte sectors",
                "ro" if self._ro else "rw"]
        if g.candelete:
            bits.append("discard")
        bits.extend(self._flags)
        return f"{self.path} ({', '.join(bits)})"

    # -- submitting -------------------------------------------------------------

    def read(self, req: BlockRequest) -> int:
        return self.submit(req, BlockOp.READ)

    def write(self, req: BlockRequest) -> int:
        return self.submit(req, BlockOp.WRITE)

    def flush(self, req: BlockRequest) -> int:
        return self.submit(req, BlockOp.FLUSH)

    def discard(self, req: BlockRequest) -> int:
        """Deallocate ``req.length`` bytes at ``req.offset`` (``blockif_delete``)."""
        return self.submit(req, BlockOp.DISCARD)

    def write_zeroes(self, req: BlockRequest) -> int:
        """Make ``req.length`` bytes at ``req.offset`` read as zeros."""
        return self.submit(req, BlockOp.WRITE_ZEROES)

    def submit(self, req: BlockRequest, op: BlockOp) -> int:
        """Queue ``req``; 0, or ``E2BIG`` (queue full) / ``ENXIO`` (closed)."""
        views: list[memoryview] | None = None
        nbytes = 0
        try:
            if op is BlockOp.READ or op is BlockOp.WRITE:
                views = [v if isinstance(v, memoryview) else memoryview(v) for v in req.iov]
                nbytes = sum(v.nbytes for v in views)
            elif op is not BlockOp.FLUSH:
                nbytes = int(req.length) if req.length is not None else \
                    sum(memoryview(v).nbytes for v in req.iov)
        except (TypeError, ValueError):
            views, nbytes = None, -1         # completes with EFAULT / EINVAL
        with self._lock:
            if self._closed:
                return errno.ENXIO
            if len(self._pending) + len(self._busy) + len(self._held) >= BLOCKIF_MAXREQ:
                return errno.E2BIG
            req.resid = nbytes
            elem = _Elem(req, op, views, nbytes)
            if self._paused:
                elem.status = _Status.HELD
                self._held.append(elem)
            else:
                self._enqueue(elem)
        return 0

    def cancel(self, req: BlockRequest) -> int:
        """``blockif_cancel``: 0 (removed, no callback), EBUSY (running), EINVAL."""
        with self._lock:
            for queue in (self._held, self._pending):
                for elem in queue:
                    if elem.req is req:
                        queue.remove(elem)
                        self._release(elem)
                        return 0
            for elem in self._busy:
                if elem.req is req:
                    return errno.EBUSY
        return errno.EINVAL

    # -- queue discipline (called with the lock held) ----------------------------

    def _enqueue(self, elem: _Elem) -> None:
        start = elem.req.offset
        blocked = any(e.end == start for e in self._pending) or \
            any(e.end == start for e in self._busy)
        elem.status = _Status.BLOCK if blocked else _Status.PEND
        self._pending.append(elem)
        if not blocked:
            self._work.notify()

    def _dequeue(self) -> _Elem | None:
        for elem in self._pending:
            if elem.status is _Status.PEND:
                self._pending.remove(elem)
                elem.status = _Status.BUSY
                self._busy.append(elem)
                return elem
        return None

    def _release(self, elem: _Elem) -> None:
        """Let requests that waited for ``elem`` go; wake drainers."""
        woke = False
        if elem.end is not None:
            for other in self._pending:
                if other.status is _Status.BLOCK and other.req.offset == elem.end:
                    other.status = _Status.PEND
                    woke = True
        if woke:
            self._work.notify_all()
        if not self._pending and not self._busy:
            self._idle.notify_all()

    # -- workers -------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._lock:
                elem = self._dequeue()
                while elem is None:
                    if self._stopping:
                        return
                    self._work.wait()
                    elem = self._dequeue()
            err = self._execute(elem)
            elem.status = _Status.DONE
            try:
                elem.req.callback(elem.req, err)
            except Exception:
                log.exception("%s: completion callback failed", self.path)
            with self._lock:
                self._busy.remove(elem)
                self._release(elem)

    def _execute(self, elem: _Elem) -> int:
        """Perform one request; returns 0 or an errno, never raises."""
        op, req = elem.op, elem.req
        try:
            if op is BlockOp.FLUSH:
                return self._flush_backing()
            if op is BlockOp.DISCARD and not self._geo.candelete:
                return errno.EOPNOTSUPP
            if op is not BlockOp.READ and self._ro:
                return errno.EROFS
            rw = op is BlockOp.READ or op is BlockOp.WRITE
            if rw and elem.views is None:
                return errno.EFAULT
            if req.offset < 0 or elem.nbytes < 0 or req.offset + elem.nbytes > self._geo.size:
                return errno.EINVAL
            if rw:
                return self._transfer(elem)
            if elem.nbytes == 0:
                req.resid = 0
                return 0
            if op is BlockOp.DISCARD:
                err = self._discard(req.offset, elem.nbytes)
            else:
                err = self._zero(req.offset, elem.nbytes)
            if err == 0:
                req.resid = 0
            return err
        except OSError as exc:
            return exc.errno or errno.EIO
        except (TypeError, ValueError, BufferError):
            return errno.EFAULT

    def _transfer(self, elem: _Elem) -> int:
        reading = elem.op is BlockOp.READ
        call = os.preadv if reading else os.pwritev
        views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v
                 for v in elem.views if v.nbytes]  # type: ignore[union-attr]
        pos = elem.req.offset
        done = 0
        while views:
            n = call(self._fd, views[:_IOV_BATCH], pos)
            if n <= 0:
                if reading:
                    break            # end of file: the rest stays in resid
                return errno.EIO
            pos += n
            done += n
            views = _advance(views, n)
        elem.req.resid = elem.nbytes - done
        return 0

    def _flush_backing(self) -> int:
        try:
            if _FREEBSD and self._geo.is_disk:
                fcntl.ioctl(self._fd, DIOCGFLUSH)
            else:
                os.fsync(self._fd)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def _discard(self, offset: int, length: int) -> int:
        if self._geo.is_disk:
            if _LINUX:
                fcntl.ioctl(self._fd, BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                fcntl.ioctl(self._fd, DIOCGDELETE, struct.pack("qq", offset, length))
            return 0
        if _FREEBSD:
            return _fspacectl_dealloc(self._fd, offset, length)
        if not self._punch_ok:
            return 0
        err = _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            # Discard is advisory; writing zeros instead would turn a guest's
            # whole-disk discard (mkfs) into a whole-disk write.
            self._punch_ok = False
            return 0
        return err

    def _zero(self, offset: int, length: int) -> int:
        if self._geo.is_disk:
            if _LINUX:
                try:
                    fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                    return 0
                except OSError:
                    pass
        elif _LINUX:
            for mode in (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                         FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
                if _fallocate(self._fd, mode, offset, length) == 0:
                    return 0
        elif _FREEBSD and self._geo.candelete:
            if _fspacectl_dealloc(self._fd, offset, length) == 0:
                return 0
        zeros = bytes(min(length, _ZERO_CHUNK))
        while length > 0:
            n = os.pwrite(self._fd, zeros[:min(length, len(zeros))], offset)
            if n <= 0:
                return errno.EIO
            offset += n
            length -= n
        return 0

    # -- pause / resume / close -----------------------------------------------------

    def pause(self) -> int:
        """Drain: wait for every request queued so far, then flush.

        Requests submitted from now on are held until :meth:`resume`.
        Returns the flush's errno (0 when fine); a failed flush is also
        logged, as bhyve warns and carries on.  Must not be called from a
        completion callback, nor while holding a lock the callbacks take
        (they could not finish, and the drain would wait for ever).
        """
        with self._lock:
            self._paused = True
            while self._pending or self._busy:
                self._idle.wait()
        if self._ro:
            return 0
        err = self._flush_backing()
        if err:
            log.warning("%s: failed to flush backing file: %s", self.path, os.strerror(err))
        return err

    def resume(self) -> None:
        """Start the requests held since :meth:`pause` and accept new ones."""
        with self._lock:
            self._paused = False
            held, self._held = self._held, []
            for elem in held:
                self._enqueue(elem)

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Finish queued requests, stop the workers, close the file.

        Requests held by a pause are dropped without a callback (the device
        is going away); later submissions get ``ENXIO``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._held.clear()
            while self._pending or self._busy:
                if threading.current_thread() in self._threads:
                    break
                self._idle.wait()
            self._stopping = True
            self._work.notify_all()
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join()
        try:
            os.close(self._fd)
        except OSError:
            pass

    def __enter__(self) -> "BlockBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BlockBackend {self.describe()}>"


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after ``n`` bytes went through the first ones."""
    i = 0
    while i < len(views) and n >= views[i].nbytes:
        n -= views[i].nbytes
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest
