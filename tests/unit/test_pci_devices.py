"""The host bridge and the LPC bridge: IDs, config overrides, bhyve's errors."""

from __future__ import annotations

import os

import pytest

from bhyvepy.dev.hostbridge import HostBridge
from bhyvepy.dev.lpc import LpcBridge, host_isa_bridge
from bhyvepy.pci import PciInitError
from bhyvepy.registry import find_pci_emulation

from pci_testkit import Machine


def ids(m: Machine, b: int, s: int, f: int) -> tuple[int, int, int, int, int]:
    """(vendor, device, class dword, subsystem dword, header type)."""
    return (m.cfg1_read(b, s, f, 0, 2), m.cfg1_read(b, s, f, 2, 2), m.cfg1_read(b, s, f, 8, 4),
            m.cfg1_read(b, s, f, 0x2C, 4), m.cfg1_read(b, s, f, 0x0E, 1))


def test_registered_emulation_names() -> None:
    assert find_pci_emulation("hostbridge") is HostBridge
    assert find_pci_emulation("lpc") is LpcBridge
    assert find_pci_emulation("amd_hostbridge") is None     # converted by the command line


def test_hostbridge_defaults() -> None:
    m = Machine()
    m.add(HostBridge, 0, 0, 0)
    m.pci.finalize()
    assert ids(m, 0, 0, 0) == (0x1275, 0x1275, 0x06000000, 0, 0)
    assert m.cfg1_read(0, 0, 0, 0x34, 1) == 0x40
    assert m.cfg1_read(0, 0, 0, 0x40, 4) == 0x00420010       # PCIe v2, root port
    assert m.cfg1_read(0, 0, 0, 0x4C, 4) == 0x411            # link: gen1 x1
    assert m.cfg1_read(0, 0, 0, 0x50, 4) >> 16 == 0x11
    assert m.cfg1_read(0, 0, 0, 0x3D, 1) == 0                # no interrupt pin
    assert m.cfg1_read(0, 0, 0, 0x10, 4) == 0                # no BARs
    assert m.cfg1_read(0, 0, 0, 0x04, 2) == 0x0004           # bus master only


@pytest.mark.parametrize("values, expect", [
    ({"pcireg.vendor": "0x1022", "pcireg.device": "0x7432"}, (0x1022, 0x7432)),   # amd_hostbridge
    ({"pcireg.vendor": "8086", "pcireg.device": "29b0"}, (0x8086, 0x29B0)),       # hex without 0x
    ({"pcireg.vendor": "junk"}, (0x0000, 0x1275)),                                # strtol: 0
    ({"pcireg.vendor": "0x123456"}, (0x3456, 0x1275)),                            # truncated
    ({"vendor": "4130", "devid": "0x7432"}, (0x1022, 0x7432)),                    # old keys, C syntax
    ({"vendor": "0x1022", "pcireg.vendor": "0x8086"}, (0x1022, 0x1275)),          # old key wins
])
def test_hostbridge_id_overrides(values: dict, expect: tuple[int, int]) -> None:
    m = Machine()
    m.add(HostBridge, 0, 0, 0, config=m.node(0, 0, 0, **values))
    m.pci.finalize()
    assert ids(m, 0, 0, 0)[:2] == expect


def test_hostbridge_on_another_bus_is_still_a_root_port() -> None:
    m = Machine()
    m.add(HostBridge, 1, 0, 0)
    m.pci.finalize()
    assert m.cfg1_read(1, 0, 0, 0x40, 4) == 0x00420010


def test_lpc_defaults() -> None:
    m = Machine()
    m.add(LpcBridge, 0, 31, 0)
    m.pci.finalize()
    assert ids(m, 0, 31, 0) == (0x8086, 0x7000, 0x06010000, 0, 0)
    assert m.cfg1_read(0, 31, 0, 0x34, 1) == 0               # no capabilities
    assert m.cfg1_read(0, 31, 0, 0x06, 2) & 0x10 == 0


