/* The smallest end-to-end check: boot path, COM1 output, ACPI poweroff. */
#include "guest.h"

void guest_main(void)
{
	kprintf("Hello from bhyvepy guest\n");
}
