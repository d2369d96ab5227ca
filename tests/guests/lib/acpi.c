#include "acpi.h"

void acpi_poweroff(void)
{
	/*
	 * One 16-bit write sets SLP_TYP and SLP_EN together; bhyve acts on
	 * the write that has SLP_EN set and checks the type in that same
	 * value, and a 2-byte access is the only size it accepts here.
	 */
	outw(PM1A_CNT_PORT, PM1_SLP_TYP_S5 | PM1_SLP_EN);
	/*
	 * If that did nothing, stop with interrupts off: bhyve then ends with
	 * its "halted" status, which a test tells apart from a poweroff.
	 */
	for (;;) {
		cli();
		hlt();
	}
}

void acpi_reset(void)
{
	/* 1-byte access: bhyve rejects other sizes on this port. */
	outb(RESET_CTL_PORT, RESET_CTL_HARD | RESET_CTL_GO);
}
