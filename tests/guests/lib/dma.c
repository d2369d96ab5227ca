#include "dma.h"
#include "util.h"

/*
 * In .noinit: the boot stub zeroes .bss with one "rep stosl", which is cheap,
 * but a megabyte the guests mostly do not use would still be wasted work;
 * dma_alloc() zeroes what it hands out instead.
 */
static uint8_t pool[DMA_POOL_SIZE]
	__attribute__((aligned(PAGE_SIZE), section(".noinit.dma")));
static size_t pool_used;

void *dma_alloc(size_t size, size_t align)
{
	size_t start;

	if (align == 0 || (align & (align - 1)))
		fail("dma_alloc: alignment %zu is not a power of two", align);
	start = (pool_used + align - 1) & ~(align - 1);
	if (start > DMA_POOL_SIZE || size > DMA_POOL_SIZE - start)
		fail("dma_alloc: %zu bytes (align %zu) do not fit, %zu used",
		     size, align, pool_used);
	pool_used = start + size;
	memset(pool + start, 0, size);
	return pool + start;
}
