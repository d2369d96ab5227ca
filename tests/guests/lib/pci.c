#include "intr.h"
#include "mmu.h"
#include "pci.h"
#include "util.h"

#define CF8_PORT	0xcf8
#define CFC_PORT	0xcfc
#define CAP_WALK_MAX	48

static void cf8_select(uint16_t bdf, uint16_t off)
{
	outl(CF8_PORT, 0x80000000u | ((uint32_t)bdf << 8) | (off & 0xfc));
}

uint32_t pci_read32(uint16_t bdf, uint16_t off)
{
	cf8_select(bdf, off);
	return inl(CFC_PORT);
}

uint16_t pci_read16(uint16_t bdf, uint16_t off)
{
	cf8_select(bdf, off);
	return inw(CFC_PORT + (off & 2));
}

uint8_t pci_read8(uint16_t bdf, uint16_t off)
{
	cf8_select(bdf, off);
	return inb(CFC_PORT + (off & 3));
}

void pci_write32(uint16_t bdf, uint16_t off, uint32_t v)
{
	cf8_select(bdf, off);
	outl(CFC_PORT, v);
}

void pci_write16(uint16_t bdf, uint16_t off, uint16_t v)
{
	cf8_select(bdf, off);
	outw(CFC_PORT + (off & 2), v);
}

void pci_write8(uint16_t bdf, uint16_t off, uint8_t v)
{
	cf8_select(bdf, off);
	outb(CFC_PORT + (off & 3), v);
}

uint32_t pci_ecam_read32(uint16_t bdf, uint16_t off)
{
	return mmio_read32(pci_ecam_addr(bdf, off));
}

uint16_t pci_ecam_read16(uint16_t bdf, uint16_t off)
{
	return mmio_read16(pci_ecam_addr(bdf, off));
}

uint8_t pci_ecam_read8(uint16_t bdf, uint16_t off)
{
	return mmio_read8(pci_ecam_addr(bdf, off));
}

void pci_ecam_write32(uint16_t bdf, uint16_t off, uint32_t v)
{
	mmio_write32(pci_ecam_addr(bdf, off), v);
}

void pci_ecam_write16(uint16_t bdf, uint16_t off, uint16_t v)
{
	mmio_write16(pci_ecam_addr(bdf, off), v);
}

void pci_ecam_write8(uint16_t bdf, uint16_t off, uint8_t v)
{
	mmio_write8(pci_ecam_addr(bdf, off), v);
}

bool pci_present(uint16_t bdf)
{
	uint16_t vendor = pci_read16(bdf, PCI_VENDOR_ID);

	return vendor != 0xffff && vendor != 0;
}

unsigned pci_scan_bus0(pci_visit_t visit, void *arg)
{
	unsigned count = 0;

	for (unsigned dev = 0; dev < 32; dev++) {
		uint16_t bdf0 = PCI_BDF(0, dev, 0);
		unsigned nfn;

		if (!pci_present(bdf0))
			continue;
		nfn = pci_read8(bdf0, PCI_HEADER_TYPE) & PCI_HDR_MULTIFUNCTION
			? 8 : 1;
		for (unsigned fn = 0; fn < nfn; fn++) {
			uint16_t bdf = PCI_BDF(0, dev, fn);

			if (fn && !pci_present(bdf))
				continue;
			if (visit)
				visit(bdf, arg);
			count++;
		}
	}
	return count;
}

struct nth_arg {
	pci_match_t match;
	uint32_t key;
	unsigned index;
	bool found;
	uint16_t bdf;
};

static void nth_visit(uint16_t bdf, void *p)
{
	struct nth_arg *a = p;

	if (a->found || !a->match(bdf, a->key))
		return;
	if (a->index-- == 0) {
		a->found = true;
		a->bdf = bdf;
	}
}

bool pci_find_nth(pci_match_t match, uint32_t key, unsigned index, uint16_t *bdf)
{
	struct nth_arg a = { match, key, index, false, 0 };

	pci_scan_bus0(nth_visit, &a);
	if (a.found)
		*bdf = a.bdf;
	return a.found;
}

static bool match_ids(uint16_t bdf, uint32_t ids)
{
	return pci_read32(bdf, PCI_VENDOR_ID) == ids;
}

bool pci_find(uint16_t vendor, uint16_t device, unsigned index,
	      uint16_t *bdf)
{
	return pci_find_nth(match_ids, ((uint32_t)device << 16) | vendor, index, bdf);
}

static bool match_class(uint16_t bdf, uint32_t class_code)
{
	return pci_read32(bdf, PCI_REVISION) >> 8 == class_code;
}

bool pci_find_class(uint32_t class_code, unsigned index, uint16_t *bdf)
{
	return pci_find_nth(match_class, class_code, index, bdf);
}

bool pci_host_is_bhyve(void)
{
	uint32_t ids = pci_read32(PCI_BDF(0, 0, 0), PCI_VENDOR_ID);

	return ids == 0x12751275u || ids == 0x74321022u;
}

