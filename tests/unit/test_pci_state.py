"""Snapshot of the common PCI part: round trip, composition, rejection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings

from bhyvepy.dev.hostbridge import HostBridge
from bhyvepy.dev.lpc import LpcBridge
from bhyvepy.pci import PciContext, PciDeviceState
from bhyvepy.snapshot.registry import SnapshotRegistry
from bhyvepy.snapshot.state import U32, StateError, decode, device_state, encode, strategy

from pci_testkit import Machine, SampleDevice

LAPIC = 0xFEE00000


@device_state("counter", version=1)
@dataclass
class CounterState(PciDeviceState):
    count: U32 = 0


class Counter(SampleDevice):
    """A device with its own state field on top of the common PCI part."""

    emulation = "counter"
    state_class = CounterState

    def __init__(self, ctx: PciContext) -> None:
        super().__init__(ctx)
        self.set_ids(0x10DD, 0x0002, 0x020000, subvendor=0x10DD, subdevice=0x66)
        self.count = 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.count += 1

    def save_device_fields(self) -> dict:
        return {"count": self.count}

    def check_device_fields(self, state: CounterState) -> None:
        if state.count > 1000:
            raise StateError("count out of range")

    def load_device_fields(self, state: CounterState) -> None:
        self.count = state.count


def build() -> Machine:
    m = Machine()
    m.pci.router.reserve(4)
    m.add(HostBridge, 0, 0, 0)
    m.add(Counter, 0, 3, 0)
    m.add(SampleDevice, 0, 4, 0)
    m.add(SampleDevice, 0, 5, 0)
    m.add(LpcBridge, 0, 31, 0)
    m.pci.finalize()
    m.reg = SnapshotRegistry()
    m.pci.register_snapshots(m.reg)
    return m


def guest_activity(m: Machine) -> None:
    """Leave every kind of common state non-default."""
    dev = m.pci.get(0, 3, 0)
    m.cfg1_write(0, 3, 0, 0x14, 4, 0xD0000000)             # move a BAR
    m.cfg1_write(0, 3, 0, 0x3C, 1, 0x0B)
    t = dev.bars[4].addr
    m.cfg1_write(0, 3, 0, 0x52, 2, 0x8000)                 # MSI-X on
    m.dispatch.mmio_write(0, t + 16, 8, LAPIC)
    m.dispatch.mmio_write(0, t + 24, 4, 0x55)              # entry 1 data, still masked
    dev.signal_vector(1)                                   # -> pending
    m.dispatch.mmio_write(0, 0xD0000000, 4, 1)             # device's own state
    other = m.pci.get(0, 4, 0)
    m.cfg1_write(0, 4, 0, 0x44, 4, LAPIC)
    m.cfg1_write(0, 4, 0, 0x4C, 2, 0x31)
    m.cfg1_write(0, 4, 0, 0x42, 2, 0x0011)                 # MSI on, 2 messages
    hb = m.pci.get(0, 0, 0)
    assert hb is not None and other is not None
    m.cfg1_write(0, 0, 0, 0x48, 2, 0x0010)                 # PCIe device control
    m.cfg1_write(0, 31, 0, 0x61, 1, 0x0A)                  # PIRQB -> IRQ 10
    m.cfg1_write(0, 4, 0, 0x04, 2, 0x0407)                 # INTx disabled ...
    other.intx_assert()                                    # ... so it is pending


def snapshot(m: Machine) -> dict[str, bytes]:
    return {name: encode(dev.save_state()) for name, _, dev in m.reg}


def test_round_trip_into_a_fresh_vm() -> None:
    a = build()
    a.pci.get(0, 3, 0).intx_assert()        # pending once MSI-X is on
    a.pci.get(0, 5, 0).intx_assert()        # asserted
    guest_activity(a)
    blobs = snapshot(a)
    b = build()
    b.vm.calls.clear()
    for name, emu, dev in b.reg:
        dev.restore_state(decode(dev.state_class, blobs[name]))
    assert b.vm.calls == []                 # levels are adopted, not re-driven
    for bsf in [(0, 0, 0), (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 31, 0)]:
        for off in range(0, 0x100, 4):
            assert b.cfg1_read(*bsf, off, 4) == a.cfg1_read(*bsf, off, 4), (bsf, off)
    da, db = a.pci.get(0, 3, 0), b.pci.get(0, 3, 0)
    assert db.count == da.count == 1
    assert b.pci.decoded_ranges(db) == a.pci.decoded_ranges(da)
    assert b.mmio.lookup(0xD0000000).name == f"{db.name} BAR1"
    assert snapshot(b) == blobs
    # behaviour continues where it stopped: unmasking sends the pending vector
    b.dispatch.mmio_write(0, db.bars[4].addr + 28, 4, 0)
    assert b.msi.sent == [(LAPIC, 0x55)]
    b.pci.get(0, 4, 0).signal_vector(1)
    assert b.msi.sent[-1] == (LAPIC, 0x32)
    # INTx: the restored asserted line drops with a real deassert
    b.pci.get(0, 5, 0).intx_deassert()
    assert [c[0] for c in b.vm.calls] == ["isa_deassert", "ioapic_deassert"]
    # the pending line of 0:4:0 asserts once neither INTx-disable nor MSI hold it
    n = len(b.vm.calls)
    b.cfg1_write(0, 4, 0, 0x04, 2, 0x0007)
    assert len(b.vm.calls) == n                        # MSI still on
    b.cfg1_write(0, 4, 0, 0x42, 2, 0x0000)
    assert b.vm.calls[-1][0] == "ioapic_assert"
    assert b.pci.router.pirq_read(2) == 0x0A


def mutate(state, **pci_changes):
    return dataclasses.replace(state, pci=dataclasses.replace(state.pci, **pci_changes))


@pytest.fixture
def saved() -> tuple[Machine, object]:
    m = build()
    guest_activity(m)
    return m, m.pci.get(0, 3, 0).save_state()


def rejected(m: Machine, state, match: str) -> None:
    dev = m.pci.get(0, 3, 0)
    before = encode(dev.save_state())
    with pytest.raises(StateError, match=match):
        dev.restore_state(state)
    assert encode(dev.save_state()) == before           # nothing changed


def test_rejects_a_different_device(saved) -> None:
    m, st = saved
    with pytest.raises(StateError):
        m.pci.get(0, 0, 0).restore_state(st)             # counter state into the hostbridge
    other = m.pci.get(0, 4, 0).save_state()
    rejected(m, CounterState(pci=other.pci), "read-only config byte")   # same layout, other IDs


def test_rejects_bar_size_or_type_changes(saved) -> None:
    m, st = saved
    bars = list(st.pci.bars)
    bars[1] = dataclasses.replace(bars[1], size=bars[1].size * 2)
    rejected(m, mutate(st, bars=bars), "BAR 1")
    bars = list(st.pci.bars)
    bars[0] = dataclasses.replace(bars[0], kind=2)
    rejected(m, mutate(st, bars=bars), "BAR 0")


def test_rejects_bar_address_out_of_range_or_disagreeing(saved) -> None:
    m, st = saved
    bars = list(st.pci.bars)
    bars[1] = dataclasses.replace(bars[1], addr=0x1_0000_0000)          # MEM32 above 4 GiB
    rejected(m, mutate(st, bars=bars), "BAR 1 address")
    bars = list(st.pci.bars)
    bars[1] = dataclasses.replace(bars[1], addr=0xC1000000)             # register says otherwise
    rejected(m, mutate(st, bars=bars), "disagrees")


def test_rejects_msix_table_size_mismatch(saved) -> None:
    m, st = saved
    msix = dataclasses.replace(st.pci.msix, table=st.pci.msix.table[:-1])
    rejected(m, mutate(st, msix=msix), "MSI-X table of 2 entries")
    msix = dataclasses.replace(st.pci.msix, pba=b"\x08" + bytes(7))     # bit 3 of 3 vectors
    rejected(m, mutate(st, msix=msix), "pending bits beyond")
    msix = dataclasses.replace(st.pci.msix, enabled=False)
    rejected(m, mutate(st, msix=msix), "MSI-X state disagrees")


def test_rejects_msi_and_intx_inconsistencies(saved) -> None:
    m, st = saved
    msi = dataclasses.replace(st.pci.msi, enabled=True)
    rejected(m, mutate(st, msi=msi), "MSI state disagrees")
    intx = dataclasses.replace(st.pci.intx, pin=2)
    rejected(m, mutate(st, intx=intx), "INTx pin")


def test_rejects_device_fields_through_the_hook(saved) -> None:
    m, st = saved
    rejected(m, dataclasses.replace(st, count=5000), "count out of range")


def test_lpc_state_checks_pirq_registers() -> None:
    m = build()
    lpc = m.pci.get(0, 31, 0)
    st = lpc.save_state()
    with pytest.raises(StateError):
        lpc.restore_state(dataclasses.replace(st, pirq=b"\x40" * 8))
    blob = bytearray(encode(st))
    blob[-1] = 0x70
    with pytest.raises(StateError):
        decode(type(st), bytes(blob))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategy(CounterState))
def test_arbitrary_states_are_refused_or_applied_never_crash(state) -> None:
    m = build()
    dev = m.pci.get(0, 3, 0)
    try:
        dev.restore_state(state)
    except StateError:
        return
    m.cfg1_read(0, 3, 0, 0, 4)
    dev.signal_vector(0)
