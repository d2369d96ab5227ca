"""FreeBSD libnv packed nvlists, as bhyvectl(8) and bhyve(8) exchange them.

bhyve 14+ takes checkpoint requests on a UNIX stream socket as one libnv
nvlist per connection (``nvlist_send``/``nvlist_recv``), so bhyvepy has to
speak that wire format to be driven by the stock bhyvectl.  This module is
bhyvepy's own codec for it, written from the format as libnv defines it:

* nvlist header, 19 bytes packed: magic ``0x6c`` (u8), version ``0`` (u8),
  flags (u8: ``NV_FLAG_IGNORE_CASE`` 0x01, ``NV_FLAG_NO_UNIQUE`` 0x02,
  ``NV_FLAG_BIG_ENDIAN`` 0x80; ``NV_FLAG_IN_ARRAY`` is 0x100 and so never
  survives the u8), descriptor count (u64), size (u64).  ``size`` is the
  number of bytes that follow the header *to the end of the whole buffer*,
  also for nested headers; the descriptor count of a nested header is the
  number of descriptors from there to the end.
* nvpair header, 19 bytes packed: type (u8), name size including NUL (u16),
  data size (u64), item count (u64, arrays only); then the name, then the
  data.  A nested nvlist (``NVLIST``) is followed directly by its own header
  and pairs and closed by an ``NVLIST_UP`` (255) pair with the empty name.
  An ``NVLIST_ARRAY`` pair carries the element count; each element is an
  nvlist header, its pairs and an ``NVLIST_ARRAY_NEXT`` (254) pair.
* descriptors travel as indexes into the descriptor array; the descriptors
  themselves follow the data as ``SCM_RIGHTS`` messages, each carrying one
  dummy zero byte and up to 85 descriptors, one control message per
  descriptor (libnv's ``fd_send``).
* numbers and descriptor indexes use the byte order named by the
  ``NV_FLAG_BIG_ENDIAN`` flag of the header.  bhyvepy encodes little endian
  (amd64 native) and decodes both.

Python side: an nvlist is a ``dict`` (insertion ordered).  ``None`` is NULL,
``bool`` BOOL, ``int`` NUMBER (unsigned 64 bit), ``str`` STRING, ``dict``
NVLIST, :class:`Descriptor` DESCRIPTOR, ``bytes`` BINARY, and a non-empty
homogeneous ``list`` of bools, ints, strs, dicts or Descriptors the array
types.  Names and strings are C strings: they are decoded as UTF-8 with
``surrogateescape`` so that any byte string round-trips.

Everything decoded is untrusted (it comes from a socket): every malformed
input raises :class:`NvlistError` with a message naming the problem.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

__all__ = [
    "Descriptor",
    "NvlistError",
    "pack",
    "unpack",
    "descriptors",
    "send_nvlist",
    "recv_nvlist",
    "MAX_DEPTH",
]

# Header and pair layouts (both packed, no padding).
_NVLIST_MAGIC = 0x6C
_NVLIST_VERSION = 0
_HDR_LE = struct.Struct("<BBBQQ")
_HDR_BE = struct.Struct(">BBBQQ")
_PAIR_LE = struct.Struct("<BHQQ")
_PAIR_BE = struct.Struct(">BHQQ")
HEADER_SIZE = _HDR_LE.size          # 19
PAIR_HEADER_SIZE = _PAIR_LE.size    # 19

NV_FLAG_IGNORE_CASE = 0x01
NV_FLAG_NO_UNIQUE = 0x02
NV_FLAG_BIG_ENDIAN = 0x80
_PUBLIC_FLAGS = NV_FLAG_IGNORE_CASE | NV_FLAG_NO_UNIQUE
_WIRE_FLAGS = _PUBLIC_FLAGS | NV_FLAG_BIG_ENDIAN

NV_TYPE_NULL = 1
NV_TYPE_BOOL = 2
NV_TYPE_NUMBER = 3
NV_TYPE_STRING = 4
NV_TYPE_NVLIST = 5
NV_TYPE_DESCRIPTOR = 6
NV_TYPE_BINARY = 7
NV_TYPE_BOOL_ARRAY = 8
NV_TYPE_NUMBER_ARRAY = 9
NV_TYPE_STRING_ARRAY = 10
NV_TYPE_NVLIST_ARRAY = 11
NV_TYPE_DESCRIPTOR_ARRAY = 12
NV_TYPE_NVLIST_ARRAY_NEXT = 254
NV_TYPE_NVLIST_UP = 255

NV_NAME_MAX = 2048
MAX_DEPTH = 64
#: descriptors per sendmsg in libnv on FreeBSD (MCLBYTES / 24); the receiver
#: of stock libnv expects exactly this split.
FDS_PER_MESSAGE = 85
#: default limits for :func:`recv_nvlist` (control messages are tiny).
DEFAULT_MAX_SIZE = 16 << 20
DEFAULT_MAX_FDS = 1024

_U64_MAX = (1 << 64) - 1

_TYPE_NAMES = {
    NV_TYPE_NULL: "NULL", NV_TYPE_BOOL: "BOOL", NV_TYPE_NUMBER: "NUMBER",
    NV_TYPE_STRING: "STRING", NV_TYPE_NVLIST: "NVLIST",
    NV_TYPE_DESCRIPTOR: "DESCRIPTOR", NV_TYPE_BINARY: "BINARY",
    NV_TYPE_BOOL_ARRAY: "BOOL ARRAY", NV_TYPE_NUMBER_ARRAY: "NUMBER ARRAY",
    NV_TYPE_STRING_ARRAY: "STRING ARRAY", NV_TYPE_NVLIST_ARRAY: "NVLIST ARRAY",
    NV_TYPE_DESCRIPTOR_ARRAY: "DESCRIPTOR ARRAY",
    NV_TYPE_NVLIST_ARRAY_NEXT: "NVLIST_ARRAY_NEXT", NV_TYPE_NVLIST_UP: "NVLIST_UP",
}


class NvlistError(ValueError):
    """A packed nvlist is malformed, or a value cannot be packed."""


@dataclass(frozen=True)
class Descriptor:
    """A file descriptor carried in an nvlist.

    A separate type so that a descriptor is never mistaken for a NUMBER.
    Descriptors produced by :func:`recv_nvlist` are owned by the caller, who
    must close them (see :func:`descriptors`).
    """

    fd: int


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------

@dataclass
class _Tok:
    """One element of the packed stream, in stream order.

    ``opener`` is the stream index of the NVLIST / NVLIST_ARRAY pair that a
    nested header or closing marker belongs to (-1 for the top header); it is
    what libnv's size walk uses to decide what a nested pair's data size is.
    """

    kind: str                 # "hdr", "pair", "mark"
    size: int                 # bytes this token occupies
    ndesc: int = 0            # descriptors carried by this token
    opener: int = -1
    ptype: int = 0
    name: bytes = b""
    data: bytes = b""
    nitems: int = 0


def _cstr(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise NvlistError(f"{what} must be a str, not {type(text).__name__}")
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise NvlistError(f"{what} {text!r} cannot be encoded: {exc}") from None
    if b"\0" in raw:
        raise NvlistError(f"{what} {text!r} contains a NUL character")
    return raw


def _array_kind(name: str, items: list) -> int:
    if not items:
        raise NvlistError(f"nvlist array '{name}' is empty (libnv arrays have at least one item)")
    for nvtype, pytypes in (
        (NV_TYPE_BOOL_ARRAY, (bool,)),
        (NV_TYPE_DESCRIPTOR_ARRAY, (Descriptor,)),
        (NV_TYPE_STRING_ARRAY, (str,)),
        (NV_TYPE_NVLIST_ARRAY, (dict,)),
    ):
        if all(isinstance(x, pytypes) for x in items):
            return nvtype
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return NV_TYPE_NUMBER_ARRAY
    raise NvlistError(f"nvlist array '{name}' mixes item types or has unsupported items")


def _check_number(name: str, value: int) -> int:
    if not 0 <= value <= _U64_MAX:
        raise NvlistError(f"number '{name}' = {value} does not fit in 64 unsigned bits")
    return value


def _check_fd(name: str, desc: Descriptor) -> int:
    if not isinstance(desc.fd, int) or isinstance(desc.fd, bool) or desc.fd < 0:
        raise NvlistError(f"descriptor '{name}' has invalid fd {desc.fd!r}")
    return desc.fd


def _flatten(nvl: Mapping[str, Any], toks: list[_Tok], fds: list[int], depth: int,
             opener: int) -> None:
    """Append the tokens of ``nvl`` (header included) in libnv's pack order."""
    if depth > MAX_DEPTH:
        raise NvlistError(f"nvlist nesting deeper than {MAX_DEPTH}")
    if not isinstance(nvl, Mapping):
        raise NvlistError(f"an nvlist must be a dict, not {type(nvl).__name__}")
    toks.append(_Tok("hdr", HEADER_SIZE, opener=opener))
    for key, value in nvl.items():
        name = _cstr(key, "nvpair name")
        if len(name) >= NV_NAME_MAX:
            raise NvlistError(f"nvpair name '{key[:40]}...' is longer than {NV_NAME_MAX - 1} bytes")

        def pair(ptype: int, data: bytes = b"", nitems: int = 0, ndesc: int = 0) -> int:
            toks.append(_Tok("pair", PAIR_HEADER_SIZE + len(name) + 1 + len(data),
                             ndesc=ndesc, ptype=ptype, name=name, data=data,
                             nitems=nitems))
            return len(toks) - 1

        if value is None:
            pair(NV_TYPE_NULL)
        elif isinstance(value, bool):
            pair(NV_TYPE_BOOL, b"\1" if value else b"\0")
        elif isinstance(value, int):
            pair(NV_TYPE_NUMBER, struct.pack("<Q", _check_number(key, value)))
        elif isinstance(value, str):
            pair(NV_TYPE_STRING, _cstr(value, f"string '{key}'") + b"\0")
        elif isinstance(value, Descriptor):
            fds.append(_check_fd(key, value))
            pair(NV_TYPE_DESCRIPTOR, struct.pack("<q", len(fds) - 1), ndesc=1)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            if not data:
                raise NvlistError(f"binary '{key}' is empty (libnv rejects empty binaries)")
            pair(NV_TYPE_BINARY, data)
        elif isinstance(value, Mapping):
            idx = pair(NV_TYPE_NVLIST)
            _flatten(value, toks, fds, depth + 1, idx)
            toks.append(_Tok("mark", PAIR_HEADER_SIZE + 1, opener=idx,
                             ptype=NV_TYPE_NVLIST_UP))
        elif isinstance(value, (list, tuple)):
            items = list(value)
            kind = _array_kind(key, items)
            n = len(items)
            if kind == NV_TYPE_BOOL_ARRAY:
                pair(kind, bytes(int(b) for b in items), n)
            elif kind == NV_TYPE_NUMBER_ARRAY:
                pair(kind, struct.pack(f"<{n}Q", *(_check_number(key, x) for x in items)), n)
            elif kind == NV_TYPE_STRING_ARRAY:
                pair(kind, b"".join(_cstr(s, f"string in '{key}'") + b"\0" for s in items), n)
            elif kind == NV_TYPE_DESCRIPTOR_ARRAY:
                idxs = []
                for d in items:
                    fds.append(_check_fd(key, d))
                    idxs.append(len(fds) - 1)
                pair(kind, struct.pack(f"<{n}q", *idxs), n, ndesc=n)
            else:
                idx = pair(NV_TYPE_NVLIST_ARRAY, b"", n)
                for element in items:
                    _flatten(element, toks, fds, depth + 1, idx)
                    toks.append(_Tok("mark", PAIR_HEADER_SIZE + 1, opener=idx,
                                     ptype=NV_TYPE_NVLIST_ARRAY_NEXT))
        else:
            raise NvlistError(f"nvpair '{key}': cannot pack a {type(value).__name__}")


