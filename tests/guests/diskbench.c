/*
 * Disk benchmark load for bench/disk.py: random 4 KiB reads, then
 * sequential 1 MiB writes and a FLUSH, on the first virtio-blk disk.
 *
 * The guest has no trustworthy clock (the LAPIC timer rate differs per
 * hypervisor and a suspended VM stops it), so it only prints a marker line
 * before and after each phase; the host timestamps them as they arrive on
 * COM1.  The parameters come from the host on COM1, so one ROM serves any
 * size of run: after "DISKBENCH READY ..." the guest reads one line
 * "<reads> <writes> <seed>" (decimal).
 *
 * Queue depth is 1: one request in flight, each completion awaited with
 * sti; hlt and taken from an interrupt (vblk_request), as vblk does.  The
 * random block numbers come from a 64-bit LCG (Knuth's MMIX constants);
 * block = (state >> 33) mod (disk size / 4 KiB), the state advanced before
 * each read.  bench/disk.py repeats the same sequence on the host.
 *
 * Output and the data pattern are documented in README.md.
 */
#include "dma.h"
#include "guest.h"
#include "pcifw.h"
#include "vblk.h"

#define BLOCK		4096u
#define CHUNK		(1024u * 1024u)
#define LCG_MUL		6364136223846793005ull
#define LCG_ADD		1442695040888963407ull
#define TAG_XOR		0x4b4e424b53494442ull	/* "BDISKBNK" little-endian */
#define WORD_MUL	0x9e3779b97f4a7c15ull
#define MAX_CHUNK_SEGS	8			/* what vblk_request takes */
#define CFG_SEG_MAX	12			/* legacy virtio-blk config */

/* Not zeroed at boot: the stub's bss clear would cost more than the fill. */
static uint8_t wbuf[CHUNK]
	__attribute__((aligned(4096), section(".noinit.diskbench")));

static struct vblk disk;

static uint64_t read_decimal(void)
{
	uint64_t v = 0;
	bool digits = false;
	int c;

	for (;;) {
		c = serial_getc_nowait();
		if (c < 0) {
			cpu_pause();
			continue;
		}
		if (c >= '0' && c <= '9') {
			v = v * 10 + (unsigned)(c - '0');
			digits = true;
		} else if (digits) {
			return v;
		}
	}
}

/* Segments per 1 MiB request: at most seg_max (when offered) and 8. */
static unsigned chunk_segments(void)
{
	unsigned n = MAX_CHUNK_SEGS;

	if (disk.dev.host_features & VBLK_F_SEG_MAX) {
		uint32_t seg_max = virtio_cfg_read32(&disk.dev, CFG_SEG_MAX);

		if (seg_max == 0)
			fail("DISKBENCH device seg_max is 0");
		while (n > seg_max)
			n /= 2;
	}
	return n;
}

static void check(const char *what, uint64_t i, uint8_t st)
{
	if (st != VBLK_S_OK)
		fail("DISKBENCH %s %lu: status %u", what, i, st);
}

static void random_reads(uint64_t n, uint64_t seed, uint64_t blocks)
{
	uint8_t *buf = dma_alloc(BLOCK, BLOCK);
	uint64_t x = seed;

	kprintf("DISKBENCH READS START\n");
	for (uint64_t i = 0; i < n; i++) {
		uint64_t blk;

		x = x * LCG_MUL + LCG_ADD;
		blk = (x >> 33) % blocks;
		check("read", i, vblk_rw(&disk, false, blk * (BLOCK / 512), buf,
					 BLOCK / 512));
		/* bench/disk.py tags every block: proves the right one came. */
		if (*(volatile uint64_t *)buf != (blk ^ TAG_XOR))
			fail("DISKBENCH read %lu: block %lu has tag %lx", i, blk,
			     *(volatile uint64_t *)buf);
	}
	kprintf("DISKBENCH READS DONE %lu\n", n);
}

static void sequential_writes(uint64_t n, uint64_t chunks, unsigned nseg)
{
	struct virtq_seg segs[MAX_CHUNK_SEGS];
	uint64_t *w = (uint64_t *)wbuf;
	uint32_t seglen = CHUNK / nseg;

	for (uint64_t j = 0; j < CHUNK / 8; j++)
		w[j] = (j + 1) * WORD_MUL;
	for (unsigned s = 0; s < nseg; s++)
		segs[s] = (struct virtq_seg){ wbuf + s * seglen, seglen, false };

	kprintf("DISKBENCH WRITES START\n");
	for (uint64_t i = 0; i < n; i++) {
		uint64_t sector = (i % chunks) * (CHUNK / 512);

		check("write", i, vblk_request(&disk, VBLK_T_OUT, sector, segs,
					       nseg));
	}
	if (disk.dev.features & VBLK_F_FLUSH)
		check("flush", n, vblk_request(&disk, VBLK_T_FLUSH, 0, NULL, 0));
	kprintf("DISKBENCH WRITES DONE %lu\n", n);
}

void guest_main(void)
{
	uint8_t dest = intr_platform_init();
	uint64_t reads, writes, seed, blocks, chunks;
	unsigned nseg;
	uint16_t bdf;

	pcifw_setup();
	if (!virtio_find(VIRTIO_TYPE_BLOCK, 0, &bdf))
		fail("no virtio-blk function on bus 0");
	vblk_init(&disk, bdf, true, dest);
	blocks = disk.capacity / (BLOCK / 512);
	chunks = disk.capacity / (CHUNK / 512);
	if (chunks == 0)
		fail("DISKBENCH disk of %lu sectors: needs at least 1 MiB",
		     disk.capacity);
	nseg = chunk_segments();
	kprintf("DISKBENCH READY pci=%02x:%02x.%x irq=%s queue-size=%u "
		"capacity=%lu segs=%u flush=%s\n", PCI_BUS(bdf), PCI_DEV(bdf),
		PCI_FN(bdf), virtio_irq_name(&disk.dev), disk.q.size,
		disk.capacity, nseg,
		disk.dev.features & VBLK_F_FLUSH ? "yes" : "no");

	reads = read_decimal();
	writes = read_decimal();
	seed = read_decimal();
	kprintf("DISKBENCH PARAMS reads=%lu writes=%lu seed=%lu\n", reads,
		writes, seed);

	random_reads(reads, seed, blocks);
	sequential_writes(writes, chunks, nseg);
	kprintf("DISKBENCH requests=%u interrupts=%u\n", disk.requests,
		disk.q.irqs);
}
