"""The part of a snapshot every PCI function shares (bhyve's
``pci_snapshot_pci_dev``), declared once for all device models.

A device's own state class extends :class:`PciDeviceState`, which holds
this common part in its ``pci`` field, and declares only its own fields::

    @device_state("virtio-blk", version=1)
    @dataclass
    class VirtioBlkState(PciDeviceState):
        features: U64 = 0

The checks here are the ones that need no device: types, ranges, lengths.
Whether the state fits the device it is restored into (same BARs, same
table size, same IDs) is checked by
:meth:`bhyvepy.pci.device.PciFunction.validate_state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from bhyvepy.pci.bars import BarKind
from bhyvepy.pci.config_space import EXT_SIZE, PCI_NUM_BARS
from bhyvepy.pci.msi import MAX_MSIX_ENTRIES, pba_size
from bhyvepy.snapshot.state import (BOOL, U8, U32, U64, Blob, ListOf, Nested, StateError,
                                    device_state)

INTX_IDLE, INTX_ASSERTED, INTX_PENDING = 0, 1, 2


@device_state("pci-bar", version=1)
@dataclass
class BarState:
    kind: U8 = 0
    size: U64 = 0
    addr: U64 = 0

    def validate(self) -> None:
        if self.kind not in tuple(BarKind):
            raise StateError(f"unknown BAR type {self.kind}")
        if self.size & (self.size - 1):
            raise StateError(f"BAR size {self.size:#x} is not a power of two")
        if self.size and self.addr % self.size:
            raise StateError(f"BAR address {self.addr:#x} not aligned to its size {self.size:#x}")

    @staticmethod
    def hypothesis_strategy():  # type: ignore[no-untyped-def]
        from hypothesis import strategies as st

        return st.builds(lambda k, shift, n: BarState(k, 1 << shift if shift < 64 else 0,
                                                      (n << shift) & (2**64 - 1) if shift < 64 else 0),
                         st.sampled_from([int(k) for k in BarKind]), st.integers(2, 64),
                         st.integers(0, 2**20))


@device_state("pci-msi", version=1)
@dataclass
class MsiState:
    enabled: BOOL = False
    addr: U64 = 0
    data: U32 = 0
    maxmsgnum: U8 = 0

    def validate(self) -> None:
        if self.maxmsgnum not in (0, 1, 2, 4, 8, 16, 32, 64, 128):
            raise StateError(f"MSI message count {self.maxmsgnum} invalid")

    @staticmethod
    def hypothesis_strategy():  # type: ignore[no-untyped-def]
        from hypothesis import strategies as st

        return st.builds(MsiState, st.booleans(), st.integers(0, 2**64 - 1),
                         st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 4, 8, 16, 32]))


@device_state("pci-msix-entry", version=1)
@dataclass
class MsixEntryState:
    addr: U64 = 0
    data: U32 = 0
    vector_control: U32 = 1


@device_state("pci-msix", version=1)
@dataclass
class MsixState:
    enabled: BOOL = False
    function_mask: BOOL = False
    table: Annotated[list, ListOf(Nested(cls=MsixEntryState), max_len=MAX_MSIX_ENTRIES)] = \
        field(default_factory=list)
    pba: Annotated[bytes, Blob(max_len=pba_size(MAX_MSIX_ENTRIES))] = b""

    def validate(self) -> None:
        expected = pba_size(len(self.table)) if self.table else 0
        if len(self.pba) != expected:
            raise StateError(f"MSI-X PBA of {len(self.pba)} bytes for {len(self.table)} vectors")

    @staticmethod
    def hypothesis_strategy():  # type: ignore[no-untyped-def]
        from hypothesis import strategies as st

        from bhyvepy.snapshot.state import strategy

        def build(enabled: bool, fmask: bool, table: list, seed: bytes) -> "MsixState":
            n = pba_size(len(table)) if table else 0
            return MsixState(enabled, fmask, table, (seed * n)[:n] if seed else bytes(n))

        return st.builds(build, st.booleans(), st.booleans(),
                         st.lists(strategy(MsixEntryState), max_size=8), st.binary(max_size=8))


@device_state("pci-intx", version=1)
@dataclass
class IntxState:
    pin: U8 = 0              # 0 = no INTx, 1-4 = INTA-INTD
    state: U8 = INTX_IDLE    # bhyve's lintr state: idle, asserted, pending

    def validate(self) -> None:
        if self.pin > 4:
            raise StateError(f"INTx pin {self.pin} invalid")
        if self.state not in (INTX_IDLE, INTX_ASSERTED, INTX_PENDING):
            raise StateError(f"INTx state {self.state} invalid")
        if self.pin == 0 and self.state != INTX_IDLE:
            raise StateError("INTx asserted on a function without INTx")

    @staticmethod
    def hypothesis_strategy():  # type: ignore[no-untyped-def]
        from hypothesis import strategies as st

        return st.one_of(st.just(IntxState(0, INTX_IDLE)),
                         st.builds(IntxState, st.integers(1, 4), st.integers(0, 2)))


def _empty_config() -> bytes:
    return bytes(EXT_SIZE)


def _no_bars() -> list:
    return [BarState() for _ in range(PCI_NUM_BARS)]


@device_state("pci", version=1)
@dataclass
class PciState:
    config: Annotated[bytes, Blob(exact=EXT_SIZE)] = field(default_factory=_empty_config)
    bars: Annotated[list, ListOf(Nested(cls=BarState), exact=PCI_NUM_BARS)] = \
        field(default_factory=_no_bars)
    msi: MsiState = field(default_factory=MsiState)
    msix: MsixState = field(default_factory=MsixState)
    intx: IntxState = field(default_factory=IntxState)

    @staticmethod
    def hypothesis_strategy():  # type: ignore[no-untyped-def]
        # A 4 KiB blob is too large for hypothesis to draw byte by byte.
        from hypothesis import strategies as st

        from bhyvepy.snapshot.state import strategy

        return st.builds(lambda head, bars, msi, msix, intx: PciState(
                             head.ljust(EXT_SIZE, b"\xff"), bars, msi, msix, intx),
                         st.binary(max_size=256),
                         st.lists(strategy(BarState), min_size=PCI_NUM_BARS, max_size=PCI_NUM_BARS),
                         strategy(MsiState), strategy(MsixState), strategy(IntxState))


@device_state("pci-device", version=1)
@dataclass
class PciDeviceState:
    """Base of every PCI device's state: the common part, then the device's fields."""

    pci: PciState = field(default_factory=PciState)


__all__ = ["BarState", "MsiState", "MsixEntryState", "MsixState", "IntxState", "PciState",
           "PciDeviceState", "INTX_IDLE", "INTX_ASSERTED", "INTX_PENDING"]
