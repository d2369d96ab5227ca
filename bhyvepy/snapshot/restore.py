"""Restore a machine from a snapshot file: check everything, then apply.

A snapshot is untrusted input.  :func:`check_restore` validates all of it
against the machine just built -- file format and checksums, backend,
vCPU count and memory layout, the device set (names and emulations),
every device section decoded with its state class and checked by the
device, every kernel section checked by the backend -- and only then does
:func:`apply_restore` change anything, in bhyve's order: pause devices,
guest memory, devices, kernel sections, time, resume.  Every refusal is a
:class:`RestoreError`: one line naming what is wrong, exit status 65
(EX_DATAERR, as bhyve uses for snapshot data errors).

Also here: :func:`restore_config`, the config tree a ``bhyvepy -r FILE``
run builds from the snapshot and the command line, and
:func:`inspect_snapshot`, the lenient reader behind ``bhyvepyctl
--snapshot-info`` that reports every section's checksum even when the file
as a whole is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import mmap
import os
import stat
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from bhyvepy.config import ConfigTree, ConfigTreeError
from bhyvepy.errors import BhyveExit, ExitStatus
from bhyvepy.snapshot import state as st
from bhyvepy.snapshot.checkpoint import EMULATIONS_KEY, progress_for_terminal
from bhyvepy.snapshot.fileformat import (FORMAT_VERSION, HEADER, HEADER_SIZE, KINDS, MAGIC,
                                         Snapshot, SnapshotFormatError, read_snapshot)
from bhyvepy.snapshot.registry import parse_upstream_name
from bhyvepy.vmm import KERNEL_SECTIONS

__all__ = [
    "RestoreError", "RestorePlan", "open_snapshot", "restore_config", "check_restore",
    "apply_restore", "restore_machine", "recorded_emulation", "inspect_snapshot",
    "SnapshotReport", "SNAPSHOT_OWNED_KEYS",
]

#: Config values a restore takes from the snapshot whatever the command line
#: says: bhyve reads the vCPU count and memory size from the snapshot.
SNAPSHOT_OWNED_KEYS = ("memory.size", "cpus", "sockets", "cores", "threads")


class RestoreError(BhyveExit):
    """A snapshot that cannot be restored into this VM (nothing was applied)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitStatus.EX_DATAERR)


# --------------------------------------------------------------------------
# opening and the config tree
# --------------------------------------------------------------------------

def open_snapshot(path: str) -> Snapshot:
    """Read and validate the whole file (not yet guest memory contents)."""
    try:
        return read_snapshot(path)
    except SnapshotFormatError as e:
        raise RestoreError(f"Failed to restore from {path}: {e}") from None
    except OSError as e:
        raise RestoreError(f"Failed to open snapshot {path}: {e.strerror or e}") from None


def _pci_node_of(path: str) -> tuple[str, ...] | None:
    parts = path.split(".")
    if len(parts) >= 5 and parts[0] == "pci" and all(p.isdigit() for p in parts[1:4]):
        return tuple(parts[:4])
    return None


