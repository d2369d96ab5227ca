/*
 * Small runtime for freestanding guests: the memory functions gcc may call
 * on its own, failure reporting, and poll-count timeouts.
 */
#ifndef GUEST_UTIL_H
#define GUEST_UTIL_H

#include "io.h"

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/*
 * Print "FAIL <message>" on COM1 and power off.  Every guest reports a
 * failure this way, so a host test needs to look for one prefix only.
 */
__attribute__((noreturn, format(printf, 1, 2)))
void fail(const char *fmt, ...);

/*
 * Timeouts count polls, not time: guests make no assumption about the
 * speed of the CPU (emulated kernel code may run at 1-2 M instructions/s,
 * a native one at several G), and each poll of a device register is a VM
 * exit anyway.  Size a budget as "polls a working device needs, times a
 * generous factor".  To wait for a real duration use an interrupt from a
 * timer device instead (see intr.h).
 */
struct poll_budget {
	uint64_t left;
};

static inline struct poll_budget poll_budget(uint64_t polls)
{
	struct poll_budget b = { polls };
	return b;
}

/* Spend one poll; true once the budget is used up. */
static inline bool poll_expired(struct poll_budget *b)
{
	if (b->left == 0)
		return true;
	b->left--;
	cpu_pause();
	return false;
}

/* Burn about N loop iterations (a crude delay for settle times only). */
void spin(uint64_t n);

/* Entry point each guest program defines; returning powers the VM off. */
void guest_main(void);

#endif
