/*
 * Ending the VM the way an OS does on bhyve.  Each ends the bhyve process
 * with a distinct exit status, which is what the host tests check:
 * poweroff -> 1, reset -> 0 (see bhyve(8)).
 */
#ifndef GUEST_ACPI_H
#define GUEST_ACPI_H

#include "io.h"

/* bhyve's fixed ACPI registers (its FADT points at these). */
#define PM1A_EVT_PORT	0x400
#define PM1A_CNT_PORT	0x404
#define PM_TMR_PORT	0x408
#define PM1_SLP_TYP_S5	(5u << 10)	/* bhyve's _S5 package value */
#define PM1_SLP_EN	(1u << 13)

/* PC reset control register; bit 2 starts a reset, bit 1 asks a hard one. */
#define RESET_CTL_PORT	0xcf9
#define RESET_CTL_HARD	0x02
#define RESET_CTL_GO	0x04

/* Enter S5.  Never returns: if the write is ignored the CPU halts. */
__attribute__((noreturn)) void acpi_poweroff(void);

/* Hard reset through 0xCF9.  Returns only if the reset did not happen. */
void acpi_reset(void);

#endif
