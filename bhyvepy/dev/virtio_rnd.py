"""virtio-rnd: an entropy source for the guest (bhyve's ``pci_virtio_rnd.c``).

One queue of 64 entries, no feature bits, no device configuration.  Each
chain the guest posts is filled with random bytes from the host kernel
(``os.getrandom``, which like bhyve's non-blocking ``/dev/random`` only
blocks before the pool is seeded at boot) and returned with the number of
bytes written.  bhyve asserts that every chain is a single buffer and that
the read succeeds; here a chain with an unusable buffer is returned empty,
and a fill is capped per chain so a guest cannot make one request cost
megabytes of entropy.

Snapshots carry only the common PCI and virtio parts, as in bhyve (which
has ``pe_snapshot`` but no pause hooks for this device: there is no I/O in
flight).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from bhyvepy.dev.virtio.queue import Virtqueue
from bhyvepy.dev.virtio.transport import (VIRTIO_DEV_RANDOM, VIRTIO_ID_ENTROPY,
                                          VirtioDeviceState, VirtioPciDevice)
from bhyvepy.pci import PciContext, PciInitError
from bhyvepy.registry import pci_emul
from bhyvepy.snapshot.state import device_state

VTRND_RINGSZ = 64
PCIC_CRYPTO = 0x10
#: Largest fill per chain; the rest of a bigger buffer stays untouched and
#: the used length says how much is valid.
VTRND_MAX_FILL = 64 * 1024


def host_entropy(n: int) -> bytes:
    """``n`` bytes from the host kernel's CSPRNG."""
    try:
        return os.getrandom(n)
    except (AttributeError, OSError):       # pre-3.6 kernels, non-Linux
        with open("/dev/urandom", "rb") as f:
            return f.read(n)


@device_state("virtio-rnd", version=1)
@dataclass
class VirtioRndState(VirtioDeviceState):
    pass


@pci_emul("virtio-rnd")
class VirtioRnd(VirtioPciDevice):
    state_class: ClassVar[type] = VirtioRndState
    vc_name: ClassVar[str] = "vtrnd"

    def __init__(self, ctx: PciContext, *, entropy=host_entropy) -> None:
        # bhyve checks the source is seeded and readable before creating the device.
        try:
            entropy(8)
        except OSError as e:
            raise PciInitError(f"vtrnd: /dev/random not ready, read(): {e}") from None
        super().__init__(ctx, device_id=VIRTIO_DEV_RANDOM, class_code=PCIC_CRYPTO << 16,
                         subdevice=VIRTIO_ID_ENTROPY, queue_sizes=[VTRND_RINGSZ],
                         host_features=0, cfgsize=0)
        self._entropy = entropy
        self.filled = 0         # bytes handed to the guest (diagnostics, tests)

    def queue_notify(self, vq: Virtqueue) -> None:
        with self._lock:
            while True:
                chain = self.pop(vq)
                if chain is None:
                    break
                length = 0
                if chain.error is None and not chain.readable:
                    want = min(chain.writable_len, VTRND_MAX_FILL)
                    if want:
                        try:
                            length = chain.scatter(self._entropy(want))
                        except OSError as e:
                            self.complain(f"entropy source failed: {e}")
                            length = 0
                else:
                    self.complain(chain.error or "entropy request with device-readable buffers")
                self.filled += length
                vq.push(chain, length)
            self.end_chains(vq, True)
