#include "ahci.h"
#include "dma.h"
#include "intr.h"
#include "mmu.h"
#include "pci.h"
#include "util.h"

/*
 * Poll budgets (each poll is an MMIO read, i.e. a VM exit).  bhyve's HBA
 * finishes a reset or a port stop inside the register write; real ones
 * take up to 500 ms (AHCI 1.3 section 10.1.2).
 */
#define RESET_POLLS	100000
#define STOP_POLLS	100000
#define READY_POLLS	100000
/* Command completion when polling: generous, each poll is a VM exit. */
#define COMMAND_POLLS	10000000

#define CMD_HDR_DWORDS	8
#define CMD_HDR_CFL	5		/* register FIS: 5 dwords */
#define CMD_HDR_A	(1u << 5)	/* ATAPI */
#define CMD_HDR_W	(1u << 6)	/* host to device */
#define CT_CFIS		0x00
#define CT_ACMD		0x40
#define CT_PRDT		0x80
#define CT_SIZE		(CT_PRDT + 16 * AHCI_MAX_PRDS)
#define FIS_H2D		0x27
#define FIS_H2D_C	0x80		/* command, not control */
#define DEV_LBA		0x40

#define PORT_IE		(AHCI_P_IX_DHR | AHCI_P_IX_PS | AHCI_P_IX_DS | \
			 AHCI_P_IX_SDB | AHCI_P_IX_DP | AHCI_P_IX_ERRORS)

uint32_t ahci_watchdog_count = 0x10000000;

uint32_t ahci_read(struct ahci_hba *h, uint32_t reg)
{
	return mmio_read32(h->abar + reg);
}

void ahci_write(struct ahci_hba *h, uint32_t reg, uint32_t v)
{
	mmio_write32(h->abar + reg, v);
}

uint32_t ahci_port_read(struct ahci_port *p, uint32_t reg)
{
	return mmio_read32(p->regs + reg);
}

void ahci_port_write(struct ahci_port *p, uint32_t reg, uint32_t v)
{
	mmio_write32(p->regs + reg, v);
}

/*
 * One handler for MSI and INTx: for each port the HBA flags, collect and
 * clear its PxIS, then clear those bits in IS.  With INTx that is what
 * drops the level-triggered line; a spurious call on a shared pin finds IS
 * empty and does nothing.
 */
static void on_interrupt(void *arg)
{
	struct ahci_hba *h = arg;
	uint32_t is = ahci_read(h, AHCI_IS);

	if (!is)
		return;
	h->irqs++;
	for (unsigned n = 0; n < AHCI_MAX_PORTS; n++) {
		struct ahci_port *p = h->ports[n];
		uint32_t pis;

		if (!(is & (1u << n)))
			continue;
		pis = mmio_read32(h->abar + AHCI_PORT(n) + AHCI_P_IS);
		mmio_write32(h->abar + AHCI_PORT(n) + AHCI_P_IS, pis);
		if (p)
			p->is_seen |= pis;
	}
	ahci_write(h, AHCI_IS, is);
}

