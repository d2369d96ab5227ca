"""Guest drivers against bhyvepy's device models on the real hypervisor.

The guests write known patterns (tests/guests/disk_patterns.py is the host's
model of them); the tests then read the image files on the host, so a disk
that received another disk's data, a lost write or a missed flush shows up.
"""

from __future__ import annotations

import re
import sys

import pytest

from harness import GUEST_DIR, guest_rom

sys.path.insert(0, str(GUEST_DIR))
import disk_patterns as dp  # noqa: E402

pytestmark = pytest.mark.guest

DISK_SECTORS = 64


def make_disks(tmp_path, n: int, sectors: int = DISK_SECTORS) -> list:
    paths = []
    for i in range(n):
        p = tmp_path / f"disk{i}.img"
        p.write_bytes(bytes(sectors * dp.SECTOR_SIZE))
        paths.append(p)
    return paths


@pytest.mark.parametrize("rom", ["virtio_blk", "virtio_blk_intx"])
def test_two_virtio_blk_disks_in_one_slot_keep_their_own_data(guest, tmp_path, rom):
    a, b = make_disks(tmp_path, 2)
    run = guest(guest_rom(rom), slots=[f"3:0,virtio-blk,{a}", f"3:1,virtio-blk,{b},ser=DISKB"])
    run.read_until("VIRTIO-BLK DONE", timeout=120)
    assert run.wait(60) == 1
    out = run.output.decode()
    assert re.search(rf"VBLK 0 capacity={DISK_SECTORS} id=\S+ OK", out), out
    assert re.search(rf"VBLK 1 capacity={DISK_SECTORS} id=DISKB OK", out), out
    for disk, path in enumerate((a, b)):
        image = path.read_bytes()
        assert dp.check_image(image, dp.vblk_expected(disk, DISK_SECTORS)) == []
        # and nothing of the other disk's pattern landed here
        other = dp.vblk_expected(1 - disk, DISK_SECTORS)
        assert all(image[lba * 512:(lba + 1) * 512] != data for lba, data in other.items())


def test_virtio_rnd_delivers_entropy(guest):
    run = guest(guest_rom("virtio_rnd"), slots=["6,virtio-rnd"])
    out = run.read_until("VIRTIO-RND OK", timeout=120)
    assert run.wait(60) == 1
    assert "FAIL" not in out
