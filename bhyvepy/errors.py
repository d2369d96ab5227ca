"""Errors that end the process with one of bhyve(8)'s exit statuses.

bhyve reports configuration and start-up problems as one line on stderr
followed by a fixed exit status; consumers such as libvirt and vm-bhyve act on
those statuses, so every layer raises :class:`BhyveExit` and only the command
line front end turns it into a message and an exit code.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Exit statuses of bhyve(8) (EXIT STATUS section) plus sysexits(3) codes it uses."""

    RESET = 0          # guest rebooted: the caller restarts the VM
    POWEROFF = 1       # guest powered off; also usage errors
    HALT = 2           # guest halted
    TRIPLEFAULT = 3    # guest triple fault
    ERROR = 4          # BHYVE_EXIT_ERROR: configuration or run-time error
    SUSPENDED = 5      # VM exited after a successful --suspend checkpoint
    USAGE = 1          # bhyve_usage(1)
    EX_USAGE = 64      # errx(EX_USAGE, ...)
    EX_DATAERR = 65    # bad snapshot data
    EX_OSERR = 71      # topology/capsicum/activate failures


class BhyveExit(Exception):
    """A condition that ends bhyvepy with a message and a bhyve exit status."""

    def __init__(self, message: str | None, status: int = ExitStatus.ERROR) -> None:
        super().__init__(message or "")
        self.message = message
        self.status = int(status)


class PlainBhyveExit(BhyveExit):
    """A fatal error bhyve reports with plain ``fprintf``/``EPRINTLN`` text.

    The command line front end prints the message without the program-name
    prefix that ``errx()`` adds (``-s`` parsing errors are of this kind).
    """


class GuestMemoryError(Exception):
    """A device was handed a guest-physical range that is not guest RAM.

    Raised by the bounds-checked guest memory accessor; device models turn it
    into a device-level error (bad status, needs-reset) and never let it reach
    the vCPU loop.
    """


class BackendUnavailable(Exception):
    """The kernel backend cannot be used on this host (missing module, wrong OS)."""
