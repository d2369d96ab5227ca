"""Checkpoint and restore against real machines built in this process on KVM.

A machine with two of several device types (COM1/COM2, two virtio-blk, two
virtio-rnd) is checkpointed by the real checkpoint code; the file, and
damaged or doctored copies of it, are then restored into freshly built
machines.  Every bad input must be refused with a message naming what is
wrong, exit status 65, and the target machine left exactly as it was.
Also: checkpoints that fail (unsnapshottable device, kernel refusal,
ENOSPC, unwritable directory) leave the VM running and an older file
intact, and the config tree a ``-r`` run builds.  No vCPU runs here: the
guest tests in tests/integration/test_snapshot.py do that.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bhyvepy.cli import parse_args, resolve_settings
from bhyvepy.config import ConfigTree
from bhyvepy.errors import ExitStatus
from bhyvepy.snapshot import state as st
from bhyvepy.snapshot.checkpoint import (EMULATIONS_KEY, CheckpointError, checkpoint,
                                         progress_for_terminal)
from bhyvepy.snapshot.fileformat import (HEADER_SIZE, MemRegion, Section, read_snapshot,
                                         write_snapshot)
from bhyvepy.snapshot.restore import (RestoreError, inspect_snapshot, restore_config,
                                      restore_machine)
from bhyvepy.vmm import KERNEL_SECTIONS

REPO = Path(__file__).resolve().parents[2]
ROM = REPO / "tests" / "guests" / "out" / "hello.rom"


def _kvm_ok() -> tuple[bool, str]:
    try:
        from bhyvepy.vmm.kvm import KvmBackend
    except Exception as e:  # noqa: BLE001
        return False, f"KVM backend does not import: {e}"
    return KvmBackend.available()


needs_kvm = pytest.mark.skipif(not _kvm_ok()[0], reason=f"needs KVM: {_kvm_ok()[1]}")


# --------------------------------------------------------------------------
# machines
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("snapchk")
    if not ROM.exists():
        subprocess.run(["make", "-s", "-C", str(ROM.parent.parent)], check=True)
    shutil.copy(ROM, d / "rom")       # a private copy: other builds may replace out/
    for name in ("a.img", "b.img"):
        with open(d / name, "wb") as f:
            f.truncate(1 << 20)
    for name in ("com1.log", "com2.log"):
        (d / name).touch()
    return d


def machine_args(d: Path, *extra: str, name: str = "chk") -> list[str]:
    return ["-c", "2", "-m", "64M", "-l", f"bootrom,{d / 'rom'}",
            "-l", f"com1,{d / 'com1.log'}", "-l", f"com2,{d / 'com2.log'}",
            "-s", "0,hostbridge", "-s", "31,lpc",
            "-s", f"3,virtio-blk,{d / 'a.img'}", "-s", f"4,virtio-blk,{d / 'b.img'}",
            "-s", "5,virtio-rnd", "-s", "6,virtio-rnd", "-o", f"rundir={d / 'run'}",
            *extra, name]


@pytest.fixture
def build(workdir):
    from bhyvepy.vm import build_machine

    made = []

    def make(*extra: str):
        p = parse_args(machine_args(workdir, *extra))
        m = build_machine(p.config, resolve_settings(p.config))
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
        m.vm.destroy()


MARK_GPA = 0x300000


@pytest.fixture(scope="module")
def good(workdir):
    """A snapshot written by the checkpoint code from a real machine."""
    if not _kvm_ok()[0]:
        pytest.skip(f"needs KVM: {_kvm_ok()[1]}")
    from bhyvepy.vm import build_machine

    p = parse_args(machine_args(workdir))
    m = build_machine(p.config, resolve_settings(p.config))
    try:
        m.mem.write(0x200000, b"snapshot memory " * 256)
        path = workdir / "good.snap"
        checkpoint(m, str(path), progress=None)
    finally:
        m.close()
        m.vm.destroy()
    return path


STABLE_KERNEL = ("vioapic", "vlapic", "vatpic")


def fingerprint(m) -> tuple:
    """What a restore would change: memory, device states, kernel state that
    does not move with time, and whether the VM was left paused."""
    mem = hashlib.sha256(m.mem.read(0, 4 << 20)).hexdigest()
    devs = [st.encode(dev.save_state()) for _, _, dev in m.snapshots]
    kern = [m.vm.save_kernel_section(n) for n in STABLE_KERNEL]
    return mem, devs, kern, m.gate._pause_requested


def refused(m, path, *expected: str) -> RestoreError:
    m.mem.write(MARK_GPA, b"TARGET MACHINE")
    before = fingerprint(m)
    with pytest.raises(RestoreError) as ei:
        restore_machine(m, str(path), progress=None)
    assert ei.value.status == ExitStatus.EX_DATAERR == 65
    for text in expected:
        assert text in ei.value.message, ei.value.message
    assert fingerprint(m) == before, "state was changed by a refused restore"
    assert m.mem.read(MARK_GPA, 14) == b"TARGET MACHINE"
    return ei.value


# --------------------------------------------------------------------------
# doctored files
# --------------------------------------------------------------------------

def rewrite(src: Path, dst: Path, *, meta=None, devices=None, kern=None) -> Path:
    """Copy a snapshot through the file format, changing what the callbacks change."""
    snap = read_snapshot(str(src))
    try:
        k = [Section(i.name, i.version, snap.section("kern_structs", i.name))
             for i in snap.sections("kern_structs")]
        d = [Section(i.name, i.version, snap.section("devices", i.name))
             for i in snap.sections("devices")]
        bufs = [bytearray(r.size) for r in snap.memory]
        snap.load_memory(bufs)
        md = {key: v for key, v in snap.metadata.items()
              if key not in ("kern_structs", "devices", "memory", "format")}
        regions = [MemRegion(r.gpa, b) for r, b in zip(snap.memory, bufs)]
    finally:
        snap.close()
    if meta:
        meta(md)
    if devices:
        d = devices(d)
    if kern:
        k = kern(k)
    write_snapshot(str(dst), metadata=md, kern_structs=k, devices=d, memory=regions)
    return dst


def byte_at(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1)[0]


def patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    """A copy of ``src`` (holes kept: cp --sparse) with ``data`` at ``offset``."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