def pack(nvl: Mapping[str, Any], *, flags: int = 0) -> tuple[bytes, list[int]]:
    """Pack ``nvl`` exactly as libnv's ``nvlist_send`` lays it out.

    Returns the bytes and the descriptors in index order (they go on the
    socket separately).  ``flags`` are the public flags of the top nvlist.
    """
    if flags & ~_PUBLIC_FLAGS:
        raise NvlistError(f"invalid nvlist flags {flags:#x}")
    toks: list[_Tok] = []
    fds: list[int] = []
    _flatten(nvl, toks, fds, 0, -1)

    n = len(toks)
    # Suffix sums: bytes and descriptors strictly after position i.
    after_size = [0] * (n + 1)
    after_desc = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        after_size[i] = after_size[i + 1] + toks[i].size
        after_desc[i] = after_desc[i + 1] + toks[i].ndesc

    out = bytearray()
    for i, tok in enumerate(toks):
        if tok.kind == "hdr":
            hflags = flags if i == 0 else 0
            out += _HDR_LE.pack(_NVLIST_MAGIC, _NVLIST_VERSION, hflags,
                                after_desc[i + 1], after_size[i + 1])
        elif tok.kind == "mark":
            out += _PAIR_LE.pack(tok.ptype, 1, 0, 0) + b"\0"
        else:
            datasize = len(tok.data)
            if tok.ptype == NV_TYPE_NVLIST:
                datasize = _nested_datasize(toks, i)
            out += _PAIR_LE.pack(tok.ptype, len(tok.name) + 1, datasize, tok.nitems)
            out += tok.name + b"\0" + tok.data
    return bytes(out), fds


