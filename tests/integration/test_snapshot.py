"""Suspend, checkpoint and resume of real guests on the real hypervisor.

A guest runs in one bhyvepy process; ``bhyvepyctl`` (or the same request
sent from here, where a cycle must be quick) checkpoints or suspends it
through its control socket; ``bhyvepy -r FILE`` alone restores it in a new
process, whose COM1 connects to the same console socket, so the test reads
one continuous console across processes.  The guest must not notice: no
reboot banner, numbering carries on, bytes typed after the restore are
echoed.  Also here: the round-trip property of every device state class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from harness import REPO, GuestRun, guest_rom

from bhyvepy import ctl
from bhyvepy.snapshot import state as st
from bhyvepy.snapshot.fileformat import read_snapshot
from bhyvepy.snapshot.nvlist import Descriptor


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

@pytest.fixture
def rundir():
    """A short private directory for control sockets (sun_path is ~107 bytes)."""
    d = tempfile.mkdtemp(prefix="bps-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rom(tmp_path):
    """A private copy of a guest ROM: other builds may rewrite tests/guests/out."""
    def get(name: str) -> Path:
        dst = tmp_path / f"{name}.rom"
        if not dst.exists():
            shutil.copy(guest_rom(name), dst)
        return dst
    return get


def bhyvepyctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bhyvepy.ctl", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def request_checkpoint(rundir: str, vm: str, path: Path, *, suspend: bool) -> dict:
    """What bhyvepyctl sends, from this process (no interpreter start-up)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return ctl.request(rundir, vm, {"cmd": "checkpoint", "filename": path.name,
                                        "suspend": suspend, "fddir": Descriptor(fd)},
                           timeout=120)
    finally:
        os.close(fd)


