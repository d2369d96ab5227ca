#include "pci.h"
#include "pcifw.h"
#include "serial.h"
#include "util.h"

#define IO_BASE		0xc000u
#define IO_LIMIT	0x10000u
#define MEM_BASE	0xc0000000ull
#define MEM_LIMIT	0xfec00000ull	/* IOAPIC, LAPIC and the ROM above */

/* QEMU's host bridges and the i440FX's PCI-to-ISA bridge. */
#define ID_I440FX	0x12378086u
#define ID_Q35		0x29c08086u
#define ID_PIIX3	0x70008086u
#define PIIX_PIRQ_ROUTE	0x60		/* 4 bytes, PIRQA-D; bit 7 = off */

struct fw_state {
	uint64_t io_next, mem_next;
	unsigned unassigned;
	unsigned changed;
	uint32_t chipset;
};

static uint64_t align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) & ~(a - 1);
}

static void note_assigned(uint16_t bdf, void *arg)
{
	struct fw_state *st = arg;

	if ((pci_read8(bdf, PCI_HEADER_TYPE) & 0x7f) != 0)
		return;
	for (unsigned i = 0; i < 6;) {
		struct pci_bar bar;
		unsigned used = pci_bar_probe(bdf, i, &bar);

		i += used;
		if (bar.kind == PCI_BAR_NONE)
			continue;
		if (bar.addr == 0) {
			st->unassigned++;
			continue;
		}
		if (bar.kind == PCI_BAR_IO) {
			if (bar.addr + bar.size > st->io_next)
				st->io_next = bar.addr + bar.size;
		} else if (bar.addr + bar.size <= MEM_LIMIT &&
			   bar.addr + bar.size > st->mem_next) {
			st->mem_next = bar.addr + bar.size;
		}
	}
}

static void assign_bars(uint16_t bdf, void *arg)
{
	struct fw_state *st = arg;
	bool changed = false;

	if ((pci_read8(bdf, PCI_HEADER_TYPE) & 0x7f) != 0)
		return;
	for (unsigned i = 0; i < 6;) {
		struct pci_bar bar;
		uint16_t off = (uint16_t)(PCI_BAR0 + 4 * i);
		unsigned used = pci_bar_probe(bdf, i, &bar);
		uint64_t a;

		i += used;
		if (bar.kind == PCI_BAR_NONE || bar.addr != 0)
			continue;
		if (bar.kind == PCI_BAR_IO) {
			a = align_up(st->io_next, bar.size);
			if (a + bar.size > IO_LIMIT)
				fail("firmware: out of I/O space for "
				     "%02x:%02x.%x", PCI_BUS(bdf),
				     PCI_DEV(bdf), PCI_FN(bdf));
			st->io_next = a + bar.size;
			pci_write32(bdf, off, (uint32_t)a);
		} else {
			/* 64-bit BARs too go below 4 GiB: simplest. */
			a = align_up(st->mem_next, bar.size);
			if (a + bar.size > MEM_LIMIT)
				fail("firmware: out of memory space for "
				     "%02x:%02x.%x", PCI_BUS(bdf),
				     PCI_DEV(bdf), PCI_FN(bdf));
			st->mem_next = a + bar.size;
			pci_write32(bdf, off, (uint32_t)a);
			if (bar.kind == PCI_BAR_MEM64)
				pci_write32(bdf, off + 4, 0);
		}
		changed = true;
	}
	if (changed)
		st->changed++;
}

/*
 * i440FX: the PIIX3 routes PIRQA-D to ISA IRQs through its PIRQ route
 * registers, which are off after reset; slot S's INTx pin P (1-4) drives
 * PIRQ (S - 1 + P - 1) mod 4.  The IRQs chosen are SeaBIOS's.
 */
static const uint8_t piix_irqs[4] = { 10, 10, 11, 11 };

static int i440fx_line(uint16_t bdf, uint8_t pin)
{
	uint16_t piix;
	unsigned pirq;
	uint8_t route;

	if (!pci_find(ID_PIIX3 & 0xffff, ID_PIIX3 >> 16, 0, &piix))
		return -1;
	pirq = (PCI_DEV(bdf) + pin - 2) & 3;
	route = pci_read8(piix, PIIX_PIRQ_ROUTE + pirq);
	if (route & 0x80) {
		route = piix_irqs[pirq];
		pci_write8(piix, PIIX_PIRQ_ROUTE + pirq, route);
	}
	return route & 0x0f;
}

/*
 * Q35: in APIC mode the ICH9 wires PIRQA-H straight to IOAPIC pins 16-23,
 * and QEMU's reset routing sends pin P (1-4) of an ordinary slot S to
 * PIRQ E + (S + P - 1) mod 4 (found by experiment under QEMU 7.2: slots
 * 3, 4, 5 and 8 with pin A land on pins 23, 20, 21 and 20).
 */
static int q35_line(uint16_t bdf, uint8_t pin)
{
	return 20 + (int)((PCI_DEV(bdf) + pin - 1) & 3);
}

static void assign_line(uint16_t bdf, void *arg)
{
	struct fw_state *st = arg;
	uint8_t pin = pci_read8(bdf, PCI_INTERRUPT_PIN);
	uint8_t line = pci_read8(bdf, PCI_INTERRUPT_LINE);
	int irq;

	if (pin < 1 || pin > 4 || (line != 0 && line != 0xff))
		return;
	if (st->chipset == ID_I440FX)
		irq = i440fx_line(bdf, pin);
	else if (st->chipset == ID_Q35)
		irq = q35_line(bdf, pin);
	else
		return;
	if (irq <= 0)
		return;
	pci_write8(bdf, PCI_INTERRUPT_LINE, (uint8_t)irq);
	st->changed++;
}

void pcifw_setup(void)
{
	struct fw_state st = { IO_BASE, MEM_BASE, 0, 0, 0 };

	st.chipset = pci_read32(PCI_BDF(0, 0, 0), PCI_VENDOR_ID);
	pci_scan_bus0(note_assigned, &st);
	if (st.unassigned)
		pci_scan_bus0(assign_bars, &st);
	pci_scan_bus0(assign_line, &st);
	if (st.changed)
		kprintf("FIRMWARE set up %u BAR sets or interrupt lines\n",
			st.changed);
}
