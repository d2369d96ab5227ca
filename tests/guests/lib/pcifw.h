/*
 * The part of PCI set-up that firmware does before an OS runs: BAR
 * addresses and the interrupt-line register.
 *
 * bhyve (and so bhyvepy) does both itself when it creates the devices, so
 * under them this finds nothing to do.  QEMU started with "-bios ROM"
 * leaves BARs at 0 and the interrupt lines empty; this fills them in the
 * way SeaBIOS would, so the drivers can be tried under QEMU unchanged.
 */
#ifndef GUEST_PCIFW_H
#define GUEST_PCIFW_H

#include "io.h"

/*
 * Assign every unassigned BAR on bus 0 (I/O from 0xC000, memory from
 * 0xC0000000, above whatever is already assigned) and, on QEMU's i440FX
 * and Q35 chipsets only, program INTx routing and interrupt lines that
 * are empty.  Prints one "FIRMWARE ..." line if it changed anything.
 */
void pcifw_setup(void);

#endif
