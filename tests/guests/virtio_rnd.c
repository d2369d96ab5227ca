/*
 * virtio-rnd (entropy device): one queue, buffers the device fills.  Each
 * request is a single device-writable descriptor, as bhyve expects.
 * Output: README.md.
 */
#include "dma.h"
#include "guest.h"
#include "pcifw.h"
#include "virtio.h"

#define ROUNDS		4
#define BUF_LEN		64
#define SHOW		16

void guest_main(void)
{
	uint8_t dest = intr_platform_init();
	static struct virtio_dev dev;
	static struct virtq q;
	uint8_t *buf, first = 0;
	uint32_t total = 0;
	bool varied = false;
	uint16_t bdf;

	pcifw_setup();
	if (!virtio_find(VIRTIO_TYPE_RNG, 0, &bdf))
		fail("no virtio-rnd function on bus 0");
	virtio_begin(&dev, bdf);
	virtio_negotiate(&dev, 0);
	virtio_setup_interrupts(&dev, 1, true, dest);
	virtq_setup(&dev, &q, 0);
	virtio_driver_ok(&dev);
	kprintf("RND pci=%02x:%02x.%x host-features=%08x irq=%s queue-size=%u\n",
		PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), dev.host_features,
		virtio_irq_name(&dev), q.size);

	buf = dma_alloc(BUF_LEN, 16);
	for (unsigned r = 0; r < ROUNDS; r++) {
		struct virtq_seg seg = { buf, BUF_LEN, true };
		uint32_t len;

		memset(buf, 0, BUF_LEN);
		len = virtq_call(&q, &seg, 1);
		if (len > BUF_LEN)
			fail("RND round %u: used length %u > %u", r, len,
			     BUF_LEN);
		kprintf("RND %u len=%u ", r, len);
		print_hex(buf, len < SHOW ? len : SHOW);
		kprintf("\n");
		for (uint32_t i = 0; i < len; i++) {
			if (total == 0 && i == 0)
				first = buf[0];
			else if (buf[i] != first)
				varied = true;
		}
		total += len;
	}
	if (total == 0)
		fail("RND: the device returned no bytes");
	if (!varied)
		fail("RND: all %u bytes are %02x", total, first);
	kprintf("VIRTIO-RND OK %u\n", total);
}
