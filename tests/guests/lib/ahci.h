/*
 * AHCI 1.3 host bus adapter: HBA and port set-up, and one command at a time
 * (slot 0) for ATA disks and ATAPI (packet) devices.
 *
 * bhyve's HBA ("ahci", "ahci-hd", "ahci-cd") is 8086:2821, class 01/06/01,
 * registers in BAR 5 (ABAR), an MSI capability, and INTx.  It accepts only
 * 32-bit aligned register writes, which is all this code does.
 */
#ifndef GUEST_AHCI_H
#define GUEST_AHCI_H

#include "io.h"

#define AHCI_CLASS		0x010601	/* mass storage, SATA, AHCI */
#define AHCI_ABAR		5

/* Generic host control. */
#define AHCI_CAP		0x00
#define AHCI_GHC		0x04
#define AHCI_IS			0x08
#define AHCI_PI			0x0c
#define AHCI_VS			0x10
#define AHCI_GHC_HR		(1u << 0)
#define AHCI_GHC_IE		(1u << 1)
#define AHCI_GHC_AE		(1u << 31)
#define AHCI_CAP_NCS(cap)	((((cap) >> 8) & 0x1f) + 1)
#define AHCI_CAP_SSS		(1u << 27)

/* Port registers, at 0x100 + 0x80 * port. */
#define AHCI_PORT(n)		(0x100u + 0x80u * (n))
#define AHCI_P_CLB		0x00
#define AHCI_P_CLBU		0x04
#define AHCI_P_FB		0x08
#define AHCI_P_FBU		0x0c
#define AHCI_P_IS		0x10
#define AHCI_P_IE		0x14
#define AHCI_P_CMD		0x18
#define AHCI_P_TFD		0x20
#define AHCI_P_SIG		0x24
#define AHCI_P_SSTS		0x28
#define AHCI_P_SCTL		0x2c
#define AHCI_P_SERR		0x30
#define AHCI_P_SACT		0x34
#define AHCI_P_CI		0x38

#define AHCI_P_CMD_ST		(1u << 0)
#define AHCI_P_CMD_SUD		(1u << 1)
#define AHCI_P_CMD_POD		(1u << 2)
#define AHCI_P_CMD_FRE		(1u << 4)
#define AHCI_P_CMD_FR		(1u << 14)
#define AHCI_P_CMD_CR		(1u << 15)
#define AHCI_P_CMD_ATAPI	(1u << 24)

#define AHCI_P_IX_DHR		(1u << 0)	/* D2H register FIS */
#define AHCI_P_IX_PS		(1u << 1)	/* PIO setup FIS */
#define AHCI_P_IX_DS		(1u << 2)	/* DMA setup FIS */
#define AHCI_P_IX_SDB		(1u << 3)	/* set device bits FIS */
#define AHCI_P_IX_DP		(1u << 5)	/* descriptor processed */
#define AHCI_P_IX_OF		(1u << 24)
#define AHCI_P_IX_INF		(1u << 26)
#define AHCI_P_IX_IF		(1u << 27)
#define AHCI_P_IX_HBD		(1u << 28)
#define AHCI_P_IX_HBF		(1u << 29)
#define AHCI_P_IX_TFE		(1u << 30)	/* task file error */
#define AHCI_P_IX_ERRORS	(AHCI_P_IX_OF | AHCI_P_IX_INF | \
				 AHCI_P_IX_IF | AHCI_P_IX_HBD | \
				 AHCI_P_IX_HBF | AHCI_P_IX_TFE)

#define AHCI_TFD_ERR		0x01
#define AHCI_TFD_DRQ		0x08
#define AHCI_TFD_BSY		0x80

#define AHCI_SIG_ATA		0x00000101u
#define AHCI_SIG_ATAPI		0xeb140101u

/* ATA commands used here. */
#define ATA_READ_DMA_EXT	0x25
#define ATA_WRITE_DMA_EXT	0x35
#define ATA_PACKET		0xa0
#define ATA_IDENTIFY_PACKET	0xa1
#define ATA_IDENTIFY		0xec
#define ATA_FLUSH_CACHE_EXT	0xea

#define AHCI_MAX_PRDS		8
#define AHCI_MAX_PORTS		32

