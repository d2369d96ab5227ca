/*
 * Drives every virtio-blk function on bus 0 the way a legacy driver does:
 * reset and feature negotiation, one request queue, MSI-X (or INTx),
 * writes of a known pattern (one request with two data segments, and the
 * disk's last sector on its own), FLUSH when offered, read-back and
 * compare, GET_ID.  Every completion is waited for with sti; hlt and must
 * come with an interrupt.  Built with -DFORCE_INTX it leaves MSI-X off and
 * takes INTx even where the device has MSI-X (virtio_blk_intx.rom).
 *
 * Output and the sector pattern are documented in README.md.
 */
#include "dma.h"
#include "guest.h"
#include "pattern.h"
#include "pcifw.h"
#include "vblk.h"

#ifdef FORCE_INTX
#define ALLOW_MSIX	false
#else
#define ALLOW_MSIX	true
#endif

#define MAX_DISKS	8
#define HEAD_SECTORS	4	/* LBAs 0-3, written as one request */
#define TAG		"bhyvepy-vblk"

static struct vblk disks[MAX_DISKS];

static void check_status(unsigned n, const char *what, uint8_t st)
{
	if (st != VBLK_S_OK)
		fail("VBLK %u %s: status %u", n, what, st);
}

static void compare(unsigned n, const uint8_t *got, const uint8_t *want,
		    uint64_t lba)
{
	for (unsigned i = 0; i < SECTOR_SIZE; i++) {
		if (got[i] != want[i])
			fail("VBLK %u lba %lu byte %u: read %02x, wrote %02x",
			     n, lba, i, got[i], want[i]);
	}
}

static void test_disk(unsigned n, uint16_t bdf, uint8_t dest)
{
	struct vblk *b = &disks[n];
	uint8_t *wbuf = dma_alloc(HEAD_SECTORS * SECTOR_SIZE, 16);
	uint8_t *rbuf = dma_alloc(HEAD_SECTORS * SECTOR_SIZE, 16);
	uint8_t *id = dma_alloc(VBLK_ID_BYTES, 16);
	struct virtq_seg halves[2] = {
		{ wbuf, 2 * SECTOR_SIZE, false },
		{ wbuf + 2 * SECTOR_SIZE, 2 * SECTOR_SIZE, false },
	};
	struct virtq_seg idseg = { id, VBLK_ID_BYTES, true };
	uint64_t last;
	uint8_t st;

	vblk_init(b, bdf, ALLOW_MSIX, dest);
	kprintf("VBLK %u pci=%02x:%02x.%x host-features=%08x features=%08x "
		"irq=%s queue-size=%u\n", n, PCI_BUS(bdf), PCI_DEV(bdf),
		PCI_FN(bdf), b->dev.host_features, b->dev.features,
		virtio_irq_name(&b->dev), b->q.size);
	if (b->capacity <= HEAD_SECTORS)
		fail("VBLK %u capacity %lu: too small for the test", n,
		     b->capacity);
	last = b->capacity - 1;

	for (unsigned s = 0; s < HEAD_SECTORS; s++)
		sector_pattern(wbuf + s * SECTOR_SIZE, TAG, n, s);
	check_status(n, "write lba 0-3", vblk_request(b, VBLK_T_OUT, 0,
						       halves, 2));
	sector_pattern(wbuf, TAG, n, last);
	check_status(n, "write last lba", vblk_rw(b, true, last, wbuf, 1));
	if (b->dev.features & VBLK_F_FLUSH)
		check_status(n, "flush", vblk_request(b, VBLK_T_FLUSH, 0,
						      NULL, 0));

	check_status(n, "read last lba", vblk_rw(b, false, last, rbuf, 1));
	compare(n, rbuf, wbuf, last);
	check_status(n, "read lba 0-3", vblk_rw(b, false, 0, rbuf,
						HEAD_SECTORS));
	for (unsigned s = 0; s < HEAD_SECTORS; s++) {
		sector_pattern(wbuf, TAG, n, s);
		compare(n, rbuf + s * SECTOR_SIZE, wbuf, s);
	}

	st = vblk_request(b, VBLK_T_GET_ID, 0, &idseg, 1);
	if (st != VBLK_S_OK && st != VBLK_S_UNSUPP)
		fail("VBLK %u get-id: status %u", n, st);
	kprintf("VBLK %u requests=%u interrupts=%u flush=%s\n", n, b->requests,
		b->q.irqs, b->dev.features & VBLK_F_FLUSH ? "yes" : "no");
	kprintf("VBLK %u capacity=%lu id=", n, b->capacity);
	if (st == VBLK_S_OK)
		print_text(id, VBLK_ID_BYTES);
	else
		kprintf("-");
	kprintf(" OK\n");
}

void guest_main(void)
{
	uint8_t dest = intr_platform_init();
	unsigned n = 0;
	uint16_t bdf;

	pcifw_setup();
	while (n < MAX_DISKS && virtio_find(VIRTIO_TYPE_BLOCK, n, &bdf)) {
		test_disk(n, bdf, dest);
		n++;
	}
	if (n == 0)
		fail("no virtio-blk function on bus 0");
	kprintf("VIRTIO-BLK DONE %u\n", n);
}