def _nested_datasize(toks: list[_Tok], i: int) -> int:
    """libnv's data size of the NVLIST pair at ``i``.

    libnv sets it to ``nvlist_size()`` of the child, and that walk, started
    on a child that already has a parent, runs on through the rest of the
    parent (and its parents) to the end of the buffer.  It counts every pair
    it meets plus the header and closing marker of every nested list or array
    that it opens itself, but not the markers of lists opened before it
    started; for an empty child it is just the header.  Receivers only check
    that it is non-zero and fits, but bhyvepy reproduces it so that its
    output is byte-identical to libnv's.
    """
    total = HEADER_SIZE
    if toks[i + 2].kind == "mark" and toks[i + 2].opener == i:
        return total        # an empty child: the walk never starts
    for tok in toks[i + 2:]:
        if tok.kind == "pair" or tok.opener > i:
            total += tok.size
    return total


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

@dataclass
class _Frame:
    nvl: dict
    name: str                     # for messages
    kind: str                     # "root", "nvlist" or "element"
    elements: list | None = None  # array being filled (kind == "element")
    remaining: int = 0            # elements still to come after this one


class _Reader:
    """Cursor over untrusted bytes; every read is bounds-checked."""

    def __init__(self, data: bytes, fds: Sequence[int]) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.fds = fds
        self.used: set[int] = set()
        self.big = False

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise NvlistError(f"nvlist truncated: {what} needs {n} bytes, {self.left} left")
        chunk = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return chunk

    def header(self, what: str) -> tuple[int, int]:
        """Parse and check an nvlist header; returns (public flags, ndesc)."""
        raw = self.take(HEADER_SIZE, f"{what} header")
        magic, version, flags, _, _ = _HDR_LE.unpack(raw)
        if magic != _NVLIST_MAGIC:
            raise NvlistError(f"{what}: bad nvlist magic {magic:#04x} (expected 0x6c)")
        if version != _NVLIST_VERSION:
            raise NvlistError(f"{what}: unsupported nvlist version {version}")
        if flags & ~_WIRE_FLAGS:
            raise NvlistError(f"{what}: invalid nvlist flags {flags:#04x}")
        big = bool(flags & NV_FLAG_BIG_ENDIAN)
        if what == "nvlist":
            self.big = big
        elif big != self.big:
            raise NvlistError(f"{what}: byte order differs from the enclosing nvlist")
        _, _, _, ndesc, size = (_HDR_BE if big else _HDR_LE).unpack(raw)
        if size != self.left:
            raise NvlistError(
                f"{what}: header says {size} bytes follow, but {self.left} do")
        if ndesc > len(self.fds):
            raise NvlistError(
                f"{what}: header announces {ndesc} descriptors, only {len(self.fds)} received")
        return flags & _PUBLIC_FLAGS, ndesc

    def u64s(self, raw: bytes, n: int) -> tuple[int, ...]:
        return struct.unpack(f"{'>' if self.big else '<'}{n}Q", raw)

    def fd(self, idx: int, name: str) -> Descriptor:
        if idx >= 1 << 63:  # negative as int64
            raise NvlistError(f"descriptor '{name}': negative index {idx - (1 << 64)}")
        if idx >= len(self.fds):
            raise NvlistError(
                f"descriptor '{name}': index {idx} out of range ({len(self.fds)} received)")
        if idx in self.used:
            raise NvlistError(f"descriptor '{name}': index {idx} used more than once")
        self.used.add(idx)
        return Descriptor(self.fds[idx])


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _strings(raw: bytes, name: str, count: int) -> list[str]:
    if not raw or raw[-1] != 0:
        raise NvlistError(f"string array '{name}' is not NUL-terminated")
    parts = raw[:-1].split(b"\0")
    if len(parts) != count:
        raise NvlistError(
            f"string array '{name}' holds {len(parts)} strings, header says {count}")
    return [_name(p) for p in parts]