def restore_config(snapshot_config: dict, cmdline: ConfigTree, defaults: ConfigTree,
                   warn: Callable[[str], None] | None = None) -> ConfigTree:
    """The config tree of a restored VM: the snapshot's, with host resources
    the command line names explicitly.

    A value counts as given when it differs from what bhyve's defaults put
    in an empty command line.  A PCI function given with ``-s`` (any
    ``pci.B.S.F.*`` value) replaces that function's node as a whole, so a
    disk re-specified as ``-s 3,virtio-blk,new.img`` does not inherit options
    from the snapshot; other values (``-l com1,...``, ``-o ...``, the VM
    name) replace single leaves.  The vCPU count, topology and memory size
    always come from the snapshot.  A device set that no longer matches is
    found later by :func:`check_restore`, with the devices named.
    """
    warn = warn or cmdline.warn
    given = [(p, v) for p, v in cmdline.leaves() if defaults.get_raw(p) != v]
    base = copy.deepcopy(snapshot_config)
    for node in {n for p, _ in given if (n := _pci_node_of(p)) is not None}:
        parent: Any = base
        for name in node[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(node[-1], None)
    try:
        tree = ConfigTree.from_dict(base, warn=cmdline.warn)
    except ConfigTreeError as e:
        raise RestoreError(f"bad configuration in snapshot: {e}") from None
    snap_tree = ConfigTree.from_dict(snapshot_config, warn=cmdline.warn)
    for path, value in given:
        if path in SNAPSHOT_OWNED_KEYS:
            if snap_tree.get_raw(path) != value:
                warn(f"ignoring {path}={value} from the command line: "
                     "the vCPU count and memory size come from the snapshot")
            continue
        tree.set_value(path, value)
    return tree


# --------------------------------------------------------------------------
# checking
# --------------------------------------------------------------------------

@dataclass
class RestorePlan:
    """Everything decoded and checked, ready to apply."""

    snapshot: Snapshot
    devices: list[tuple[str, Any, Any]] = field(default_factory=list)   # name, device, state
    kernel: list[tuple[str, bytes]] = field(default_factory=list)       # name, payload
    ram: list[Any] = field(default_factory=list)                         # MemoryRegion, gpa order


def recorded_emulation(snap: Snapshot, name: str) -> str | None:
    """The emulation the snapshot records for device section ``name``.

    A per-record ``emulation`` field wins if the file has one; otherwise the
    top-level map that :mod:`~bhyvepy.snapshot.checkpoint` writes.
    """
    for rec in snap.metadata.get("devices", ()):
        if isinstance(rec, dict) and rec.get("device") == name and isinstance(rec.get("emulation"), str):
            return rec["emulation"]
    table = snap.metadata.get(EMULATIONS_KEY)
    if isinstance(table, dict):
        emu = table.get(name)
        if emu is None:
            # Upstream spelling in the table, our spelling in the record or vice versa.
            for k, v in table.items():
                if isinstance(k, str) and parse_upstream_name(k) == parse_upstream_name(name):
                    emu = v
                    break
        if isinstance(emu, str):
            return emu
    return None


def _names(names: list[str]) -> str:
    return ", ".join(sorted(names))


def _check_machine(m: Any, snap: Snapshot) -> list[Any]:
    backend = m.vm.backend_name
    if snap.backend != backend:
        raise RestoreError(f"snapshot was taken with the {snap.backend!r} backend, "
                           f"this VM runs on {backend!r}")
    ncpus = snap.basic["ncpus"]
    if ncpus != len(m.vcpus):
        raise RestoreError(f"snapshot has {ncpus} vCPUs, this VM has {len(m.vcpus)}")
    ram = sorted((r for r in m.mem.regions if getattr(r, "is_ram", True)), key=lambda r: r.gpa)
    mine = [(r.gpa, r.size) for r in ram]
    theirs = sorted((r.gpa, r.size) for r in snap.memory)
    if mine != theirs:
        def show(layout: list[tuple[int, int]]) -> str:
            return ", ".join(f"{size >> 20} MiB at {gpa:#x}" for gpa, size in layout) or "none"
        raise RestoreError(f"snapshot memory ({show(theirs)}) does not match this VM's "
                           f"({show(mine)})")
    return ram


def _check_devices(m: Any, snap: Snapshot) -> list[tuple[str, Any, Any]]:
    infos = {parse_upstream_name(i.name): i for i in snap.sections("devices")}
    registered = {name: (emu, dev) for name, emu, dev in m.snapshots}
    missing = [n for n in registered if n not in infos]
    extra = [n for n in infos if n not in registered]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the snapshot: {_names(missing)}")
        if extra:
            parts.append(f"not in this VM: {_names(extra)}")
        raise RestoreError("snapshot devices do not match this VM's devices (" + "; ".join(parts) + ")")
    out = []
    for name, emu, dev in m.snapshots:
        info = infos[name]
        recorded = recorded_emulation(snap, info.name)
        if recorded is None:
            raise RestoreError(f"device section '{name}': the snapshot does not record its emulation")
        if recorded != emu:
            raise RestoreError(f"device section '{name}' is a {recorded!r} device in the snapshot, "
                               f"but a {emu!r} device in this VM")
        payload = snap.section("devices", info.name)
        cls = getattr(dev, "state_class", None)
        if cls is None:
            raise RestoreError(f"device {name} does not support snapshots")
        try:
            if st.version_of(payload) != info.version:
                raise st.StateError(f"state version {st.version_of(payload)} disagrees with the "
                                    f"metadata's {info.version}")
            state = st.decode(cls, payload)
            check = getattr(dev, "validate_state", None)
            if callable(check):
                check(state)
        except (st.StateError, ValueError, TypeError) as e:
            raise RestoreError(f"device section '{name}': {e}") from None
        out.append((name, dev, state))
    return out


def _check_kernel(m: Any, snap: Snapshot) -> list[tuple[str, bytes]]:
    have = [i.name for i in snap.sections("kern_structs")]
    missing = [n for n in KERNEL_SECTIONS if n not in have]
    extra = [n for n in have if n not in KERNEL_SECTIONS]
    if missing:
        raise RestoreError(f"snapshot lacks kernel section(s) {_names(missing)}")
    if extra:
        raise RestoreError(f"snapshot has unknown kernel section(s) {_names(extra)}")
    out = []
    for name in KERNEL_SECTIONS:
        payload = snap.section("kern_structs", name)
        try:
            m.vm.check_kernel_section(name, payload)
        except Exception as e:  # noqa: BLE001 - checking changes nothing; report any refusal
            raise RestoreError(f"kernel section '{name}': {e}") from None
        out.append((name, payload))
    return out


def check_restore(m: Any, snap: Snapshot) -> RestorePlan:
    """Validate ``snap`` against machine ``m`` without changing anything."""
    ram = _check_machine(m, snap)
    devices = _check_devices(m, snap)
    kernel = _check_kernel(m, snap)
    return RestorePlan(snap, devices, kernel, ram)


# --------------------------------------------------------------------------
# applying
# --------------------------------------------------------------------------

def _clear(region: Any) -> bool:
    """Zero a whole RAM region cheaply (drop its pages); False if not possible.

    A fresh VM's RAM is not all zero (the boot ROM's shadow copy is in it),
    and the snapshot's zero pages are holes that loading skips.  Dropping
    the pages zeroes them without touching the untouched ones.
    """
    buf = region.buf
    advice = getattr(mmap, "MADV_REMOVE", None)
    if advice is None or not isinstance(buf, mmap.mmap):
        return False
    try:
        buf.madvise(advice, 0, region.size)
    except OSError:
        return False
    return True


def apply_restore(m: Any, plan: RestorePlan, *, progress: Any = True) -> None:
    """Apply a checked plan: bhyve's order, then re-base guest time."""
    snap = plan.snapshot
    bar = progress_for_terminal() if progress is True else (progress or None)
    if not m.pause():
        raise RestoreError("Failed to pause the VM for the restore")
    try:
        zero = [not _clear(r) for r in plan.ram]
        try:
            snap.load_memory([r.buf for r in plan.ram], zero_holes=any(zero), progress=bar)
        except SnapshotFormatError as e:
            raise RestoreError(f"Failed to restore guest memory: {e}") from None
        finally:
            if bar is not None and hasattr(bar, "finish"):
                bar.finish()
        for name, dev, state in plan.devices:
            try:
                dev.restore_state(state)
            except Exception as e:  # noqa: BLE001 - checked before; report what still fails
                raise RestoreError(f"Failed to restore {name}: {e}") from None
        for name, payload in plan.kernel:
            try:
                m.vm.restore_kernel_section(name, payload)
            except Exception as e:  # noqa: BLE001
                raise RestoreError(f"Failed to restore {name}: {e}") from None
        try:
            m.vm.restore_time()
        except Exception as e:  # noqa: BLE001
            raise BhyveExit(f"Failed to restore time: {e}", ExitStatus.EX_OSERR) from None
    finally:
        m.resume()


def restore_machine(m: Any, snapshot: Snapshot | str, *, progress: Any = True) -> None:
    """Check ``snapshot`` (a path or an opened file) against ``m``, then apply it."""
    snap = open_snapshot(snapshot) if isinstance(snapshot, (str, os.PathLike)) else snapshot
    try:
        plan = check_restore(m, snap)
        apply_restore(m, plan, progress=progress)
    finally:
        if snap is not snapshot:
            snap.close()


# --------------------------------------------------------------------------
# inspection (bhyvepyctl --snapshot-info)
# --------------------------------------------------------------------------

@dataclass
class SectionReport:
    kind: str
    name: str
    emulation: str | None
    version: Any
    size: Any
    status: str          # "ok", "checksum mismatch", "truncated", "bad record"


@dataclass
class MemoryReport:
    gpa: int
    size: int
    data_bytes: int
    status: str


@dataclass
class SnapshotReport:
    path: str
    verdict: str | None = None               # None: valid; else why the file is refused
    format: int | None = None
    metadata: dict | None = None
    sections: list[SectionReport] = field(default_factory=list)
    memory: list[MemoryReport] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.verdict is None


# The header layout documented in fileformat's module docstring.
_HEADER = HEADER


def _read_at(fd: int, n: int, off: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, min(n - len(out), 8 << 20), off + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def inspect_snapshot(path: str, *, verify_memory: bool = True) -> SnapshotReport:
    """Everything that can be said about a snapshot file, even a damaged one.

    The verdict is :func:`read_snapshot`'s (plus the memory checksums);
    the per-section statuses come from reading each section on its own, so
    a flipped byte is reported against the section it is in.
    """
    rep = SnapshotReport(path)
    try:
        read_snapshot(path).close()
    except SnapshotFormatError as e:
        rep.verdict = str(e)
    except OSError as e:
        rep.verdict = f"cannot open: {e.strerror or e}"
        return rep
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        rep.verdict = f"cannot open: {e.strerror or e}"
        return rep
    try:
        _inspect(fd, rep, verify_memory)
    finally:
        os.close(fd)
    return rep


def _inspect(fd: int, rep: SnapshotReport, verify_memory: bool) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return
    size = os.fstat(fd).st_size
    head = _read_at(fd, HEADER_SIZE, 0)
    if len(head) < HEADER_SIZE or head[:len(MAGIC)] != MAGIC:
        return
    (_, version, _, meta_off, meta_len, sec_off, _sec_len, mem_off, _mem_len, _fsize,
     meta_sha, _) = _HEADER.unpack(head)
    rep.format = version
    if version != FORMAT_VERSION or meta_len > 512 << 20 or meta_off + meta_len > size:
        return
    raw = _read_at(fd, meta_len, meta_off)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    if not isinstance(meta, dict):
        return
    rep.metadata = meta
    meta_ok = hashlib.sha256(raw).digest() == meta_sha
    emulations = meta.get(EMULATIONS_KEY) if isinstance(meta.get(EMULATIONS_KEY), dict) else {}
    for kind in KINDS:
        records = meta.get(kind)
        for rec in records if isinstance(records, list) else ():
            if not isinstance(rec, dict):
                rep.sections.append(SectionReport(kind, "?", None, None, None, "bad record"))
                continue
            name = rec.get("device") if isinstance(rec.get("device"), str) else "?"
            emu = rec.get("emulation", emulations.get(name)) if kind == "devices" else None
            n, off, ck = rec.get("size"), rec.get("file_offset"), rec.get("checksum")
            if not (isinstance(n, int) and isinstance(off, int) and isinstance(ck, str)
                    and n >= 0 and off >= 0):
                status = "bad record"
            else:
                data = _read_at(fd, n, sec_off + off)
                if len(data) < n:
                    status = "truncated"
                elif "sha256:" + hashlib.sha256(data).hexdigest() == ck:
                    status = "ok" if meta_ok else "ok (metadata checksum mismatch)"
                else:
                    status = "checksum mismatch"
            rep.sections.append(SectionReport(kind, name, emu if isinstance(emu, str) else None,
                                              rec.get("version"), n, status))
    regions = meta.get("memory")
    for rec in regions if isinstance(regions, list) else ():
        try:
            gpa, rsize, foff = int(rec["gpa"]), int(rec["size"]), int(rec["file_offset"])
            extents = [(int(a), int(b)) for a, b in rec["extents"]]
            ck = str(rec["checksum"])
        except (KeyError, TypeError, ValueError):
            rep.memory.append(MemoryReport(0, 0, 0, "bad record"))
            continue
        data_bytes = sum(b for _, b in extents)
        status = "not verified"
        if verify_memory:
            crc, status = 0, "ok"
            for off, length in extents:
                pos = 0
                while pos < length:
                    chunk = os.pread(fd, min(length - pos, 8 << 20), mem_off + foff + off + pos)
                    if not chunk:
                        status = "truncated"
                        break
                    crc = zlib.crc32(chunk, crc)
                    pos += len(chunk)
                if status != "ok":
                    break
            if status == "ok" and f"crc32:{crc:08x}" != ck:
                status = "checksum mismatch"
        rep.memory.append(MemoryReport(gpa, rsize, data_bytes, status))
    if verify_memory and rep.verdict is None:
        bad = [r for r in rep.memory if r.status != "ok"]
        if bad:
            rep.verdict = f"{bad[0].status} in memory region at gpa {bad[0].gpa:#x}"
