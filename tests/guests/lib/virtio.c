#include "dma.h"
#include "intr.h"
#include "pci.h"
#include "util.h"
#include "virtio.h"

uint32_t virtio_watchdog_count = 0x10000000;

/* A reset must read back as 0; a working device needs one poll. */
#define RESET_POLLS	1000

static bool match_virtio(uint16_t bdf, uint32_t type)
{
	uint16_t device;

	if (pci_read16(bdf, PCI_VENDOR_ID) != VIRTIO_VENDOR)
		return false;
	device = pci_read16(bdf, PCI_DEVICE_ID);
	return device >= VIRTIO_DEV_FIRST && device <= VIRTIO_DEV_LAST &&
	       pci_read16(bdf, PCI_SUBSYS_ID) == type;
}

bool virtio_find(uint16_t type, unsigned index, uint16_t *bdf)
{
	return pci_find_nth(match_virtio, type, index, bdf);
}

static void set_status(struct virtio_dev *d, uint8_t s)
{
	outb(d->io + VIRTIO_R_STATUS, s);
}

uint8_t virtio_status(struct virtio_dev *d)
{
	return inb(d->io + VIRTIO_R_STATUS);
}

void virtio_begin(struct virtio_dev *d, uint16_t bdf)
{
	uint32_t bar0 = pci_read32(bdf, PCI_BAR0);
	struct poll_budget b = poll_budget(RESET_POLLS);

	memset(d, 0, sizeof(*d));
	d->bdf = bdf;
	d->type = pci_read16(bdf, PCI_SUBSYS_ID);
	d->intx_pin = -1;
	if (!(bar0 & 1) || (bar0 & ~3u) == 0)
		fail("virtio %02x:%02x.%x: BAR0 %08x is not an assigned I/O BAR",
		     PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), bar0);
	d->io = (uint16_t)(bar0 & ~3u);
	d->cfg = VIRTIO_CFG_OFF;
	pci_command(bdf, PCI_CMD_IO | PCI_CMD_MASTER, 0);

	set_status(d, 0);
	while (virtio_status(d) != 0) {
		if (poll_expired(&b))
			fail("virtio %02x:%02x.%x: status %02x after reset",
			     PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf),
			     virtio_status(d));
	}
	set_status(d, VIRTIO_S_ACKNOWLEDGE);
	set_status(d, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER);
	d->host_features = inl(d->io + VIRTIO_R_HOST_FEATURES);
}

uint32_t virtio_negotiate(struct virtio_dev *d, uint32_t wanted)
{
	d->features = d->host_features & wanted;
	outl(d->io + VIRTIO_R_GUEST_FEATURES, d->features);
	return d->features;
}

static void on_queue_msix(void *arg)
{
	struct virtq *q = arg;

	q->irqs++;
}

static void on_config_msix(void *arg)
{
	struct virtio_dev *d = arg;

	d->cfg_irqs++;
}

/*
 * The pin may be shared with other functions: reading ISR both tells
 * whether this device raised it and deasserts the line.
 */
static void on_intx(void *arg)
{
	struct virtio_dev *d = arg;
	uint8_t isr = inb(d->io + VIRTIO_R_ISR);

	if (!isr)
		return;
	d->intx_irqs++;
	if (isr & VIRTIO_ISR_QUEUE) {
		for (unsigned i = 0; i < d->nqueues; i++)
			d->queues[i]->irqs++;
	}
	if (isr & VIRTIO_ISR_CONFIG)
		d->cfg_irqs++;
}