def flipped(src: Path, dst: Path, offset: int, mask: int) -> Path:
    return patched(src, dst, offset, bytes([byte_at(src, offset) ^ mask]))


def section_offset(path: Path, kind: str, name: str) -> int:
    with open(path, "rb") as f:
        sec_off = struct.unpack_from("<Q", f.read(HEADER_SIZE), 40)[0]
    with read_snapshot(str(path)) as snap:
        return sec_off + snap.section_info(kind, name).file_offset


# --------------------------------------------------------------------------
# tests: the good file
# --------------------------------------------------------------------------

@needs_kvm
def test_checkpoint_records_every_instance_and_kernel_section(good):
    with read_snapshot(str(good)) as snap:
        names = [i.name for i in snap.sections("devices")]
        assert names == ["pm", "atkbdc", "uart-com1", "uart-com2", "hostbridge-pci-0-0-0",
                         "virtio-blk-pci-0-3-0", "virtio-blk-pci-0-4-0",
                         "virtio-rnd-pci-0-5-0", "virtio-rnd-pci-0-6-0", "lpc-pci-0-31-0"]
        assert [i.name for i in snap.sections("kern_structs")] == list(KERNEL_SECTIONS)
        assert snap.metadata[EMULATIONS_KEY]["virtio-blk-pci-0-4-0"] == "virtio-blk"
        assert snap.metadata[EMULATIONS_KEY]["uart-com2"] == "uart"
        assert snap.basic["ncpus"] == 2 and snap.basic["vmname"] == "chk"
        assert snap.basic["memsize"] == 64 << 20
        assert snap.backend == "kvm"
        tree = ConfigTree.from_dict(snap.config)
        assert tree.get_value("pci.0.4.0.device") == "virtio-blk"
        assert tree.get_value("name") == "chk"
        # Zero pages are holes: only the pages the boot ROM shadow and the
        # test wrote hold data.
        assert sum(r.data_bytes for r in snap.memory) < 1 << 20
        for info in snap.sections("devices"):
            assert st.version_of(snap.section("devices", info.name)) == info.version


