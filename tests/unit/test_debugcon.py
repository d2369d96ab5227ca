"""QEMU-style debug console and the POST diagnostic ports."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bhyvepy.dev.debugcon import DEBUGCON_READBACK, DebugCon, DebugConError
from bhyvepy.dev.pm import PowerManagement
from bhyvepy.dev.post import PostPort


class Line:
    def assert_(self) -> None: ...
    def deassert(self) -> None: ...
    def pulse(self) -> None: ...


def test_bytes_are_appended_to_the_file(tmp_path):
    log = tmp_path / "seabios.log"
    log.write_bytes(b"earlier\n")
    con = DebugCon.open(str(log))
    assert con.read(0, 1) == DEBUGCON_READBACK          # what SeaBIOS probes for
    for c in b"SeaBIOS (version 1.16)\n":
        con.write(0, 1, c)
    con.write(0, 2, 0x0A21)                              # a word: low byte first
    assert log.read_bytes() == b"earlier\nSeaBIOS (version 1.16)\n!\n"   # unbuffered
    con.close()
    con.write(0, 1, ord("x"))                            # after close: dropped, no error
    assert log.read_bytes().endswith(b"!\n")


def test_open_error_is_clear(tmp_path):
    with pytest.raises(DebugConError, match="debugcon: .*missing"):
        DebugCon.open(str(tmp_path / "missing" / "log"))


def test_shares_0x402_with_pm1_enable(tmp_path):
    log = tmp_path / "log"
    con = DebugCon.open(str(log))
    pm = PowerManagement(Line(), lambda how: None, narrow_0x402=con)
    evt = pm.pm1_evt
    assert evt.read(2, 1) == 0xE9
    evt.write(2, 1, ord("o"))
    evt.write(2, 1, ord("k"))
    evt.write(2, 2, 0x0100)                              # PWRBTN_EN, a 16-bit write
    assert evt.read(2, 2) == 0x0100
    con.close()
    assert log.read_bytes() == b"ok"


def test_post_port_reads_ff_and_keeps_last_code():
    p = PostPort()
    assert p.read(0, 1) == 0xFF and p.read(0, 2) == 0xFFFF
    assert p.last is None
    p.write(0, 1, 0x55)
    p.write(0, 1, 0xAA)
    assert p.last == 0xAA and p.writes == 2
    assert p.read(0, 1) == 0xFF


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
                max_size=30))
def test_random_accesses_never_raise(tmp_path_factory, ops):
    log = tmp_path_factory.mktemp("dc") / "log"
    con = DebugCon.open(str(log))
    post = PostPort()
    written = bytearray()
    for is_write, size, val in ops:
        val &= (1 << (8 * size)) - 1
        if is_write:
            con.write(0, size, val)
            post.write(0, size, val)
            written += val.to_bytes(size, "little")
        else:
            assert con.read(0, size) == int.from_bytes(b"\xe9" * size, "little")
            assert post.read(0, size) == (1 << (8 * size)) - 1
    con.close()
    assert log.read_bytes() == bytes(written)