int pci_intx_pin(uint16_t bdf)
{
	uint8_t pin = pci_read8(bdf, PCI_INTERRUPT_PIN);
	uint8_t line = pci_read8(bdf, PCI_INTERRUPT_LINE);

	if (pin < 1 || pin > 4)
		return -1;
	if (pci_host_is_bhyve())
		return 16 + (int)((4 + PCI_DEV(bdf) + pin) % 8);
	if (line == 0 || line == 0xff)
		return -1;
	return line;
}

unsigned pci_bar_slots(uint16_t bdf)
{
	switch (pci_read8(bdf, PCI_HEADER_TYPE) & 0x7f) {
	case 0:
		return 6;
	case 1:
		return 2;
	default:
		return 0;
	}
}

/* Write all-ones to a config dword, return what sticks, restore it. */
static uint32_t size_dword(uint16_t bdf, uint16_t off, uint32_t ones,
			   uint32_t orig)
{
	uint32_t rb;

	pci_write32(bdf, off, ones);
	rb = pci_read32(bdf, off);
	pci_write32(bdf, off, orig);
	return rb;
}

unsigned pci_bar_probe(uint16_t bdf, unsigned index, struct pci_bar *bar)
{
	uint16_t off = (uint16_t)(PCI_BAR0 + 4 * index);
	uint16_t cmd = pci_read16(bdf, PCI_COMMAND);
	uint32_t orig, rb;
	unsigned used = 1;

	memset(bar, 0, sizeof(*bar));
	/*
	 * With decoding on, the all-ones pattern would briefly claim the top
	 * of the address space (where the ROM and LAPIC are): turn it off.
	 */
	pci_write16(bdf, PCI_COMMAND, cmd & ~(PCI_CMD_IO | PCI_CMD_MEM));
	orig = pci_read32(bdf, off);
	rb = size_dword(bdf, off, 0xffffffffu, orig);

	if (orig & 1) {
		uint32_t mask = rb & ~3u;

		if (mask) {
			/* I/O BARs may implement only the low 16 bits. */
			if (!(mask & 0xffff0000u))
				mask |= 0xffff0000u;
			bar->kind = PCI_BAR_IO;
			bar->addr = orig & ~3u;
			bar->size = (uint32_t)(~mask + 1);
		}
	} else if (((orig >> 1) & 3) == 2 && index + 1 < pci_bar_slots(bdf)) {
		uint32_t orig_hi = pci_read32(bdf, off + 4);
		uint32_t rb_hi = size_dword(bdf, off + 4, 0xffffffffu,
					    orig_hi);
		uint64_t mask = ((uint64_t)rb_hi << 32) | (rb & ~0xfu);

		used = 2;
		if (mask) {
			bar->kind = PCI_BAR_MEM64;
			bar->prefetchable = orig & 8;
			bar->addr = ((uint64_t)orig_hi << 32) | (orig & ~0xfu);
			bar->size = ~mask + 1;
		}
	} else {
		uint32_t mask = rb & ~0xfu;

		if (mask) {
			bar->kind = PCI_BAR_MEM32;
			bar->prefetchable = orig & 8;
			bar->addr = orig & ~0xfu;
			bar->size = (uint32_t)(~mask + 1);
		}
	}
	pci_write16(bdf, PCI_COMMAND, cmd);
	return used;
}

uint64_t pci_bar_addr(uint16_t bdf, unsigned index)
{
	uint16_t off = (uint16_t)(PCI_BAR0 + 4 * index);
	uint32_t lo = pci_read32(bdf, off);

	if (lo & 1)
		return lo & ~3u;
	if (((lo >> 1) & 3) == 2)
		return ((uint64_t)pci_read32(bdf, off + 4) << 32) |
		       (lo & ~0xfu);
	return lo & ~0xfu;
}

bool pci_rom_probe(uint16_t bdf, uint64_t *addr, uint64_t *size)
{
	unsigned hdr = pci_read8(bdf, PCI_HEADER_TYPE) & 0x7f;
	uint16_t off;
	uint16_t cmd = pci_read16(bdf, PCI_COMMAND);
	uint32_t orig, mask;

	if (hdr == 0)
		off = PCI_ROM_ADDRESS;
	else if (hdr == 1)
		off = PCI_ROM_ADDRESS1;
	else
		return false;
	pci_write16(bdf, PCI_COMMAND, cmd & ~PCI_CMD_MEM);
	orig = pci_read32(bdf, off);
	/* Bit 0 is the ROM's own enable: keep it clear while sizing. */
	mask = size_dword(bdf, off, 0xfffff800u, orig) & 0xfffff800u;
	pci_write16(bdf, PCI_COMMAND, cmd);
	if (!mask)
		return false;
	*addr = orig & 0xfffff800u;
	*size = (uint32_t)(~mask + 1);
	return true;
}

void pci_command(uint16_t bdf, uint16_t set, uint16_t clear)
{
	uint16_t cmd = pci_read16(bdf, PCI_COMMAND);

	pci_write16(bdf, PCI_COMMAND, (uint16_t)((cmd | set) & ~clear));
}

