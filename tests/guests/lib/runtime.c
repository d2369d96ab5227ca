/*
 * The C side of the boot path: start64 (start.S) calls guest_start() on a
 * fresh stack with bss zeroed and interrupts off.
 */
#include "acpi.h"
#include "intr.h"
#include "serial.h"
#include "util.h"

void guest_start(void);

void guest_start(void)
{
	serial_init();
	/* Before anything can fault, so a fault prints FAIL, not a reset. */
	intr_init();
	guest_main();
	acpi_poweroff();
}
