/*
 * PCI configuration access (mechanism #1 and ECAM), bus-0 enumeration,
 * BAR sizing, capability walks and MSI/MSI-X programming.
 *
 * A function is named by its BDF: bus << 8 | device << 3 | function.
 */
#ifndef GUEST_PCI_H
#define GUEST_PCI_H

#include "io.h"

#define PCI_BDF(b, d, f)	((uint16_t)(((b) << 8) | ((d) << 3) | (f)))
#define PCI_BUS(bdf)		((unsigned)(bdf) >> 8)
#define PCI_DEV(bdf)		(((unsigned)(bdf) >> 3) & 0x1f)
#define PCI_FN(bdf)		((unsigned)(bdf) & 0x7)

/* bhyve's PCI_EMUL_ECFG_BASE: 1 MiB of ECAM per bus. */
#define PCI_ECAM_BASE		0xe0000000ull

#define PCI_VENDOR_ID		0x00
#define PCI_DEVICE_ID		0x02
#define PCI_COMMAND		0x04
#define PCI_STATUS		0x06
#define PCI_REVISION		0x08
#define PCI_CLASS_PROG		0x09	/* prog-if, subclass, class above */
#define PCI_HEADER_TYPE		0x0e
#define PCI_BAR0		0x10
#define PCI_SUBSYS_VENDOR	0x2c
#define PCI_SUBSYS_ID		0x2e
#define PCI_ROM_ADDRESS		0x30	/* header type 0 */
#define PCI_ROM_ADDRESS1	0x38	/* header type 1 */
#define PCI_CAP_PTR		0x34
#define PCI_CB_CAP_PTR		0x14	/* header type 2 */
#define PCI_INTERRUPT_LINE	0x3c
#define PCI_INTERRUPT_PIN	0x3d

#define PCI_CMD_IO		0x0001
#define PCI_CMD_MEM		0x0002
#define PCI_CMD_MASTER		0x0004
#define PCI_CMD_INTX_DISABLE	0x0400
#define PCI_STATUS_CAP_LIST	0x0010
#define PCI_HDR_MULTIFUNCTION	0x80

#define PCI_CAP_PM		0x01
#define PCI_CAP_MSI		0x05
#define PCI_CAP_VENDOR		0x09
#define PCI_CAP_PCIE		0x10
#define PCI_CAP_MSIX		0x11

/* Mechanism #1 (0xCF8/0xCFC).  Offsets are 0-255; sizes must be aligned. */
uint32_t pci_read32(uint16_t bdf, uint16_t off);
uint16_t pci_read16(uint16_t bdf, uint16_t off);
uint8_t pci_read8(uint16_t bdf, uint16_t off);
void pci_write32(uint16_t bdf, uint16_t off, uint32_t v);
void pci_write16(uint16_t bdf, uint16_t off, uint16_t v);
void pci_write8(uint16_t bdf, uint16_t off, uint8_t v);

/* ECAM (memory-mapped); offsets 0-4095. */
static inline uint64_t pci_ecam_addr(uint16_t bdf, uint16_t off)
{
	return PCI_ECAM_BASE + ((uint64_t)bdf << 12) + off;
}
uint32_t pci_ecam_read32(uint16_t bdf, uint16_t off);
uint16_t pci_ecam_read16(uint16_t bdf, uint16_t off);
uint8_t pci_ecam_read8(uint16_t bdf, uint16_t off);
void pci_ecam_write32(uint16_t bdf, uint16_t off, uint32_t v);
void pci_ecam_write16(uint16_t bdf, uint16_t off, uint16_t v);
void pci_ecam_write8(uint16_t bdf, uint16_t off, uint8_t v);

/* True if a function answers at BDF (vendor ID not 0xFFFF or 0). */
bool pci_present(uint16_t bdf);

/*
 * Call VISIT for every function on bus 0: each slot's function 0, and
 * functions 1-7 only where function 0 has the multifunction bit.  Returns
 * how many functions were visited.  VISIT may be NULL (count only).
 */
typedef void (*pci_visit_t)(uint16_t bdf, void *arg);
unsigned pci_scan_bus0(pci_visit_t visit, void *arg);

/* The INDEX-th (from 0) function on bus 0 for which MATCH(bdf, KEY) holds. */
typedef bool (*pci_match_t)(uint16_t bdf, uint32_t key);
bool pci_find_nth(pci_match_t match, uint32_t key, unsigned index, uint16_t *bdf);

/* The INDEX-th (from 0) function with these IDs on bus 0. */
bool pci_find(uint16_t vendor, uint16_t device, unsigned index,
	      uint16_t *bdf);

/* The INDEX-th (from 0) function of class CLASS (class, subclass, prog-if). */
bool pci_find_class(uint32_t class_code, unsigned index, uint16_t *bdf);

/* bhyve's host bridge at 00:00.0 (its default 1275:1275 or 1022:7432). */
bool pci_host_is_bhyve(void);

/*
 * The IOAPIC pin of the function's INTx line; -1 if it has no INTx pin or
 * none can be found.  Under bhyve booted from a ROM the wiring is fixed:
 * slot S, pin P (1-4 = INTA-INTD) goes to IOAPIC pin 16 + (4 + S + P) mod 8
 * (bhyve's interrupt-line register holds the 8259 IRQ of the PIRQ link
 * instead, for guests in PIC mode).  Elsewhere the interrupt-line register
 * is taken as the IOAPIC pin, as pcifw_setup() leaves it under QEMU.
 */
int pci_intx_pin(uint16_t bdf);

enum pci_bar_kind { PCI_BAR_NONE, PCI_BAR_IO, PCI_BAR_MEM32, PCI_BAR_MEM64 };

struct pci_bar {
	enum pci_bar_kind kind;
	bool prefetchable;
	uint64_t addr;
	uint64_t size;
};

/* Number of BAR registers the header type has (6, 2 or 0). */
unsigned pci_bar_slots(uint16_t bdf);

/*
 * Size BAR INDEX the way firmware does: decoding off, write all-ones, read
 * back, restore the BAR and the command register.  Returns the number of
 * BAR registers it occupies (2 for a 64-bit BAR, else 1); bar->kind is
 * PCI_BAR_NONE if the register is not implemented.
 */
unsigned pci_bar_probe(uint16_t bdf, unsigned index, struct pci_bar *bar);

/* The BAR's current address, without sizing it (0 if not implemented). */
uint64_t pci_bar_addr(uint16_t bdf, unsigned index);

/* Size the expansion-ROM BAR; false if the function has none. */
bool pci_rom_probe(uint16_t bdf, uint64_t *addr, uint64_t *size);

/* Set then clear bits in the command register. */
void pci_command(uint16_t bdf, uint16_t set, uint16_t clear);

/*
 * Capability list (standard, in the first 256 bytes).  Walks stop after 48
 * entries so a looping list in a buggy device cannot hang the guest.
 */
uint8_t pci_find_cap(uint16_t bdf, uint8_t id);
unsigned pci_caps(uint16_t bdf, uint8_t *ids, unsigned max);

/*
 * Point single-message MSI at (DEST, VECTOR), enable it and disable INTx.
 * Returns false if the function has no MSI capability.
 */
bool pci_msi_setup(uint16_t bdf, uint8_t dest, uint8_t vector);

/*
 * Program MSI-X table ENTRY for (DEST, VECTOR), unmask it and enable MSI-X
 * (memory decoding on, INTx off).  Returns false if the function has no
 * MSI-X capability or ENTRY is beyond its table.
 */
bool pci_msix_setup(uint16_t bdf, unsigned entry, uint8_t dest,
		    uint8_t vector);

#endif