@needs_kvm
def test_good_snapshot_restores_memory_and_devices(build, good):
    m = build()
    m.mem.write(MARK_GPA, b"TARGET MACHINE")
    restore_machine(m, str(good), progress=None)
    assert m.mem.read(0x200000, 16) == b"snapshot memory "
    assert m.mem.read(MARK_GPA, 14) == bytes(14), "a hole in the snapshot must read as zero"
    assert not m.gate._pause_requested
    with read_snapshot(str(good)) as snap:
        for name, _, dev in m.snapshots:
            assert st.encode(dev.save_state()) == snap.section("devices", name), name


# --------------------------------------------------------------------------
# tests: bad files, each refused before anything is applied
# --------------------------------------------------------------------------

@needs_kvm
def test_truncated_file_is_refused(build, good, tmp_path):
    bad = patched(good, tmp_path / "trunc", 0, b"")
    os.truncate(bad, good.stat().st_size // 2)
    refused(build(), bad, "truncated")


@needs_kvm
def test_flipped_byte_in_metadata_is_refused(build, good, tmp_path):
    bad = flipped(good, tmp_path / "meta", HEADER_SIZE + 40, 0x20)
    refused(build(), bad, "checksum mismatch in snapshot metadata")


@needs_kvm
def test_flipped_byte_in_a_device_section_is_refused(build, good, tmp_path):
    off = section_offset(good, "devices", "uart-com2") + 3
    bad = flipped(good, tmp_path / "sec", off, 0x01)
    refused(build(), bad, "checksum mismatch in section 'uart-com2'")


@needs_kvm
def test_flipped_byte_in_a_kernel_section_is_refused(build, good, tmp_path):
    off = section_offset(good, "kern_structs", "vlapic") + 100
    bad = flipped(good, tmp_path / "ksec", off, 0x80)
    refused(build(), bad, "checksum mismatch in section 'vlapic'")


@needs_kvm
def test_wrong_format_version_is_refused(build, good, tmp_path):
    bad = patched(good, tmp_path / "v2", 16, struct.pack("<I", 2))
    refused(build(), bad, "unsupported snapshot format version 2")


@needs_kvm
def test_snapshot_from_another_backend_is_refused(build, good, tmp_path):
    def other(md):
        md["backend"] = "vmm"
    bad = rewrite(good, tmp_path / "vmm", meta=other)
    refused(build(), bad, "'vmm' backend", "'kvm'")


@needs_kvm
def test_missing_device_section_is_refused_by_name(build, good, tmp_path):
    bad = rewrite(good, tmp_path / "missing",
                  devices=lambda d: [s for s in d if s.name != "virtio-blk-pci-0-4-0"])
    e = refused(build(), bad, "missing from the snapshot: virtio-blk-pci-0-4-0")
    assert "not in this VM" not in e.message


@needs_kvm
def test_extra_device_section_is_refused_by_name(build, good, tmp_path):
    def extra(d):
        twin = next(s for s in d if s.name == "virtio-rnd-pci-0-6-0")
        return d + [Section("virtio-rnd-pci-0-7-0", twin.version, twin.payload)]

    def emu(md):
        md[EMULATIONS_KEY]["virtio-rnd-pci-0-7-0"] = "virtio-rnd"

    bad = rewrite(good, tmp_path / "extra", devices=extra, meta=emu)
    refused(build(), bad, "not in this VM: virtio-rnd-pci-0-7-0")


@needs_kvm
def test_device_set_difference_names_both_sides(build, good):
    # The VM has a third virtio-rnd the snapshot lacks, and lacks nothing:
    m = build("-s", "7,virtio-rnd")
    refused(m, good, "missing from the snapshot: virtio-rnd-pci-0-7-0")


@needs_kvm
def test_right_name_wrong_emulation_is_refused(build, good, tmp_path):
    def lie(md):
        md[EMULATIONS_KEY]["uart-com2"] = "virtio-rnd"
    bad = rewrite(good, tmp_path / "emu", meta=lie)
    refused(build(), bad, "'uart-com2' is a 'virtio-rnd' device in the snapshot",
            "'uart' device in this VM")


@needs_kvm
def test_section_of_another_device_type_under_a_name_is_refused(build, good, tmp_path):
    # Same name and recorded emulation, but the payload is virtio-rnd state:
    # decoding it as a UART state fails, before anything is applied.
    def swap(d):
        rnd = next(s for s in d if s.name == "virtio-rnd-pci-0-5-0")
        return [Section(s.name, rnd.version, rnd.payload) if s.name == "uart-com1" else s
                for s in d]
    bad = rewrite(good, tmp_path / "swap", devices=swap)
    refused(build(), bad, "device section 'uart-com1'")


@needs_kvm
def test_device_state_that_does_not_fit_the_device_is_refused(build, good, tmp_path):
    # virtio-blk state restored into a virtio-rnd slot: decodes as neither.
    def swap(d):
        blk = next(s for s in d if s.name == "virtio-blk-pci-0-3-0")
        return [Section(s.name, blk.version, blk.payload) if s.name == "virtio-rnd-pci-0-6-0"
                else s for s in d]
    bad = rewrite(good, tmp_path / "fit", devices=swap)
    refused(build(), bad, "device section 'virtio-rnd-pci-0-6-0'")


@needs_kvm
def test_missing_kernel_section_is_refused(build, good, tmp_path):
    bad = rewrite(good, tmp_path / "nokern", kern=lambda k: [s for s in k if s.name != "vmcx"])
    refused(build(), bad, "lacks kernel section(s) vmcx")


@needs_kvm
def test_kernel_section_the_backend_rejects_is_refused(build, good, tmp_path):
    def garbage(k):
        return [Section(s.name, s.version, b"\x01\x00\x00\x00junk") if s.name == "vlapic" else s
                for s in k]
    bad = rewrite(good, tmp_path / "kjunk", kern=garbage)
    refused(build(), bad, "kernel section 'vlapic'")


@needs_kvm
def test_vcpu_count_mismatch_is_refused(build, good, tmp_path):
    def more(md):
        md["basic metadata"]["ncpus"] = 3
    bad = rewrite(good, tmp_path / "ncpus", meta=more)
    refused(build(), bad, "snapshot has 3 vCPUs, this VM has 2")


@needs_kvm
def test_memory_size_mismatch_is_refused(build, good):
    refused(build("-m", "32M"), good, "snapshot memory (64 MiB at 0x0)", "(32 MiB at 0x0)")


@needs_kvm
def test_missing_emulation_record_is_refused(build, good, tmp_path):
    def drop(md):
        del md[EMULATIONS_KEY]["pm"]
    bad = rewrite(good, tmp_path / "noemu", meta=drop)
    refused(build(), bad, "'pm': the snapshot does not record its emulation")


@needs_kvm
def test_bhyvepy_r_with_a_bad_file_exits_65(good, tmp_path):
    bad = patched(good, tmp_path / "trunc", 0, b"")
    os.truncate(bad, 5000)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "bhyvepy", "-r", str(bad)], env=env,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 65, p.stderr
    assert "truncated" in p.stderr and "Traceback" not in p.stderr


