/*
 * virtio-blk requests on top of the legacy virtio transport: a 16-byte
 * header the device reads, the data segments, a status byte it writes.
 */
#ifndef GUEST_VBLK_H
#define GUEST_VBLK_H

#include "virtio.h"

#define VBLK_T_IN		0
#define VBLK_T_OUT		1
#define VBLK_T_FLUSH		4
#define VBLK_T_GET_ID		8

#define VBLK_S_OK		0
#define VBLK_S_IOERR		1
#define VBLK_S_UNSUPP		2

#define VBLK_F_SIZE_MAX		(1u << 1)
#define VBLK_F_SEG_MAX		(1u << 2)
#define VBLK_F_BLK_SIZE		(1u << 6)
#define VBLK_F_FLUSH		(1u << 9)
#define VBLK_ID_BYTES		20
#define VBLK_MAX_SEGS		8

struct vblk_hdr {
	uint32_t type;
	uint32_t ioprio;
	uint64_t sector;
};

struct vblk {
	struct virtio_dev dev;
	struct virtq q;
	uint64_t capacity;		/* 512-byte sectors */
	volatile struct vblk_hdr *hdr;	/* one request at a time */
	volatile uint8_t *status;
	unsigned requests;
};

/* Set up the function at BDF; accepts VIRTIO_BLK_F_FLUSH when offered. */
void vblk_init(struct vblk *b, uint16_t bdf, bool allow_msix, uint8_t dest);

/*
 * One request of TYPE at SECTOR with NSEG data segments (device-written
 * for IN and GET_ID, device-read for OUT); returns the status byte.  A
 * status the device did not write (it is preset to 0xFF) is returned as
 * is, so callers see it.
 */
uint8_t vblk_request(struct vblk *b, uint32_t type, uint64_t sector,
		     const struct virtq_seg *data, unsigned nseg);

/* Read or write COUNT sectors from/to one contiguous buffer. */
uint8_t vblk_rw(struct vblk *b, bool write, uint64_t sector, void *buf,
		unsigned count);

#endif
