"""Tests for bhyvepy.snapshot.nvlist against libnv's packed layout.

The expected bytes are built here field by field with ``struct.pack`` from
libnv's header definitions (nvlist header: u8 magic 0x6c, u8 version 0,
u8 flags, u64 descriptors, u64 size; nvpair header: u8 type, u16 name size
incl. NUL, u64 data size, u64 item count), not by the code under test.
"""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bhyvepy.snapshot.nvlist import (
    Descriptor,
    NvlistError,
    descriptors,
    pack,
    recv_nvlist,
    send_nvlist,
    unpack,
)

# libnv type codes (sys/nv.h, nv_impl.h)
NULL, BOOL, NUMBER, STRING, NVLIST, DESCRIPTOR, BINARY = 1, 2, 3, 4, 5, 6, 7
BOOL_ARRAY, NUMBER_ARRAY, STRING_ARRAY, NVLIST_ARRAY, DESCRIPTOR_ARRAY = 8, 9, 10, 11, 12
ARRAY_NEXT, UP = 254, 255
BIG_ENDIAN = 0x80


def hdr(size: int, ndesc: int = 0, flags: int = 0, e: str = "<") -> bytes:
    return struct.pack(e + "BBBQQ", 0x6C, 0, flags, ndesc, size)


def pair(ptype: int, name: bytes, data: bytes = b"", nitems: int = 0, datasize: int | None = None,
         e: str = "<") -> bytes:
    size = len(data) if datasize is None else datasize
    return struct.pack(e + "BHQQ", ptype, len(name) + 1, size, nitems) + name + b"\0" + data


def marker(ptype: int, e: str = "<") -> bytes:
    return struct.pack(e + "BHQQ", ptype, 1, 0, 0) + b"\0"


def with_header(body: bytes, ndesc: int = 0, flags: int = 0, e: str = "<") -> bytes:
    return hdr(len(body), ndesc, flags, e) + body


# The request bhyvectl --suspend sends (bhyve 14 snapshot.c / bhyvectl.c).
BHYVECTL_BODY = (
    pair(STRING, b"cmd", b"checkpoint\0")
    + pair(STRING, b"filename", b"vm.ckp\0")
    + pair(BOOL, b"suspend", b"\1")
    + pair(DESCRIPTOR, b"fddir", struct.pack("<q", 0))
)


# --------------------------------------------------------------------------
# hand-built bytes, both directions
# --------------------------------------------------------------------------

def test_decode_bhyvectl_request():
    data = with_header(BHYVECTL_BODY, ndesc=1)
    nvl = unpack(data, [42])
    assert nvl == {"cmd": "checkpoint", "filename": "vm.ckp", "suspend": True,
                   "fddir": Descriptor(42)}
    assert list(nvl) == ["cmd", "filename", "suspend", "fddir"]


def test_encode_bhyvectl_request():
    data, fds = pack({"cmd": "checkpoint", "filename": "vm.ckp", "suspend": True,
                      "fddir": Descriptor(7)})
    assert data == with_header(BHYVECTL_BODY, ndesc=1)
    assert fds == [7]


def test_scalar_types_encode_and_decode():
    body = (pair(NULL, b"z") + pair(BOOL, b"f", b"\0")
            + pair(NUMBER, b"n", struct.pack("<Q", 0xFFFF_FFFF_FFFF_FFFF))
            + pair(BINARY, b"b", b"\0\1\2")
            + pair(STRING, b"s", "h\u00e9".encode() + b"\0"))
    value = {"z": None, "f": False, "n": 2**64 - 1, "b": b"\0\1\2", "s": "h\u00e9"}
    assert pack(value) == (with_header(body), [])
    assert unpack(with_header(body)) == value


def test_arrays_encode_and_decode():
    body = (pair(BOOL_ARRAY, b"ba", b"\1\0\1", 3)
            + pair(NUMBER_ARRAY, b"na", struct.pack("<2Q", 1, 2**40), 2)
            + pair(STRING_ARRAY, b"sa", b"a\0\0bcd\0", 3)
            + pair(DESCRIPTOR_ARRAY, b"da", struct.pack("<2q", 0, 1), 2))
    value = {"ba": [True, False, True], "na": [1, 2**40], "sa": ["a", "", "bcd"],
             "da": [Descriptor(10), Descriptor(11)]}
    assert pack(value) == (with_header(body, ndesc=2), [10, 11])
    assert unpack(with_header(body, ndesc=2), [10, 11]) == value


