/*
 * Halts with interrupts off; the host expects bhyve's status 2 (a vCPU
 * that can never wake up again ends the VM as "halted").
 */
#include "guest.h"

void guest_main(void)
{
	kprintf("HALTING\n");
	/* Only an NMI or SMI could resume us; then just halt again. */
	for (;;) {
		cli();
		hlt();
	}
}
