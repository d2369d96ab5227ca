"""The host-side models of the guests' disk data agree with the guest C code.

tests/guests/disk_patterns.py and iostress_model.py tell integration and
snapshot tests what the guests write and print.  Here the guests' own
pattern code (tests/guests/lib/pattern.c) is built for the host and run, so
a change on either side that breaks the agreement fails here, in seconds,
without booting anything.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

GUESTS = Path(__file__).resolve().parents[1] / "guests"
sys.path.insert(0, str(GUESTS))

import disk_patterns as dp  # noqa: E402
import iostress_model as im  # noqa: E402

DRIVER = r"""
#include <stdio.h>
#include "pattern.h"

/* pattern.c needs nothing else from the guest runtime. */
int main(void)
{
	static uint8_t b[2048];
	unsigned d, i;

	for (d = 0; d < 3; d++) {
		for (i = 0; i < 70; i += 23) {
			sector_pattern(b, d == 2 ? "bhyvepy-ahci" : "bhyvepy-vblk",
				       d * 31, (uint64_t)i * 1000003);
			fwrite(b, 1, 512, stdout);
		}
	}
	for (i = 0; i < 40; i++) {
		for (d = 0; d < 2; d++) {
			iostress_sector(b, d, i * 977);
			fwrite(b, 1, 512, stdout);
		}
	}
	for (i = 0; i < sizeof(b); i++)
		b[i] = (uint8_t)(i * 7 + 3);
	printf("%08x", fnv32_words(FNV32_INIT, b, sizeof(b)));
	printf("%08x", fnv32_words(0x12345678u, b, 12));
	return 0;
}
"""


@pytest.fixture(scope="module")
def c_output(tmp_path_factory) -> bytes:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the guests' pattern code for the host")
    tmp = tmp_path_factory.mktemp("patterns")
    (tmp / "driver.c").write_text(DRIVER)
    exe = tmp / "driver"
    subprocess.run([cc, "-std=gnu11", "-O2", "-I", str(GUESTS / "lib"), "-o", str(exe),
                    str(tmp / "driver.c"), str(GUESTS / "lib" / "pattern.c")],
                   check=True, capture_output=True)
    return subprocess.run([str(exe)], check=True, capture_output=True).stdout


def test_sector_pattern_matches_c(c_output: bytes) -> None:
    off = 0
    for d in range(3):
        tag = dp.AHCI_TAG if d == 2 else dp.VBLK_TAG
        for i in range(0, 70, 23):
            assert c_output[off:off + 512] == dp.sector_pattern(tag, d * 31, i * 1000003)
            off += 512


def test_iostress_sector_matches_c(c_output: bytes) -> None:
    off = 3 * 4 * 512
    for i in range(40):
        for d in range(2):
            assert c_output[off:off + 512] == im.sector(d, i * 977), (d, i)
            off += 512


def test_fnv32_words_matches_c(c_output: bytes) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(2048))
    tail = c_output[-16:].decode()
    assert int(tail[:8], 16) == dp.fnv32_words(data)
    assert int(tail[8:], 16) == dp.fnv32_words(data[:12], 0x12345678)


def test_sector_pattern_layout() -> None:
    s = dp.sector_pattern("bhyvepy-vblk", 1, 4095)
    assert len(s) == 512
    assert s[:16] == b"bhyvepy-vblk    "
    assert struct.unpack_from("<IQ", s, 16) == (1, 4095)
    assert s[28] == (28 + 7 + 13 * 4095) & 0xFF and s[511] == (511 + 7 + 13 * 4095) & 0xFF


def test_iostress_disk_contents_are_the_last_writes() -> None:
    contents = im.disk_contents(0, 37)
    assert sorted(contents) == list(range(im.SECTORS))
    # LBA 4 was last written by iteration 36, LBA 5 by iteration 21.
    assert contents[4] == im.sector(0, 36) and contents[5] == im.sector(0, 21)
    assert sorted(im.disk_contents(1, 3)) == [0, 1, 2]
    assert im.disk_contents(1, 0) == {}


def test_iostress_checksums_chain() -> None:
    sums = im.checksums(5)
    assert len(sums) == 5 and len(set(sums)) == 5
    h = dp.fnv32_words(im.sector(0, 0))
    assert sums[0] == dp.fnv32_words(im.sector(1, 0), h)
    assert im.checksums(3) == sums[:3]


def test_cd_reads_pick_the_volume_descriptor_when_there_is_one() -> None:
    image = bytes(range(256)) * (2048 * 30 // 256)
    reads = dp.cd_reads(image)
    assert [(lba, n) for lba, n, _, _ in reads] == [(16, 4), (29, 1)]
    assert reads[0][3] == image[16 * 2048:16 * 2048 + 16].hex()
    small = dp.cd_reads(image[:3 * 2048])
    assert [(lba, n) for lba, n, _, _ in small] == [(0, 3), (2, 1)]


def test_cd_checksum_cycles_through_the_first_blocks() -> None:
    image = b"".join(bytes([b]) * 2048 for b in range(20))
    h = im.FNV32_INIT
    for i in range(40):
        b = i % 16
        h = dp.fnv32_words(image[b * 2048:(b + 1) * 2048], h)
    assert im.cd_checksum(image, 40) == h
