"""Tests that need a real FreeBSD host with vmm.ko loaded.

Mark them ``@pytest.mark.freebsd_vmm`` (the marker is registered in
pyproject.toml) and/or take the :func:`vmm_backend` fixture; elsewhere they
skip with the reason ``needs FreeBSD with vmm.ko``.  This is not a
``conftest.py`` (pytest would not pick up a second one here by that name):
import the fixture where it is used, or call
:func:`skip_freebsd_vmm_items` from the top-level conftest's
``pytest_collection_modifyitems`` hook.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import pytest

FREEBSD_VMM_REASON = "needs FreeBSD with vmm.ko"


def freebsd_vmm_status() -> tuple[bool, str]:
    """(usable, skip reason) for tests that drive vmm.ko."""
    if not sys.platform.startswith("freebsd"):
        return False, FREEBSD_VMM_REASON
    from bhyvepy.vmm.vmmapi import VmmapiBackend

    ok, why = VmmapiBackend.available()
    return ok, "" if ok else f"{FREEBSD_VMM_REASON} ({why})"


def skip_freebsd_vmm_items(items: Iterable[Any]) -> None:
    """Add a skip to every collected item marked ``freebsd_vmm`` when vmm.ko is not usable."""
    ok, why = freebsd_vmm_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "freebsd_vmm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def vmm_backend() -> Any:
    """A real :class:`~bhyvepy.vmm.vmmapi.VmmapiBackend`, or a skip."""
    ok, why = freebsd_vmm_status()
    if not ok:
        pytest.skip(why)
    from bhyvepy.vmm.vmmapi import VmmapiBackend

    return VmmapiBackend()
