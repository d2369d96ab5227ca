/*
 * Steady, deterministic disk traffic for the snapshot tests.
 *
 * Iteration i writes sector (i mod IOSTRESS_SECTORS) of virtio-blk disks 0
 * and 1 (slot order) with a pattern of (disk, i), reads both back, checks
 * them, folds them into a running checksum and prints "ITER i checksum".
 * With an ATAPI CD on an AHCI HBA it also reads one CD block per
 * iteration.  Nothing here depends on time (no timers, no watchdog), so a
 * VM suspended and resumed at any instant, even with a request in flight,
 * must go on to print exactly what an uninterrupted run prints.
 * iostress_model.py computes all of it; README.md describes it.
 */
#include "ahci.h"
#include "dma.h"
#include "guest.h"
#include "pattern.h"
#include "pcifw.h"
#include "vblk.h"

#define IOSTRESS_ITERATIONS	200
#define IOSTRESS_SECTORS	16
#define IOSTRESS_CD_CYCLE	16
#define FLUSH_EVERY		16
#define CD_BLOCK		2048

static struct vblk disks[2];
static struct ahci_hba hba;
static struct ahci_port cd_ports[AHCI_MAX_PORTS];
static struct ahci_port *cd;
static uint32_t cd_blocks;
static uint8_t *wbuf, *rbuf, *cdbuf;

static uint32_t be32(const uint8_t *b)
{
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 |
	       (uint32_t)b[2] << 8 | b[3];
}

/* The first ATAPI device on the first AHCI HBA, if there is one. */
static void find_cd(uint8_t dest)
{
	static const uint8_t capacity[12] = { 0x25 };
	uint16_t bdf;

	if (!pci_find_class(AHCI_CLASS, 0, &bdf))
		return;
	ahci_hba_init(&hba, bdf, true, dest);
	for (unsigned n = 0; n < AHCI_MAX_PORTS; n++) {
		if (hba.pi & (1u << n))
			(void)ahci_port_start(&hba, &cd_ports[n], n);
	}
	ahci_enable_interrupts(&hba);
	for (unsigned n = 0; n < AHCI_MAX_PORTS; n++) {
		struct ahci_port *p = hba.ports[n];
		uint32_t tfd;

		if (!p || p->sig != AHCI_SIG_ATAPI)
			continue;
		memset(cdbuf, 0, 8);
		tfd = ahci_packet(p, capacity, cdbuf, 8);
		if (tfd)
			fail("IOSTRESS cd port %u read capacity: tfd=%08x", n,
			     tfd);
		kprintf("IOSTRESS cd port %u blocks=%u block-size=%u irq=%s\n",
			n, be32(cdbuf) + 1, be32(cdbuf + 4),
			ahci_irq_name(&hba));
		if (!cd && be32(cdbuf + 4) == CD_BLOCK) {
			cd = p;
			cd_blocks = be32(cdbuf) + 1;
		}
	}
}

static uint32_t cd_read(uint32_t iter, uint32_t sum)
{
	uint32_t cycle = cd_blocks < IOSTRESS_CD_CYCLE ? cd_blocks
						     : IOSTRESS_CD_CYCLE;
	uint32_t block = iter % cycle;
	uint8_t cdb[12] = { 0x28 };
	uint32_t tfd;

	cdb[2] = (uint8_t)(block >> 24);
	cdb[3] = (uint8_t)(block >> 16);
	cdb[4] = (uint8_t)(block >> 8);
	cdb[5] = (uint8_t)block;
	cdb[8] = 1;
	tfd = ahci_packet(cd, cdb, cdbuf, CD_BLOCK);
	if (tfd)
		fail("ITER %u cd read block %u: tfd=%08x", iter, block, tfd);
	return fnv32_words(sum, cdbuf, CD_BLOCK);
}

static void iterate(uint32_t iter, uint32_t *sum)
{
	uint64_t lba = iter % IOSTRESS_SECTORS;
	uint8_t st;

	for (unsigned d = 0; d < 2; d++) {
		iostress_sector(wbuf + d * SECTOR_SIZE, d, iter);
		st = vblk_rw(&disks[d], true, lba, wbuf + d * SECTOR_SIZE, 1);
		if (st != VBLK_S_OK)
			fail("ITER %u disk %u write lba %lu: status %u", iter,
			     d, lba, st);
	}
	for (unsigned d = 0; d < 2; d++) {
		memset(rbuf, 0, SECTOR_SIZE);
		st = vblk_rw(&disks[d], false, lba, rbuf, 1);
		if (st != VBLK_S_OK)
			fail("ITER %u disk %u read lba %lu: status %u", iter,
			     d, lba, st);
		if (memcmp(rbuf, wbuf + d * SECTOR_SIZE, SECTOR_SIZE))
			fail("ITER %u disk %u lba %lu reads back wrong", iter,
			     d, lba);
		*sum = fnv32_words(*sum, rbuf, SECTOR_SIZE);
	}
	if (iter % FLUSH_EVERY == FLUSH_EVERY - 1) {
		for (unsigned d = 0; d < 2; d++) {
			if (!(disks[d].dev.features & VBLK_F_FLUSH))
				continue;
			st = vblk_request(&disks[d], VBLK_T_FLUSH, 0, NULL, 0);
			if (st != VBLK_S_OK)
				fail("ITER %u disk %u flush: status %u", iter,
				     d, st);
		}
	}
}

void guest_main(void)
{
	uint8_t dest = intr_platform_init();
	uint32_t sum = FNV32_INIT, cdsum = FNV32_INIT;

	/* A suspended VM may sit still for any time: no watchdog. */
	virtio_watchdog_count = 0;
	ahci_watchdog_count = 0;
	pcifw_setup();
	wbuf = dma_alloc(2 * SECTOR_SIZE, 16);
	rbuf = dma_alloc(SECTOR_SIZE, 16);
	cdbuf = dma_alloc(CD_BLOCK, 16);
	for (unsigned d = 0; d < 2; d++) {
		uint16_t bdf;

		if (!virtio_find(VIRTIO_TYPE_BLOCK, d, &bdf))
			fail("IOSTRESS needs two virtio-blk disks, found %u",
			     d);
		vblk_init(&disks[d], bdf, true, dest);
		if (disks[d].capacity < IOSTRESS_SECTORS)
			fail("IOSTRESS disk %u: %lu sectors", d,
			     disks[d].capacity);
		kprintf("IOSTRESS disk %u pci=%02x:%02x.%x capacity=%lu irq=%s\n",
			d, PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf),
			disks[d].capacity, virtio_irq_name(&disks[d].dev));
	}
	find_cd(dest);
	kprintf("IOSTRESS START iterations=%u sectors=%u cd=%s\n",
		IOSTRESS_ITERATIONS, IOSTRESS_SECTORS, cd ? "yes" : "no");

	for (uint32_t i = 0; i < IOSTRESS_ITERATIONS; i++) {
		iterate(i, &sum);
		if (cd)
			cdsum = cd_read(i, cdsum);
		kprintf("ITER %u %08x\n", i, sum);
	}
	if (cd)
		kprintf("IOSTRESS CD port=%u fnv=%08x\n", cd->num, cdsum);
	kprintf("IOSTRESS DONE %08x\n", sum);
}