def unpack(data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *,
           flags: int = 0) -> dict[str, Any]:
    """Decode one packed nvlist (``nvlist_unpack`` plus descriptors).

    ``fds`` are the descriptors received with it, in index order; DESCRIPTOR
    values become :class:`Descriptor` wrapping those numbers (nothing is
    duplicated or closed here).  ``flags`` are the public flags the top
    nvlist must carry, as for ``nvlist_recv(sock, flags)``.
    """
    rd = _Reader(bytes(data), fds)
    top_flags, _ = rd.header("nvlist")
    if top_flags != flags:
        raise NvlistError(f"nvlist flags {top_flags:#x} differ from the expected {flags:#x}")
    root: dict[str, Any] = {}
    stack = [_Frame(root, "", "root")]

    while rd.left:
        frame = stack[-1]
        raw = rd.take(PAIR_HEADER_SIZE, "nvpair header")
        ptype, namesize, datasize, nitems = (_PAIR_BE if rd.big else _PAIR_LE).unpack(raw)
        if ptype not in _TYPE_NAMES:
            raise NvlistError(f"unknown nvpair type {ptype}")
        if namesize < 1 or namesize > NV_NAME_MAX:
            raise NvlistError(f"nvpair name size {namesize} out of range 1..{NV_NAME_MAX}")
        rawname = rd.take(namesize, "nvpair name")
        if rawname.find(0) != namesize - 1:
            raise NvlistError(f"nvpair name {rawname[:40]!r} is not a NUL-terminated string")
        name = _name(rawname[:-1])
        if datasize > rd.left:
            raise NvlistError(
                f"nvpair '{name}': data size {datasize} exceeds the {rd.left} bytes left")

        if ptype == NV_TYPE_NVLIST_UP:
            if frame.kind != "nvlist":
                raise NvlistError("NVLIST_UP outside a nested nvlist")
            stack.pop()
            continue
        if ptype == NV_TYPE_NVLIST_ARRAY_NEXT:
            if frame.kind != "element":
                raise NvlistError("NVLIST_ARRAY_NEXT outside an nvlist array")
            stack.pop()
            if frame.remaining:
                element: dict[str, Any] = {}
                rd.header(f"element of nvlist array '{frame.name}'")
                assert frame.elements is not None
                frame.elements.append(element)
                stack.append(_Frame(element, frame.name, "element", frame.elements,
                                    frame.remaining - 1))
            continue

        if name in frame.nvl:
            raise NvlistError(f"duplicate nvpair name '{name}'")

        value: Any
        if ptype == NV_TYPE_NULL:
            if datasize != 0:
                raise NvlistError(f"NULL '{name}' has data size {datasize}")
            value = None
        elif ptype == NV_TYPE_BOOL:
            if datasize != 1:
                raise NvlistError(f"BOOL '{name}' has data size {datasize}, expected 1")
            byte = rd.take(1, f"BOOL '{name}'")[0]
            if byte > 1:
                raise NvlistError(f"BOOL '{name}' has value {byte}, expected 0 or 1")
            value = bool(byte)
        elif ptype == NV_TYPE_NUMBER:
            if datasize != 8:
                raise NvlistError(f"NUMBER '{name}' has data size {datasize}, expected 8")
            value = rd.u64s(rd.take(8, f"NUMBER '{name}'"), 1)[0]
        elif ptype == NV_TYPE_STRING:
            raw = rd.take(datasize, f"STRING '{name}'")
            if not raw or raw.find(0) != len(raw) - 1:
                raise NvlistError(f"STRING '{name}' is not a NUL-terminated string")
            value = _name(raw[:-1])
        elif ptype == NV_TYPE_DESCRIPTOR:
            if datasize != 8:
                raise NvlistError(f"DESCRIPTOR '{name}' has data size {datasize}, expected 8")
            value = rd.fd(rd.u64s(rd.take(8, f"DESCRIPTOR '{name}'"), 1)[0], name)
        elif ptype == NV_TYPE_BINARY:
            if datasize == 0:
                raise NvlistError(f"BINARY '{name}' is empty")
            value = rd.take(datasize, f"BINARY '{name}'")
        elif ptype in (NV_TYPE_BOOL_ARRAY, NV_TYPE_NUMBER_ARRAY, NV_TYPE_DESCRIPTOR_ARRAY):
            itemsize = 1 if ptype == NV_TYPE_BOOL_ARRAY else 8
            if nitems == 0:
                raise NvlistError(f"{_TYPE_NAMES[ptype]} '{name}' has no items")
            if datasize != itemsize * nitems:
                raise NvlistError(
                    f"{_TYPE_NAMES[ptype]} '{name}': data size {datasize} "
                    f"does not match {nitems} items")
            raw = rd.take(datasize, f"{_TYPE_NAMES[ptype]} '{name}'")
            if ptype == NV_TYPE_BOOL_ARRAY:
                if any(b > 1 for b in raw):
                    raise NvlistError(f"BOOL ARRAY '{name}' holds a value other than 0 or 1")
                value = [bool(b) for b in raw]
            elif ptype == NV_TYPE_NUMBER_ARRAY:
                value = list(rd.u64s(raw, nitems))
            else:
                value = [rd.fd(i, name) for i in rd.u64s(raw, nitems)]
        elif ptype == NV_TYPE_STRING_ARRAY:
            if nitems == 0 or datasize == 0:
                raise NvlistError(f"STRING ARRAY '{name}' is empty")
            value = _strings(rd.take(datasize, f"STRING ARRAY '{name}'"), name, nitems)
        elif ptype == NV_TYPE_NVLIST:
            if datasize == 0:
                raise NvlistError(f"NVLIST '{name}' has data size 0")
            if len(stack) > MAX_DEPTH:
                raise NvlistError(f"nvlist nesting deeper than {MAX_DEPTH}")
            rd.header(f"nested nvlist '{name}'")
            value = {}
            frame.nvl[name] = value
            stack.append(_Frame(value, name, "nvlist"))
            continue
        else:  # NV_TYPE_NVLIST_ARRAY
            if nitems == 0:
                raise NvlistError(f"NVLIST ARRAY '{name}' has no items")
            if nitems * HEADER_SIZE > rd.left:
                raise NvlistError(
                    f"NVLIST ARRAY '{name}': {nitems} items cannot fit in {rd.left} bytes")
            if len(stack) > MAX_DEPTH:
                raise NvlistError(f"nvlist nesting deeper than {MAX_DEPTH}")
            rd.header(f"element of nvlist array '{name}'")
            first: dict[str, Any] = {}
            value = [first]
            frame.nvl[name] = value
            stack.append(_Frame(first, name, "element", value, nitems - 1))
            continue
        frame.nvl[name] = value

    if len(stack) != 1:
        open_frame = stack[-1]
        marker = "NVLIST_UP" if open_frame.kind == "nvlist" else "NVLIST_ARRAY_NEXT"
        raise NvlistError(
            f"nvlist truncated: nested nvlist '{open_frame.name}' is missing its {marker}")
    return root