static uint8_t first_cap(uint16_t bdf)
{
	uint16_t ptr_off;

	if (!(pci_read16(bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return 0;
	ptr_off = (pci_read8(bdf, PCI_HEADER_TYPE) & 0x7f) == 2
		? PCI_CB_CAP_PTR : PCI_CAP_PTR;
	return pci_read8(bdf, ptr_off) & 0xfc;
}

unsigned pci_caps(uint16_t bdf, uint8_t *ids, unsigned max)
{
	unsigned n = 0;
	uint8_t ptr = first_cap(bdf);

	/* Pointers below 0x40 would point into the header: end of list. */
	for (unsigned i = 0; ptr >= 0x40 && i < CAP_WALK_MAX; i++) {
		if (n < max)
			ids[n] = pci_read8(bdf, ptr);
		n++;
		ptr = pci_read8(bdf, ptr + 1) & 0xfc;
	}
	return n;
}

uint8_t pci_find_cap(uint16_t bdf, uint8_t id)
{
	uint8_t ptr = first_cap(bdf);

	for (unsigned i = 0; ptr >= 0x40 && i < CAP_WALK_MAX; i++) {
		if (pci_read8(bdf, ptr) == id)
			return ptr;
		ptr = pci_read8(bdf, ptr + 1) & 0xfc;
	}
	return 0;
}

/* MSI capability layout. */
#define MSI_CTRL		2
#define MSI_CTRL_ENABLE		0x0001
#define MSI_CTRL_MME		0x0070	/* multiple message enable */
#define MSI_CTRL_64BIT		0x0080
#define MSI_CTRL_PVM		0x0100	/* per-vector masking */
#define MSI_ADDR_LO		4

bool pci_msi_setup(uint16_t bdf, uint8_t dest, uint8_t vector)
{
	uint8_t cap = pci_find_cap(bdf, PCI_CAP_MSI);
	uint16_t ctrl;
	uint64_t addr = msi_address(dest);
	uint16_t data_off, mask_off;

	if (!cap)
		return false;
	ctrl = pci_read16(bdf, cap + MSI_CTRL);
	/* Data and mask registers move up by 4 when the address is 64-bit. */
	if (ctrl & MSI_CTRL_64BIT) {
		pci_write32(bdf, cap + MSI_ADDR_LO, (uint32_t)addr);
		pci_write32(bdf, cap + 8, (uint32_t)(addr >> 32));
		data_off = cap + 12;
		mask_off = cap + 16;
	} else {
		pci_write32(bdf, cap + MSI_ADDR_LO, (uint32_t)addr);
		data_off = cap + 8;
		mask_off = cap + 12;
	}
	pci_write16(bdf, data_off, (uint16_t)msi_data(vector));
	if (ctrl & MSI_CTRL_PVM)
		pci_write32(bdf, mask_off, 0);
	ctrl = (uint16_t)((ctrl & ~MSI_CTRL_MME) | MSI_CTRL_ENABLE);
	pci_write16(bdf, cap + MSI_CTRL, ctrl);
	pci_command(bdf, PCI_CMD_INTX_DISABLE, 0);
	return true;
}

/* MSI-X capability layout. */
#define MSIX_CTRL		2
#define MSIX_CTRL_SIZE		0x07ff
#define MSIX_CTRL_FMASK		0x4000
#define MSIX_CTRL_ENABLE	0x8000
#define MSIX_TABLE		4
#define MSIX_ENTRY_SIZE		16

bool pci_msix_setup(uint16_t bdf, unsigned entry, uint8_t dest,
		    uint8_t vector)
{
	uint8_t cap = pci_find_cap(bdf, PCI_CAP_MSIX);
	uint16_t ctrl;
	uint32_t table;
	uint64_t base, addr = msi_address(dest);

	if (!cap)
		return false;
	ctrl = pci_read16(bdf, cap + MSIX_CTRL);
	if (entry > (ctrl & MSIX_CTRL_SIZE))
		return false;
	table = pci_read32(bdf, cap + MSIX_TABLE);
	base = pci_bar_addr(bdf, table & 7) + (table & ~7u) +
	       (uint64_t)entry * MSIX_ENTRY_SIZE;
	mmio_map(base, MSIX_ENTRY_SIZE);

	/*
	 * Enable with the function masked, so no entry can fire while it is
	 * half-written, then program the entry and drop the function mask.
	 */
	pci_command(bdf, PCI_CMD_MEM | PCI_CMD_INTX_DISABLE, 0);
	pci_write16(bdf, cap + MSIX_CTRL,
		    ctrl | MSIX_CTRL_ENABLE | MSIX_CTRL_FMASK);
	mmio_write32(base + 0, (uint32_t)addr);
	mmio_write32(base + 4, (uint32_t)(addr >> 32));
	mmio_write32(base + 8, msi_data(vector));
	mmio_write32(base + 12, 0);	/* vector control: unmasked */
	pci_write16(bdf, cap + MSIX_CTRL,
		    (uint16_t)((ctrl | MSIX_CTRL_ENABLE) & ~MSIX_CTRL_FMASK));
	return true;
}