enum ahci_irq_mode { AHCI_IRQ_POLL, AHCI_IRQ_MSI, AHCI_IRQ_INTX };

struct ahci_hba;

struct ahci_port {
	struct ahci_hba *hba;
	unsigned num;
	uint64_t regs;			/* MMIO address of the port's block */
	volatile uint32_t *cmd_list;	/* 32 headers of 8 dwords */
	volatile uint8_t *rfis;		/* received FIS area, 256 bytes */
	volatile uint8_t *table;	/* slot 0's command table */
	uint32_t sig;
	volatile uint32_t is_seen;	/* PxIS bits the handler cleared */
	uint32_t commands;
};

struct ahci_hba {
	uint16_t bdf;
	uint64_t abar;
	uint32_t cap, pi, vs;
	enum ahci_irq_mode irq;
	int intx_pin;
	uint8_t vector;
	volatile uint32_t irqs;		/* interrupts that were ours */
	struct ahci_port *ports[AHCI_MAX_PORTS];
};

struct ahci_prd {
	volatile void *buf;
	uint32_t len;			/* even, at most 4 MiB */
};

/*
 * Interrupt waits in ahci_exec() are guarded by the LAPIC watchdog with
 * this count (see watchdog_arm); 0 turns the guard off (iostress: a
 * suspended VM may sit still for any time).  Polling uses a poll budget.
 */
extern uint32_t ahci_watchdog_count;

uint32_t ahci_read(struct ahci_hba *h, uint32_t reg);
void ahci_write(struct ahci_hba *h, uint32_t reg, uint32_t v);
uint32_t ahci_port_read(struct ahci_port *p, uint32_t reg);
void ahci_port_write(struct ahci_port *p, uint32_t reg, uint32_t v);

/*
 * Memory decoding and bus mastering on, AHCI mode, HBA reset, and the
 * interrupt: MSI when allowed and offered, else INTx (from the
 * interrupt-line register), else polling.  Interrupts stay masked at the
 * HBA (GHC.IE) until ahci_enable_interrupts().
 */
void ahci_hba_init(struct ahci_hba *h, uint16_t bdf, bool allow_msi,
		   uint8_t dest);
void ahci_enable_interrupts(struct ahci_hba *h);

/*
 * True if port N has a device with the PHY up (PxSSTS.DET = 3).  Then
 * stops the port, gives it a command list and FIS area, starts it and
 * reads its signature into p->sig.
 */
bool ahci_port_start(struct ahci_hba *h, struct ahci_port *p, unsigned n);

/*
 * Run one command in slot 0 and wait for it (interrupt or poll).  FIS is
 * the 20-byte host-to-device register FIS; CDB (12 bytes) is the ATAPI
 * packet for ATA_PACKET, else NULL.  Returns 0, or the PxTFD value when
 * the device reported an error (the port is then restarted).
 */
uint32_t ahci_exec(struct ahci_port *p, const uint8_t fis[20],
		   const uint8_t *cdb, const struct ahci_prd *prds,
		   unsigned nprd, bool write);

/* Fill a register FIS for COMMAND with LBA48 addressing. */
void ahci_fis(uint8_t fis[20], uint8_t command, uint64_t lba,
	      uint16_t count);

/* IDENTIFY (PACKET) DEVICE into BUF (512 bytes). */
uint32_t ahci_identify(struct ahci_port *p, void *buf, bool atapi);

/* READ/WRITE DMA EXT of COUNT 512-byte sectors, BUF split over 2 PRDs. */
uint32_t ahci_rw(struct ahci_port *p, bool write, uint64_t lba,
		 uint16_t count, void *buf);

uint32_t ahci_flush(struct ahci_port *p);

/* An ATAPI packet command reading LEN bytes (0 for none) into BUF. */
uint32_t ahci_packet(struct ahci_port *p, const uint8_t cdb[12], void *buf,
		     uint32_t len);

/* ATA IDENTIFY string (byte-swapped words) into OUT (LEN + 1 bytes). */
void ata_string(const uint16_t *id, unsigned word, unsigned len, char *out);

const char *ahci_irq_name(const struct ahci_hba *h);

#endif
