/*
 * Freestanding runtime support.  gcc emits calls to memset/memcpy/memmove/
 * memcmp for struct copies and some loops even with -ffreestanding, so they
 * must exist.  They use the x86 string instructions: where the host runs
 * guest kernel code through an instruction emulator (a microsecond or two
 * per instruction), one "rep stosb" over a page costs about as much as a few
 * instructions of a byte loop, so zeroing a virtqueue ring takes
 * microseconds instead of tens of milliseconds.
 */
#include <stdarg.h>

#include "acpi.h"
#include "serial.h"
#include "util.h"

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep stosb"
			 : "+D"(d), "+c"(n)
			 : "a"(c)
			 : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep movsb"
			 : "+D"(d), "+S"(src), "+c"(n)
			 :
			 : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	/* Overlapping with the destination above: copy backwards. */
	d += n - 1;
	s += n - 1;
	__asm__ volatile("std; rep movsb; cld"
			 : "+D"(d), "+S"(s), "+c"(n)
			 :
			 : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	if (n == 0)
		return 0;
	/* repe cmpsb stops one past the first difference (or at the end). */
	__asm__ volatile("repe cmpsb"
			 : "+D"(y), "+S"(x), "+c"(n)
			 :
			 : "memory", "cc");
	return x[-1] - y[-1];
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
