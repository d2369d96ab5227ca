"""Instance registry for snapshots: every stateful device under a unique name.

Upstream bhyve once keyed snapshot records by emulation name, so two
virtio-blk disks collapsed into one record.  Here each device *instance*
registers under a name derived from where it sits (``virtio-blk-pci-0-3-1``)
or a fixed name for singletons (``atkbdc``, ``uart-com1``), and registering a
name twice is a start-up error, never a silent overwrite.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable


class DuplicateDeviceName(Exception):
    pass


@runtime_checkable
class Snapshottable(Protocol):
    """What a device offers the checkpoint code.

    ``state_class`` is its ``@device_state`` dataclass; ``save_state`` returns
    an instance (plain data, no live handles); ``restore_state`` receives an
    already-decoded and validated instance.  ``pause``/``resume`` bracket a
    checkpoint: pause drains in-flight I/O.
    """

    state_class: type

    def save_state(self) -> Any: ...
    def restore_state(self, state: Any) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...


def pci_instance_name(emulation: str, bus: int, slot: int, func: int) -> str:
    """``virtio-blk-pci-0-3-1``: the name of a PCI function's snapshot record."""
    return f"{emulation}-pci-{bus}-{slot}-{func}"


def parse_upstream_name(name: str) -> str:
    """Read upstream bhyve 14's spelling ``virtio-blk@pci.0.3.1`` as ours."""
    if "@pci." in name:
        emu, _, where = name.partition("@pci.")
        parts = where.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return pci_instance_name(emu, *(int(p) for p in parts))
    return name


class SnapshotRegistry:
    """Ordered name -> (emulation, device) map; order is save and restore order."""

    def __init__(self) -> None:
        self._devs: dict[str, tuple[str, Any]] = {}

    def register(self, name: str, emulation: str, dev: Any) -> None:
        if name in self._devs:
            raise DuplicateDeviceName(f"snapshot device name {name!r} registered twice")
        self._devs[name] = (emulation, dev)

    def __iter__(self) -> Iterator[tuple[str, str, Any]]:
        for name, (emu, dev) in self._devs.items():
            yield name, emu, dev

    def __len__(self) -> int:
        return len(self._devs)

    def __contains__(self, name: str) -> bool:
        return name in self._devs

    def get(self, name: str) -> tuple[str, Any]:
        return self._devs[name]

    def names(self) -> list[str]:
        return list(self._devs)
