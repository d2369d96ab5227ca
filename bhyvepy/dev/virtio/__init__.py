"""Virtio for bhyvepy: split virtqueues and bhyve's legacy PCI transport.

:mod:`.queue` interprets the guest's rings (defensively: they are
untrusted input); :mod:`.transport` is the PCI function every virtio device
derives from -- BAR 0 registers, feature negotiation, reset, interrupts,
needs-reset on guest errors, and the virtio part of the snapshot.  The
device models live beside this package (``bhyvepy/dev/virtio_blk.py``,
``virtio_rnd.py``, ``virtio_console.py``).
"""

from bhyvepy.dev.virtio.queue import (QF_BROKEN, QF_ENABLED, VIRTIO_F_NOTIFY_ON_EMPTY,
                                      VIRTIO_MSI_NO_VECTOR, VIRTIO_RING_F_EVENT_IDX,
                                      VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT,
                                      VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                                      VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
                                      DescriptorChain, QueueState, Virtqueue, VirtqueueError,
                                      legacy_layout, slice_views, vring_size,
                                      vring_size_aligned)
from bhyvepy.dev.virtio.transport import (VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_PCI_ISR_CONFIG,
                                          VIRTIO_PCI_ISR_INTR, VIRTIO_VENDOR,
                                          VirtioDeviceState, VirtioPciDevice, VirtioState,
                                          virtio_config_offset)

__all__ = [
    "Virtqueue", "VirtqueueError", "DescriptorChain", "QueueState", "slice_views",
    "legacy_layout", "vring_size", "vring_size_aligned", "QF_ENABLED", "QF_BROKEN",
    "VIRTIO_F_NOTIFY_ON_EMPTY", "VIRTIO_MSI_NO_VECTOR", "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC", "VRING_AVAIL_F_NO_INTERRUPT", "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_USED_F_NO_NOTIFY",
    "VirtioPciDevice", "VirtioState", "VirtioDeviceState", "virtio_config_offset",
    "VIRTIO_CONFIG_S_NEEDS_RESET", "VIRTIO_PCI_ISR_INTR", "VIRTIO_PCI_ISR_CONFIG",
    "VIRTIO_VENDOR",
]