void virtio_setup_interrupts(struct virtio_dev *d, unsigned nqueues,
			     bool allow_msix, uint8_t dest)
{
	uint16_t bdf = d->bdf;
	uint8_t msix = pci_find_cap(bdf, PCI_CAP_MSIX);

	d->dest = dest;
	/* One entry for config changes plus one per queue, or none at all. */
	if (msix && (pci_read16(bdf, msix + 2) & 0x7ff) + 1u < 1 + nqueues)
		msix = 0;
	if (allow_msix && msix) {
		uint16_t got;

		d->cfg_vector = intr_alloc_vector();
		intr_set_handler_arg(d->cfg_vector, on_config_msix, d);
		if (!pci_msix_setup(bdf, 0, dest, d->cfg_vector))
			fail("virtio %02x:%02x.%x: MSI-X entry 0 missing",
			     PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf));
		d->irq = VIRTIO_IRQ_MSIX;
		d->cfg = VIRTIO_CFG_OFF_MSIX;
		outw(d->io + VIRTIO_R_CONFIG_VECTOR, 0);
		got = inw(d->io + VIRTIO_R_CONFIG_VECTOR);
		if (got != 0)
			fail("virtio %02x:%02x.%x: config vector reads %04x",
			     PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), got);
		/* Queue entries are programmed in virtq_setup(). */
		return;
	}
	d->intx_pin = pci_intx_pin(bdf);
	if (d->intx_pin < 0)
		fail("virtio %02x:%02x.%x: no MSI-X%s and no INTx routing "
		     "(pin %u line %u)", PCI_BUS(bdf), PCI_DEV(bdf),
		     PCI_FN(bdf), allow_msix ? "" : " allowed",
		     pci_read8(bdf, PCI_INTERRUPT_PIN),
		     pci_read8(bdf, PCI_INTERRUPT_LINE));
	d->irq = VIRTIO_IRQ_INTX;
	pci_command(bdf, 0, PCI_CMD_INTX_DISABLE);
	intx_attach((unsigned)d->intx_pin, on_intx, d, dest);
}

void virtq_setup(struct virtio_dev *d, struct virtq *q, uint16_t index)
{
	uint16_t bdf = d->bdf;
	uint16_t n;
	size_t used_off, bytes;
	uint8_t *ring;

	if (d->nqueues == VIRTIO_MAX_QUEUES)
		fail("virtio: more than %u queues", VIRTIO_MAX_QUEUES);
	outw(d->io + VIRTIO_R_QUEUE_SEL, index);
	n = inw(d->io + VIRTIO_R_QUEUE_NUM);
	/* Legacy drivers must use the size the device gives. */
	if (n == 0 || (n & (n - 1)))
		fail("virtio %02x:%02x.%x: queue %u size %u", PCI_BUS(bdf),
		     PCI_DEV(bdf), PCI_FN(bdf), index, n);
	if (inl(d->io + VIRTIO_R_QUEUE_PFN) != 0)
		fail("virtio %02x:%02x.%x: queue %u PFN not 0 after reset",
		     PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), index);

	used_off = (16u * n + 6u + 2u * n + VRING_ALIGN - 1) &
		   ~(size_t)(VRING_ALIGN - 1);
	bytes = used_off + ((6u + 8u * n + VRING_ALIGN - 1) &
			    ~(size_t)(VRING_ALIGN - 1));
	ring = dma_alloc(bytes, VRING_ALIGN);

	memset(q, 0, sizeof(*q));
	q->dev = d;
	q->index = index;
	q->size = n;
	q->desc = (volatile struct vring_desc *)ring;
	q->avail = (volatile struct vring_avail *)(ring + 16u * n);
	q->used = (volatile struct vring_used *)(ring + used_off);
	q->num_free = n;
	for (uint16_t i = 0; i < n; i++)
		q->desc[i].next = (uint16_t)(i + 1);
	q->msix_entry = VIRTIO_NO_VECTOR;

	outl(d->io + VIRTIO_R_QUEUE_PFN,
	     (uint32_t)(dma_addr(ring) >> VRING_PFN_SHIFT));
	d->queues[d->nqueues++] = q;

	if (d->irq == VIRTIO_IRQ_MSIX) {
		uint8_t vec = intr_alloc_vector();
		uint16_t entry = (uint16_t)(1 + index);
		uint16_t got;

		intr_set_handler_arg(vec, on_queue_msix, q);
		if (!pci_msix_setup(bdf, entry, d->dest, vec))
			fail("virtio %02x:%02x.%x: no MSI-X entry %u for queue "
			     "%u", PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf),
			     entry, index);
		outw(d->io + VIRTIO_R_QUEUE_VECTOR, entry);
		got = inw(d->io + VIRTIO_R_QUEUE_VECTOR);
		if (got != entry)
			fail("virtio %02x:%02x.%x: queue %u vector reads %04x",
			     PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), index,
			     got);
		q->msix_entry = entry;
	}
}

void virtio_driver_ok(struct virtio_dev *d)
{
	set_status(d, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER |
		   VIRTIO_S_DRIVER_OK);
}

uint8_t virtio_cfg_read8(struct virtio_dev *d, unsigned off)
{
	return inb((uint16_t)(d->io + d->cfg + off));
}

uint16_t virtio_cfg_read16(struct virtio_dev *d, unsigned off)
{
	return inw((uint16_t)(d->io + d->cfg + off));
}

