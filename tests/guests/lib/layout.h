/*
 * Constants shared by the assembly stub, the linker script's users and C.
 * Only plain #defines: this header is included from .S files too.
 */
#ifndef GUEST_LAYOUT_H
#define GUEST_LAYOUT_H

/* Real-mode CS base after reset; the ROM must fit in this 64 KiB segment. */
#define ROM_SEG		0xffff0000

/* GDT selectors (see gdt in start.S). */
#define SEL_CODE32	0x08
#define SEL_DATA	0x10
#define SEL_CODE64	0x18

#define CR0_PE		0x00000001
#define CR0_NW		0x20000000
#define CR0_CD		0x40000000
#define CR0_PG		0x80000000
#define CR4_PAE		0x00000020
#define MSR_EFER	0xc0000080
#define EFER_LME	0x00000100

#define PTE_P		0x001
#define PTE_RW		0x002
#define PTE_PWT		0x008
#define PTE_PCD		0x010
#define PTE_PS		0x080
#define LARGE_PAGE	0x200000

#define STACK_SIZE	16384

#endif
