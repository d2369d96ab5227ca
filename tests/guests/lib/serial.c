#include "serial.h"
#include "util.h"

/*
 * A working UART has THR empty within a few polls (bhyve's is always
 * ready); the bound only keeps a broken one from hanging the guest, in
 * which case the byte is written anyway and may be lost.
 */
#define THRE_POLLS 100000

void serial_init(void)
{
	outb(COM1_PORT + UART_IER, 0);
	outb(COM1_PORT + UART_LCR, UART_LCR_DLAB);
	outb(COM1_PORT + UART_DLL, 1);		/* 115200 baud */
	outb(COM1_PORT + UART_DLM, 0);
	outb(COM1_PORT + UART_LCR, UART_LCR_8N1);
	/* FIFOs on and cleared, receive trigger at 1 byte. */
	outb(COM1_PORT + UART_FCR, 0x07);
	outb(COM1_PORT + UART_MCR, UART_MCR_DTR | UART_MCR_RTS);
}

void serial_putc(char c)
{
	struct poll_budget b = poll_budget(THRE_POLLS);

	while (!(inb(COM1_PORT + UART_LSR) & UART_LSR_THRE)) {
		if (poll_expired(&b))
			break;
	}
	outb(COM1_PORT + UART_THR, (uint8_t)c);
}

void serial_puts(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

int serial_getc_nowait(void)
{
	if (!(inb(COM1_PORT + UART_LSR) & UART_LSR_DR))
		return -1;
	return inb(COM1_PORT + UART_RBR);
}

void serial_rx_irq(bool on)
{
	uint8_t mcr = inb(COM1_PORT + UART_MCR);

	if (on) {
		outb(COM1_PORT + UART_MCR, mcr | UART_MCR_OUT2);
		outb(COM1_PORT + UART_IER, UART_IER_RDA);
	} else {
		outb(COM1_PORT + UART_IER, 0);
		outb(COM1_PORT + UART_MCR, mcr & ~UART_MCR_OUT2);
	}
}

/* Digits are built backwards into a small buffer, then padded and sent. */
static void put_number(uint64_t v, unsigned base, bool upper, bool negative,
		       unsigned width, char pad)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char buf[24];
	unsigned n = 0;

	do {
		buf[n++] = digits[v % base];
		v /= base;
	} while (v);
	if (negative) {
		/* "-0005": the sign goes before zero padding, after blanks. */
		if (pad == '0') {
			serial_putc('-');
		} else {
			buf[n++] = '-';
		}
		if (width)
			width--;
	}
	while (width > n) {
		serial_putc(pad);
		width--;
	}
	while (n)
		serial_putc(buf[--n]);
}

void kvprintf(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		char pad = ' ';
		unsigned width = 0;
		int lng = 0;

		if (*fmt != '%') {
			serial_putc(*fmt);
			continue;
		}
		fmt++;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (unsigned)(*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng++;
			fmt++;
		}

		switch (*fmt) {
		case 'd':
		case 'i': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			bool neg = v < 0;

			put_number(neg ? -(uint64_t)v : (uint64_t)v, 10, false,
				   neg, width, pad);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			uint64_t v = lng ? va_arg(ap, uint64_t)
					 : va_arg(ap, unsigned int);

			put_number(v, *fmt == 'u' ? 10 : 16, *fmt == 'X',
				   false, width, pad);
			break;
		}
		case 'p':
			serial_puts("0x");
			put_number((uint64_t)(uintptr_t)va_arg(ap, void *), 16,
				   false, false, width, pad);
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);

			if (!s)
				s = "(null)";
			for (size_t len = strlen(s); width > len; width--)
				serial_putc(' ');
			serial_puts(s);
			break;
		}
		case 'c':
			serial_putc((char)va_arg(ap, int));
			break;
		case '%':
			serial_putc('%');
			break;
		case '\0':
			return;
		default:
			/* Show unknown conversions rather than hide them. */
			serial_putc('%');
			serial_putc(*fmt);
			break;
		}
	}
}

void kprintf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
}

void print_hex(const void *buf, size_t len)
{
	static const char digits[] = "0123456789abcdef";
	const uint8_t *p = buf;

	for (size_t i = 0; i < len; i++) {
		serial_putc(digits[p[i] >> 4]);
		serial_putc(digits[p[i] & 15]);
	}
}

void print_text(const void *buf, size_t len)
{
	const uint8_t *p = buf;

	while (len && (p[len - 1] == ' ' || p[len - 1] == 0))
		len--;
	if (!len) {
		serial_putc('-');
		return;
	}
	for (size_t i = 0; i < len; i++) {
		if (p[i] == ' ')
			serial_putc('_');
		else
			serial_putc(p[i] > ' ' && p[i] < 0x7f ? (char)p[i]
							     : '?');
	}
}
