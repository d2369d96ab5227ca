"""Take a checkpoint of a running machine into one snapshot file.

The order is bhyve's (``vm_checkpoint``): everything that can fail without
touching the guest is done first (is every device snapshottable, can the
target directory take a file), then the vCPUs are stopped and the devices
paused (disks drained and flushed, NIC queues stopped), the kernel sections,
the device sections and guest memory are written, and the VM either runs on
(checkpoint) or is left stopped for the caller to end (suspend).

Unlike bhyve, a failed checkpoint never costs the VM or an older snapshot:
every error resumes the guest, and :func:`~bhyvepy.snapshot.fileformat.write_snapshot`
only replaces the target once the new file is complete and on disk.

Memory the guest never touched is not read at all: where the backend can
tell (``MemoryRegion.data_extents()``, KVM's memfd-backed RAM) only its data
extents are scanned for zero pages and written.  Reading untouched shared
guest memory would allocate it, growing the process by the guest's size.

A checkpoint (not a suspend) lets the vCPUs and devices run again as soon as
every byte is in the file, before the fsync and the rename: the flush to
disk can take longer than writing to the page cache, and the copy in the
file can no longer change.  This does not weaken the guarantee above: the
old snapshot is still replaced only by the rename after a successful
fsync, and a failure of either removes the temporary file and raises
:class:`CheckpointError` with the VM running, as every other failure does.
``paused_seconds`` therefore ends at that resume.  A suspend keeps the VM
stopped until the file is on disk, since the VM is about to end and the
requester must not be told "done" for a file that might still be lost.
"""

from __future__ import annotations

import os
import platform
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bhyvepy.snapshot import state as st
from bhyvepy.snapshot.fileformat import MemRegion, Section, write_snapshot
from bhyvepy.snapshot.progress import ProgressBar
from bhyvepy.vmm import KERNEL_SECTIONS

__all__ = [
    "CheckpointError", "CheckpointResult", "checkpoint", "snapshot_metadata",
    "progress_for_terminal", "EMULATIONS_KEY", "KERNEL_SECTION_VERSION",
]

#: Top-level metadata key: device instance name -> emulation name.  The
#: section table of fileformat has no per-record emulation field, so the
#: emulations travel beside it (see restore.recorded_emulation).
EMULATIONS_KEY = "emulations"

#: Version recorded for kernel sections, whose payloads are the backend's own
#: (vmm.ko's are raw kernel structures without a version header).
KERNEL_SECTION_VERSION = 1

#: memflags bits of bhyve's basic metadata (vm_get_memflags).
MEMFLAGS_INCORE = 0x1
MEMFLAGS_WIRED = 0x2

# One checkpoint at a time per process: the VM can only be paused once.
_busy = threading.Lock()


class CheckpointError(Exception):
    """The checkpoint failed; the VM is running again and no file was replaced."""


@dataclass
class CheckpointResult:
    path: str
    metadata: dict
    paused_seconds: float          # vCPUs stopped: pause, save, (resume)
    total_seconds: float
    suspended: bool = False        # VM left stopped; the caller ends it (exit 5)
    sections: list[str] = field(default_factory=list)


def progress_for_terminal(stdin: Any = None, stream: Any = None) -> ProgressBar | None:
    """bhyve draws its progress line only when its stdin is a terminal.

    bhyvepy asks the same of stdin and draws on stderr, and only if stderr
    is a terminal too: stdout may carry a guest console (``com1,stdio``), and
    a redirected stderr (a log file) must not fill with carriage returns.
    """
    stdin = sys.stdin if stdin is None else stdin
    stream = sys.stderr if stream is None else stream
    try:
        if not (stdin.isatty() and stream.isatty()):
            return None
    except (AttributeError, ValueError, OSError):
        return None
    return ProgressBar(stream)


def _unsupported(dev: Any) -> str | None:
    """Why ``dev`` cannot be saved, or None.  bhyve fails such a checkpoint
    with ENOTSUP; a device says so by having no state class, no
    ``save_state``, or a ``snapshot_unsupported`` reason."""
    reason = getattr(dev, "snapshot_unsupported", None)
    if reason:
        return reason if isinstance(reason, str) else "device does not support snapshots"
    if getattr(dev, "state_class", None) is None or not callable(getattr(dev, "save_state", None)):
        return "device does not support snapshots"
    return None


def _memflags(cfg: Any) -> int:
    flags = 0
    if cfg.get_bool("memory.guest_in_core", False):
        flags |= MEMFLAGS_INCORE
    if cfg.get_bool("memory.wired", False):
        flags |= MEMFLAGS_WIRED
    return flags


def snapshot_metadata(m: Any) -> dict:
    """What the snapshot says about the VM beyond its sections and memory."""
    u = platform.uname()
    return {
        "basic metadata": {
            "ncpus": len(m.vcpus),
            "vmname": m.config.get_value("name", None) or getattr(m.vm, "name", ""),
            "memflags": _memflags(m.config),
        },
        "backend": m.vm.backend_name,
        "host": {"hostname": u.node, "system": u.system, "release": u.release,
                 "machine": u.machine, "bhyvepy": _version()},
        "config": m.config.to_dict(),
        EMULATIONS_KEY: {name: emu for name, emu, _ in m.snapshots},
    }


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("bhyvepy")
    except Exception:  # noqa: BLE001 - not installed (source tree)
        return "unknown"


