/*
 * Reset stub: the CPU arrives here exactly as after a power-on reset, so the
 * same ROM runs under bhyvepy, under FreeBSD's bhyve and under QEMU -bios.
 *
 * Path: real mode at 0xFFFFFFF0 -> 32-bit flat protected mode (no
 * interrupts; KVM's emulator cannot iretd there anyway) -> copy the C image
 * from ROM to RAM at 1 MiB and zero its bss -> identity page tables for the
 * first 4 GiB -> long mode -> guest_start() in C.
 *
 * Every instruction here may be emulated one by one by the host, so the
 * loops are kept to the minimum: only the page tables that are actually used
 * are written.
 */

#include "layout.h"

/*
 * Write COUNT page-directory entries at EDI, the first one being EAX, each
 * next one 2 MiB further.  A macro rather than a subroutine: there is no
 * stack in RAM yet (ESP is 0 after reset, and below 4 GiB is ROM).
 */
	.macro	FILL_PD count
	movl	$\count, %ecx
1:	movl	%eax, (%edi)
	movl	$0, 4(%edi)
	addl	$8, %edi
	addl	$LARGE_PAGE, %eax
	decl	%ecx
	jnz	1b
	.endm

/* ---------------------------------------------------------------------- */
/* Real mode.  CS base is 0xFFFF0000, so offsets are (address - ROM_SEG).  */

	.section .rom.text, "ax", @progbits
	.code16
real_entry:
	cli
	cld
	/*
	 * DS is 0 after reset and the GDT lives in ROM near 4 GiB, so address
	 * the descriptor through CS.  The "l" suffix makes lgdt take all 32
	 * bits of the base instead of 24.
	 */
	lgdtl	%cs:(gdt_ptr - ROM_SEG)
	movl	%cr0, %eax
	/* Caches are disabled at reset (CD, NW); turn them on while here. */
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	/* Only the far jump actually loads a 32-bit CS. */
	ljmpl	$SEL_CODE32, $prot_entry

/* ---------------------------------------------------------------------- */
/* 32-bit protected mode, flat segments, paging off.                      */

	.code32
prot_entry:
	movw	$SEL_DATA, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs

	/* The C image is linked at 1 MiB but stored in ROM: copy it. */
	movl	$__image_lma, %esi
	movl	$__image_vma, %edi
	movl	$__image_dwords, %ecx
	rep movsl

	/* C expects zeroed statics. */
	xorl	%eax, %eax
	movl	$__bss_start, %edi
	movl	$__bss_dwords, %ecx
	rep stosl

	/*
	 * PML4 and PDPT are zeroed (only their first entries are used, the
	 * rest must read as not-present); the four page directories are
	 * written entry by entry below, so they need no zeroing.
	 */
	movl	$pt_pml4, %edi
	movl	$(2 * 4096 / 4), %ecx
	rep stosl

	movl	$(pt_pdpt + PTE_P + PTE_RW), pt_pml4
	movl	$(pt_pd + 0 * 4096 + PTE_P + PTE_RW), pt_pdpt + 0
	movl	$(pt_pd + 1 * 4096 + PTE_P + PTE_RW), pt_pdpt + 8
	movl	$(pt_pd + 2 * 4096 + PTE_P + PTE_RW), pt_pdpt + 16
	movl	$(pt_pd + 3 * 4096 + PTE_P + PTE_RW), pt_pdpt + 24

	/*
	 * 2048 large pages = 0..4 GiB.  The last GiB holds only MMIO (ECAM,
	 * PCI BARs, IOAPIC, LAPIC, the ROM): map it uncached, as a real
	 * kernel would, so that the ROM stays right on real hardware too.
	 */
	movl	$pt_pd, %edi
	movl	$(PTE_P + PTE_RW + PTE_PS), %eax
	FILL_PD	(3 * 512)
	orl	$(PTE_PWT + PTE_PCD), %eax
	FILL_PD	512

	movl	$pt_pml4, %eax
	movl	%eax, %cr3
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	/* Paging on with EFER.LME set activates long mode (compat first). */
	movl	%cr0, %eax
	orl	$CR0_PG, %eax
	movl	%eax, %cr0
	ljmp	$SEL_CODE64, $start64

/* ---------------------------------------------------------------------- */

	.section .rom.rodata, "a", @progbits
	.balign 8
/*
 * Accessed bits are preset in every descriptor: the CPU would otherwise
 * write them back on the first segment load, and the GDT is in ROM.  The
 * GDT stays in use for good (interrupt delivery and iretq reload CS/SS).
 */
gdt:
	.quad	0
	.quad	0x00cf9b000000ffff	/* SEL_CODE32: 32-bit code, 4 GiB */
	.quad	0x00cf93000000ffff	/* SEL_DATA: data, 4 GiB */
	.quad	0x00af9b000000ffff	/* SEL_CODE64: 64-bit code (L=1) */
gdt_end:
	.balign 8
gdt_ptr:
	.word	gdt_end - gdt - 1
	.long	gdt

/* ---------------------------------------------------------------------- */
/* The architectural reset vector: the last 16 bytes below 4 GiB.         */

	.section .reset, "ax", @progbits
	.code16
	.globl	reset_vector
reset_vector:
	cli
	jmp	real_entry
	.balign	16, 0xf4

/* ---------------------------------------------------------------------- */
/* 64-bit entry, in the RAM image.                                         */

	.section .text.start64, "ax", @progbits
	.code64
	.globl	start64
start64:
	movw	$SEL_DATA, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	leaq	__stack_top(%rip), %rsp
	xorl	%ebp, %ebp
	call	guest_start
1:	cli
	hlt
	jmp	1b

/* ---------------------------------------------------------------------- */
/* RAM that the stub initializes itself, so it is not zeroed as bss.      */

	.section .noinit, "aw", @nobits
	.balign	4096
	.globl	pt_pml4, pt_pdpt, pt_pd
pt_pml4:
	.skip	4096
pt_pdpt:
	.skip	4096
pt_pd:
	.skip	4 * 4096
	.balign	16
	.globl	__stack_bottom, __stack_top
__stack_bottom:
	.skip	STACK_SIZE
__stack_top:

	.section .note.GNU-stack, "", @progbits
