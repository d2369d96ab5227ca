#!/usr/bin/env python3
"""Port-I/O exit round trips per second: bhyvepy's full dispatch path vs a bare loop.

Both loops run the same guest (``out 0x80, al; jmp back`` at the reset
vector, real mode) on the same backend call in the same process:

* baseline: the backend's run call in a Python loop that does nothing with
  the exit (what any Python VMM on this binding must at least pay);
* bhyvepy: ``Vcpu.run()`` with the real :class:`Dispatcher` and a device on
  the :class:`PortBus`, i.e. exit decoding, bus lookup and a device call.

The result is a ratio (bhyvepy / baseline); absolute numbers depend on the
host (nested KVM here runs ~100 k exits/s even from C) and are printed for
context only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bhyvepy.bus import MmioBus, PortBus  # noqa: E402
from bhyvepy.dispatch import Dispatcher  # noqa: E402
from bhyvepy.vmm import Topology  # noqa: E402
from bhyvepy.vmm.kvm import KvmBackend, lib  # noqa: E402

ROM_SIZE = 64 << 10
ROM_BASE = (4 << 30) - ROM_SIZE
GUEST = bytes.fromhex("E680EBFC")          # out 0x80, al ; jmp $-2


def make_vm(backend: KvmBackend, name: str):
    vm = backend.create_vm(name)
    vm.set_topology(Topology(cpus=1))
    vm.setup_memory(16 << 20)
    rom = vm.map_devmem("bootrom", ROM_BASE, ROM_SIZE, readonly=True)
    buf = memoryview(rom.buf)
    buf[0:len(GUEST)] = GUEST
    buf[0xFFF0:0xFFF3] = b"\xE9" + ((0 - 0xFFF3) & 0xFFFF).to_bytes(2, "little")
    vcpu = vm.create_vcpu(0)
    vcpu.reset_to_reset_vector()
    return vm, vcpu


def bare_loop(vcpu, n: int) -> float:
    c = vcpu._c
    run = lib.bhyvepy_vcpu_run
    lib.bhyvepy_vcpu_enter(c)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            if run(c) != 0:
                raise RuntimeError("KVM_RUN failed")
        return n / (time.perf_counter() - t0)
    finally:
        lib.bhyvepy_vcpu_leave(c)


def dispatch_loop(vcpu, n: int) -> float:
    ports, mmio = PortBus(), MmioBus()
    count = [0]

    def post_write(off: int, size: int, value: int) -> None:
        count[0] += 1
        if count[0] == n:
            vcpu.kick()

    ports.register("post", 0x80, 1, lambda o, s: 0xFF, post_write)
    t0 = time.perf_counter()
    vcpu.run(Dispatcher(ports, mmio))
    return count[0] / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=40000, help="exits per measurement")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    args = ap.parse_args()
    ok, why = KvmBackend.available()
    if not ok:
        print(f"skipped: {why}")
        return 0
    backend = KvmBackend()
    vm, vcpu = make_vm(backend, "bench-exits")
    try:
        bare, full = [], []
        for _ in range(args.rounds):     # interleave to share the host's noise
            bare.append(bare_loop(vcpu, args.n))
            full.append(dispatch_loop(vcpu, args.n))
        b, f = max(bare), max(full)
        print(f"baseline (bare backend call loop): {b:10.0f} exits/s")
        print(f"bhyvepy  (full dispatch path):     {f:10.0f} exits/s")
        print(f"ratio bhyvepy/baseline: {f / b:.2f}")
    finally:
        vm.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
