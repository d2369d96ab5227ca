"""Config mechanism #1, ECAM, absent functions, multi-function bit, robustness."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bhyvepy.dev.hostbridge import HostBridge
from bhyvepy.dev.lpc import LpcBridge
from bhyvepy.pci import PciContext, PciFunction, PciInitError
from bhyvepy.snapshot.registry import DuplicateDeviceName, SnapshotRegistry

from pci_testkit import Machine, SampleDevice


class Broken(PciFunction):
    """A device whose config hooks fail: the bus must contain it."""

    emulation = "broken"

    def __init__(self, ctx: PciContext) -> None:
        super().__init__(ctx)
        self.set_ids(0xDEAD, 0xBEEF, 0)

    def cfg_read(self, offset: int, size: int) -> int:
        if offset == 0x40:
            raise RuntimeError("device bug")
        return super().cfg_read(offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError("device bug")


@pytest.fixture
def m() -> Machine:
    m = Machine()
    m.add(HostBridge, 0, 0, 0)
    m.add(SampleDevice, 0, 3, 0)
    m.add(SampleDevice, 0, 4, 0)
    m.add(SampleDevice, 0, 4, 2, msix=0)
    m.add(LpcBridge, 0, 31, 0)
    m.add(SampleDevice, 2, 1, 0, msi=0)
    m.pci.finalize()
    return m


def test_mechanism1_and_ecam_see_the_same_space(m: Machine) -> None:
    for bsf in [(0, 0, 0), (0, 3, 0), (0, 4, 2), (0, 31, 0), (2, 1, 0), (0, 7, 0), (5, 0, 0)]:
        for off in range(0, 0x100, 4):
            assert m.cfg1_read(*bsf, off, 4) == m.ecam_read(*bsf, off, 4), (bsf, off)
        for off in range(0x3C, 0x44):
            assert m.cfg1_read(*bsf, off, 1) == m.ecam_read(*bsf, off, 1)
    # a write through one is seen through the other
    m.ecam_write(0, 3, 0, 0x3C, 1, 0x0B)
    assert m.cfg1_read(0, 3, 0, 0x3C, 1) == 0x0B
    m.cfg1_write(0, 3, 0, 0x0C, 1, 0x10)
    assert m.ecam_read(0, 3, 0, 0x0C, 1) == 0x10


def test_config_address_latch(m: Machine) -> None:
    m.dispatch.pio_out(0, 0xCF8, 4, 0xFF_FF_FF_FF)
    assert m.dispatch.pio_in(0, 0xCF8, 4) == 0x80FFFFFC      # reserved bits dropped
    assert m.dispatch.pio_in(0, 0xCF8, 2) == 0xFFFF           # only dword accesses
    assert m.dispatch.pio_in(0, 0xCF8, 1) == 0xFF
    m.dispatch.pio_out(0, 0xCF8, 2, 0)                        # ignored
    assert m.dispatch.pio_in(0, 0xCF8, 4) == 0x80FFFFFC
    m.dispatch.pio_out(0, 0xCF8, 4, 0x0000_1800)              # enable bit clear
    assert m.dispatch.pio_in(0, 0xCFC, 4) == 0xFFFFFFFF
    assert m.ports.lookup(0xCF9) is None                      # the reset port stays free


def test_absent_functions_and_bad_accesses_read_all_ones(m: Machine) -> None:
    assert m.cfg1_read(0, 5, 0, 0, 4) == 0xFFFFFFFF
    assert m.cfg1_read(1, 0, 0, 0, 2) == 0xFFFF
    assert m.ecam_read(0, 3, 7, 0, 4) == 0xFFFFFFFF
    assert m.pci.cfg_read(0, 3, 0, 1, 2) == 0xFFFF             # unaligned
    assert m.pci.cfg_read(0, 3, 0, 0, 3) == 0xFFFFFF           # odd size
    assert m.ecam_read(0, 3, 0, 0, 8) == 2**64 - 1            # qword ECAM access
    m.pci.cfg_write(0, 5, 0, 0x3C, 1, 1)                      # nobody there: no effect
    m.pci.cfg_write(0, 3, 0, 0x0D, 2, 0xFFFF)                 # unaligned: dropped
    assert m.pci.cfg_read(0, 3, 0, 0x0D, 1) == 0
    m.pci.cfg_write(0, 3, 0, 0x0D, 1, 0x40)                   # the latency timer is writable
    assert m.pci.cfg_read(0, 3, 0, 0x0D, 1) == 0x40


def test_extended_space_through_ecam_only(m: Machine) -> None:
    assert m.ecam_read(0, 3, 0, 0x100, 4) == 0                # no extended capabilities
    assert m.ecam_read(0, 3, 0, 0x104, 4) == 0xFFFFFFFF
    m.ecam_write(0, 3, 0, 0x200, 4, 0)
    assert m.ecam_read(0, 3, 0, 0x200, 4) == 0xFFFFFFFF
    # mechanism #1 has only 8 register bits: 0x100 wraps to 0
    m.dispatch.pio_out(0, 0xCF8, 4, 0x8000_0000 | 3 << 11 | 0x0F00_0000)
    assert m.dispatch.pio_in(0, 0xCFC, 4) == m.cfg1_read(0, 3, 0, 0, 4)


def test_multifunction_bit_is_computed(m: Machine) -> None:
    assert m.cfg1_read(0, 4, 0, 0x0E, 1) & 0x80
    assert m.cfg1_read(0, 4, 2, 0x0C, 4) >> 16 & 0x80
    assert m.cfg1_read(0, 4, 0, 0x0E, 2) & 0x80
    assert not m.cfg1_read(0, 3, 0, 0x0E, 1) & 0x80
    assert not m.cfg1_read(0, 0, 0, 0x0C, 4) >> 16 & 0x80


def test_device_errors_are_contained() -> None:
    m = Machine()
    m.add(Broken, 0, 3, 0)
    m.pci.finalize()
    assert m.cfg1_read(0, 3, 0, 0x40, 4) == 0xFFFFFFFF
    m.cfg1_write(0, 3, 0, 0x04, 2, 7)
    assert m.cfg1_read(0, 3, 0, 0, 4) == 0xBEEFDEAD


def test_slots_are_checked() -> None:
    m = Machine()
    m.add(HostBridge, 0, 0, 0)
    with pytest.raises(PciInitError, match="already occupied"):
        m.add(HostBridge, 0, 0, 0)
    with pytest.raises(PciInitError):
        m.add(HostBridge, 0, 32, 0)


def test_snapshot_names_and_duplicates(m: Machine) -> None:
    reg = SnapshotRegistry()
    m.pci.register_snapshots(reg)
    assert reg.names() == ["hostbridge-pci-0-0-0", "sample-pci-0-3-0", "sample-pci-0-4-0",
                           "sample-pci-0-4-2", "lpc-pci-0-31-0", "sample-pci-2-1-0"]
    with pytest.raises(DuplicateDeviceName):
        m.pci.register_snapshots(reg)


_bsf = st.tuples(st.sampled_from([0, 2, 7]), st.sampled_from([0, 3, 4, 31, 1, 9]),
                 st.sampled_from([0, 2, 1]))
_access = st.one_of(
    st.tuples(st.just("cfg1a"), st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("cfg1d"), st.integers(0, 3), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1),
              st.booleans()),
    st.tuples(st.just("ecam"), _bsf, st.integers(0, 0xFFF), st.sampled_from([1, 2, 4, 8]),
              st.integers(0, 2**64 - 1), st.booleans()),
    st.tuples(st.just("direct"), _bsf, st.integers(-4, 0x1003), st.integers(0, 9),
              st.integers(0, 2**32 - 1), st.booleans()),
    st.tuples(st.just("bar"), st.integers(0, 5), st.integers(0, 0x2010), st.sampled_from([1, 2, 4, 8]),
              st.integers(0, 2**64 - 1), st.booleans()),
    st.tuples(st.just("irq"), st.integers(0, 7)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_access, max_size=60))
def test_random_guest_accesses_never_raise(accesses) -> None:
    m = Machine()
    m.add(HostBridge, 0, 0, 0)
    dev = m.add(SampleDevice, 0, 3, 0)
    m.add(SampleDevice, 0, 4, 0, msi=0)
    m.add(SampleDevice, 0, 4, 2, msix=0)
    m.add(LpcBridge, 0, 31, 0)
    m.pci.finalize()
    d = m.dispatch
    for a in accesses:
        kind = a[0]
        if kind == "cfg1a":
            d.pio_out(0, 0xCF8, a[2], a[1] & ((1 << 8 * a[2]) - 1))
        elif kind == "cfg1d":
            _, port, size, value, write = a
            if write:
                d.pio_out(0, 0xCFC + port, size, value & ((1 << 8 * size) - 1))
            else:
                assert 0 <= d.pio_in(0, 0xCFC + port, size) < 1 << 8 * size
        elif kind == "ecam":
            _, (b, s, f), off, size, value, write = a
            gpa = m.ecam_addr(b, s, f, off)
            if write:
                d.mmio_write(0, gpa, size, value & ((1 << 8 * size) - 1))
            else:
                assert 0 <= d.mmio_read(0, gpa, size) < 1 << 8 * size
        elif kind == "direct":
            _, (b, s, f), off, size, value, write = a
            if write:
                m.pci.cfg_write(b, s, f, off, size, value)
            else:
                m.pci.cfg_read(b, s, f, off, size)
        elif kind == "bar":
            _, idx, off, size, value, write = a
            base = dev.bars[idx].addr + off
            if dev.bars[idx].kind.name == "IO":
                if write:
                    d.pio_out(0, base & 0xFFFF, min(size, 4), value & 0xFFFFFFFF)
                else:
                    d.pio_in(0, base & 0xFFFF, min(size, 4))
            elif write:
                d.mmio_write(0, base, size, value & ((1 << 8 * size) - 1))
            else:
                d.mmio_read(0, base, size)
        else:
            dev.signal_vector(a[1])
    # the bus is still consistent: IDs intact, every decoded range belongs to a BAR
    assert m.cfg1_read(0, 3, 0, 0, 4) == 0x000110DD
    for idx, (addr, size, registered) in m.pci.decoded_ranges(dev).items():
        assert (addr, size) == (dev.bars[idx].addr, dev.bars[idx].size)
        if registered:
            space = m.ports if dev.bars[idx].kind.name == "IO" else m.mmio
            assert space.lookup(addr).name == f"{dev.name} BAR{idx}"
    assert all(v in (0, 1) for v in m.vm.levels().values())


def test_concurrent_config_access_from_several_vcpus() -> None:
    import threading

    m = Machine()
    dev = m.add(SampleDevice, 0, 3, 0)
    m.pci.finalize()
    errors: list[BaseException] = []

    def vcpu(k: int) -> None:
        try:
            for i in range(300):
                m.pci.cfg_write(0, 3, 0, 0x04, 2, (0x0003 if (i + k) & 1 else 0))
                m.pci.cfg_write(0, 3, 0, 0x14, 4, 0xD0000000 + ((i + k) % 4) * 0x1000)
                assert m.pci.cfg_read(0, 3, 0, 0, 4) == 0x000110DD
                dev.signal_vector(0)
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=vcpu, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # whatever the interleaving, the final registration matches the final registers
    m.pci.cfg_write(0, 3, 0, 0x04, 2, 0x0003)
    m.pci.sync_decode(dev)
    assert m.mmio.lookup(dev.bars[1].addr).name == f"{dev.name} BAR1"
    stale = [a for a in range(0xD0000000, 0xD0004000, 0x1000)
             if a != dev.bars[1].addr and m.mmio.lookup(a) is not None]
    assert not stale