def nested_bytes(e: str = "<", flags: int = 0) -> bytes:
    """{"first": "1", "c": {"deep": 7}, "after": 9} laid out as libnv does.

    The nested header's size counts every byte after it to the end of the
    buffer.  The NVLIST pair's data size is libnv's nvlist_size() of the
    child, which walks on through the parent after the child: child header
    (19) + pair "deep" (19+5+8) + pair "after" (19+6+8), without the child's
    NVLIST_UP.
    """
    deep = pair(NUMBER, b"deep", struct.pack(e + "Q", 7), e=e)
    after = pair(NUMBER, b"after", struct.pack(e + "Q", 9), e=e)
    tail = deep + marker(UP, e) + after
    child_datasize = 19 + len(deep) + len(after)
    body = (pair(STRING, b"first", b"1\0", e=e)
            + pair(NVLIST, b"c", datasize=child_datasize, e=e)
            + hdr(len(tail), 0, flags, e) + tail)
    return hdr(len(body), 0, flags, e) + body


NESTED_VALUE = {"first": "1", "c": {"deep": 7}, "after": 9}


def test_nested_encode_matches_libnv_layout():
    assert pack(NESTED_VALUE)[0] == nested_bytes()


def test_nested_decode():
    assert unpack(nested_bytes()) == NESTED_VALUE


def test_empty_nested_nvlist():
    # An empty child's data size is only its header: libnv's size walk never starts.
    tail = marker(UP)
    body = pair(NVLIST, b"e", datasize=19) + hdr(len(tail)) + tail
    assert pack({"e": {}})[0] == with_header(body)
    assert unpack(with_header(body)) == {"e": {}}


def test_nvlist_array_encode_and_decode():
    # [{"x": 1}, {}]: each element is a header, its pairs and an ARRAY_NEXT; no UP.
    x = pair(NUMBER, b"x", struct.pack("<Q", 1))
    rest2 = marker(ARRAY_NEXT)
    rest1 = x + marker(ARRAY_NEXT) + hdr(len(rest2)) + rest2
    body = pair(NVLIST_ARRAY, b"arr", b"", 2) + hdr(len(rest1)) + rest1
    assert pack({"arr": [{"x": 1}, {}]})[0] == with_header(body)
    assert unpack(with_header(body)) == {"arr": [{"x": 1}, {}]}


def test_big_endian_input():
    data = nested_bytes(">", BIG_ENDIAN)
    assert unpack(data) == NESTED_VALUE
    body = (pair(NUMBER_ARRAY, b"na", struct.pack(">2Q", 3, 2**63), 2, e=">")
            + pair(DESCRIPTOR, b"fd", struct.pack(">q", 0), e=">")
            + pair(STRING, b"s", b"be\0", e=">"))
    assert unpack(with_header(body, 1, BIG_ENDIAN, ">"), [5]) == {
        "na": [3, 2**63], "fd": Descriptor(5), "s": "be"}


def test_big_endian_flag_with_little_endian_sizes_is_rejected():
    body = pair(NUMBER, b"n", struct.pack("<Q", 1))
    with pytest.raises(NvlistError):
        unpack(with_header(body, flags=BIG_ENDIAN))  # sizes read in the wrong order


def test_descriptors_helper_walks_nested_lists():
    nvl = {"a": Descriptor(3), "b": {"c": [Descriptor(4)], "d": [{"e": Descriptor(5)}]}}
    assert [d.fd for d in descriptors(nvl)] == [3, 4, 5]
    assert pack(nvl)[1] == [3, 4, 5]


# --------------------------------------------------------------------------
# bad input: every case is an NvlistError, nothing else
# --------------------------------------------------------------------------

GOOD = with_header(pair(STRING, b"cmd", b"checkpoint\0"))


