"""Boot the freestanding guest programs on the real hypervisor and check what
they print on COM1 and how bhyvepy exits (bhyve's exit statuses)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from harness import guest_rom

pytestmark = pytest.mark.guest

SEABIOS = Path("/usr/share/seabios/bios.bin")


def test_hello_prints_and_powers_off(guest):
    run = guest(guest_rom("hello"))
    run.read_until("Hello from bhyvepy guest", timeout=60)
    assert run.wait(60) == 1          # ACPI S5 -> exit status 1


def test_pcienum_sees_hostbridge_lpc_and_ecam(guest):
    run = guest(guest_rom("pcienum"), slots=["4,hostbridge"])
    run.read_until("PCIENUM DONE", timeout=90)
    assert run.wait(60) == 1
    out = run.output.decode()
    lines = [ln for ln in out.splitlines() if ln.startswith("PCI ")]
    found = {ln.split()[1]: ln for ln in lines}
    assert set(found) == {"00:00.0", "00:04.0", "00:1f.0"}
    assert "vendor=1275 device=1275 class=060000" in found["00:00.0"]
    assert "vendor=8086 device=7000 class=060100" in found["00:1f.0"]
    assert "ECAM OK 3" in out
    assert re.search(r"PCIENUM DONE 3\b", out)


def test_no_bootrom_and_no_prepared_vm_fails_like_bhyve(kvm, tmp_path):
    import subprocess
    import sys

    from harness import REPO

    r = subprocess.run([sys.executable, "-m", "bhyvepy", "-m", "64M", "-s", "0,hostbridge",
                        "-s", "31,lpc", "-o", f"rundir={tmp_path}", "nobootromvm"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 4
    assert "no bootrom was configured" in r.stderr


def test_amd_hostbridge_ids(guest):
    run = guest(guest_rom("pcienum"), base_slots=("0,amd_hostbridge", "31,lpc"))
    out = run.read_until("PCIENUM DONE", timeout=90)
    assert "PCI 00:00.0 vendor=1022 device=7432 class=060000" in out
    assert run.wait(60) == 1


def test_interrupts_timer_and_com1_receive(guest):
    run = guest(guest_rom("irq"))
    out = run.read_until("READY FOR INPUT", timeout=120)
    m = re.search(r"TIMER OK (\d+)", out)
    assert m and int(m.group(1)) >= 5
    run.send(b"ab")
    run.read_until("RX 62", timeout=60)
    run.send(b"q")
    out = run.read_until("IRQ DONE", timeout=60)
    rx = re.findall(r"RX ([0-9a-f]{2})", out)
    assert rx == ["61", "62", "71"]
    assert run.wait(60) == 1


@pytest.mark.parametrize("name,banner,status", [
    ("reset", "RESETTING", 0),
    ("triplefault", "TRIPLE FAULTING", 3),
    ("halt", "HALTING", 2),
])
def test_exit_statuses(guest, name, banner, status):
    run = guest(guest_rom(name))
    run.read_until(banner, timeout=60)
    assert run.wait(60) == status


def test_sigterm_before_acpi_enable_kills_like_bhyve(guest):
    # irq never enables ACPI: SIGTERM keeps its default action (bhyve's pm.c).
    run = guest(guest_rom("irq"))
    run.read_until("READY FOR INPUT", timeout=120)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == -signal.SIGTERM


@pytest.mark.skipif(not SEABIOS.exists(), reason="Debian's seabios package is not installed "
                    "(/usr/share/seabios/bios.bin); `make test` installs it when run as root")
def test_seabios_starts_and_looks_for_a_boot_device(guest, tmp_path):
    log = tmp_path / "seabios.log"
    run = guest(SEABIOS, mem="128M", extra=["-o", f"debugcon.path={log}"])
    deadline_text = "No bootable device"
    import time

    end = time.monotonic() + 240
    text = ""
    while time.monotonic() < end:
        text = log.read_text(errors="replace") if log.exists() else ""
        if deadline_text in text or "Booting from" in text:
            break
        if run.proc.poll() is not None:
            break
        time.sleep(0.5)
    assert "SeaBIOS" in text, text[-2000:]
    assert deadline_text in text or "Booting from" in text, text[-3000:]
    # SeaBIOS found the PCI functions through config mechanism #1.
    assert "id=1275:1275" in text and "id=8086:7000" in text


@pytest.mark.skipif(not SEABIOS.exists(), reason="Debian's seabios package is not installed")
def test_strict_io_ends_vm_on_unemulated_port(guest):
    # SeaBIOS probes ports bhyve does not emulate (QEMU's fw_cfg at 0x510):
    # with -e (x86.strictio) that ends the VM with status 4 and a message.
    run = guest(SEABIOS, mem="128M", extra=["-e"])
    assert run.wait(120) == 4
    assert "Unhandled" in run.stderr


def boot_sector(message: bytes) -> bytes:
    """A real-mode MBR: print ``message`` on COM1, then ACPI power-off."""
    code = bytes.fromhex(
        "31C0" "8ED8" "FC"         # xor ax,ax; mov ds,ax; cld
        "BE1D7C"                   # mov si, 0x7c00 + 29 (message)
        "BAF803"                   # mov dx, 0x3f8
        "AC" "84C0" "7403"         # lodsb; test al,al; jz done
        "EE" "EBF8"                # out dx,al; jmp lodsb
        "BA0404" "B80034" "EF"     # done: mov dx,0x404; mov ax,0x3400; out dx,ax (S5)
        "F4" "EBFE")               # hlt; jmp $
    assert len(code) == 29
    return (code + message + b"\0").ljust(510, b"\0") + b"\x55\xAA"


@pytest.mark.skipif(not SEABIOS.exists(), reason="Debian's seabios package is not installed")
def test_seabios_boots_from_virtio_blk(guest, tmp_path):
    disk = tmp_path / "boot.img"
    disk.write_bytes(boot_sector(b"BOOTED FROM VIRTIO-BLK\r\n") + bytes(1 << 20))
    log = tmp_path / "seabios.log"
    run = guest(SEABIOS, mem="128M", slots=[f"3,virtio-blk,{disk}"],
                extra=["-o", f"debugcon.path={log}"])
    run.read_until("BOOTED FROM VIRTIO-BLK", timeout=240)
    assert run.wait(60) == 1
    assert "found virtio-blk at 00:03.0" in log.read_text(errors="replace")


@pytest.mark.skipif(not SEABIOS.exists(), reason="Debian's seabios package is not installed")
def test_seabios_finds_virtio_blk_ahci_disk_and_atapi_cd(guest, tmp_path):
    import time

    disk = tmp_path / "vblk.img"
    disk.write_bytes(bytes(1 << 20))
    cd = tmp_path / "cd.iso"
    cd.write_bytes(bytes(2048 * 64))
    hd = tmp_path / "hd.img"
    hd.write_bytes(bytes(1 << 20))
    log = tmp_path / "seabios.log"
    run = guest(SEABIOS, mem="128M",
                slots=[f"3,virtio-blk,{disk}", f"4,ahci,cd:{cd},hd:{hd}"],
                extra=["-o", f"debugcon.path={log}"])
    end = time.monotonic() + 240
    text = ""
    while time.monotonic() < end and run.proc.poll() is None:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Booting from Hard Disk" in text:
            break
        time.sleep(0.5)
    assert "found virtio-blk at 00:03.0" in text, text[-3000:]
    assert "AHCI controller at 00:04.0" in text
    assert re.search(r'AHCI/0: registering: "DVD/CD', text), text
    assert re.search(r'AHCI/1: registering: ".*Hard-Disk', text), text


def test_vcpu_pinning_with_p(guest):
    """-p 0:0 pins vCPU 0's host thread to host CPU 0 (bhyve's pthread affinity)."""
    import os

    run = guest(guest_rom("irq"), extra=["-p", "0:0"])
    run.read_until("READY FOR INPUT", timeout=120)
    threads = {}
    for tid in os.listdir(f"/proc/{run.proc.pid}/task"):
        with open(f"/proc/{run.proc.pid}/task/{tid}/comm") as f:
            threads[f.read().strip()] = int(tid)
    vcpu_tid = next(t for name, t in threads.items() if name.startswith("vcpu 0"))
    assert os.sched_getaffinity(vcpu_tid) == {0}
    run.send(b"q")
    assert run.wait(60) == 1