@needs_kvm
def test_bhyvepy_r_with_a_different_device_set_exits_65(good, workdir):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "bhyvepy", "-r", str(good), "-s", "9,virtio-rnd"],
                       env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 65, p.stderr
    assert "missing from the snapshot: virtio-rnd-pci-0-9-0" in p.stderr


@needs_kvm
def test_inspect_reports_the_damaged_section(good, tmp_path):
    off = section_offset(good, "devices", "virtio-blk-pci-0-4-0") + 10
    bad = flipped(good, tmp_path / "insp", off, 0xFF)
    rep = inspect_snapshot(str(bad))
    assert not rep.valid and "virtio-blk-pci-0-4-0" in rep.verdict
    status = {s.name: s.status for s in rep.sections}
    assert status["virtio-blk-pci-0-4-0"] == "checksum mismatch"
    assert all(v == "ok" for k, v in status.items() if k != "virtio-blk-pci-0-4-0")
    assert inspect_snapshot(str(good)).valid


# --------------------------------------------------------------------------
# tests: failing checkpoints leave the VM running and older files intact
# --------------------------------------------------------------------------

@st.device_state("test-counter", version=1)
@dataclass
class _CounterState:
    n: st.U32 = 0


class _Probe:
    """A device that records the checkpoint's calls."""

    state_class = _CounterState

    def __init__(self, log: list, fail: Exception | None = None) -> None:
        self.log, self.fail = log, fail

    def pause(self) -> None:
        self.log.append("pause")

    def resume(self) -> None:
        self.log.append("resume")

    def save_state(self):
        self.log.append("save")
        if self.fail:
            raise self.fail
        return _CounterState(7)

    def restore_state(self, s) -> None:
        self.log.append(("restore", s.n))