def test_lpc_pcireg_overrides() -> None:
    m = Machine()
    node = m.node(0, 31, 0, **{"pcireg.vendor": "0x1002", "pcireg.device": "0x439d",
                                "pcireg.revid": "0x40", "pcireg.subvendor": "0x103c",
                                "pcireg.subdevice": "0x1609"})
    m.add(LpcBridge, 0, 31, 0, config=node)
    m.pci.finalize()
    assert ids(m, 0, 31, 0)[:4] == (0x1002, 0x439D, 0x06010040, 0x1609103C)


def test_lpc_host_values_from_sysfs(tmp_path, monkeypatch) -> None:
    dev = tmp_path / "0000:00:1f.0"
    dev.mkdir()
    for name, value in {"class": "0x060100", "vendor": "0x8086", "device": "0xa3c8",
                        "revision": "0x10", "subsystem_vendor": "0x17aa",
                        "subsystem_device": "0x3136"}.items():
        (dev / name).write_text(value + "\n")
    other = tmp_path / "0000:00:00.0"
    other.mkdir()
    (other / "class").write_text("0x060000\n")
    assert host_isa_bridge(str(tmp_path)) == {"vendor": 0x8086, "device": 0xA3C8, "revid": 0x10,
                                              "subvendor": 0x17AA, "subdevice": 0x3136}
    import bhyvepy.dev.lpc as lpc_mod
    monkeypatch.setattr(lpc_mod, "host_isa_bridge", lambda: host_isa_bridge(str(tmp_path)))
    m = Machine()
    node = m.node(0, 31, 0, **{"pcireg.device": "host", "pcireg.vendor": "0x1234"})
    m.add(LpcBridge, 0, 31, 0, config=node)
    m.pci.finalize()
    assert ids(m, 0, 31, 0)[:2] == (0x1234, 0xA3C8)


def test_lpc_host_value_without_a_host_bridge_reads_zero(monkeypatch, capsys) -> None:
    import bhyvepy.dev.lpc as lpc_mod
    monkeypatch.setattr(lpc_mod, "host_isa_bridge", lambda: None)
    m = Machine()
    m.add(LpcBridge, 0, 31, 0, config=m.node(0, 31, 0, **{"pcireg.vendor": "host"}))
    assert "Unable to find host selector of LPC bridge." in capsys.readouterr().err
    m.pci.finalize()
    assert ids(m, 0, 31, 0)[:2] == (0x0000, 0x7000)


def test_only_one_lpc_bridge() -> None:
    m = Machine()
    m.add(LpcBridge, 0, 1, 0)
    with pytest.raises(PciInitError) as e:
        m.add(LpcBridge, 0, 31, 0)
    assert e.value.message == "Only one LPC bridge is allowed."
    assert e.value.status == 4


def test_lpc_only_on_bus_zero() -> None:
    m = Machine()
    with pytest.raises(PciInitError) as e:
        m.add(LpcBridge, 1, 31, 0)
    assert e.value.message == "LPC bridge can be present only on bus 0."
    # a refused bridge does not count as the one bridge
    m.add(LpcBridge, 0, 31, 0)


def test_lpc_pirq_registers_start_disabled_then_show_routing() -> None:
    m = Machine()
    m.add(LpcBridge, 0, 31, 0)
    m.pci.finalize()
    assert m.cfg1_read(0, 31, 0, 0x60, 4) == 0x80808080
    assert m.cfg1_read(0, 31, 0, 0x68, 4) == 0x80808080


@pytest.mark.skipif(not os.path.isdir("/sys/bus/pci/devices"), reason="no Linux sysfs PCI tree here")
def test_host_isa_bridge_lookup_on_this_host_does_not_fail() -> None:
    found = host_isa_bridge()
    assert found is None or set(found) == {"vendor", "device", "revid", "subvendor", "subdevice"}
