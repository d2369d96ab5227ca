/*
 * Triple-faults on purpose; the host expects bhyve's status 3.
 * With an empty IDT the #UD from ud2 cannot be delivered (#GP), nor can the
 * #GP (#DF), nor the #DF: the CPU shuts down.  ud2 rather than int3: KVM's
 * instruction emulator, which runs guest kernel code on some hosts, cannot
 * execute int3 outside real mode and stops the VM with an internal error.
 */
#include "guest.h"

void guest_main(void)
{
	static const struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) empty_idt = { 0, 0 };

	kprintf("TRIPLE FAULTING\n");
	__asm__ volatile("lidt %0\n\tud2" : : "m"(empty_idt));
	fail("still running after a triple fault");
}
