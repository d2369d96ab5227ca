/*
 * The ACPI power button, taken the way an OS takes it on bhyve: switch the
 * chipset to ACPI mode through SMI_CMD, enable the power-button event,
 * route the SCI, sleep, and shut down (S5) when the button is pressed.
 * bhyve presses the button when its process gets SIGTERM, but only after
 * the guest has enabled ACPI; the test sends SIGTERM after "ACPI READY".
 *
 * The SCI is ISA IRQ 9, identity-mapped to IOAPIC pin 9; bhyve's MADT has
 * an interrupt source override for it with level trigger and active-low
 * polarity, so the pin is programmed like that (what an OS reading the
 * MADT does).  Level-triggered: the status bit must be cleared before the
 * EOI or the interrupt comes straight back.
 *
 * Output is documented in README.md.
 */
#include "acpi.h"
#include "guest.h"

#define SMI_CMD_PORT		0xb2
#define BHYVE_ACPI_ENABLE	0xa0	/* bhyve's FADT ACPI_ENABLE value */
#define PM1A_STS_PORT		PM1A_EVT_PORT
#define PM1A_EN_PORT		(PM1A_EVT_PORT + 2)
#define PM1_SCI_EN		0x0001
#define PM1_PWRBTN		0x0100	/* same bit in STS and EN */
#define SCI_ISA_IRQ		9
#define SCI_VECTOR		0x39

static void sci_handler(struct intr_frame *frame)
{
	uint16_t sts = inw(PM1A_STS_PORT);

	(void)frame;
	kprintf("POWER BUTTON %04x\n", sts);
	if (!(sts & PM1_PWRBTN))
		fail("SCI without PWRBTN_STS: PM1a_STS=%04x", sts);
	outw(PM1A_STS_PORT, PM1_PWRBTN);	/* write 1 to clear */
	acpi_poweroff();
}

void guest_main(void)
{
	uint8_t dest = intr_platform_init();
	struct poll_budget b = poll_budget(100000);

	/* An OS checks SCI_EN first: already set means ACPI mode is on. */
	if (!(inw(PM1A_CNT_PORT) & PM1_SCI_EN))
		outb(SMI_CMD_PORT, BHYVE_ACPI_ENABLE);
	while (!(inw(PM1A_CNT_PORT) & PM1_SCI_EN)) {
		if (poll_expired(&b))
			fail("ACPI enable: SCI_EN never set in PM1a_CNT (%04x)",
			     inw(PM1A_CNT_PORT));
	}

	/* Stale events first, then only the power button may raise the SCI. */
	outw(PM1A_STS_PORT, 0xffff);
	outw(PM1A_EN_PORT, PM1_PWRBTN);
	if (!(inw(PM1A_EN_PORT) & PM1_PWRBTN))
		fail("PWRBTN_EN does not stick: PM1a_EN=%04x",
		     inw(PM1A_EN_PORT));

	intr_set_handler(SCI_VECTOR, sci_handler);
	ioapic_route(isa_irq_pin(SCI_ISA_IRQ), SCI_VECTOR,
		     IOAPIC_LEVEL | IOAPIC_ACTIVE_LOW, dest);
	kprintf("ACPI READY\n");
	for (;;)
		wait_for_interrupt();	/* the handler powers off */
}
