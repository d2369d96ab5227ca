/*
 * The stub identity-maps 0-4 GiB with 2 MiB pages.  64-bit PCI BARs may sit
 * far above that (bhyve places large ones at hundreds of GiB), so drivers
 * call mmio_map() before touching a BAR and get the same address back.
 */
#ifndef GUEST_MMU_H
#define GUEST_MMU_H

#include "io.h"

/*
 * Make [phys, phys + len) addressable (identity, uncached) and return phys
 * as a pointer.  Fails the test if the small page-table pool runs out or
 * the address is beyond what 4-level paging identity-maps (128 TiB).
 */
void *mmio_map(uint64_t phys, uint64_t len);

#endif