def wait_ready(run: GuestRun, rundir: str, vm: str, timeout: float = 60.0) -> None:
    """Wait until a (restored) VM answers on its control socket, which it
    opens only once the restore is complete.  Console input sent before that
    is lost: the restore replaces the UART's receive FIFO with the saved one
    (see the report on start-up input)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ctl.request(rundir, vm, {"cmd": "status"}, timeout=10).get("status") == "ok":
                return
        except ctl.RequestError:
            pass
        if run.proc.poll() is not None:
            raise AssertionError(f"bhyvepy exited ({run.proc.returncode}): {run.stderr}")
        if time.monotonic() > deadline:
            raise AssertionError(f"VM {vm} did not come up within {timeout}s")
        time.sleep(0.02)


def relaunch(run: GuestRun, args: list[str], rundir: str | None = None,
             vm: str | None = None) -> str:
    """Start a new bhyvepy process in ``run`` (same console socket); returns
    the console text of the previous process.  With ``rundir`` and ``vm``,
    waits until the new process serves its control socket."""
    previous = run.output.decode(errors="replace")
    if run.conn is not None:
        run.conn.close()
        run.conn = None
    for stream in (run.proc.stdout, run.proc.stderr):
        if stream:
            stream.close()
    run.output = bytearray()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run.argv = [sys.executable, "-m", "bhyvepy", *args]
    run.proc = subprocess.Popen(run.argv, cwd=str(run.workdir), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if rundir is not None and vm is not None:
        wait_ready(run, rundir, vm)
    return previous


def rx_bytes(text: str) -> list[str]:
    return re.findall(r"^RX ([0-9a-f]{2})$", text, re.M)


def no_fail(text: str) -> None:
    assert not re.search(r"^FAIL", text, re.M), text


# --------------------------------------------------------------------------
# checkpoint, keep running, restore later
# --------------------------------------------------------------------------

@pytest.mark.guest
def test_checkpoint_keeps_running_and_restores_later(guest, rom, rundir, tmp_path):
    run = guest(rom("irq"), name="ckirq", cpus="2", extra=["-o", f"rundir={rundir}"])
    run.read_until("READY FOR INPUT", timeout=120)
    run.send(b"a")
    run.read_until("RX 61", timeout=60)

    snap = tmp_path / "irq.ckpt"
    p = bhyvepyctl("--vm=ckirq", f"--rundir={rundir}", f"--checkpoint={snap}")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == ""

    run.send(b"b")                                   # the VM kept running
    run.read_until("RX 62", timeout=60)
    run.send(b"q")
    first = run.read_until("IRQ DONE", timeout=60)
    assert run.wait(60) == 1
    assert rx_bytes(first) == ["61", "62", "71"]
    assert not os.path.exists(os.path.join(rundir, "ckirq")), "socket left behind"

    with read_snapshot(str(snap)) as s:
        assert s.basic["ncpus"] == 2 and s.basic["vmname"] == "ckirq"

    # Later, in another process, the file alone brings the VM back to the
    # moment after 'a': no boot, and it still takes input by interrupt.
    relaunch(run, ["-r", str(snap)], rundir, "ckirq")
    run.send(b"c")
    after = run.read_until("RX 63", timeout=60)
    run.send(b"q")
    after = run.read_until("IRQ DONE", timeout=60)
    assert run.wait(60) == 1, run.stderr
    assert "READY FOR INPUT" not in after and "TIMER OK" not in after
    assert rx_bytes(after) == ["63", "71"]
    no_fail(first + after)


# --------------------------------------------------------------------------
# suspend -> exit 5 -> restore
# --------------------------------------------------------------------------

@pytest.mark.guest
def test_suspend_exits_5_and_counter_carries_on(guest, rom, rundir, tmp_path):
    run = guest(rom("counter"), name="ctr", extra=["-o", f"rundir={rundir}"])
    run.read_until("tick 2", timeout=120)
    snap = tmp_path / "counter.snap"
    p = bhyvepyctl("--vm=ctr", f"--rundir={rundir}", f"--suspend={snap}")
    assert p.returncode == 0, p.stderr
    assert run.wait(60) == 5
    before = relaunch(run, ["-r", str(snap)], rundir, "ctr")
    last = int(re.findall(r"tick (\d+)\n", before)[-1])
    run.read_until(f"tick {last + 2}\n", timeout=60)
    run.send(b"q")
    after = run.read_until("COUNTER DONE", timeout=60)
    assert run.wait(60) == 1, run.stderr
    assert "COUNTER READY" not in after                     # no second boot
    ticks = [int(n) for n in re.findall(r"tick (\d+)\n", before + after)]
    assert ticks == list(range(len(ticks))), "ticks restarted, repeated or skipped"
    assert "key q" in after
    no_fail(before + after)


@pytest.mark.guest
def test_ten_suspend_resume_cycles(guest, rom, rundir, tmp_path):
    """Every byte typed is echoed exactly once across 10 suspend/resume
    cycles, and the guest boots exactly once."""
    run = guest(rom("irq"), name="cyc2", extra=["-o", f"rundir={rundir}"])
    run.read_until("READY FOR INPUT", timeout=120)
    console = ""
    expected = []
    for i in range(10):
        ch = ord("A") + i
        run.send(bytes([ch]))
        run.read_until(f"RX {ch:02x}", timeout=60)
        expected.append(f"{ch:02x}")
        reply = request_checkpoint(rundir, "cyc2", tmp_path / "s", suspend=True)
        assert reply.get("status") == "ok", reply
        assert run.wait(60) == 5, run.stderr
        console += relaunch(run, ["-r", str(tmp_path / "s")], rundir, "cyc2")
    run.send(b"q")
    console += run.read_until("IRQ DONE", timeout=60)
    assert run.wait(60) == 1, run.stderr
    assert rx_bytes(console) == expected + ["71"]
    assert console.count("READY FOR INPUT") == 1 and console.count("TIMER OK") == 1
    no_fail(console)


# --------------------------------------------------------------------------
# errors on the control socket leave the VM running
# --------------------------------------------------------------------------

def _immutable(path: Path, on: bool) -> bool:
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return r.returncode == 0


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


class _Alive:
    """Proof that the guest still runs: each call types a byte and waits for
    its echo."""

    def __init__(self, run: GuestRun) -> None:
        self.run = run
        self.chars = iter(b"0123456789")

    def __call__(self) -> None:
        ch = next(self.chars)
        self.run.send(bytes([ch]))
        self.run.read_until(f"RX {ch:02x}", timeout=60)


def _irq_vm(guest, rom, rundir: str, name: str) -> tuple[GuestRun, _Alive]:
    run = guest(rom("irq"), name=name, extra=["-o", f"rundir={rundir}"])
    run.read_until("READY FOR INPUT", timeout=120)
    return run, _Alive(run)


def _poweroff(run: GuestRun, rundir: str, name: str) -> None:
    p = bhyvepyctl(f"--vm={name}", f"--rundir={rundir}", "--force-poweroff")
    assert p.returncode == 0, p.stderr
    assert run.wait(60) == 1
    no_fail(run.output.decode(errors="replace"))


@pytest.mark.guest
def test_checkpoint_into_an_unwritable_directory_fails_and_the_vm_runs_on(guest, rom, rundir,
                                                                          tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _immutable(locked, True):
        pytest.skip("chattr +i is not available here to make a directory unwritable for root")
    _immutable(locked, False)
    run, alive = _irq_vm(guest, rom, rundir, "unwr")
    old = locked / "snap"
    assert request_checkpoint(rundir, "unwr", old, suspend=False).get("status") == "ok"
    before = _digest(old)
    assert _immutable(locked, True)
    try:
        p = bhyvepyctl("--vm=unwr", f"--rundir={rundir}", f"--suspend={old}")
    finally:
        _immutable(locked, False)
    assert p.returncode == 1
    assert "Failed to create snapshot file" in p.stderr and "not permitted" in p.stderr
    assert _digest(old) == before
    assert sorted(os.listdir(locked)) == ["snap"]
    alive()                                  # a failed --suspend does not end the VM
    _poweroff(run, rundir, "unwr")


@pytest.mark.guest
def test_disk_full_during_checkpoint_keeps_the_older_file_and_the_vm(guest, rom, rundir,
                                                                     tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    mnt = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(full)],
                         capture_output=True, text=True)
    if mnt.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {mnt.stderr.strip()}")
    try:
        run, alive = _irq_vm(guest, rom, rundir, "full")
        snap = full / "snap"
        assert request_checkpoint(rundir, "full", snap, suspend=False).get("status") == "ok"
        vfs = os.statvfs(full)
        with open(full / "filler", "wb") as f:
            f.write(b"\xa5" * max(0, vfs.f_bavail * vfs.f_frsize - 64 * 1024))
        before = _digest(snap)
        p = bhyvepyctl("--vm=full", f"--rundir={rundir}", f"--checkpoint={snap}")
        assert p.returncode == 1
        assert "No space left on device" in p.stderr
        assert _digest(snap) == before
        assert sorted(os.listdir(full)) == ["filler", "snap"]      # no temporary file left
        alive()
        _poweroff(run, rundir, "full")
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)


@pytest.mark.guest
def test_bad_requests_are_answered_and_the_vm_runs_on(guest, rom, rundir, tmp_path):
    from bhyvepy.snapshot.nvlist import recv_nvlist

    run, alive = _irq_vm(guest, rom, rundir, "bad")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(rundir, "bad"))
    s.sendall(b"\x00" * 64)
    s.settimeout(30)
    assert "malformed request" in recv_nvlist(s)["error"]
    s.close()
    assert "unknown command" in ctl.request(rundir, "bad", {"cmd": "fly"}, timeout=30)["error"]
    p = bhyvepyctl("--vm=bad", f"--rundir={rundir}", f"--checkpoint={tmp_path}/no/such/dir/x")
    assert p.returncode == 1 and "No such file or directory" in p.stderr
    p = bhyvepyctl("--vm=bad", f"--rundir={rundir}", f"--checkpoint={tmp_path}")
    assert p.returncode == 1 and "Is a directory" in p.stderr
    alive()
    p = bhyvepyctl("--vm=bad", f"--rundir={rundir}", "--status")
    assert p.returncode == 0 and "state: running" in p.stdout and "vmname: bad" in p.stdout
    _poweroff(run, rundir, "bad")
    assert not os.path.exists(os.path.join(rundir, "bad")), "socket left behind"


# --------------------------------------------------------------------------
# disks under load: two virtio-blk (plus an AHCI CD and a NIC when present)
# --------------------------------------------------------------------------

def _iostress_model():
    sys.path.insert(0, str(REPO / "tests" / "guests"))
    try:
        return importlib.import_module("iostress_model")
    finally:
        sys.path.pop(0)


@pytest.mark.guest
def test_iostress_suspended_twice_mid_run_matches_an_uninterrupted_run(guest, rom, rundir,
                                                                       tmp_path):
    from bhyvepy.registry import find_pci_emulation

    if find_pci_emulation("virtio-blk") is None:
        pytest.skip("virtio-blk is not implemented yet")
    model = _iostress_model()
    disks = []
    for n in range(2):
        img = tmp_path / f"disk{n}.img"
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        disks.append(img)
    slots = [f"3:0,virtio-blk,{disks[0]}", f"3:1,virtio-blk,{disks[1]}"]
    iso = None
    if find_pci_emulation("ahci") is not None:           # ahci-cd is bhyve's legacy alias
        iso = tmp_path / "cd.iso"
        iso.write_bytes(b"".join(bytes([b]) * 2048 for b in range(20)))
        slots.append(f"4,ahci-cd,{iso}")
    if find_pci_emulation("virtio-net") is not None:
        slots.append("5,virtio-net")                     # no backend: no link
    run = guest(rom("iostress"), name="io", slots=slots, extra=["-o", f"rundir={rundir}"])
    console = ""
    for stop_at in (40, 120):
        run.read_until(f"ITER {stop_at} ", timeout=120)
        reply = request_checkpoint(rundir, "io", tmp_path / "io.snap", suspend=True)
        assert reply.get("status") == "ok", reply
        assert run.wait(60) == 5, run.stderr
        console += relaunch(run, ["-r", str(tmp_path / "io.snap")], rundir, "io")
        with read_snapshot(str(tmp_path / "io.snap")) as s:
            names = [i.name for i in s.sections("devices")]
        assert "virtio-blk-pci-0-3-0" in names and "virtio-blk-pci-0-3-1" in names
    console += run.read_until("IOSTRESS DONE", timeout=120)
    assert run.wait(60) == 1, run.stderr
    no_fail(console)
    assert console.count("IOSTRESS START") == 1
    iters = re.findall(r"^ITER (\d+) ([0-9a-f]{8})$", console, re.M)
    assert [int(i) for i, _ in iters] == list(range(model.ITERATIONS))
    assert [int(c, 16) for _, c in iters] == model.checksums()
    for d, img in enumerate(disks):
        data = img.read_bytes()
        for lba, sector in model.disk_contents(d).items():
            assert data[lba * 512:(lba + 1) * 512] == sector, f"disk {d} lba {lba}"
    if iso is not None:
        m = re.search(r"IOSTRESS CD port=\d+ fnv=([0-9a-f]{8})", console)
        assert m and int(m.group(1), 16) == model.cd_checksum(iso.read_bytes())


# --------------------------------------------------------------------------
# every device state class round-trips through its encoding
# --------------------------------------------------------------------------

def _state_classes() -> list[type]:
    """Every @device_state class the device models (and backends) declare."""
    from bhyvepy.registry import load_device_modules

    load_device_modules()
    mods = ["bhyvepy.pci.state", "bhyvepy.dev.virtio.transport", "bhyvepy.vmm.kvm"]
    import bhyvepy.dev as devpkg
    mods += [i.name for i in pkgutil.walk_packages(devpkg.__path__, devpkg.__name__ + ".")]
    found: dict[str, type] = {}
    for name in mods:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module another backend needs
            continue
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if dataclasses.is_dataclass(obj) and hasattr(obj, "__state_spec__"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


STATE_CLASSES = _state_classes()


def _valid(obj) -> bool:
    """Whether ``obj`` and every state nested in it pass their ``validate()``."""
    if isinstance(obj, (list, tuple)):
        return all(_valid(x) for x in obj)
    if not (dataclasses.is_dataclass(obj) and hasattr(obj, "__state_spec__")):
        return True
    if not all(_valid(getattr(obj, f.name)) for f in dataclasses.fields(obj)):
        return False
    validate = getattr(obj, "validate", None)
    try:
        if callable(validate):
            validate()
    except (ValueError, TypeError):
        return False
    return True


def test_state_classes_were_found():
    names = {c.__name__ for c in STATE_CLASSES}
    assert {"UartState", "AtkbdcState", "PmState"} <= names, names


@pytest.mark.parametrize("cls", STATE_CLASSES, ids=lambda c: c.__qualname__)
@settings(max_examples=10, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=hst.data())
def test_state_round_trip(cls, data):
    """decode(encode(x)) is x for a state its class accepts; a state its
    ``validate()`` rejects (the generators know field ranges, not those
    rules) is refused with StateError, never another exception."""
    obj = data.draw(st.strategy(cls))
    raw = st.encode(obj)
    assert st.version_of(raw) == st.spec_of(cls).version
    if _valid(obj):
        back = st.decode(cls, raw)
        assert back == obj
        assert st.encode(back) == raw
    else:
        with pytest.raises(st.StateError):
            st.decode(cls, raw)
    # Every strict prefix is refused, never with another error.
    cut = data.draw(hst.integers(0, len(raw) - 1))
    with pytest.raises(st.StateError):
        st.decode(cls, raw[:cut])
