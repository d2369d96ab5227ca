/*
 * The demo guest: prints "tick <n>" about twice a second, forever, from a
 * busy loop (so the vCPU is visibly busy), and "key <c>" for each byte
 * received on COM1 (interrupt driven); 'q' powers the VM off.  The loop
 * length is calibrated once at boot against the PIT (channel 2, read
 * through port 0x61), so the rate is roughly right whether the host runs
 * the guest natively or through an instruction emulator.
 * Output: README.md.
 */
#include "guest.h"

#define VEC_COM1	0x31
#define RX_RING		64	/* power of two */
#define CHUNK		256	/* spin() iterations between checks */
#define PIT_GATE_PORT	0x61
#define PIT_GATE2	0x01	/* channel 2 gate */
#define PIT_SPEAKER	0x02
#define PIT_OUT2	0x20
#define CAL_COUNT	0xffffu	/* 65535 / 1193182 Hz = 54.9 ms */
#define CAL_MAX_CHUNKS	50000000u
#define TICKS_PER_CAL	9	/* 9 x 54.9 ms ~ 0.5 s */
#define DEFAULT_CHUNKS	250	/* if the PIT cannot be read */

static volatile uint8_t rx_ring[RX_RING];
static volatile unsigned rx_head, rx_tail;

static void on_com1(struct intr_frame *f)
{
	(void)f;
	(void)inb(COM1_PORT + UART_IIR);
	while (inb(COM1_PORT + UART_LSR) & UART_LSR_DR) {
		uint8_t c = inb(COM1_PORT + UART_RBR);

		if (rx_head - rx_tail < RX_RING) {
			rx_ring[rx_head % RX_RING] = c;
			rx_head++;
		}
	}
}

/* Chunks of CHUNK spins that fit in one PIT channel 2 countdown. */
static uint32_t calibrate(void)
{
	uint8_t gate = inb(PIT_GATE_PORT);
	uint32_t chunks = 0;

	outb(PIT_GATE_PORT, (uint8_t)((gate & ~PIT_SPEAKER) & ~PIT_GATE2));
	outb(0x43, 0xb0);	/* channel 2, lo/hi byte, mode 0, binary */
	outb(0x42, CAL_COUNT & 0xff);
	outb(0x42, CAL_COUNT >> 8);
	outb(PIT_GATE_PORT, (uint8_t)((gate & ~PIT_SPEAKER) | PIT_GATE2));
	while (!(inb(PIT_GATE_PORT) & PIT_OUT2) && chunks < CAL_MAX_CHUNKS) {
		spin(CHUNK);
		chunks++;
	}
	outb(PIT_GATE_PORT, gate);
	return chunks;
}

void guest_main(void)
{
	uint8_t apic = intr_platform_init();
	uint32_t cal = calibrate();
	uint32_t chunks = cal && cal < CAL_MAX_CHUNKS ? cal * TICKS_PER_CAL
						      : DEFAULT_CHUNKS;

	while (serial_getc_nowait() >= 0)
		;
	intr_set_handler(VEC_COM1, on_com1);
	ioapic_route(isa_irq_pin(COM1_ISA_IRQ), VEC_COM1, IOAPIC_ISA_FLAGS,
		     apic);
	serial_rx_irq(true);
	kprintf("COUNTER READY calibration=%u chunks=%u\n", cal, chunks);

	sti();
	for (uint64_t n = 0;; n++) {
		for (uint32_t k = 0; k < chunks; k++) {
			spin(CHUNK);
			while (rx_tail != rx_head) {
				uint8_t c = rx_ring[rx_tail % RX_RING];

				rx_tail++;
				if (c > ' ' && c < 0x7f)
					kprintf("key %c\n", c);
				else
					kprintf("key 0x%02x\n", c);
				if (c == 'q') {
					cli();
					kprintf("COUNTER DONE\n");
					return;
				}
			}
		}
		kprintf("tick %lu\n", n);
	}
}
