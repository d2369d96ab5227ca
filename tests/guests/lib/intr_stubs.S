/*
 * 256 interrupt entry stubs, 16 bytes apart, so C finds the stub of vector
 * V at intr_stubs + 16 * V without a table.  Each stub pushes a dummy error
 * code when the CPU does not push one (so every frame has the same shape)
 * and the vector number, then joins intr_common, which saves the registers
 * the C ABI lets a callee clobber and calls intr_dispatch(frame).
 *
 * Instructions are written as bytes where their size must be fixed: the
 * assembler would otherwise pick short forms and break the 16-byte stride.
 */

/* Vectors for which the CPU pushes an error code itself. */
#define HAS_ERRCODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || \
			(v) == 21 || (v) == 29 || (v) == 30)

	.altmacro
	.macro	STUB vec
	.balign	16, 0xcc
	.if	HAS_ERRCODE(\vec)
	.byte	0x90, 0x90		/* nop; nop: keep the layout uniform */
	.else
	.byte	0x6a, 0x00		/* push $0 (dummy error code) */
	.endif
	.byte	0x68			/* push $imm32 (vector) */
	.long	\vec
	.byte	0xe9			/* jmp rel32 intr_common */
	.long	intr_common - . - 4
	.endm

	.section .text.intr, "ax", @progbits
	.code64
	.balign	16
	.globl	intr_stubs
intr_stubs:
	.set	vec, 0
	.rept	256
	STUB	%(vec)
	.set	vec, vec + 1
	.endr

/*
 * Frame layout (struct intr_frame in intr.h), from the final RSP upwards:
 * r11 r10 r9 r8 rdi rsi rdx rcx rax vector error rip cs rflags rsp ss.
 * In 64-bit mode the CPU aligns RSP to 16 before pushing its 5 words, so
 * after 2 + 9 more pushes RSP is 16-aligned again for the call.
 */
intr_common:
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	movq	%rsp, %rdi
	cld
	call	intr_dispatch
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rax
	addq	$16, %rsp		/* vector and error code */
	iretq

	.section .note.GNU-stack, "", @progbits