def descriptors(nvl: Mapping[str, Any]) -> Iterator[Descriptor]:
    """Every :class:`Descriptor` in ``nvl``, nested ones included, in wire order."""
    for value in nvl.values():
        if isinstance(value, Descriptor):
            yield value
        elif isinstance(value, Mapping):
            yield from descriptors(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, Descriptor):
                    yield item
                elif isinstance(item, Mapping):
                    yield from descriptors(item)


# --------------------------------------------------------------------------
# Socket transport
# --------------------------------------------------------------------------

def send_nvlist(sock: socket.socket, nvl: Mapping[str, Any]) -> None:
    """Send ``nvl`` the way libnv's ``nvlist_send`` does.

    The packed bytes go first; then, if there are descriptors, one
    ``sendmsg`` per group of 85 carrying a single zero byte and one
    ``SCM_RIGHTS`` control message per descriptor.  The descriptors stay
    open on this side (libnv duplicates them too).
    """
    data, fds = pack(nvl)
    sock.sendall(data)
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        chunk = fds[start:start + FDS_PER_MESSAGE]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
                     for fd in chunk]
        sock.sendmsg([b"\0"], ancillary)


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise NvlistError(f"connection closed after {got} of {n} bytes of the {what}")
        got += k
    return bytes(buf)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv_fds(sock: socket.socket, count: int) -> list[int]:
    """Receive exactly ``count`` descriptors sent by libnv's ``fd_send``."""
    cloexec = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    fds: list[int] = []
    try:
        while len(fds) < count:
            want = min(count - len(fds), FDS_PER_MESSAGE)
            # Room for one control message per descriptor, as libnv sends them.
            msg, ancdata, msg_flags, _ = sock.recvmsg(1, want * socket.CMSG_SPACE(4), cloexec)
            got: list[int] = []
            bad = None
            for level, ctype, cdata in ancdata:
                if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(cdata[:len(cdata) - len(cdata) % arr.itemsize])
                    got.extend(arr)
                else:
                    bad = f"unexpected control message (level {level}, type {ctype})"
            fds.extend(got)
            if not cloexec:
                for fd in got:
                    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
            if bad:
                raise NvlistError(f"while receiving descriptors: {bad}")
            if msg_flags & getattr(socket, "MSG_CTRUNC", 0):
                raise NvlistError("descriptor message truncated (too many descriptors sent)")
            if not msg and not got:
                raise NvlistError(
                    f"connection closed after {len(fds)} of {count} descriptors")
            if not got:
                raise NvlistError("descriptor message carried no descriptors")
        if len(fds) > count:
            raise NvlistError(f"received {len(fds)} descriptors, header announced {count}")
    except BaseException:
        _close_all(fds)
        raise
    return fds


