"""Registry of device emulations, the Python analogue of bhyve's PCI_EMUL_SET.

A device model class registers its emulation name with :func:`pci_emul` (PCI
functions, the ``-s`` option) or :func:`lpc_device` (LPC/ISA devices, the
``-l`` option).  Nothing else keeps a list of devices: the command line's
``-s help`` / ``-l help`` and the VM builder both ask this registry, so adding
a device is one decorated class in one module under ``bhyvepy/dev``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

T = TypeVar("T", bound=type)

_PCI: dict[str, type] = {}
_LPC: dict[str, type] = {}
_loaded = False


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise RuntimeError(f"{kind} emulation {name!r} registered twice")
        table[name] = cls
        cls.emulation = name  # type: ignore[attr-defined]
        return cls

    return deco


def pci_emul(name: str) -> Callable[[T], T]:
    """Class decorator: ``@pci_emul("virtio-blk")`` makes ``-s S,virtio-blk`` build it."""
    return _register(_PCI, "PCI", name)


def lpc_device(name: str) -> Callable[[T], T]:
    """Class decorator for devices configured under ``lpc.<name>`` (``-l name,...``)."""
    return _register(_LPC, "LPC", name)


def load_device_modules() -> None:
    """Import every module under :mod:`bhyvepy.dev` so their decorators run."""
    global _loaded
    if _loaded:
        return
    import bhyvepy.dev as devpkg

    for info in pkgutil.walk_packages(devpkg.__path__, devpkg.__name__ + "."):
        importlib.import_module(info.name)
    _loaded = True


def find_pci_emulation(name: str) -> type | None:
    load_device_modules()
    return _PCI.get(name)


def pci_emulation_names() -> list[str]:
    """Implemented PCI emulations, in registration order (what ``-s help`` prints)."""
    load_device_modules()
    return list(_PCI)


def find_lpc_device(name: str) -> type | None:
    load_device_modules()
    return _LPC.get(name)


def lpc_device_names() -> list[str]:
    load_device_modules()
    return list(_LPC)
