/*
 * Interrupts in 64-bit mode: IDT and handler table, 8259 masking, local
 * APIC, IOAPIC routing, the PIT, and a LAPIC-timer watchdog.
 *
 * Interrupts are delivered only in long mode (iretq); the guests keep
 * RFLAGS.IF clear and open it only inside wait_for_interrupt().
 */
#ifndef GUEST_INTR_H
#define GUEST_INTR_H

#include "io.h"

/* Register state saved by intr_stubs.S, lowest address first. */
struct intr_frame {
	uint64_t r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss;	/* pushed by the CPU */
};

typedef void (*intr_handler_t)(struct intr_frame *frame);
/* A handler that gets back the pointer it was registered with. */
typedef void (*intr_handler_arg_t)(void *arg);

/* Vectors the library itself uses; guests pick theirs from 0x30-0xEF. */
#define INTR_VEC_WATCHDOG	0xfe
#define INTR_VEC_SPURIOUS	0xff

/*
 * Load the IDT with all 256 vectors.  An exception or interrupt that has no
 * handler prints a FAIL line and powers off; guest_start() calls this first.
 */
void intr_init(void);

/*
 * Handlers for vectors >= 32 run with interrupts off and must clear the
 * cause at the device; the dispatcher sends the LAPIC EOI after they return.
 */
void intr_set_handler(uint8_t vector, intr_handler_t handler);
void intr_set_handler_arg(uint8_t vector, intr_handler_arg_t handler,
			  void *arg);

/*
 * A fresh vector for a device interrupt, from 0x40 up; fails the test when
 * none are left.  Vectors 0x30-0x3F stay free for guests that pick their
 * own numbers.
 */
uint8_t intr_alloc_vector(void);

/*
 * 8259s masked, LAPIC enabled: what every guest that takes device interrupts
 * does first.  Returns the boot CPU's APIC ID (the interrupt destination).
 */
uint8_t intr_platform_init(void);

/* Remap the two 8259s away from the exception vectors and mask them all. */
void pic_disable(void);

/* Local APIC (xAPIC mode, at its reset address). */
#define LAPIC_BASE		0xfee00000ull
#define LAPIC_ID		0x020
#define LAPIC_EOI		0x0b0
#define LAPIC_SVR		0x0f0
#define LAPIC_LVT_TIMER		0x320
#define LAPIC_TIMER_INIT	0x380
#define LAPIC_TIMER_CUR		0x390
#define LAPIC_TIMER_DIV		0x3e0
#define LAPIC_LVT_MASKED	(1u << 16)

uint32_t lapic_read(uint32_t reg);
void lapic_write(uint32_t reg, uint32_t v);
/* Software-enable the LAPIC (spurious vector INTR_VEC_SPURIOUS). */
void lapic_enable(void);
uint8_t lapic_id(void);
void lapic_eoi(void);

/* IOAPIC: 24 pins; ISA IRQs on pins 0-15 (IRQ0 on pin 2), PCI INTx 16-23. */
#define IOAPIC_BASE		0xfec00000ull
#define IOAPIC_ACTIVE_LOW	(1u << 13)
#define IOAPIC_LEVEL		(1u << 15)
#define IOAPIC_MASKED		(1u << 16)
/* What an ISA device line is (edge, active high) and a PCI INTx one is. */
#define IOAPIC_ISA_FLAGS	0u
#define IOAPIC_PCI_FLAGS	(IOAPIC_LEVEL | IOAPIC_ACTIVE_LOW)

uint32_t ioapic_read(uint8_t reg);
void ioapic_write(uint8_t reg, uint32_t v);
/* Number of redirection entries the IOAPIC reports. */
unsigned ioapic_pins(void);
/* Fixed delivery, physical destination DEST; unmasked unless flags say. */
void ioapic_route(unsigned pin, uint8_t vector, uint32_t flags, uint8_t dest);
void ioapic_mask(unsigned pin);

/*
 * Attach HANDLER to PCI INTx IOAPIC pin PIN (level, active low).  Pins are
 * shared: each gets one vector, and every handler attached to it runs on
 * each interrupt; a handler must check its own device's status and clear
 * it, or the level-triggered line fires again right after the EOI.
 */
void intx_attach(unsigned pin, intr_handler_arg_t handler, void *arg,
		 uint8_t dest);

/* The IOAPIC pin of an ISA IRQ (the interrupt-source override bhyve has). */
static inline unsigned isa_irq_pin(unsigned irq)
{
	return irq == 0 ? 2 : irq;
}

/* MSI message for fixed, edge-triggered delivery to one APIC. */
static inline uint64_t msi_address(uint8_t dest)
{
	return LAPIC_BASE | ((uint64_t)dest << 12);
}

static inline uint32_t msi_data(uint8_t vector)
{
	return vector;
}

/* 8254 PIT channel 0 as a rate generator at about HZ (19..1193182). */
#define PIT_HZ 1193182u
void pit_periodic(uint32_t hz);
/* Leave channel 0 stopped, output low (mode 0 waiting for a count). */
void pit_stop(void);

/*
 * One-shot LAPIC timer that fails the test ("FAIL watchdog: WHAT") if it
 * fires.  The LAPIC timer rate differs per hypervisor (bhyve 128 MHz, KVM
 * and QEMU 1 GHz), so COUNT is only a rough bound: with divide 128,
 * 0x10000000 ticks is about 34 s at 1 GHz and 4.5 min at 128 MHz.
 * It guards waits for interrupts that may never come; it is not a clock.
 */
void watchdog_arm(uint32_t count, const char *what);
void watchdog_disarm(void);

#endif