void ahci_hba_init(struct ahci_hba *h, uint16_t bdf, bool allow_msi,
		   uint8_t dest)
{
	struct poll_budget b = poll_budget(RESET_POLLS);
	uint32_t bar = pci_read32(bdf, PCI_BAR0 + 4 * AHCI_ABAR);

	memset(h, 0, sizeof(*h));
	h->bdf = bdf;
	h->intx_pin = -1;
	if ((bar & 1) || pci_bar_addr(bdf, AHCI_ABAR) == 0)
		fail("AHCI %02x:%02x.%x: BAR5 %08x is not an assigned memory "
		     "BAR", PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), bar);
	h->abar = pci_bar_addr(bdf, AHCI_ABAR);
	mmio_map(h->abar, AHCI_PORT(AHCI_MAX_PORTS));
	pci_command(bdf, PCI_CMD_MEM | PCI_CMD_MASTER, 0);

	/* AE first: HR is only defined in AHCI mode. */
	ahci_write(h, AHCI_GHC, AHCI_GHC_AE);
	ahci_write(h, AHCI_GHC, AHCI_GHC_AE | AHCI_GHC_HR);
	while (ahci_read(h, AHCI_GHC) & AHCI_GHC_HR) {
		if (poll_expired(&b))
			fail("AHCI %02x:%02x.%x: HBA reset does not finish",
			     PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf));
	}
	ahci_write(h, AHCI_GHC, AHCI_GHC_AE);
	h->cap = ahci_read(h, AHCI_CAP);
	h->pi = ahci_read(h, AHCI_PI);
	h->vs = ahci_read(h, AHCI_VS);

	if (allow_msi && pci_find_cap(bdf, PCI_CAP_MSI)) {
		h->vector = intr_alloc_vector();
		intr_set_handler_arg(h->vector, on_interrupt, h);
		pci_msi_setup(bdf, dest, h->vector);
		h->irq = AHCI_IRQ_MSI;
	} else if ((h->intx_pin = pci_intx_pin(bdf)) >= 0) {
		pci_command(bdf, 0, PCI_CMD_INTX_DISABLE);
		intx_attach((unsigned)h->intx_pin, on_interrupt, h, dest);
		h->irq = AHCI_IRQ_INTX;
	} else {
		h->irq = AHCI_IRQ_POLL;
	}
}

void ahci_enable_interrupts(struct ahci_hba *h)
{
	if (h->irq == AHCI_IRQ_POLL)
		return;
	ahci_write(h, AHCI_IS, ahci_read(h, AHCI_IS));
	ahci_write(h, AHCI_GHC, AHCI_GHC_AE | AHCI_GHC_IE);
}

static void wait_clear(struct ahci_port *p, uint32_t reg, uint32_t bits,
		       const char *what)
{
	struct poll_budget b = poll_budget(STOP_POLLS);

	while (ahci_port_read(p, reg) & bits) {
		if (poll_expired(&b))
			fail("AHCI port %u: %s (reg %02x = %08x)", p->num,
			     what, reg, ahci_port_read(p, reg));
	}
}

static void port_stop(struct ahci_port *p)
{
	uint32_t cmd = ahci_port_read(p, AHCI_P_CMD);

	if (cmd & (AHCI_P_CMD_ST | AHCI_P_CMD_CR)) {
		ahci_port_write(p, AHCI_P_CMD, cmd & ~AHCI_P_CMD_ST);
		wait_clear(p, AHCI_P_CMD, AHCI_P_CMD_CR,
			   "command list does not stop");
	}
	cmd = ahci_port_read(p, AHCI_P_CMD);
	if (cmd & (AHCI_P_CMD_FRE | AHCI_P_CMD_FR)) {
		ahci_port_write(p, AHCI_P_CMD, cmd & ~AHCI_P_CMD_FRE);
		wait_clear(p, AHCI_P_CMD, AHCI_P_CMD_FR,
			   "FIS receive does not stop");
	}
}

static void port_run(struct ahci_port *p)
{
	uint32_t cmd = ahci_port_read(p, AHCI_P_CMD) | AHCI_P_CMD_FRE;

	ahci_port_write(p, AHCI_P_CMD, cmd);
	ahci_port_write(p, AHCI_P_SERR, 0xffffffffu);
	/* The device must be idle before the command list may run. */
	wait_clear(p, AHCI_P_TFD, AHCI_TFD_BSY | AHCI_TFD_DRQ,
		   "device stays busy");
	if (p->hba->cap & AHCI_CAP_SSS)
		cmd |= AHCI_P_CMD_SUD;
	ahci_port_write(p, AHCI_P_CMD, cmd | AHCI_P_CMD_POD | AHCI_P_CMD_ST);
	ahci_port_write(p, AHCI_P_IS, 0xffffffffu);
	ahci_port_write(p, AHCI_P_IE, p->hba->irq == AHCI_IRQ_POLL ? 0
								 : PORT_IE);
}

