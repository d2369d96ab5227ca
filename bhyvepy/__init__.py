"""bhyvepy: a drop-in Python reimplementation of FreeBSD's bhyve(8) userland."""

__version__ = "0.1.0"
