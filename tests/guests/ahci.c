/*
 * Drives every AHCI HBA on bus 0 like an OS driver: HBA reset, MSI (or
 * INTx), every implemented port started, then by device signature:
 *   SATA disk: IDENTIFY DEVICE, WRITE DMA EXT of a known pattern (LBAs 0-3
 *     as one command with two PRDs, and the last LBA), FLUSH CACHE EXT,
 *     READ DMA EXT and compare;
 *   ATAPI CD-ROM: IDENTIFY PACKET DEVICE, TEST UNIT READY, GET EVENT
 *     STATUS NOTIFICATION (media), INQUIRY, READ CAPACITY, READ(10), with
 *     checksums the host can recompute from the image file.
 * Built with -DFORCE_INTX it takes INTx although the HBA has MSI
 * (ahci_intx.rom).  Output and patterns: README.md.
 */
#include "ahci.h"
#include "dma.h"
#include "guest.h"
#include "pattern.h"
#include "pcifw.h"

#ifdef FORCE_INTX
#define ALLOW_MSI	false
#else
#define ALLOW_MSI	true
#endif

#define MAX_HBAS	4
#define HEAD_SECTORS	4
#define TAG		"bhyvepy-ahci"
#define CD_BLOCK	2048
#define CD_READ_BLOCKS	4
#define CD_PVD_LBA	16	/* ISO 9660 primary volume descriptor */

static struct ahci_hba hbas[MAX_HBAS];
static struct ahci_port ports[MAX_HBAS][AHCI_MAX_PORTS];
static uint8_t *buf;		/* CD_READ_BLOCKS * CD_BLOCK, DMA-able */
static uint8_t *want;		/* HEAD_SECTORS * SECTOR_SIZE */
static unsigned ndisks, ncds;

static void check(struct ahci_port *p, const char *what, uint32_t tfd)
{
	if (tfd)
		fail("AHCI port %u %s: tfd=%08x (status %02x error %02x)",
		     p->num, what, tfd, tfd & 0xff, (tfd >> 8) & 0xff);
}

static void print_id_strings(const uint16_t *id)
{
	char s[41];

	ata_string(id, 27, 40, s);
	kprintf(" model=");
	print_text(s, 40);
	ata_string(id, 10, 20, s);
	kprintf(" serial=");
	print_text(s, 20);
}

static void test_disk(struct ahci_port *p, unsigned disk)
{
	const uint16_t *id = (const uint16_t *)buf;
	uint64_t sectors, last;

	check(p, "identify", ahci_identify(p, buf, false));
	sectors = (uint64_t)id[100] | (uint64_t)id[101] << 16 |
		  (uint64_t)id[102] << 32 | (uint64_t)id[103] << 48;
	if (!(id[83] & (1u << 10)))	/* no 48-bit addressing */
		sectors = (uint64_t)id[60] | (uint64_t)id[61] << 16;
	kprintf("AHCI port %u disk", p->num);
	print_id_strings(id);
	kprintf(" sectors=%lu\n", sectors);
	if (sectors <= HEAD_SECTORS)
		fail("AHCI port %u: %lu sectors, too small for the test",
		     p->num, sectors);
	last = sectors - 1;

	for (unsigned s = 0; s < HEAD_SECTORS; s++)
		sector_pattern(buf + s * SECTOR_SIZE, TAG, disk, s);
	check(p, "write lba 0-3", ahci_rw(p, true, 0, HEAD_SECTORS, buf));
	sector_pattern(buf, TAG, disk, last);
	check(p, "write last lba", ahci_rw(p, true, last, 1, buf));
	check(p, "flush", ahci_flush(p));

	memset(buf, 0, SECTOR_SIZE);
	check(p, "read last lba", ahci_rw(p, false, last, 1, buf));
	sector_pattern(want, TAG, disk, last);
	if (memcmp(buf, want, SECTOR_SIZE))
		fail("AHCI port %u: last lba %lu reads back wrong", p->num,
		     last);
	memset(buf, 0, HEAD_SECTORS * SECTOR_SIZE);
	check(p, "read lba 0-3", ahci_rw(p, false, 0, HEAD_SECTORS, buf));
	for (unsigned s = 0; s < HEAD_SECTORS; s++) {
		sector_pattern(want, TAG, disk, s);
		if (memcmp(buf + s * SECTOR_SIZE, want, SECTOR_SIZE))
			fail("AHCI port %u: lba %u reads back wrong", p->num,
			     s);
	}
	kprintf("AHCI port %u disk sectors=%lu pattern-disk=%u OK\n", p->num,
		sectors, disk);
	ndisks++;
}

static uint32_t be32(const uint8_t *b)
{
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 |
	       (uint32_t)b[2] << 8 | b[3];
}

static void read10(uint8_t *cdb, uint32_t lba, uint16_t blocks)
{
	memset(cdb, 0, 12);
	cdb[0] = 0x28;
	cdb[2] = (uint8_t)(lba >> 24);
	cdb[3] = (uint8_t)(lba >> 16);
	cdb[4] = (uint8_t)(lba >> 8);
	cdb[5] = (uint8_t)lba;
	cdb[7] = (uint8_t)(blocks >> 8);
	cdb[8] = (uint8_t)blocks;
}