uint32_t virtio_cfg_read32(struct virtio_dev *d, unsigned off)
{
	return inl((uint16_t)(d->io + d->cfg + off));
}

uint64_t virtio_cfg_read64(struct virtio_dev *d, unsigned off)
{
	/* Legacy has no config generation: re-read until both halves agree. */
	for (;;) {
		uint32_t hi = virtio_cfg_read32(d, off + 4);
		uint32_t lo = virtio_cfg_read32(d, off);

		if (virtio_cfg_read32(d, off + 4) == hi)
			return ((uint64_t)hi << 32) | lo;
	}
}

uint16_t virtq_add(struct virtq *q, const struct virtq_seg *segs, unsigned n)
{
	uint16_t head = q->free_head, i = head;

	if (n == 0 || n > q->num_free)
		fail("virtq %u: chain of %u with %u free descriptors",
		     q->index, n, q->num_free);
	/* The free list is linked through .next, so a chain is its prefix. */
	for (unsigned k = 0; k < n; k++) {
		volatile struct vring_desc *d = &q->desc[i];

		d->addr = dma_addr(segs[k].buf);
		d->len = segs[k].len;
		d->flags = (uint16_t)((k + 1 < n ? VRING_DESC_F_NEXT : 0) |
				      (segs[k].device_writes
				       ? VRING_DESC_F_WRITE : 0));
		i = d->next;
	}
	q->free_head = i;
	q->num_free = (uint16_t)(q->num_free - n);

	q->avail->ring[q->avail_idx & (q->size - 1)] = head;
	/* Descriptors and ring slot before the index (x86 keeps the order). */
	barrier();
	q->avail_idx++;
	q->avail->idx = q->avail_idx;
	return head;
}

void virtq_kick(struct virtq *q)
{
	/*
	 * The avail index must be visible before the flag is read: a device
	 * that turns notifications back on and then looks at the ring either
	 * sees our entry or we see its flag clear.  A locked add is a full
	 * barrier that every instruction emulator knows.
	 */
	__asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
	if (q->used->flags & VRING_USED_F_NO_NOTIFY)
		return;
	outw(q->dev->io + VIRTIO_R_QUEUE_NOTIFY, q->index);
}

bool virtq_pop(struct virtq *q, uint16_t *head, uint32_t *len)
{
	volatile struct vring_used_elem *e;
	uint16_t id, i, count = 1;

	if (q->last_used == q->used->idx)
		return false;
	barrier();
	e = &q->used->ring[q->last_used & (q->size - 1)];
	id = (uint16_t)e->id;
	if (len)
		*len = e->len;
	if (id >= q->size)
		fail("virtq %u: used id %u out of range", q->index, id);
	q->last_used++;

	for (i = id; q->desc[i].flags & VRING_DESC_F_NEXT; i = q->desc[i].next) {
		if (++count > q->size)
			fail("virtq %u: descriptor loop from %u", q->index, id);
	}
	q->desc[i].next = q->free_head;
	q->free_head = id;
	q->num_free = (uint16_t)(q->num_free + count);
	if (head)
		*head = id;
	return true;
}

static bool ready(struct virtq *q)
{
	if (q->last_used == q->used->idx)
		return false;
	return q->dev->irq == VIRTIO_IRQ_NONE || q->irqs != q->irqs_seen;
}

void virtq_wait(struct virtq *q)
{
	cli();
	if (!ready(q)) {
		if (virtio_watchdog_count)
			watchdog_arm(virtio_watchdog_count,
				     "virtio: no used entry or no interrupt");
		while (!ready(q)) {
			if (q->dev->irq == VIRTIO_IRQ_NONE)
				cpu_pause();
			else
				wait_for_interrupt();
		}
		if (virtio_watchdog_count)
			watchdog_disarm();
	}
	q->irqs_seen = q->irqs;
}

uint32_t virtq_call(struct virtq *q, const struct virtq_seg *segs,
		    unsigned n)
{
	uint16_t head = virtq_add(q, segs, n), got;
	uint32_t len;

	virtq_kick(q);
	virtq_wait(q);
	if (!virtq_pop(q, &got, &len))
		fail("virtq %u: used entry vanished", q->index);
	if (got != head)
		fail("virtq %u: used id %u, expected %u", q->index, got, head);
	return len;
}

const char *virtio_irq_name(const struct virtio_dev *d)
{
	switch (d->irq) {
	case VIRTIO_IRQ_MSIX:
		return "msix";
	case VIRTIO_IRQ_INTX:
		return "intx";
	default:
		return "poll";
	}
}