def _with_probe(m, log, fail=None) -> _Probe:
    probe = _Probe(log, fail)
    m.snapshots.register("probe", "test-counter", probe)
    m.devices.append(probe)
    return probe


@needs_kvm
def test_checkpoint_order_pause_save_resume(build, tmp_path):
    m = build()
    log: list = []
    _with_probe(m, log)
    r = checkpoint(m, str(tmp_path / "s"), progress=None)
    assert log == ["pause", "save", "resume"]
    assert not r.suspended and not m.gate._pause_requested
    assert "probe" in r.sections and "vmcx" in r.sections


@needs_kvm
def test_suspend_leaves_the_vm_stopped_for_the_caller(build, tmp_path):
    m = build()
    log: list = []
    _with_probe(m, log)
    r = checkpoint(m, str(tmp_path / "s"), suspend=True, progress=None)
    assert r.suspended and log == ["pause", "save"] and m.gate._pause_requested
    assert m.exit_status is None          # the control server ends it after answering
    m.resume()


def _older(tmp_path: Path) -> tuple[Path, bytes]:
    old = tmp_path / "snap"
    old.write_bytes(b"an older snapshot")
    return old, old.read_bytes()


def _no_temp_files(d: Path) -> None:
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []


@needs_kvm
def test_unsnapshottable_device_fails_cleanly_naming_it(build, tmp_path):
    m = build()
    log: list = []
    probe = _with_probe(m, log)
    probe.state_class = None
    old, content = _older(tmp_path)
    with pytest.raises(CheckpointError, match="Failed to snapshot probe: device does not support"):
        checkpoint(m, str(old), progress=None)
    assert log == [] and not m.gate._pause_requested   # refused before pausing
    assert old.read_bytes() == content
    _no_temp_files(tmp_path)


@needs_kvm
def test_device_failing_to_save_resumes_the_vm(build, tmp_path):
    m = build()
    log: list = []
    _with_probe(m, log, fail=RuntimeError("queue busy"))
    old, content = _older(tmp_path)
    with pytest.raises(CheckpointError, match="Failed to snapshot probe: queue busy"):
        checkpoint(m, str(old), progress=None)
    assert log == ["pause", "save", "resume"] and not m.gate._pause_requested
    assert old.read_bytes() == content
    _no_temp_files(tmp_path)


@needs_kvm
def test_device_failing_to_pause_resumes_the_vm(build, tmp_path, monkeypatch):
    m = build()
    log: list = []
    probe = _with_probe(m, log)

    def stuck() -> None:
        log.append("pause")
        raise OSError(errno.EIO, "flush failed")

    monkeypatch.setattr(probe, "pause", stuck)
    old, content = _older(tmp_path)
    with pytest.raises(CheckpointError, match="Failed to pause the devices: .*flush failed"):
        checkpoint(m, str(old), progress=None)
    assert log == ["pause", "resume"] and not m.gate._pause_requested
    assert old.read_bytes() == content


@needs_kvm
def test_kernel_refusing_a_section_resumes_the_vm(build, tmp_path, monkeypatch):
    m = build()
    log: list = []
    _with_probe(m, log)
    real = m.vm.save_kernel_section

    def refuse(name):
        if name == "vlapic":
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
        return real(name)

    monkeypatch.setattr(m.vm, "save_kernel_section", refuse)
    old, content = _older(tmp_path)
    with pytest.raises(CheckpointError, match="Failed to snapshot struct vlapic"):
        checkpoint(m, str(old), progress=None)
    assert log == ["pause", "resume"] and not m.gate._pause_requested
    assert old.read_bytes() == content


@needs_kvm
def test_enospc_while_writing_keeps_the_older_file(build, tmp_path, monkeypatch):
    m = build()
    old, content = _older(tmp_path)
    real = os.pwrite
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        checkpoint(m, str(old), progress=None)
    monkeypatch.undo()
    assert calls and old.read_bytes() == content and not m.gate._pause_requested
    _no_temp_files(tmp_path)


