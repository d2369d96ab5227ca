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


def make_iso(path, blocks: int, seed: int) -> bytes:
    """An ISO-sized image of 2048-byte blocks whose every block is distinct."""
    data = b"".join((f"CD{seed} block {b:06d} ".encode() * 100)[:dp.CD_BLOCK] for b in range(blocks))
    path.write_bytes(data)
    return data


def test_one_vm_with_every_device_type_twice(guest, tmp_path):
    """Issue 3's VM: two virtio-blk disks, one ahci-hd disk, two ahci-cd drives,
    virtio-net and virtio-rnd; the guest writes a distinct pattern to each
    disk and reads each CD; every image is then checked on the host."""
    vb0, vb1, hd = make_disks(tmp_path, 3)
    cd0 = tmp_path / "cd0.iso"
    cd1 = tmp_path / "cd1.iso"
    isos = [make_iso(cd0, 40, 0), make_iso(cd1, 24, 1)]
    cd_before = [cd0.read_bytes(), cd1.read_bytes()]
    run = guest(guest_rom("alldevs"), mem="64M", slots=[
        f"3:0,virtio-blk,{vb0}", f"3:1,virtio-blk,{vb1}",
        f"4,ahci-hd,{hd}", f"5,ahci-cd,{cd0}", f"6,ahci-cd,{cd1}",
        "7,virtio-net", "8,virtio-rnd"])
    run.read_until("ALLDEVS DONE", timeout=240)
    assert run.wait(60) == 1
    out = run.output.decode()
    assert "FAIL" not in out
    assert "VIRTIO-BLK DONE 2" in out
    assert re.search(r"AHCI DONE hbas=3 disks=1 cds=2", out), out
    assert "VIRTIO-RND OK" in out

    # Each disk holds exactly its own pattern and none of another's.
    expected = {
        vb0: dp.vblk_expected(0, DISK_SECTORS),
        vb1: dp.vblk_expected(1, DISK_SECTORS),
        hd: dp.ahci_expected(0, 0, DISK_SECTORS),
    }
    for path, want in expected.items():
        image = path.read_bytes()
        assert dp.check_image(image, want) == [], path.name
        for other, theirs in expected.items():
            if other != path:
                assert all(image[lba * 512:(lba + 1) * 512] != data for lba, data in theirs.items())
    # The CDs were read, correctly, and never written.
    for i, (cd, iso) in enumerate(zip((cd0, cd1), isos)):
        assert cd.read_bytes() == cd_before[i]
        for lba, n, fnv, head in dp.cd_reads(iso):
            assert f"cd read lba={lba} blocks={n} fnv={fnv:08x}" in out, (lba, n)