def _bad_cases():
    s = pair(STRING, b"cmd", b"x\0")
    yield "empty", b"", [], "truncated"
    yield "short header", GOOD[:10], [], "truncated"
    yield "bad magic", b"\x6d" + GOOD[1:], [], "magic"
    yield "bad version", GOOD[:1] + b"\x01" + GOOD[2:], [], "version"
    yield "unknown flag", GOOD[:2] + b"\x04" + GOOD[3:], [], "flags"
    yield "size too big", hdr(len(s) + 1) + s, [], "header says"
    yield "size too small", hdr(len(s) - 1) + s, [], "header says"
    yield "size overflow", hdr(2**64 - 1) + s, [], "header says"
    yield "truncated pair header", with_header(s[:10]), [], "truncated"
    yield "unknown type", with_header(struct.pack("<BHQQ", 13, 2, 0, 0) + b"a\0"), [], "unknown nvpair type 13"
    yield "type zero", with_header(struct.pack("<BHQQ", 0, 2, 0, 0) + b"a\0"), [], "unknown nvpair type 0"
    yield "name without NUL", with_header(struct.pack("<BHQQ", NULL, 2, 0, 0) + b"ab"), [], "NUL-terminated"
    yield "name with inner NUL", with_header(struct.pack("<BHQQ", NULL, 3, 0, 0) + b"a\0\0"), [], "NUL-terminated"
    yield "name size zero", with_header(struct.pack("<BHQQ", NULL, 0, 0, 0)), [], "name size"
    yield "name size huge", with_header(struct.pack("<BHQQ", NULL, 4000, 0, 0) + b"a" * 3999 + b"\0"), [], "name size"
    yield "name past end", with_header(struct.pack("<BHQQ", NULL, 50, 0, 0) + b"a\0"), [], "truncated"
    yield "data size overflow", with_header(struct.pack("<BHQQ", BINARY, 2, 2**64 - 1, 0) + b"a\0xx"), [], "exceeds"
    yield "string without NUL", with_header(pair(STRING, b"s", b"abc")), [], "NUL-terminated"
    yield "string with inner NUL", with_header(pair(STRING, b"s", b"a\0c\0")), [], "NUL-terminated"
    yield "empty string data", with_header(pair(STRING, b"s", b"")), [], "NUL-terminated"
    yield "bool value 2", with_header(pair(BOOL, b"b", b"\2")), [], "0 or 1"
    yield "bool size 8", with_header(pair(BOOL, b"b", b"\0" * 8)), [], "data size"
    yield "number size 4", with_header(pair(NUMBER, b"n", b"\0" * 4)), [], "data size"
    yield "null with data", with_header(pair(NULL, b"n", b"\0")), [], "data size"
    yield "empty binary", with_header(pair(BINARY, b"b", b"")), [], "empty"
    yield "duplicate name", with_header(s + s), [], "duplicate"
    yield "descriptor index out of range", with_header(pair(DESCRIPTOR, b"d", struct.pack("<q", 1)), 1), [9], "out of range"
    yield "descriptor negative index", with_header(pair(DESCRIPTOR, b"d", struct.pack("<q", -1)), 1), [9], "negative"
    yield "descriptor index reused", with_header(pair(DESCRIPTOR, b"d", struct.pack("<q", 0)) + pair(DESCRIPTOR, b"e", struct.pack("<q", 0)), 1), [9], "more than once"
    yield "more descriptors announced than received", with_header(s, 2), [9], "announces"
    yield "number array size mismatch", with_header(pair(NUMBER_ARRAY, b"a", b"\0" * 16, 3)), [], "does not match"
    yield "number array huge nitems", with_header(pair(NUMBER_ARRAY, b"a", b"\0" * 16, 2**61 + 2)), [], "does not match"
    yield "bool array no items", with_header(pair(BOOL_ARRAY, b"a", b"", 0)), [], "no items"
    yield "bool array bad value", with_header(pair(BOOL_ARRAY, b"a", b"\1\7", 2)), [], "0 or 1"
    yield "string array wrong count", with_header(pair(STRING_ARRAY, b"a", b"x\0y\0", 3)), [], "holds 2"
    yield "string array without NUL", with_header(pair(STRING_ARRAY, b"a", b"x\0y", 2)), [], "NUL-terminated"
    yield "descriptor array out of range", with_header(pair(DESCRIPTOR_ARRAY, b"a", struct.pack("<2q", 0, 5), 2), 1), [9], "out of range"
    yield "nvlist array no items", with_header(pair(NVLIST_ARRAY, b"a", b"", 0)), [], "no items"
    yield "nvlist array too many items", with_header(pair(NVLIST_ARRAY, b"a", b"", 2**60) + hdr(0)), [], "cannot fit"
    # nesting
    child_tail = pair(NUMBER, b"deep", struct.pack("<Q", 7))
    yield "missing NVLIST_UP", with_header(pair(NVLIST, b"c", datasize=19) + hdr(len(child_tail)) + child_tail), [], "missing its NVLIST_UP"
    yield "nested size wrong", with_header(pair(NVLIST, b"c", datasize=19) + hdr(99) + marker(UP)), [], "header says"
    yield "nested bad magic", with_header(pair(NVLIST, b"c", datasize=19) + b"\x00" + hdr(20)[1:] + marker(UP)), [], "magic"
    yield "nested nvlist data size zero", with_header(pair(NVLIST, b"c", datasize=0) + hdr(20) + marker(UP)), [], "data size 0"
    yield "nested byte order differs", with_header(pair(NVLIST, b"c", datasize=19) + hdr(20, flags=BIG_ENDIAN, e=">") + marker(UP)), [], "byte order"
    yield "UP at top level", with_header(marker(UP)), [], "NVLIST_UP outside"
    yield "ARRAY_NEXT at top level", with_header(marker(ARRAY_NEXT)), [], "ARRAY_NEXT outside"
    yield "UP closes array element", with_header(pair(NVLIST_ARRAY, b"a", b"", 1) + hdr(20) + marker(UP)), [], "NVLIST_UP outside"
    yield "array missing ARRAY_NEXT", with_header(pair(NVLIST_ARRAY, b"a", b"", 1) + hdr(0)), [], "missing its NVLIST_ARRAY_NEXT"
    yield "array element missing", with_header(pair(NVLIST_ARRAY, b"a", b"", 2) + hdr(20 + 19) + marker(ARRAY_NEXT) + b"\0" * 19), [], "magic"


