/*
 * Virtio over PCI, legacy (0.9.5) layout, as bhyve implements it: the
 * register block is BAR 0 (I/O space), the MSI-X table (when the device
 * has one) is in a memory BAR, rings are page-aligned and given to the
 * device as a page frame number.
 *
 * A driver goes: virtio_begin() (reset, ACKNOWLEDGE, DRIVER),
 * virtio_negotiate(), virtio_setup_interrupts(), virtq_setup() for each
 * queue, virtio_driver_ok(); then virtq_add() / virtq_kick() and
 * virtq_wait() / virtq_pop(), or virtq_call() for one request at a time.
 */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "io.h"

#define VIRTIO_VENDOR		0x1af4
/* Legacy/transitional device IDs; the subsystem ID is the device type. */
#define VIRTIO_DEV_FIRST	0x1000
#define VIRTIO_DEV_LAST		0x103f

#define VIRTIO_TYPE_NET		1
#define VIRTIO_TYPE_BLOCK	2
#define VIRTIO_TYPE_CONSOLE	3
#define VIRTIO_TYPE_RNG		4

/* Legacy register block (BAR 0, I/O); every access has the register's size. */
#define VIRTIO_R_HOST_FEATURES	0x00	/* 32 */
#define VIRTIO_R_GUEST_FEATURES	0x04	/* 32 */
#define VIRTIO_R_QUEUE_PFN	0x08	/* 32 */
#define VIRTIO_R_QUEUE_NUM	0x0c	/* 16, read-only */
#define VIRTIO_R_QUEUE_SEL	0x0e	/* 16 */
#define VIRTIO_R_QUEUE_NOTIFY	0x10	/* 16 */
#define VIRTIO_R_STATUS		0x12	/* 8 */
#define VIRTIO_R_ISR		0x13	/* 8, reading clears it */
#define VIRTIO_R_CONFIG_VECTOR	0x14	/* 16, only while MSI-X is enabled */
#define VIRTIO_R_QUEUE_VECTOR	0x16	/* 16, only while MSI-X is enabled */
/* Device-specific configuration starts here, depending on MSI-X. */
#define VIRTIO_CFG_OFF		0x14
#define VIRTIO_CFG_OFF_MSIX	0x18
#define VIRTIO_NO_VECTOR	0xffff

#define VIRTIO_S_ACKNOWLEDGE	0x01
#define VIRTIO_S_DRIVER		0x02
#define VIRTIO_S_DRIVER_OK	0x04
#define VIRTIO_S_FAILED		0x80

#define VIRTIO_ISR_QUEUE	0x01
#define VIRTIO_ISR_CONFIG	0x02

#define VIRTIO_F_NOTIFY_ON_EMPTY	(1u << 24)
#define VIRTIO_F_RING_INDIRECT_DESC	(1u << 28)
#define VIRTIO_F_RING_EVENT_IDX		(1u << 29)

#define VRING_DESC_F_NEXT	1
#define VRING_DESC_F_WRITE	2
#define VRING_USED_F_NO_NOTIFY	1
#define VRING_ALIGN		4096
#define VRING_PFN_SHIFT		12

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};

struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[];
};

struct virtio_dev;

struct virtq {
	struct virtio_dev *dev;
	uint16_t index;			/* queue number at the device */
	uint16_t size;			/* entries, as the device dictates */
	volatile struct vring_desc *desc;
	volatile struct vring_avail *avail;
	volatile struct vring_used *used;
	uint16_t free_head;
	uint16_t num_free;
	uint16_t last_used;		/* next used entry to look at */
	uint16_t avail_idx;		/* our copy of avail->idx */
	uint16_t msix_entry;		/* VIRTIO_NO_VECTOR without MSI-X */
	volatile uint32_t irqs;		/* interrupts that named this queue */
	uint32_t irqs_seen;		/* irqs as of the last virtq_wait() */
};

enum virtio_irq_mode { VIRTIO_IRQ_NONE, VIRTIO_IRQ_MSIX, VIRTIO_IRQ_INTX };

