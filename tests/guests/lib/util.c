/*
 * Freestanding runtime support.  gcc emits calls to memset/memcpy/memmove/
 * memcmp for struct copies and some loops even with -ffreestanding, so they
 * must exist; they are kept byte-wise because the images are tiny and speed
 * here is dominated by VM exits, not by copying.
 */
#include <stdarg.h>

#include "acpi.h"
#include "serial.h"
#include "util.h"

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++) {
		if (*x != *y)
			return *x - *y;
	}
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

void spin(uint64_t n)
{
	while (n--)
		cpu_pause();
}

void fail(const char *fmt, ...)
{
	va_list ap;

	cli();
	serial_puts("FAIL ");
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
	serial_putc('\n');
	acpi_poweroff();
}