def _deep(depth: int) -> bytes:
    """``depth`` nvlists nested in one another, each closed by NVLIST_UP.

    Every nested header's size is the number of bytes after it to the end.
    """
    parts: list[bytes | None] = []
    for _ in range(depth):
        parts.append(pair(NVLIST, b"n", datasize=19))
        parts.append(None)  # the child's header, filled in below
    parts.extend([marker(UP)] * depth)
    sizes = [19 if p is None else len(p) for p in parts]
    for i, p in enumerate(parts):
        if p is None:
            parts[i] = hdr(sum(sizes[i + 1:]))
    return with_header(b"".join(parts))


BAD = list(_bad_cases())


@pytest.mark.parametrize("data,fds,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_raises_nvlist_error(data, fds, match):
    with pytest.raises(NvlistError, match=match):
        unpack(data, fds)


def test_nesting_limit():
    assert unpack(_deep(64))  # exactly at the limit is fine
    with pytest.raises(NvlistError, match="deeper than 64"):
        unpack(_deep(65))


def test_top_level_flags_must_match_expected():
    data = with_header(pair(NULL, b"a"), flags=0x02)
    with pytest.raises(NvlistError, match="flags"):
        unpack(data)
    assert unpack(data, flags=0x02) == {"a": None}


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise_anything_else(blob):
    try:
        unpack(GOOD[:19] + blob)
    except NvlistError:
        pass
    try:
        unpack(blob, [1, 2])
    except NvlistError:
        pass


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_corrupted_valid_input_never_raises_anything_else(data):
    raw = bytearray(nested_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        unpack(bytes(raw[:cut]))
    except NvlistError:
        pass


# --------------------------------------------------------------------------
# encoding errors
# --------------------------------------------------------------------------

@pytest.mark.parametrize("value,match", [
    ({"a": -1}, "64 unsigned bits"),
    ({"a": 2**64}, "64 unsigned bits"),
    ({"a": "x\0y"}, "NUL"),
    ({"a\0": 1}, "NUL"),
    ({"a": []}, "empty"),
    ({"a": [1, "x"]}, "mixes"),
    ({"a": [True, 1]}, "mixes"),
    ({"a": b""}, "empty"),
    ({"a": 1.5}, "cannot pack"),
    ({"a": Descriptor(-1)}, "invalid fd"),
    ({1: 1}, "must be a str"),
    ({"x" * 2048: 1}, "longer than"),
])
def test_encode_rejects_unpackable_values(value, match):
    with pytest.raises(NvlistError, match=match):
        pack(value)


def test_encode_nesting_limit():
    nvl: dict = {}
    for _ in range(70):
        nvl = {"n": nvl}
    with pytest.raises(NvlistError, match="deeper"):
        pack(nvl)


# --------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=12)
_names = _text.filter(lambda s: len(s.encode()) < 2047)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(0, 2**64 - 1), _text,
    st.binary(min_size=1, max_size=20), st.builds(Descriptor, st.integers(0, 1000)),
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=4),
    st.lists(_text, min_size=1, max_size=4),
    st.lists(st.builds(Descriptor, st.integers(0, 1000)), min_size=1, max_size=3),
)
_nvlists = st.recursive(
    st.dictionaries(_names, _scalars, max_size=4),
    lambda children: st.dictionaries(
        _names, st.one_of(_scalars, children, st.lists(children, min_size=1, max_size=3)),
        max_size=4),
    max_leaves=20,
)


