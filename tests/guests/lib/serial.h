/*
 * COM1 (16550 at 0x3F8, ISA IRQ 4): the guests' only output channel.
 * Output is polled so it works before, during and without interrupts.
 */
#ifndef GUEST_SERIAL_H
#define GUEST_SERIAL_H

#include <stdarg.h>

#include "io.h"

#define COM1_PORT	0x3f8
#define COM1_ISA_IRQ	4

/* 16550 registers (offsets from the base port) and the bits used here. */
#define UART_RBR	0	/* read: receive buffer */
#define UART_THR	0	/* write: transmit holding */
#define UART_DLL	0	/* with LCR.DLAB: divisor low */
#define UART_IER	1
#define UART_DLM	1	/* with LCR.DLAB: divisor high */
#define UART_IIR	2	/* read */
#define UART_FCR	2	/* write */
#define UART_LCR	3
#define UART_MCR	4
#define UART_LSR	5
#define UART_MSR	6
#define UART_SCR	7

#define UART_IER_RDA	0x01	/* receive data available interrupt */
#define UART_IIR_NOPEND	0x01	/* no interrupt pending */
#define UART_LCR_8N1	0x03
#define UART_LCR_DLAB	0x80
#define UART_MCR_DTR	0x01
#define UART_MCR_RTS	0x02
#define UART_MCR_OUT2	0x08	/* gates the IRQ line on PC hardware */
#define UART_LSR_DR	0x01
#define UART_LSR_THRE	0x20

void serial_init(void);
void serial_putc(char c);
void serial_puts(const char *s);
/* One received byte, or -1 if none is waiting (no blocking). */
int serial_getc_nowait(void);
/* Let received bytes raise COM1's IRQ (IER.RDA and MCR.OUT2). */
void serial_rx_irq(bool on);

/*
 * printf subset: %d %i %u %x %X %p %s %c %%, with an optional '0' flag,
 * field width and the l/ll/z length modifiers.
 */
__attribute__((format(printf, 1, 2))) void kprintf(const char *fmt, ...);
void kvprintf(const char *fmt, va_list ap);

/* BUF as lowercase hex, no separators: one token. */
void print_hex(const void *buf, size_t len);

/*
 * A device-supplied string as one token: trailing blanks and NULs dropped,
 * inner blanks as '_', other non-printable bytes as '?', "-" if empty.
 */
void print_text(const void *buf, size_t len);

#endif