bool ahci_port_start(struct ahci_hba *h, struct ahci_port *p, unsigned n)
{
	uint64_t a;

	memset(p, 0, sizeof(*p));
	p->hba = h;
	p->num = n;
	p->regs = h->abar + AHCI_PORT(n);
	if ((ahci_port_read(p, AHCI_P_SSTS) & 0xf) != 3)
		return false;

	port_stop(p);
	p->cmd_list = dma_alloc(32 * CMD_HDR_DWORDS * 4, 1024);
	p->rfis = dma_alloc(256, 256);
	p->table = dma_alloc(CT_SIZE, 128);
	a = dma_addr(p->cmd_list);
	ahci_port_write(p, AHCI_P_CLB, (uint32_t)a);
	ahci_port_write(p, AHCI_P_CLBU, (uint32_t)(a >> 32));
	a = dma_addr(p->rfis);
	ahci_port_write(p, AHCI_P_FB, (uint32_t)a);
	ahci_port_write(p, AHCI_P_FBU, (uint32_t)(a >> 32));
	h->ports[n] = p;
	port_run(p);
	/* Valid once FIS receive is on (the device's first D2H FIS). */
	p->sig = ahci_port_read(p, AHCI_P_SIG);
	return true;
}

/* After an error the HBA stops fetching until software restarts the port. */
static void port_recover(struct ahci_port *p)
{
	port_stop(p);
	port_run(p);
}

static bool done(struct ahci_port *p, bool irq)
{
	uint32_t is = irq ? p->is_seen : ahci_port_read(p, AHCI_P_IS);

	if (is & AHCI_P_IX_ERRORS)
		return true;
	if (ahci_port_read(p, AHCI_P_CI) & 1)
		return false;
	/*
	 * The HBA may clear CI a moment before its interrupt arrives: with
	 * interrupts on, wait for that too (the D2H FIS with I set).
	 */
	return !irq || (is & (AHCI_P_IX_DHR | AHCI_P_IX_SDB));
}

uint32_t ahci_exec(struct ahci_port *p, const uint8_t fis[20],
		   const uint8_t *cdb, const struct ahci_prd *prds,
		   unsigned nprd, bool write)
{
	bool irq = p->hba->irq != AHCI_IRQ_POLL;
	struct poll_budget b = poll_budget(COMMAND_POLLS);
	volatile uint32_t *hdr = p->cmd_list;
	uint32_t is, tfd;

	if (nprd > AHCI_MAX_PRDS)
		fail("AHCI port %u: %u PRDs", p->num, nprd);
	memset((void *)p->table, 0, CT_SIZE);
	memcpy((void *)(p->table + CT_CFIS), fis, 20);
	if (cdb)
		memcpy((void *)(p->table + CT_ACMD), cdb, 12);
	for (unsigned i = 0; i < nprd; i++) {
		volatile uint32_t *prd =
			(volatile uint32_t *)(p->table + CT_PRDT + 16 * i);
		uint64_t a = dma_addr(prds[i].buf);

		prd[0] = (uint32_t)a;
		prd[1] = (uint32_t)(a >> 32);
		prd[2] = 0;
		prd[3] = prds[i].len - 1;	/* byte count - 1, no IRQ */
	}
	hdr[0] = CMD_HDR_CFL | (cdb ? CMD_HDR_A : 0) |
		 (write ? CMD_HDR_W : 0) | ((uint32_t)nprd << 16);
	hdr[1] = 0;				/* PRDBC, set by the HBA */
	hdr[2] = (uint32_t)dma_addr(p->table);
	hdr[3] = (uint32_t)(dma_addr(p->table) >> 32);

	cli();
	p->is_seen = 0;
	barrier();
	ahci_port_write(p, AHCI_P_CI, 1);
	if (irq && ahci_watchdog_count)
		watchdog_arm(ahci_watchdog_count,
			     "AHCI: command not completed or no interrupt");
	while (!done(p, irq)) {
		if (irq)
			wait_for_interrupt();
		else if (poll_expired(&b))
			fail("AHCI port %u: command %02x not completed (CI %08x "
			     "IS %08x TFD %08x)", p->num, fis[2],
			     ahci_port_read(p, AHCI_P_CI),
			     ahci_port_read(p, AHCI_P_IS),
			     ahci_port_read(p, AHCI_P_TFD));
	}
	if (irq && ahci_watchdog_count)
		watchdog_disarm();
	p->commands++;
	if (irq) {
		is = p->is_seen;
	} else {
		is = ahci_port_read(p, AHCI_P_IS);
		ahci_port_write(p, AHCI_P_IS, is);
	}
	tfd = ahci_port_read(p, AHCI_P_TFD);
	if ((is & AHCI_P_IX_ERRORS) || (tfd & AHCI_TFD_ERR)) {
		port_recover(p);
		return tfd ? tfd : 0xffffffffu;
	}
	return 0;
}

