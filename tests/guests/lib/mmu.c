#include "layout.h"
#include "mmu.h"
#include "util.h"

#define ADDR_MASK	0x000ffffffffff000ull
#define POOL_PAGES	8
#define FOUR_GIB	0x100000000ull
#define IDENTITY_LIMIT	(1ull << 47)	/* keeps addresses canonical */

extern uint64_t pt_pml4[512];

/* Not zeroed at boot (.noinit): each page is cleared when handed out. */
static uint64_t pool[POOL_PAGES][512]
	__attribute__((aligned(4096), section(".noinit.mmu")));
static unsigned pool_used;

static uint64_t *next_level(uint64_t *table, unsigned idx)
{
	if (!(table[idx] & PTE_P)) {
		uint64_t *page;

		if (pool_used == POOL_PAGES)
			fail("mmio_map: out of page-table pages");
		page = pool[pool_used++];
		memset(page, 0, 4096);
		table[idx] = (uint64_t)(uintptr_t)page | PTE_P | PTE_RW;
	}
	return (uint64_t *)(uintptr_t)(table[idx] & ADDR_MASK);
}

void *mmio_map(uint64_t phys, uint64_t len)
{
	uint64_t end = phys + (len ? len : 1);

	if (end <= FOUR_GIB)
		return (void *)(uintptr_t)phys;
	if (end > IDENTITY_LIMIT || end < phys)
		fail("mmio_map: 0x%lx+0x%lx cannot be identity-mapped", phys,
		     len);
	for (uint64_t a = phys & ~(uint64_t)(LARGE_PAGE - 1); a < end;
	     a += LARGE_PAGE) {
		uint64_t *pdpt = next_level(pt_pml4, (a >> 39) & 511);
		uint64_t *pd = next_level(pdpt, (a >> 30) & 511);

		pd[(a >> 21) & 511] =
			a | PTE_P | PTE_RW | PTE_PS | PTE_PWT | PTE_PCD;
		invlpg(a);
	}
	return (void *)(uintptr_t)phys;
}