@given(_nvlists)
@settings(max_examples=100, deadline=None)
def test_round_trip(nvl):
    data, fds = pack(nvl)
    assert unpack(data, fds) == nvl
    # re-encoding the decoded value gives the same bytes
    assert pack(unpack(data, fds)) == (data, fds)


@given(_nvlists)
@settings(max_examples=50, deadline=None)
def test_round_trip_big_endian_reencode(nvl):
    """Swap every fixed-size field to big endian by hand and decode again."""
    data, fds = pack(nvl)
    assert unpack(_to_big_endian(data), fds) == nvl


def _to_big_endian(data: bytes) -> bytes:
    """Re-encode libnv little-endian bytes as a big-endian sender would."""
    out = bytearray()
    pos = 0

    def header() -> None:
        nonlocal pos
        m, v, f, nd, sz = struct.unpack_from("<BBBQQ", data, pos)
        out.extend(struct.pack(">BBBQQ", m, v, f | BIG_ENDIAN, nd, sz))
        pos += 19

    header()
    while pos < len(data):
        t, ns, ds, ni = struct.unpack_from("<BHQQ", data, pos)
        out.extend(struct.pack(">BHQQ", t, ns, ds, ni))
        pos += 19
        out.extend(data[pos:pos + ns])
        pos += ns
        if t in (NUMBER, DESCRIPTOR, NUMBER_ARRAY, DESCRIPTOR_ARRAY):
            n = ds // 8
            out.extend(struct.pack(f">{n}Q", *struct.unpack_from(f"<{n}Q", data, pos)))
            pos += ds
        elif t in (NULL, BOOL, STRING, BINARY, BOOL_ARRAY, STRING_ARRAY):
            out.extend(data[pos:pos + ds])
            pos += ds
        elif t in (NVLIST, NVLIST_ARRAY):
            header()
        elif t == ARRAY_NEXT and pos < len(data) and data[pos] == 0x6C:
            # another element of the same array follows
            header()
    return bytes(out)


# --------------------------------------------------------------------------
# sockets and descriptor passing
# --------------------------------------------------------------------------

@pytest.fixture
def pair_of_sockets():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def _open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def test_socket_round_trip_passes_the_same_file(pair_of_sockets, tmp_path):
    a, b = pair_of_sockets
    path = tmp_path / "f"
    path.write_bytes(b"snapshot-dir-marker")
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(path, os.O_RDWR)
    try:
        send_nvlist(a, {"cmd": "checkpoint", "filename": "f", "suspend": False,
                        "fddir": Descriptor(dirfd), "file": Descriptor(fd)})
        got = recv_nvlist(b)
        assert got["cmd"] == "checkpoint" and got["suspend"] is False
        new_dir, new_file = got["fddir"].fd, got["file"].fd
        assert new_dir not in (dirfd, fd) and new_file not in (dirfd, fd)
        assert os.fstat(new_file).st_ino == os.stat(path).st_ino
        assert os.pread(new_file, 100, 0) == b"snapshot-dir-marker"
        # writes through the received descriptor reach the same file
        os.pwrite(new_file, b"S", 0)
        assert path.read_bytes().startswith(b"S")
        # the directory descriptor works for openat() as bhyve uses it
        assert os.stat("f", dir_fd=new_dir).st_ino == os.stat(path).st_ino
        for d in descriptors(got):
            os.close(d.fd)
    finally:
        os.close(dirfd)
        os.close(fd)