void ahci_fis(uint8_t fis[20], uint8_t command, uint64_t lba,
	      uint16_t count)
{
	memset(fis, 0, 20);
	fis[0] = FIS_H2D;
	fis[1] = FIS_H2D_C;
	fis[2] = command;
	fis[4] = (uint8_t)lba;
	fis[5] = (uint8_t)(lba >> 8);
	fis[6] = (uint8_t)(lba >> 16);
	fis[7] = DEV_LBA;
	fis[8] = (uint8_t)(lba >> 24);
	fis[9] = (uint8_t)(lba >> 32);
	fis[10] = (uint8_t)(lba >> 40);
	fis[12] = (uint8_t)count;
	fis[13] = (uint8_t)(count >> 8);
}

uint32_t ahci_identify(struct ahci_port *p, void *buf, bool atapi)
{
	uint8_t fis[20];
	struct ahci_prd prd = { buf, 512 };

	ahci_fis(fis, atapi ? ATA_IDENTIFY_PACKET : ATA_IDENTIFY, 0, 0);
	fis[7] = 0;
	return ahci_exec(p, fis, NULL, &prd, 1, false);
}

uint32_t ahci_rw(struct ahci_port *p, bool write, uint64_t lba,
		 uint16_t count, void *buf)
{
	uint8_t fis[20];
	uint32_t len = count * 512u;
	struct ahci_prd prds[2];
	unsigned n = 1;

	ahci_fis(fis, write ? ATA_WRITE_DMA_EXT : ATA_READ_DMA_EXT, lba,
		 count);
	/* Two PRDs when there are two sectors or more: a scatter list. */
	if (count >= 2) {
		uint32_t first = (count / 2) * 512u;

		prds[0] = (struct ahci_prd){ buf, first };
		prds[1] = (struct ahci_prd){ (uint8_t *)buf + first,
					     len - first };
		n = 2;
	} else {
		prds[0] = (struct ahci_prd){ buf, len };
	}
	return ahci_exec(p, fis, NULL, prds, n, write);
}

uint32_t ahci_flush(struct ahci_port *p)
{
	uint8_t fis[20];

	ahci_fis(fis, ATA_FLUSH_CACHE_EXT, 0, 0);
	return ahci_exec(p, fis, NULL, NULL, 0, false);
}

uint32_t ahci_packet(struct ahci_port *p, const uint8_t cdb[12], void *buf,
		     uint32_t len)
{
	uint8_t fis[20];
	struct ahci_prd prd = { buf, len };

	ahci_fis(fis, ATA_PACKET, 0, 0);
	fis[7] = 0;
	/* Features bit 0: data by DMA.  LBA mid/high: PIO byte-count limit. */
	fis[3] = len ? 1 : 0;
	fis[5] = (uint8_t)(len > 0xfffe ? 0xfe : len);
	fis[6] = (uint8_t)((len > 0xfffe ? 0xfffe : len) >> 8);
	return ahci_exec(p, fis, cdb, &prd, len ? 1 : 0, false);
}

void ata_string(const uint16_t *id, unsigned word, unsigned len, char *out)
{
	for (unsigned i = 0; i < len; i += 2) {
		uint16_t w = id[word + i / 2];

		out[i] = (char)(w >> 8);
		out[i + 1] = (char)w;
	}
	out[len] = 0;
}

const char *ahci_irq_name(const struct ahci_hba *h)
{
	switch (h->irq) {
	case AHCI_IRQ_MSI:
		return "msi";
	case AHCI_IRQ_INTX:
		return "intx";
	default:
		return "poll";
	}
}
