"""virtio-rnd driven through its BAR 0 like a guest driver, plus the legacy
transport behaviour every virtio device shares (registers, reset, ISR/INTx,
MSI-X vectors, -W, needs-reset, snapshot round trip)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bhyvepy.dev.hostbridge import HostBridge
from bhyvepy.dev.virtio_rnd import VTRND_MAX_FILL, VirtioRnd, VirtioRndState
from bhyvepy.snapshot.state import StateError, decode, encode

from pci_testkit import Machine
from virtio_driver import (ACK, CONFIG_VECTOR, DRIVER, DRIVER_OK, GUEST_FEATURES,
                           HOST_FEATURES, ISR, NEEDS_RESET, QUEUE_NUM, QUEUE_PFN, QUEUE_SEL,
                           QUEUE_VECTOR, STATUS, Allocator, LegacyDriver, make_memory)

RAM = (0x100000, 0x200000)      # 1 MiB of RAM at 1 MiB, unmapped around it


def build(msix: bool = True, slot: int = 4, entropy=None):
    mem = make_memory(RAM)
    m = Machine(mem=mem)
    if not msix:
        m.tree.set_value("virtio_msix", "false")
    m.add(HostBridge, 0, 0, 0)
    kw = {} if entropy is None else {"entropy": entropy}
    dev = m.add(VirtioRnd, 0, slot, 0, **kw)
    m.pci.finalize()
    drv = LegacyDriver(m, dev, mem, Allocator(*RAM))
    return m, dev, drv


def test_identity_bars_and_capabilities() -> None:
    m, dev, drv = build()
    assert m.cfg1_read(0, 4, 0, 0x00, 4) == 0x1005_1AF4
    assert m.cfg1_read(0, 4, 0, 0x2C, 4) == 0x0004_1AF4     # subsystem: entropy
    assert m.cfg1_read(0, 4, 0, 0x0B, 1) == 0x10            # PCIC_CRYPTO
    assert m.bar_addr(dev, 0) and m.cfg1_read(0, 4, 0, 0x10, 4) & 1     # I/O BAR 0
    assert m.cfg1_read(0, 4, 0, 0x14, 4) & 1 == 0                       # MEM BAR 1 (MSI-X)
    assert dev.msix is not None and dev.msix.nvec == 2                  # 1 queue + config
    assert dev.msi is not None and dev.intx_pin


def test_dash_w_gives_msi_only() -> None:
    m, dev, drv = build(msix=False)
    assert dev.msix is None and dev.msi is not None
    assert m.cfg1_read(0, 4, 0, 0x14, 4) == 0                           # no BAR 1
    assert drv.cfg_base == 20


def test_feature_and_queue_registers() -> None:
    _, dev, drv = build()
    assert drv.r(HOST_FEATURES, 4) == 0
    drv.w(GUEST_FEATURES, 4, 0xFFFFFFFF)
    assert drv.r(GUEST_FEATURES, 4) == 0                      # masked by the offer
    drv.w(QUEUE_SEL, 2, 0)
    assert drv.r(QUEUE_NUM, 2) == 64
    drv.w(QUEUE_SEL, 2, 7)                                    # selecting a missing queue is allowed
    assert drv.r(QUEUE_NUM, 2) == 0
    assert drv.r(QUEUE_PFN, 4) == 0xFFFFFFFF
    assert drv.r(QUEUE_VECTOR, 2) == 0xFFFF
    drv.w(QUEUE_PFN, 4, 0x123)                                # ignored: no such queue
    assert dev.queues[0].pfn == 0
    drv.w(QUEUE_NUM, 2, 8)                                    # read-only
    drv.w(QUEUE_SEL, 2, 0)
    assert drv.r(QUEUE_NUM, 2) == 64
    assert drv.r(HOST_FEATURES, 2) == 0xFFFF                  # wrong size reads all-ones


def test_entropy_is_delivered_with_msix() -> None:
    m, dev, drv = build()
    enable_msix(m, dev)
    drv.negotiate()
    q = drv.setup_queue(0)
    drv.w(QUEUE_VECTOR, 2, 1)
    drv.w(CONFIG_VECTOR, 2, 0)
    drv.driver_ok()
    bufs = [drv.buf(64) for _ in range(3)]
    for b in bufs:
        q.add([(b, 64, True)])
    drv.kick(0)
    used = q.collect()
    assert [ln for _, ln in used] == [64, 64, 64]
    blobs = [drv.mem.read(b, 64) for b in bufs]
    assert len(set(blobs)) == 3 and all(any(x) for x in blobs)
    assert m.msi.sent and m.msi.sent[-1] == (0xFEE00000, 0x41)   # queue vector 1


def enable_msix(m: Machine, dev) -> None:
    """Program MSI-X entries 0 and 1 and enable MSI-X through config space."""
    base = m.bar_addr(dev, 1)
    for i in range(2):
        m.dispatch.mmio_write(0, base + 16 * i, 4, 0xFEE00000)
        m.dispatch.mmio_write(0, base + 16 * i + 8, 4, 0x40 + i)
        m.dispatch.mmio_write(0, base + 16 * i + 12, 4, 0)
    cap = next(off for off, cid in dev.caps if cid == 0x11)
    ctrl = m.cfg1_read(0, dev.slot, 0, cap + 2, 2)
    m.cfg1_write(0, dev.slot, 0, cap + 2, 2, ctrl | 0x8000)
    assert dev.msix_enabled


def test_intx_isr_read_to_clear() -> None:
    m, dev, drv = build()
    drv.negotiate()
    q = drv.setup_queue(0)
    drv.driver_ok()
    b = drv.buf(16)
    q.add([(b, 16, True)])
    drv.kick(0)
    assert q.collect() == [(0, 16)]
    assert any(c[0] == "ioapic_assert" for c in m.vm.calls)
    assert m.cfg1_read(0, 4, 0, 0x06, 2) & 0x08              # INTx status bit
    assert drv.r(ISR, 1) == 1
    assert drv.r(ISR, 1) == 0                                 # read clears
    assert m.vm.levels() and all(v == 0 for v in m.vm.levels().values())


def test_no_interrupt_flag_suppresses_interrupt() -> None:
    m, dev, drv = build()
    drv.negotiate()
    q = drv.setup_queue(0)
    drv.driver_ok()
    q.set_avail_flags(1)                                      # VRING_AVAIL_F_NO_INTERRUPT
    q.add([(drv.buf(8), 8, True)])
    drv.kick(0)
    assert q.collect() and drv.r(ISR, 1) == 0


def test_fill_is_capped_and_readable_buffers_refused() -> None:
    _, dev, drv = build()
    drv.negotiate()
    q = drv.setup_queue(0)
    drv.driver_ok()
    big = drv.buf(VTRND_MAX_FILL + 4096)
    q.add([(big, VTRND_MAX_FILL + 4096, True)])
    ro = drv.buf(32)
    q.add([(ro, 32, False)])
    drv.kick(0)
    assert [ln for _, ln in q.collect()] == [VTRND_MAX_FILL, 0]
    assert drv.status() & NEEDS_RESET == 0


def test_reset_clears_queues_and_features() -> None:
    _, dev, drv = build()
    drv.negotiate()
    drv.setup_queue(0)
    drv.driver_ok()
    assert dev.queues[0].ready
    drv.w(STATUS, 1, 0)
    assert not dev.queues[0].ready and dev.queues[0].pfn == 0
    assert drv.r(QUEUE_PFN, 4) == 0 and drv.r(STATUS, 1) == 0


def test_ring_outside_ram_needs_reset_and_vm_goes_on() -> None:
    _, dev, drv = build()
    drv.negotiate()
    drv.w(QUEUE_SEL, 2, 0)
    drv.w(QUEUE_PFN, 4, 0x7FFFF)                              # far outside guest RAM
    drv.driver_ok()
    assert drv.status() & NEEDS_RESET
    drv.w(STATUS, 1, ACK | DRIVER | DRIVER_OK)                # driver cannot clear it
    assert drv.status() & NEEDS_RESET
    drv.kick(0)                                               # harmless
    drv.w(STATUS, 1, 0)                                       # a reset recovers
    assert drv.status() == 0
    drv.negotiate()
    q = drv.setup_queue(0)
    drv.driver_ok()
    q.add([(drv.buf(8), 8, True)])
    drv.kick(0)
    assert [ln for _, ln in q.collect()] == [8]


def test_corrupt_ring_sends_config_interrupt_and_stops_queue() -> None:
    m, dev, drv = build()
    drv.negotiate()
    q = drv.setup_queue(0)
    drv.driver_ok()
    q.write_desc(0, drv.buf(8), 8, 2 | 1, 0)                  # descriptor 0 links to itself
    q.publish(0)
    drv.kick(0)
    assert drv.status() & NEEDS_RESET
    assert drv.r(ISR, 1) & 2                                  # configuration change
    q.add([(drv.buf(8), 8, True)])
    drv.kick(0)
    assert q.collect() == []                                  # queue stopped


def test_entropy_source_failure_refuses_device() -> None:
    from bhyvepy.pci import PciInitError

    def broken(n: int) -> bytes:
        raise OSError("not seeded")

    with pytest.raises(PciInitError, match="vtrnd"):
        build(entropy=broken)


def test_snapshot_round_trip_and_mismatch() -> None:
    _, dev, drv = build()
    drv.negotiate()
    q = drv.setup_queue(0)
    drv.driver_ok()
    q.add([(drv.buf(8), 8, True)])
    drv.kick(0)
    state = decode(VirtioRndState, encode(dev.save_state()))
    assert state.virtio.queues[0].next_used == 1
    # a fresh device at the same slot accepts it and continues the ring
    _, dev2, drv2 = build()
    dev2.restore_state(state)
    assert dev2.queues[0].ready and dev2.queues[0].last_avail == 1
    assert dev2.status == dev.status
    # a device built with -W has other BARs and refuses it
    _, dev3, _ = build(msix=False)
    with pytest.raises(StateError):
        dev3.restore_state(state)


def test_msi_mode_sends_message_and_keeps_intx_pending() -> None:
    m, dev, drv = build(msix=False)
    cap = next(off for off, cid in dev.caps if cid == 0x05)
    m.cfg1_write(0, 4, 0, cap + 4, 4, 0xFEE00000)
    m.cfg1_write(0, 4, 0, cap + 12, 2, 0x55)                  # 64-bit capable: data at +12
    ctrl = m.cfg1_read(0, 4, 0, cap + 2, 2)
    m.cfg1_write(0, 4, 0, cap + 2, 2, ctrl | 1)
    assert dev.msi_enabled
    drv.negotiate()
    q = drv.setup_queue(0)
    drv.driver_ok()
    q.add([(drv.buf(8), 8, True)])
    drv.kick(0)
    assert q.collect()
    assert m.msi.sent[-1] == (0xFEE00000, 0x55)
    assert not any(c[0] == "ioapic_assert" for c in m.vm.calls)   # INTx only pending
    assert drv.r(ISR, 1) == 1 and drv.r(ISR, 1) == 0


def test_needs_reset_uses_the_config_vector_with_msix() -> None:
    m, dev, drv = build()
    enable_msix(m, dev)
    drv.negotiate()
    drv.w(CONFIG_VECTOR, 2, 0)
    drv.w(QUEUE_SEL, 2, 0)
    drv.w(QUEUE_VECTOR, 2, 1)
    drv.driver_ok()
    drv.w(QUEUE_PFN, 4, 0x7FFFF)                              # ring outside RAM
    assert drv.status() & NEEDS_RESET
    assert m.msi.sent == [(0xFEE00000, 0x40)]                 # config vector 0, not the queue's


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.sampled_from([1, 2, 3, 4, 8]),
                              st.integers(0, 2**32 - 1)), max_size=60))
def test_register_fuzz_never_raises(ops) -> None:
    """Whatever a guest does to BAR 0, the handlers return normally."""
    _, dev, drv = build()
    drv.negotiate()
    q = drv.setup_queue(0)
    for is_write, off, size, value in ops:
        if is_write:
            dev.bar_write(0, off, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= dev.bar_read(0, off, size) < 1 << (8 * size)
    q.add([(drv.buf(8), 8, True)])
    dev.bar_write(0, 16, 2, 0)                                # a kick still never raises


def test_broken_queue_stays_broken_until_reset() -> None:
    _, dev, drv = build()
    drv.negotiate()
    drv.w(QUEUE_SEL, 2, 0)
    drv.w(QUEUE_PFN, 4, 0x7FFFF)
    assert dev.queues[0].broken
    drv.setup_queue(0)                                        # re-pointing it is not enough
    assert dev.queues[0].broken and not dev.queues[0].ready