#define VIRTIO_MAX_QUEUES	4

struct virtio_dev {
	uint16_t bdf;
	uint16_t io;			/* BAR 0 base port */
	uint16_t type;			/* subsystem ID */
	uint16_t cfg;			/* port offset of the device config */
	uint32_t host_features;
	uint32_t features;		/* negotiated */
	enum virtio_irq_mode irq;
	int intx_pin;			/* IOAPIC pin, INTx mode */
	uint8_t dest;			/* APIC ID interrupts go to */
	uint8_t cfg_vector;		/* CPU vector of config changes */
	volatile uint32_t cfg_irqs;	/* config-change interrupts seen */
	volatile uint32_t intx_irqs;	/* INTx interrupts that were ours */
	unsigned nqueues;
	struct virtq *queues[VIRTIO_MAX_QUEUES];
};

struct virtq_seg {
	volatile void *buf;
	uint32_t len;
	bool device_writes;		/* VRING_DESC_F_WRITE */
};

/*
 * Interrupt waits in virtq_wait() are guarded by the LAPIC watchdog with
 * this count (see watchdog_arm); 0 turns the guard off, for guests that
 * must not depend on host time (a suspended VM may sit still for long).
 */
extern uint32_t virtio_watchdog_count;

/* The INDEX-th (from 0) virtio function of TYPE on bus 0, in slot order. */
bool virtio_find(uint16_t type, unsigned index, uint16_t *bdf);

/*
 * Decoding and bus mastering on, reset, ACKNOWLEDGE, DRIVER; reads the
 * host features.  Fails the test if BAR 0 is not an I/O BAR.
 */
void virtio_begin(struct virtio_dev *d, uint16_t bdf);

/* Accept the host features in WANTED; returns what was accepted. */
uint32_t virtio_negotiate(struct virtio_dev *d, uint32_t wanted);

/*
 * MSI-X (table entry 0 for config changes, entry 1 + n for queue n) when
 * the device has the capability with room for NQUEUES queues and
 * ALLOW_MSIX is set; otherwise INTx on
 * the IOAPIC pin from the interrupt-line register.  Fails the test if
 * neither works.  Call before virtq_setup(): with MSI-X enabled the device
 * configuration moves from 0x14 to 0x18.
 */
void virtio_setup_interrupts(struct virtio_dev *d, unsigned nqueues,
			     bool allow_msix, uint8_t dest);

/* Allocate and register queue INDEX (size from the device, PFN, vector). */
void virtq_setup(struct virtio_dev *d, struct virtq *q, uint16_t index);

void virtio_driver_ok(struct virtio_dev *d);
uint8_t virtio_status(struct virtio_dev *d);

/* Device-specific configuration, OFF relative to its start. */
uint8_t virtio_cfg_read8(struct virtio_dev *d, unsigned off);
uint16_t virtio_cfg_read16(struct virtio_dev *d, unsigned off);
uint32_t virtio_cfg_read32(struct virtio_dev *d, unsigned off);
uint64_t virtio_cfg_read64(struct virtio_dev *d, unsigned off);

/* Put a descriptor chain on the avail ring; returns its head.  No kick. */
uint16_t virtq_add(struct virtq *q, const struct virtq_seg *segs,
		   unsigned n);
/* Notify the device, unless it asked not to be (VRING_USED_F_NO_NOTIFY). */
void virtq_kick(struct virtq *q);

/* Take one used entry, if any, and free its descriptors. */
bool virtq_pop(struct virtq *q, uint16_t *head, uint32_t *len);

/*
 * Sleep (sti; hlt) until the used ring has an entry and, with interrupts
 * on, an interrupt for this queue came since the previous wait.  A device
 * that moves the used ring without interrupting makes this hang (or the
 * watchdog fire): that is the point, it checks both.
 */
void virtq_wait(struct virtq *q);

/* One request: add, kick, wait, pop; checks the head; returns used len. */
uint32_t virtq_call(struct virtq *q, const struct virtq_seg *segs,
		    unsigned n);

const char *virtio_irq_name(const struct virtio_dev *d);

#endif
