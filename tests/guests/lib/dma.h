/*
 * Memory that devices read and write (virtqueue rings, AHCI command lists,
 * data buffers).  RAM is identity-mapped, so a buffer's address is also the
 * bus address a device is given.
 */
#ifndef GUEST_DMA_H
#define GUEST_DMA_H

#include "io.h"

/* Size of the pool all DMA memory comes from; it is never given back. */
#define DMA_POOL_SIZE	(1024 * 1024)
#define PAGE_SIZE	4096

/*
 * SIZE bytes aligned to ALIGN (a power of two), zeroed.  Fails the test when
 * the pool is exhausted: the guests set everything up once at boot, so that
 * is a bug in the guest, not a condition to recover from.
 */
void *dma_alloc(size_t size, size_t align);

/* The bus address of a buffer (identity mapping: its pointer value). */
static inline uint64_t dma_addr(const volatile void *p)
{
	return (uint64_t)(uintptr_t)p;
}

#endif
