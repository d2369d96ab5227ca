"""SIGTERM presses the ACPI power button once the guest enabled ACPI (bhyve's
pm.c): the guest sees PWRBTN_STS through the SCI and shuts down with S5."""

from __future__ import annotations

import re
import signal

import pytest

from harness import guest_rom

pytestmark = pytest.mark.guest


def test_sigterm_after_acpi_enable_presses_power_button(guest):
    run = guest(guest_rom("acpibutton"))
    run.read_until("ACPI READY", timeout=120)
    assert run.proc.poll() is None, "the guest must be waiting for the button"
    run.proc.send_signal(signal.SIGTERM)
    run.read_until("POWER BUTTON", timeout=30)
    status = run.wait(30)
    out = run.output.decode(errors="replace")
    assert "FAIL" not in out, out
    m = re.search(r"^POWER BUTTON ([0-9a-f]{4})$", out, re.MULTILINE)
    assert m, out
    assert int(m.group(1), 16) & 0x0100, f"PWRBTN_STS not set in PM1a_STS: {m.group(1)}"
    assert status == 1            # the guest's S5 poweroff, not the signal