@needs_kvm
def test_unwritable_directory_fails_before_pausing(build):
    m = build()
    log: list = []
    _with_probe(m, log)
    with pytest.raises(CheckpointError, match="Failed to create snapshot file /sys/snap"):
        checkpoint(m, "/sys/snap", progress=None)
    assert log == []


@needs_kvm
def test_directory_as_target_fails_cleanly(build, tmp_path):
    m = build()
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="Is a directory"):
        checkpoint(m, str(tmp_path / "d"), progress=None)


@needs_kvm
def test_checkpoint_relative_to_a_directory_descriptor(build, tmp_path):
    m = build()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        checkpoint(m, "viafd", dir_fd=fd, progress=None)
    finally:
        os.close(fd)
    with read_snapshot(str(tmp_path / "viafd")) as snap:
        assert snap.basic["vmname"] == "chk"


class _Tty:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        pass

    def flush(self) -> None:
        pass


def test_progress_bar_only_when_stdin_and_stderr_are_terminals():
    assert progress_for_terminal(_Tty(True), _Tty(True)) is not None
    assert progress_for_terminal(_Tty(False), _Tty(True)) is None
    assert progress_for_terminal(_Tty(True), _Tty(False)) is None
    assert progress_for_terminal(object(), _Tty(True)) is None


# --------------------------------------------------------------------------
# the config tree of `bhyvepy -r FILE [options]`
# --------------------------------------------------------------------------

SNAP_CONFIG = {
    "name": "vm1", "cpus": "2", "memory": {"size": "64M"},
    "lpc": {"com1": {"path": "/dev/nmdm0A"}, "bootrom": "/old/rom"},
    "pci": {"0": {"0": {"0": {"device": "hostbridge"}},
                  "3": {"0": {"device": "virtio-blk", "path": "/old/a.img", "ro": "true"}},
                  "4": {"0": {"device": "virtio-net", "backend": "tap0"}}}},
}


def _defaults() -> ConfigTree:
    return parse_args(["-r", "x"]).config


def _merge(*argv: str) -> tuple[ConfigTree, list[str]]:
    warnings: list[str] = []
    tree = restore_config(SNAP_CONFIG, parse_args(["-r", "x", *argv]).config, _defaults(),
                          warn=warnings.append)
    return tree, warnings


def test_restore_config_alone_is_the_snapshots():
    tree, warnings = _merge()
    assert tree.get_value("name") == "vm1"
    assert tree.get_value("pci.0.3.0.path") == "/old/a.img"
    assert tree.get_value("memory.size") == "64M" and tree.get_value("cpus") == "2"
    assert resolve_settings(tree).ncpus == 2 and resolve_settings(tree).memsize == 64 << 20
    assert warnings == []


def test_restore_config_overrides_host_resources():
    tree, _ = _merge("-s", "3,virtio-blk,/new/a.img", "-l", "com1,/dev/nmdm1A",
                     "-l", "bootrom,/new/rom", "newname")
    assert tree.get_value("pci.0.3.0.path") == "/new/a.img"
    # a re-specified function replaces the whole node: "ro" is not inherited
    assert tree.get_value("pci.0.3.0.ro") is None
    assert tree.get_value("pci.0.4.0.backend") == "tap0"      # untouched
    assert tree.get_value("lpc.com1.path") == "/dev/nmdm1A"
    assert tree.get_value("lpc.bootrom") == "/new/rom"
    assert tree.get_value("name") == "newname"


def test_restore_config_keeps_vcpus_and_memory_from_the_snapshot():
    tree, warnings = _merge("-m", "1G", "-c", "4")
    assert tree.get_value("memory.size") == "64M" and tree.get_value("cpus") == "2"
    assert any("memory.size=1G" in w for w in warnings)
    assert any("cpus=4" in w for w in warnings)


def test_restore_config_lets_a_new_device_through_for_the_device_check():
    tree, _ = _merge("-s", "5,virtio-rnd")
    assert tree.get_value("pci.0.5.0.device") == "virtio-rnd"


def test_restore_config_rejects_a_bad_tree():
    with pytest.raises(RestoreError, match="bad configuration in snapshot"):
        restore_config({"pci": 5}, parse_args(["-r", "x"]).config, _defaults())