def recv_nvlist(sock: socket.socket, *, flags: int = 0, max_size: int = DEFAULT_MAX_SIZE,
                max_fds: int = DEFAULT_MAX_FDS) -> dict[str, Any]:
    """Receive one nvlist the way libnv's ``nvlist_recv`` does.

    Reads the 19-byte header to learn the size and descriptor count, then
    the rest, then the descriptors.  Received descriptors referenced by the
    nvlist are returned as :class:`Descriptor` and belong to the caller; any
    others, and all of them if the nvlist is malformed, are closed.
    """
    head = _recv_exact(sock, HEADER_SIZE, "nvlist header")
    magic, version, hflags, _, _ = _HDR_LE.unpack(head)
    if magic != _NVLIST_MAGIC:
        raise NvlistError(f"nvlist: bad nvlist magic {magic:#04x} (expected 0x6c)")
    if hflags & ~_WIRE_FLAGS:
        raise NvlistError(f"nvlist: invalid nvlist flags {hflags:#04x}")
    order = _HDR_BE if hflags & NV_FLAG_BIG_ENDIAN else _HDR_LE
    _, _, _, ndesc, size = order.unpack(head)
    if size > max_size:
        raise NvlistError(f"nvlist of {size} bytes exceeds the limit of {max_size}")
    if ndesc > max_fds:
        raise NvlistError(f"nvlist announces {ndesc} descriptors, limit is {max_fds}")
    body = _recv_exact(sock, size, "nvlist") if size else b""
    fds = _recv_fds(sock, ndesc) if ndesc else []
    try:
        result = unpack(head + body, fds, flags=flags)
    except BaseException:
        _close_all(fds)
        raise
    used = {d.fd for d in descriptors(result)}
    _close_all([fd for fd in fds if fd not in used])
    return result