static void cd_read(struct ahci_port *p, uint32_t lba, uint16_t blocks)
{
	uint8_t cdb[12];
	uint32_t len = blocks * (uint32_t)CD_BLOCK;

	read10(cdb, lba, blocks);
	memset(buf, 0, len);
	check(p, "read(10)", ahci_packet(p, cdb, buf, len));
	kprintf("AHCI port %u cd read lba=%u blocks=%u fnv=%08x head=", p->num,
		lba, blocks, fnv32_words(FNV32_INIT, buf, len));
	print_hex(buf, 16);
	kprintf("\n");
}

static void test_cd(struct ahci_port *p)
{
	static const uint8_t tur[12] = { 0x00 };
	static const uint8_t gesn[12] = { 0x4a, 0x01, 0, 0, 0x10, 0, 0,
					  0x00, 0x08 };
	static const uint8_t inquiry[12] = { 0x12, 0, 0, 0, 36 };
	static const uint8_t capacity[12] = { 0x25 };
	uint32_t blocks, bsize, first;

	check(p, "identify packet", ahci_identify(p, buf, true));
	kprintf("AHCI port %u cd", p->num);
	print_id_strings((const uint16_t *)buf);
	kprintf("\n");

	check(p, "test unit ready", ahci_packet(p, tur, NULL, 0));
	memset(buf, 0, 8);
	check(p, "get event status", ahci_packet(p, gesn, buf, 8));
	/* Media event descriptor: byte 5 bit 1 = media present. */
	kprintf("AHCI port %u cd media=%s event-class=%02x\n", p->num,
		buf[5] & 2 ? "present" : "absent", buf[2]);

	memset(buf, 0, 36);
	check(p, "inquiry", ahci_packet(p, inquiry, buf, 36));
	kprintf("AHCI port %u cd inquiry type=%02x vendor=", p->num,
		buf[0] & 0x1f);
	print_text(buf + 8, 8);
	kprintf(" product=");
	print_text(buf + 16, 16);
	kprintf(" revision=");
	print_text(buf + 32, 4);
	kprintf("\n");

	memset(buf, 0, 8);
	check(p, "read capacity", ahci_packet(p, capacity, buf, 8));
	blocks = be32(buf) + 1;
	bsize = be32(buf + 4);
	kprintf("AHCI port %u cd capacity blocks=%u block-size=%u\n", p->num,
		blocks, bsize);
	if (bsize != CD_BLOCK)
		fail("AHCI port %u: block size %u", p->num, bsize);

	first = blocks >= CD_PVD_LBA + CD_READ_BLOCKS ? CD_PVD_LBA : 0;
	cd_read(p, first, (uint16_t)(blocks < CD_READ_BLOCKS
				     ? blocks : CD_READ_BLOCKS));
	cd_read(p, blocks - 1, 1);
	kprintf("AHCI port %u cd blocks=%u OK\n", p->num, blocks);
	ncds++;
}

static void test_hba(unsigned idx, uint16_t bdf, uint8_t dest)
{
	struct ahci_hba *h = &hbas[idx];

	ahci_hba_init(h, bdf, ALLOW_MSI, dest);
	kprintf("AHCI hba=%02x:%02x.%x id=%04x:%04x cap=%08x pi=%08x "
		"version=%08x irq=%s\n", PCI_BUS(bdf), PCI_DEV(bdf),
		PCI_FN(bdf), pci_read16(bdf, PCI_VENDOR_ID),
		pci_read16(bdf, PCI_DEVICE_ID), h->cap, h->pi, h->vs,
		ahci_irq_name(h));
	for (unsigned n = 0; n < AHCI_MAX_PORTS; n++) {
		struct ahci_port *p = &ports[idx][n];

		if (!(h->pi & (1u << n)))
			continue;
		if (!ahci_port_start(h, p, n)) {
			kprintf("AHCI port %u none\n", n);
			continue;
		}
		kprintf("AHCI port %u sig=%08x\n", n, p->sig);
	}
	ahci_enable_interrupts(h);
	for (unsigned n = 0; n < AHCI_MAX_PORTS; n++) {
		struct ahci_port *p = h->ports[n];

		if (!p)
			continue;
		if (p->sig == AHCI_SIG_ATA)
			test_disk(p, idx * AHCI_MAX_PORTS + n);
		else if (p->sig == AHCI_SIG_ATAPI)
			test_cd(p);
		else
			fail("AHCI port %u: unknown signature %08x", n,
			     p->sig);
	}
	kprintf("AHCI hba=%02x:%02x.%x interrupts=%u\n", PCI_BUS(bdf),
		PCI_DEV(bdf), PCI_FN(bdf), h->irqs);
}

void guest_main(void)
{
	uint8_t dest = intr_platform_init();
	unsigned n = 0;
	uint16_t bdf;

	pcifw_setup();
	buf = dma_alloc(CD_READ_BLOCKS * CD_BLOCK, 4096);
	want = dma_alloc(HEAD_SECTORS * SECTOR_SIZE, 16);
	while (n < MAX_HBAS && pci_find_class(AHCI_CLASS, n, &bdf)) {
		test_hba(n, bdf, dest);
		n++;
	}
	if (n == 0)
		fail("no AHCI HBA on bus 0");
	kprintf("AHCI DONE hbas=%u disks=%u cds=%u\n", n, ndisks, ncds);
}
