/*
 * Lists every PCI function on bus 0 as firmware sees it (IDs, class, BARs
 * sized by the all-ones probe, expansion ROM, capabilities, INTx), then
 * checks that ECAM shows the same configuration space as 0xCF8/0xCFC.
 * The line format is a contract with the host tests: see README.md.
 */
#include "guest.h"

#define MAX_FUNCS 64

struct enum_state {
	unsigned count;
	uint16_t bdf[MAX_FUNCS];
};

static const char *bar_kind_name(const struct pci_bar *b)
{
	switch (b->kind) {
	case PCI_BAR_IO:
		return "io";
	case PCI_BAR_MEM32:
		return b->prefetchable ? "mem32p" : "mem32";
	case PCI_BAR_MEM64:
		return b->prefetchable ? "mem64p" : "mem64";
	default:
		return "none";
	}
}

static void show_function(uint16_t bdf, void *arg)
{
	struct enum_state *st = arg;
	uint32_t ids = pci_read32(bdf, PCI_VENDOR_ID);
	uint32_t class_rev = pci_read32(bdf, PCI_REVISION);
	uint8_t hdr = pci_read8(bdf, PCI_HEADER_TYPE);
	unsigned slots = pci_bar_slots(bdf);
	uint8_t caps[16];
	unsigned ncaps;
	uint64_t rom_addr, rom_size;
	uint8_t pin;

	kprintf("PCI %02x:%02x.%x vendor=%04x device=%04x class=%06x rev=%02x"
		" hdr=%02x",
		PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), ids & 0xffff,
		ids >> 16, class_rev >> 8, class_rev & 0xff, hdr);
	if ((hdr & 0x7f) == 0)
		kprintf(" subsys=%04x:%04x",
			pci_read16(bdf, PCI_SUBSYS_VENDOR),
			pci_read16(bdf, PCI_SUBSYS_ID));

	for (unsigned i = 0; i < slots;) {
		struct pci_bar bar;
		unsigned used = pci_bar_probe(bdf, i, &bar);

		if (bar.kind != PCI_BAR_NONE)
			kprintf(" BAR%u=%s:0x%lx/0x%lx", i, bar_kind_name(&bar),
				bar.addr, bar.size);
		i += used;
	}
	if (pci_rom_probe(bdf, &rom_addr, &rom_size))
		kprintf(" ROM=0x%lx/0x%lx", rom_addr, rom_size);

	ncaps = pci_caps(bdf, caps, ARRAY_SIZE(caps));
	if (ncaps > ARRAY_SIZE(caps))
		fail("%02x:%02x.%x: capability list too long or looping",
		     PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf));
	kprintf(" caps=");
	if (ncaps == 0)
		kprintf("-");
	for (unsigned i = 0; i < ncaps; i++)
		kprintf(i ? ",%02x" : "%02x", caps[i]);

	pin = pci_read8(bdf, PCI_INTERRUPT_PIN);
	if (pin >= 1 && pin <= 4)
		kprintf(" int=%c/%u\n", 'A' + pin - 1,
			pci_read8(bdf, PCI_INTERRUPT_LINE));
	else
		kprintf(" int=-\n");

	if (st->count < MAX_FUNCS)
		st->bdf[st->count] = bdf;
	st->count++;
}

/* Header dwords that must read the same whichever way they are accessed. */
static const uint16_t ecam_offsets[] = { 0x00, 0x08, 0x0c, 0x2c, 0x3c };

static void check_ecam(const struct enum_state *st)
{
	unsigned n = st->count < MAX_FUNCS ? st->count : MAX_FUNCS;

	for (unsigned i = 0; i < n; i++) {
		uint16_t bdf = st->bdf[i];

		for (unsigned j = 0; j < ARRAY_SIZE(ecam_offsets); j++) {
			uint16_t off = ecam_offsets[j];
			uint32_t a = pci_read32(bdf, off);
			uint32_t b = pci_ecam_read32(bdf, off);

			if (a != b)
				fail("ECAM %02x:%02x.%x off=%02x cf8=%08x "
				     "ecam=%08x", PCI_BUS(bdf), PCI_DEV(bdf),
				     PCI_FN(bdf), off, a, b);
		}
	}

	/* An empty slot must read as all-ones through ECAM too. */
	for (unsigned dev = 0; dev < 32; dev++) {
		uint16_t bdf = PCI_BDF(0, dev, 0);
		uint32_t v;

		if (pci_present(bdf))
			continue;
		v = pci_ecam_read32(bdf, PCI_VENDOR_ID);
		if (v != 0xffffffffu)
			fail("ECAM 00:%02x.0 empty slot reads %08x", dev, v);
		break;
	}

	/*
	 * A write through ECAM must be seen through 0xCFC.  The interrupt
	 * line register is plain read/write storage in every function.
	 */
	if (n) {
		uint16_t bdf = st->bdf[0];
		uint8_t orig = pci_read8(bdf, PCI_INTERRUPT_LINE);
		uint8_t v;

		pci_ecam_write8(bdf, PCI_INTERRUPT_LINE, orig ^ 0xa5);
		v = pci_read8(bdf, PCI_INTERRUPT_LINE);
		pci_write8(bdf, PCI_INTERRUPT_LINE, orig);
		if (v != (uint8_t)(orig ^ 0xa5))
			fail("ECAM write to %02x:%02x.%x not seen via cf8 "
			     "(wrote %02x, read %02x)", PCI_BUS(bdf),
			     PCI_DEV(bdf), PCI_FN(bdf), orig ^ 0xa5, v);
	}
	kprintf("ECAM OK %u\n", n);
}

void guest_main(void)
{
	static struct enum_state st;

	pci_scan_bus0(show_function, &st);
	if (st.count == 0)
		fail("no PCI function on bus 0");
	check_ecam(&st);
	kprintf("PCIENUM DONE %u\n", st.count);
}