def test_wire_bytes_match_libnv(pair_of_sockets):
    """send_nvlist puts the packed bytes first, then one SCM_RIGHTS message
    per descriptor in sendmsg groups with a single zero byte each."""
    a, b = pair_of_sockets
    r, w = os.pipe()
    try:
        send_nvlist(a, {"cmd": "checkpoint", "filename": "vm.ckp", "suspend": True,
                        "fddir": Descriptor(r)})
        expected = with_header(BHYVECTL_BODY, ndesc=1)
        got = b""
        while len(got) < len(expected):
            got += b.recv(len(expected) - len(got))
        assert got == expected
        msg, anc, _, _ = b.recvmsg(16, socket.CMSG_SPACE(4) * 4)
        assert msg == b"\0"
        assert len(anc) == 1 and anc[0][:2] == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        received = array.array("i", anc[0][2]).tolist()
        os.write(w, b"x")
        assert os.read(received[0], 1) == b"x"
        os.close(received[0])
    finally:
        os.close(r)
        os.close(w)


def test_recv_from_hand_rolled_libnv_sender(pair_of_sockets):
    """Many descriptors: libnv sends them in groups of 85, one cmsg each."""
    a, b = pair_of_sockets
    r, w = os.pipe()
    n = 100
    try:
        body = pair(DESCRIPTOR_ARRAY, b"fds", struct.pack(f"<{n}q", *range(n)), n)
        a.sendall(with_header(body, ndesc=n))
        for start in (0, 85):
            count = min(85, n - start)
            a.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                 array.array("i", [w]).tobytes())] * count)
        got = recv_nvlist(b)
        assert len(got["fds"]) == n and len({d.fd for d in got["fds"]}) == n
        os.write(got["fds"][-1].fd, b"z")
        assert os.read(r, 1) == b"z"
        for d in got["fds"]:
            os.close(d.fd)
    finally:
        os.close(r)
        os.close(w)


def test_send_many_descriptors_round_trip(pair_of_sockets):
    a, b = pair_of_sockets
    r, w = os.pipe()
    try:
        send_nvlist(a, {"fds": [Descriptor(r)] * 90, "one": Descriptor(w)})
        got = recv_nvlist(b)
        assert len(got["fds"]) == 90
        for d in descriptors(got):
            os.close(d.fd)
    finally:
        os.close(r)
        os.close(w)


def test_bad_message_closes_received_descriptors(pair_of_sockets):
    a, b = pair_of_sockets
    r, w = os.pipe()
    try:
        # the descriptor index points past the array: the nvlist is rejected
        body = pair(DESCRIPTOR, b"d", struct.pack("<q", 3))
        a.sendall(with_header(body, ndesc=1))
        a.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                             array.array("i", [r]).tobytes())])
        before = _open_fds()
        with pytest.raises(NvlistError, match="out of range"):
            recv_nvlist(b)
        assert _open_fds() <= before
    finally:
        os.close(r)
        os.close(w)


def test_unreferenced_descriptors_are_closed(pair_of_sockets):
    a, b = pair_of_sockets
    r, w = os.pipe()
    try:
        a.sendall(with_header(pair(NULL, b"x"), ndesc=1))
        a.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                             array.array("i", [r]).tobytes())])
        before = _open_fds()
        assert recv_nvlist(b) == {"x": None}
        assert _open_fds() <= before
    finally:
        os.close(r)
        os.close(w)


def test_peer_closing_mid_message_is_an_nvlist_error(pair_of_sockets):
    a, b = pair_of_sockets
    a.sendall(GOOD[:-3])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(NvlistError, match="connection closed"):
        recv_nvlist(b)


def test_peer_closing_before_descriptors(pair_of_sockets):
    a, b = pair_of_sockets
    a.sendall(with_header(pair(DESCRIPTOR, b"d", struct.pack("<q", 0)), ndesc=1))
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(NvlistError, match="descriptors"):
        recv_nvlist(b)


def test_recv_size_limit(pair_of_sockets):
    a, b = pair_of_sockets
    a.sendall(hdr(1 << 40))
    with pytest.raises(NvlistError, match="exceeds the limit"):
        recv_nvlist(b)


def test_recv_bad_magic(pair_of_sockets):
    a, b = pair_of_sockets
    a.sendall(b"GET / HTTP/1.0\r\n\r\n\0")
    with pytest.raises(NvlistError, match="magic"):
        recv_nvlist(b)
