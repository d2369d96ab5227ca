#include "dma.h"
#include "util.h"
#include "vblk.h"

void vblk_init(struct vblk *b, uint16_t bdf, bool allow_msix, uint8_t dest)
{
	memset(b, 0, sizeof(*b));
	virtio_begin(&b->dev, bdf);
	virtio_negotiate(&b->dev, VBLK_F_FLUSH);
	virtio_setup_interrupts(&b->dev, 1, allow_msix, dest);
	virtq_setup(&b->dev, &b->q, 0);
	virtio_driver_ok(&b->dev);
	b->capacity = virtio_cfg_read64(&b->dev, 0);
	b->hdr = dma_alloc(sizeof(*b->hdr), 16);
	b->status = dma_alloc(1, 1);
}

uint8_t vblk_request(struct vblk *b, uint32_t type, uint64_t sector,
		     const struct virtq_seg *data, unsigned nseg)
{
	struct virtq_seg segs[VBLK_MAX_SEGS + 2];
	bool dev_writes = type != VBLK_T_OUT;

	if (nseg > VBLK_MAX_SEGS)
		fail("vblk: %u data segments", nseg);
	b->hdr->type = type;
	b->hdr->ioprio = 0;
	b->hdr->sector = sector;
	*b->status = 0xff;
	segs[0] = (struct virtq_seg){ b->hdr, sizeof(*b->hdr), false };
	for (unsigned i = 0; i < nseg; i++) {
		segs[1 + i] = data[i];
		segs[1 + i].device_writes = dev_writes;
	}
	segs[1 + nseg] = (struct virtq_seg){ b->status, 1, true };
	virtq_call(&b->q, segs, nseg + 2);
	b->requests++;
	return *b->status;
}

uint8_t vblk_rw(struct vblk *b, bool write, uint64_t sector, void *buf,
		unsigned count)
{
	struct virtq_seg seg = { buf, count * 512u, !write };

	return vblk_request(b, write ? VBLK_T_OUT : VBLK_T_IN, sector, &seg,
			    1);
}
