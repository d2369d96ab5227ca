#include "intr.h"
#include "layout.h"
#include "util.h"

struct idt_gate {
	uint16_t offset_lo;
	uint16_t selector;
	uint8_t ist;
	uint8_t type;
	uint16_t offset_mid;
	uint32_t offset_hi;
	uint32_t reserved;
} __attribute__((packed));

struct idt_ptr {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

#define GATE_INTR64	0x8e	/* present, DPL 0, 64-bit interrupt gate */

extern const char intr_stubs[];

static struct idt_gate idt[256] __attribute__((aligned(16)));
static intr_handler_t handlers[256];
static struct {
	intr_handler_arg_t fn;
	void *arg;
} handlers_arg[256];
static uint8_t next_vector = 0x40;
static const char *watchdog_what;

void intr_init(void)
{
	struct idt_ptr p;

	for (unsigned v = 0; v < 256; v++) {
		uint64_t a = (uint64_t)(uintptr_t)(intr_stubs + 16 * v);

		idt[v].offset_lo = (uint16_t)a;
		idt[v].selector = SEL_CODE64;
		idt[v].type = GATE_INTR64;
		idt[v].offset_mid = (uint16_t)(a >> 16);
		idt[v].offset_hi = (uint32_t)(a >> 32);
	}
	p.limit = sizeof(idt) - 1;
	p.base = (uint64_t)(uintptr_t)idt;
	__asm__ volatile("lidt %0" : : "m"(p));
}

void intr_set_handler(uint8_t vector, intr_handler_t handler)
{
	handlers[vector] = handler;
}

void intr_set_handler_arg(uint8_t vector, intr_handler_arg_t handler,
			  void *arg)
{
	handlers_arg[vector].fn = handler;
	handlers_arg[vector].arg = arg;
}

uint8_t intr_alloc_vector(void)
{
	/* 0xF0 and up: the library's own (watchdog, spurious). */
	if (next_vector >= 0xf0)
		fail("out of interrupt vectors");
	return next_vector++;
}

uint8_t intr_platform_init(void)
{
	pic_disable();
	lapic_enable();
	return lapic_id();
}

void intr_dispatch(struct intr_frame *f);

void intr_dispatch(struct intr_frame *f)
{
	unsigned v = (unsigned)f->vector;
	intr_handler_t h = handlers[v];

	if (h || handlers_arg[v].fn) {
		if (h)
			h(f);
		else
			handlers_arg[v].fn(handlers_arg[v].arg);
		if (v >= 32 && v != INTR_VEC_SPURIOUS)
			lapic_eoi();
		return;
	}
	/* A spurious interrupt is not in service: it takes no EOI. */
	if (v == INTR_VEC_SPURIOUS)
		return;
	if (v < 32)
		fail("exception %u err=0x%lx rip=0x%lx", v, f->error, f->rip);
	fail("unexpected interrupt vector 0x%x", v);
}

void pic_disable(void)
{
	/*
	 * Initialise both 8259s (edge, cascaded, 8086 mode) with their vectors
	 * at 0x20-0x2F, so even a stray PIC interrupt can never look like a
	 * CPU exception, then mask every line: interrupts go via the IOAPIC.
	 */
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);	/* slave on IRQ2 */
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

uint32_t lapic_read(uint32_t reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

void lapic_write(uint32_t reg, uint32_t v)
{
	mmio_write32(LAPIC_BASE + reg, v);
}

void lapic_enable(void)
{
	lapic_write(LAPIC_SVR, 0x100 | INTR_VEC_SPURIOUS);
}

uint8_t lapic_id(void)
{
	return (uint8_t)(lapic_read(LAPIC_ID) >> 24);
}

void lapic_eoi(void)
{
	lapic_write(LAPIC_EOI, 0);
}

uint32_t ioapic_read(uint8_t reg)
{
	mmio_write32(IOAPIC_BASE, reg);
	return mmio_read32(IOAPIC_BASE + 0x10);
}

void ioapic_write(uint8_t reg, uint32_t v)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, v);
}

unsigned ioapic_pins(void)
{
	return ((ioapic_read(0x01) >> 16) & 0xff) + 1;
}

void ioapic_route(unsigned pin, uint8_t vector, uint32_t flags, uint8_t dest)
{
	uint8_t reg = (uint8_t)(0x10 + 2 * pin);

	/* Mask first, so the entry is never live half-written. */
	ioapic_write(reg, IOAPIC_MASKED);
	ioapic_write(reg + 1, (uint32_t)dest << 24);
	ioapic_write(reg, vector | flags);
}

void ioapic_mask(unsigned pin)
{
	uint8_t reg = (uint8_t)(0x10 + 2 * pin);

	ioapic_write(reg, ioapic_read(reg) | IOAPIC_MASKED);
}

#define INTX_PINS		24
#define INTX_PER_PIN		8

struct intx_pin {
	uint8_t vector;
	unsigned count;
	intr_handler_arg_t fn[INTX_PER_PIN];
	void *arg[INTX_PER_PIN];
};

static struct intx_pin intx_pins[INTX_PINS];

static void intx_dispatch(void *arg)
{
	struct intx_pin *p = arg;

	for (unsigned i = 0; i < p->count; i++)
		p->fn[i](p->arg[i]);
}

void intx_attach(unsigned pin, intr_handler_arg_t handler, void *arg,
		 uint8_t dest)
{
	struct intx_pin *p;

	if (pin >= INTX_PINS || pin >= ioapic_pins())
		fail("INTx on IOAPIC pin %u: no such pin", pin);
	p = &intx_pins[pin];
	if (p->count == INTX_PER_PIN)
		fail("INTx pin %u: more than %u handlers", pin, INTX_PER_PIN);
	p->fn[p->count] = handler;
	p->arg[p->count] = arg;
	p->count++;
	if (p->count == 1) {
		p->vector = intr_alloc_vector();
		intr_set_handler_arg(p->vector, intx_dispatch, p);
		ioapic_route(pin, p->vector, IOAPIC_PCI_FLAGS, dest);
	}
}

void pit_periodic(uint32_t hz)
{
	uint32_t div = hz ? PIT_HZ / hz : 0;

	if (div == 0 || div > 0xffff)
		div = 0;	/* 0 means 65536: the slowest rate */
	outb(0x43, 0x34);	/* channel 0, lo/hi byte, mode 2, binary */
	outb(0x40, (uint8_t)div);
	outb(0x40, (uint8_t)(div >> 8));
}

void pit_stop(void)
{
	outb(0x43, 0x30);	/* channel 0, mode 0, no count loaded yet */
}

static void watchdog_fired(struct intr_frame *f)
{
	(void)f;
	fail("watchdog: %s", watchdog_what ? watchdog_what : "timeout");
}

void watchdog_arm(uint32_t count, const char *what)
{
	watchdog_what = what;
	intr_set_handler(INTR_VEC_WATCHDOG, watchdog_fired);
	lapic_write(LAPIC_TIMER_DIV, 0x0a);	/* divide by 128 */
	lapic_write(LAPIC_LVT_TIMER, INTR_VEC_WATCHDOG);	/* one-shot */
	lapic_write(LAPIC_TIMER_INIT, count);
}

void watchdog_disarm(void)
{
	lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED | INTR_VEC_WATCHDOG);
	lapic_write(LAPIC_TIMER_INIT, 0);
}
