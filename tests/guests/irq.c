/*
 * Interrupt delivery in long mode, the way an OS driver sets it up:
 *  (a) PIT channel 0 periodic -> ISA IRQ 0 -> IOAPIC pin 2 -> LAPIC;
 *  (b) COM1 receive interrupt -> ISA IRQ 4 -> IOAPIC pin 4 -> LAPIC, bytes
 *      read in the handler and echoed as "RX xx" until a 'q' arrives.
 * The host writes to COM1 after it sees "READY FOR INPUT".
 */
#include "guest.h"

#define VEC_TIMER	0x30
#define VEC_COM1	0x31
#define TIMER_HZ	100
#define TIMER_TICKS	5
#define RX_RING		64	/* power of two */

static volatile unsigned ticks;
static volatile uint8_t rx_ring[RX_RING];
static volatile unsigned rx_head, rx_tail;	/* handler adds at head */

static void on_timer(struct intr_frame *f)
{
	(void)f;
	ticks++;
}

static void on_com1(struct intr_frame *f)
{
	(void)f;
	/*
	 * The IOAPIC pin is edge-triggered and the UART keeps its line up
	 * while data is waiting: drain every byte, or no new edge (and no
	 * new interrupt) would ever come.  Bytes beyond a full ring are
	 * dropped, which the host would notice as missing RX lines.
	 */
	(void)inb(COM1_PORT + UART_IIR);
	while (inb(COM1_PORT + UART_LSR) & UART_LSR_DR) {
		uint8_t c = inb(COM1_PORT + UART_RBR);

		if (rx_head - rx_tail < RX_RING) {
			rx_ring[rx_head % RX_RING] = c;
			rx_head++;
		}
	}
}

static void timer_test(uint8_t apic)
{
	unsigned n;

	intr_set_handler(VEC_TIMER, on_timer);
	ioapic_route(isa_irq_pin(0), VEC_TIMER, IOAPIC_ISA_FLAGS, apic);
	watchdog_arm(0x10000000, "no PIT interrupts");
	pit_periodic(TIMER_HZ);
	while (ticks < TIMER_TICKS)
		wait_for_interrupt();
	ioapic_mask(isa_irq_pin(0));
	pit_stop();
	watchdog_disarm();
	n = ticks;
	kprintf("TIMER OK %u\n", n);
}

static void serial_test(uint8_t apic)
{
	/* Input that arrived before now is not part of the test. */
	while (serial_getc_nowait() >= 0)
		;
	intr_set_handler(VEC_COM1, on_com1);
	ioapic_route(isa_irq_pin(COM1_ISA_IRQ), VEC_COM1, IOAPIC_ISA_FLAGS,
		     apic);
	serial_rx_irq(true);
	kprintf("READY FOR INPUT\n");

	for (;;) {
		uint8_t c;

		/* No watchdog: how long the host takes to type is its business. */
		while (rx_tail == rx_head)
			wait_for_interrupt();
		c = rx_ring[rx_tail % RX_RING];
		rx_tail++;
		kprintf("RX %02x\n", c);
		if (c == 'q')
			break;
	}
	serial_rx_irq(false);
	ioapic_mask(isa_irq_pin(COM1_ISA_IRQ));
}

void guest_main(void)
{
	uint8_t apic;

	pic_disable();
	lapic_enable();
	apic = lapic_id();
	timer_test(apic);
	serial_test(apic);
	kprintf("IRQ DONE\n");
}