def _probe_directory(path: str, dir_fd: int | None) -> None:
    """Fail before pausing anything if no file can be created beside ``path``."""
    directory, base = os.path.split(path)
    if not base:
        raise CheckpointError(f"Failed to create snapshot file {path!r}: no file name")
    probe = os.path.join(directory, f".{base}.{os.getpid()}.probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as e:
        raise CheckpointError(f"Failed to create snapshot file {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        os.unlink(probe, dir_fd=dir_fd)
    except OSError:
        pass
    try:
        is_dir = stat.S_ISDIR(os.stat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        is_dir = False
    if is_dir:
        raise CheckpointError(f"Failed to create snapshot file {path}: Is a directory")


def checkpoint(m: Any, path: str, *, dir_fd: int | None = None, suspend: bool = False,
               progress: Callable[[int, int], None] | None | bool = True) -> CheckpointResult:
    """Save machine ``m`` to ``path`` (relative to ``dir_fd`` if given).

    On success with ``suspend`` the VM is left stopped (vCPUs parked,
    devices paused) and the caller ends it with exit status 5 once it has
    answered the requester; otherwise the VM runs on.  Every failure raises
    :class:`CheckpointError` with the VM running again.  ``progress`` is a
    ``(done, total)`` callback, True for bhyve's terminal progress line when
    there is a terminal, or None/False for none.
    """
    if not _busy.acquire(blocking=False):
        raise CheckpointError("a checkpoint of this VM is already in progress")
    try:
        return _checkpoint(m, os.fspath(path), dir_fd, suspend, progress)
    finally:
        _busy.release()


def _checkpoint(m: Any, path: str, dir_fd: int | None, suspend: bool,
                progress: Any) -> CheckpointResult:
    t0 = time.monotonic()
    if getattr(m, "exit_status", None) is not None:
        raise CheckpointError("the VM is shutting down")
    bad = [(name, why) for name, _emu, dev in m.snapshots if (why := _unsupported(dev))]
    if bad:
        raise CheckpointError("; ".join(f"Failed to snapshot {name}: {why}" for name, why in bad))
    _probe_directory(path, dir_fd)
    metadata = snapshot_metadata(m)
    bar: Any = progress_for_terminal() if progress is True else (progress or None)

    t_pause = time.monotonic()
    try:
        paused = m.pause()
    except Exception as e:  # noqa: BLE001 - a device that cannot drain its I/O
        m.resume()
        raise CheckpointError(f"Failed to pause the devices: {e}") from None
    if not paused:
        raise CheckpointError("Failed to pause the vCPUs (timed out)")
    keep_stopped = False
    t_resumed: float | None = None

    def resume_once() -> None:
        nonlocal t_resumed
        if t_resumed is None:
            t_resumed = time.monotonic()
            m.resume()

    try:
        if m.exit_status is not None:
            raise CheckpointError("the VM is shutting down")
        kern = _save_kernel_sections(m)
        devs = _save_devices(m)
        memory = [MemRegion(r.gpa, r.buf, _data_extents(r))
                  for r in m.mem.regions if getattr(r, "is_ram", True)]
        try:
            meta = write_snapshot(path, metadata=metadata, kern_structs=kern, devices=devs,
                                  memory=memory, progress=bar, dir_fd=dir_fd,
                                  memory_written=None if suspend else resume_once)
        except OSError as e:
            raise CheckpointError(f"Failed to write snapshot {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise CheckpointError(f"Failed to write snapshot {path}: {e}") from None
        finally:
            if bar is not None and hasattr(bar, "finish"):
                bar.finish()
        keep_stopped = suspend
    finally:
        if not keep_stopped:
            resume_once()
    t_end = time.monotonic()
    return CheckpointResult(path=path, metadata=meta,
                            paused_seconds=(t_resumed or t_end) - t_pause,
                            total_seconds=t_end - t0, suspended=keep_stopped,
                            sections=[s.name for s in (*kern, *devs)])


def _data_extents(region: Any) -> list[tuple[int, int]] | None:
    """The region's data extents if its backend can tell (vCPUs are stopped)."""
    query = getattr(region, "data_extents", None)
    return query() if callable(query) else None


def _save_kernel_sections(m: Any) -> list[Section]:
    out = []
    for name in KERNEL_SECTIONS:
        try:
            payload = m.vm.save_kernel_section(name)
        except Exception as e:  # noqa: BLE001 - the kernel's refusal, reported
            raise CheckpointError(f"Failed to snapshot struct {name}: {e}") from None
        out.append(Section(name, KERNEL_SECTION_VERSION, bytes(payload)))
    return out


def _save_devices(m: Any) -> list[Section]:
    out = []
    for name, _emu, dev in m.snapshots:
        try:
            state = dev.save_state()
            payload = st.encode(state)
            version = st.spec_of(state).version
        except NotImplementedError:
            raise CheckpointError(f"Failed to snapshot {name}: device does not support snapshots") \
                from None
        except Exception as e:  # noqa: BLE001 - any device failure ends the checkpoint
            raise CheckpointError(f"Failed to snapshot {name}: {e}") from None
        out.append(Section(name, version, payload))
    return out
