"""bhyve's legacy ``-s`` and ``-l`` syntax, converted into the config tree.

bhyve turns ``-s slot,emulation,conf`` and ``-l lpcdev,conf`` into config
tree nodes while it parses the command line, using a per-emulation
conversion (``pe_legacy_config``).  This module is the catalogue of every
upstream FreeBSD amd64 emulation name with its conversion, so that every
upstream command line converts (and ``-o config.dump=1`` works) whether or
not bhyvepy implements the device; :mod:`bhyvepy.registry` decides later
what can actually be built.

The conversions follow FreeBSD 14.x sources (``pci_emul.c`` ``pci_parse_slot``
and ``pci_parse_legacy_config``, ``block_if.c``, ``net_backends.c``,
``pci_ahci.c``, ``pci_nvme.c``, ``pci_passthru.c``, ``pci_virtio_*.c``,
``pci_xhci.c``, ``pci_hostbridge.c``, ``pci_uart.c``, ``amd64/pci_lpc.c``).
Where bhyve would dereference NULL (``virtio-console`` without options, a
node path blocked by a leaf) bhyvepy keeps going the way the surrounding C
code intends instead of crashing; these spots are marked below.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from bhyvepy.config import ConfigNode, ConfigTree, PlainBhyveExit, c_sscanf
from bhyvepy.errors import BhyveExit, ExitStatus

#: ``MAXBUSES``, ``MAXSLOTS``, ``MAXFUNCS`` of pci_emul.h.
MAX_BUSES = 256
MAX_SLOTS = 32
MAX_FUNCS = 8
#: ``MAX_PORTS`` of pci_ahci.c: further ``hd:``/``cd:`` entries are ignored.
AHCI_MAX_PORTS = 32
#: ``VTCON_MAXPORTS`` of pci_virtio_console.c.
VTCON_MAX_PORTS = 16
#: Names of the LPC UARTs, ``lpc_uart_names``.
LPC_UART_NAMES = ("com1", "com2", "com3", "com4")
PCTESTDEV_NAME = "pc-testdev"

LegacyConfig = Callable[[ConfigNode, "str | None"], None]


def _fail(message: str | None) -> PlainBhyveExit:
    """A conversion error: bhyve prints it with EPRINTLN and exits 4."""
    return PlainBhyveExit(message, ExitStatus.ERROR)


def _or_root(tree: ConfigTree, node: ConfigNode | None) -> ConfigNode:
    """bhyve's ``*_config_value_node(NULL, ...)`` functions act on the root."""
    return tree.root if node is None else node


def _child(node: ConfigNode, name: str) -> ConfigNode:
    """``create_relative_config_node`` for a fresh name under a new device node.

    bhyve would pass a NULL node on (and crash) when a leaf blocks the name;
    only reachable through odd ``-o`` ordering, so refuse cleanly (the tree
    has already warned about the conflict).
    """
    child = node.create_node(name)
    if child is None:
        path = f"{node.path}.{name}" if node.path else name
        raise BhyveExit(f"Failed to create configuration node {path}", ExitStatus.ERROR)
    return child


# --------------------------------------------------------------------------
# Conversions.  Each takes the device node and the text after the emulation
# name (None when the option had no second comma).
# --------------------------------------------------------------------------

def generic_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``pci_parse_legacy_config``: ``k=v`` pairs, a bare ``k`` means true.

    Note that an empty token (``-s 30,fbuf,`` or ``a,,b``) sets a leaf whose
    name is the empty string to ``true``, exactly as bhyve does.
    """
    if opts is None:
        return
    for token in opts.split(","):
        name, eq, value = token.partition("=")
        if eq:
            node.set_value(name, value)
        else:
            node.set_bool(token, True)


def _first_then_generic(key: str) -> LegacyConfig:
    def convert(node: ConfigNode, opts: str | None) -> None:
        if opts is None:
            return
        first, comma, rest = opts.partition(",")
        node.set_value(key, first)
        if comma:
            generic_legacy_config(node, rest)

    return convert


#: ``blockif_legacy_config``: first token is the backing path.
blockif_legacy_config = _first_then_generic("path")
#: ``netbe_legacy_config``: first token is the backend (tapN, netgraph, ...).
netbe_legacy_config = _first_then_generic("backend")
#: ``pci_vtscsi_legacy_config`` (14.x): first token is the CTL device.
vtscsi_legacy_config = _first_then_generic("dev")


def uart_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``pci_uart_legacy_config``: the whole text is the backend path."""
    if opts is not None:
        node.set_value("path", opts)


def vtinput_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``pci_vtinput_legacy_config``: a path is mandatory (silent exit 4)."""
    if opts is None:
        raise _fail(None)
    _first_then_generic("path")(node, opts)


def amd_hostbridge_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """amd_hostbridge = hostbridge with AMD ids; its options are ignored."""
    regs = _child(node, "pcireg")
    regs.set_value("vendor", "0x1022")
    regs.set_value("device", "0x7432")


def nvme_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``pci_nvme_legacy_config``: ``ram=<MiB>`` or a block device path first."""
    if opts is None:
        return
    if opts.startswith("ram="):
        ram, comma, rest = opts[4:].partition(",")
        node.set_value("ram", ram)
        if comma:
            generic_legacy_config(node, rest)
        return
    blockif_legacy_config(node, opts)


def _ahci_port(ports: ConfigNode, port: int, kind: str, opts: str | None) -> None:
    port_node = _child(ports, str(port))
    port_node.set_value("type", kind)
    blockif_legacy_config(port_node, opts)


def ahci_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``pci_ahci_legacy_config``: ``hd:``/``cd:`` start a port; options follow it."""
    if opts is None:
        return
    ports = _child(node, "port")
    rest: str | None = opts
    port = 0
    while port < AHCI_MAX_PORTS and rest is not None:
        text = rest
        kind: str | None = None
        if text.startswith("hd:"):
            kind, text = "hd", text[3:]
        elif text.startswith("cd:"):
            kind, text = "cd", text[3:]
        cut = [i for i in (text.find(",hd:"), text.find(",cd:")) if i >= 0]
        if cut:
            rest = text[min(cut) + 1:]
            text = text[:min(cut)]
        else:
            rest = None
        if text:
            if kind is None:
                raise _fail(f'Missing or invalid type for port {port}: "{text}"')
            _ahci_port(ports, port, kind, text)
        port += 1


def ahci_hd_legacy_config(node: ConfigNode, opts: str | None) -> None:
    _ahci_port(_child(node, "port"), 0, "hd", opts)


def ahci_cd_legacy_config(node: ConfigNode, opts: str | None) -> None:
    _ahci_port(_child(node, "port"), 0, "cd", opts)


def passthru_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``passthru_legacy_config``: ``pptN``, ``pci0:B:S:F``, ``pciB:S:F`` or ``B/S/F``."""
    if opts is None:
        return
    first, comma, rest = opts.partition(",")
    if opts.startswith("ppt"):
        node.set_value("pptdev", first)
    else:
        for fmt in ("pci0:%d:%d:%d", "pci%d:%d:%d", "%d/%d/%d"):
            values = c_sscanf(opts, fmt)
            if len(values) == 3:
                break
        else:
            raise _fail(f'passthru: invalid options "{opts}"')
        for key, value in zip(("bus", "slot", "func"), values):
            node.set_value(key, str(value))
    if comma:
        generic_legacy_config(node, rest)


def vt9p_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``pci_vt9p_legacy_config``: one ``sharename=path``, other tokens are flags."""
    if opts is None:
        return
    have_share = False
    for token in opts.split(","):
        if "=" in token:
            if have_share:
                raise _fail("virtio-9p: more than one share name given")
            have_share = True
            share, _, path = token.partition("=")
            node.set_value("sharename", share)
            node.set_value("path", path)
        else:
            node.set_bool(token, True)


def vtcon_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``pci_vtcon_legacy_config``: ``name=path`` per port, at most 16.

    bhyve crashes (strdup(NULL)) when ``virtio-console`` has no options;
    bhyvepy creates the empty ``port`` node the C code creates first.
    """
    ports = _child(node, "port")
    if opts is None:
        return
    for port, token in enumerate(opts.split(",")):
        name, eq, path = token.partition("=")
        if not eq:
            raise _fail(f"vtcon: port {name} requires a path")
        if port >= VTCON_MAX_PORTS:
            raise _fail("vtcon: too many ports")
        port_node = _child(ports, str(port))
        port_node.set_value("name", name)
        port_node.set_value("path", path)


def xhci_legacy_config(node: ConfigNode, opts: str | None) -> None:
    """``pci_xhci_legacy_config``: each token is a USB device in slots 1, 2, ..."""
    if opts is None:
        return
    slots = _child(node, "slot")
    for slot, token in enumerate(opts.split(","), start=1):
        device, eq, option = token.partition("=")
        slot_node = _child(slots, str(slot))
        slot_node.set_value("device", device)
        if eq and option:
            generic_legacy_config(slot_node, option)


# --------------------------------------------------------------------------
# The catalogue.
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class PciEmulationSpec:
    """One ``struct pci_devemu`` as far as command line parsing is concerned."""

    name: str
    legacy_config: LegacyConfig = generic_legacy_config
    alias_of: str | None = None

    @property
    def device(self) -> str:
        """The ``device`` value the node gets (``pe_alias`` or the name)."""
        return self.alias_of or self.name


_CATALOGUE = (
    PciEmulationSpec("ahci", ahci_legacy_config),
    PciEmulationSpec("ahci-hd", ahci_hd_legacy_config, alias_of="ahci"),
    PciEmulationSpec("ahci-cd", ahci_cd_legacy_config, alias_of="ahci"),
    PciEmulationSpec("dummy"),
    PciEmulationSpec("e1000", netbe_legacy_config),
    PciEmulationSpec("fbuf"),
    PciEmulationSpec("hda"),
    PciEmulationSpec("amd_hostbridge", amd_hostbridge_legacy_config,
                     alias_of="hostbridge"),
    PciEmulationSpec("hostbridge"),
    PciEmulationSpec("lpc"),
    PciEmulationSpec("nvme", nvme_legacy_config),
    PciEmulationSpec("passthru", passthru_legacy_config),
    PciEmulationSpec("uart", uart_legacy_config),
    PciEmulationSpec("virtio-9p", vt9p_legacy_config),
    PciEmulationSpec("virtio-blk", blockif_legacy_config),
    PciEmulationSpec("virtio-console", vtcon_legacy_config),
    PciEmulationSpec("virtio-input", vtinput_legacy_config),
    PciEmulationSpec("virtio-net", netbe_legacy_config),
    PciEmulationSpec("virtio-rnd"),
    PciEmulationSpec("virtio-scsi", vtscsi_legacy_config),
    PciEmulationSpec("xhci", xhci_legacy_config),
)

#: Every upstream amd64 PCI emulation name, in bhyve's ``-s help`` order.
PCI_EMULATIONS: Mapping[str, PciEmulationSpec] = MappingProxyType(
    {spec.name: spec for spec in _CATALOGUE})

#: Alias name -> real device name (``pe_alias``).
PCI_ALIASES: Mapping[str, str] = MappingProxyType(
    {spec.name: spec.alias_of for spec in _CATALOGUE if spec.alias_of})


def find_pci_emulation(name: str) -> PciEmulationSpec | None:
    """The conversion for ``name``: upstream catalogue, then bhyvepy's registry.

    A device class registered under a name bhyve does not know may offer
    ``legacy_config(node, opts)`` as a static method; else the generic
    ``k=v`` conversion applies.
    """
    spec = PCI_EMULATIONS.get(name)
    if spec is not None:
        return spec
    from bhyvepy import registry

    cls = registry.find_pci_emulation(name)
    if cls is None:
        return None
    convert = getattr(cls, "legacy_config", None)
    return PciEmulationSpec(name, convert if callable(convert) else generic_legacy_config)


def pci_help_lines(registered: Iterable[str]) -> list[str]:
    """``-s help``: implemented emulations, each followed by its aliases."""
    names = list(registered)
    lines: list[str] = []
    for name in names:
        if name in lines:
            continue
        lines.append(name)
        for alias, target in PCI_ALIASES.items():
            if target == name and alias not in names and alias not in lines:
                lines.append(alias)
    return lines


def parse_pci_slot(tree: ConfigTree, opt: str) -> tuple[int, int, int]:
    """``pci_parse_slot``: ``[[bus:]slot:]func,emulation[,conf]`` into ``pci.B.S.F``.

    Returns the (bus, slot, func) used.  Errors are :class:`PlainBhyveExit`
    with status 4, bhyve's EPRINTLN text (or errx text from the tree).
    """
    slot_text, comma, rest = opt.partition(",")
    if not comma:
        raise _fail(f'Invalid PCI slot info field "{opt}"')
    emul, comma, conf_text = rest.partition(",")
    conf = conf_text if comma else None

    values = c_sscanf(slot_text, "%d:%d:%d")
    if len(values) == 3:
        bus, slot, func = values
    else:
        values = c_sscanf(slot_text, "%d:%d")
        if len(values) == 2:
            bus, (slot, func) = 0, values
        else:
            values = c_sscanf(slot_text, "%d")
            bus, slot, func = 0, (values[0] if values else -1), 0
    if not (0 <= bus < MAX_BUSES and 0 <= slot < MAX_SLOTS and 0 <= func < MAX_FUNCS):
        raise _fail(f'Invalid PCI slot info field "{opt}"')

    spec = find_pci_emulation(emul)
    if spec is None:
        raise _fail(f'pci slot {bus}:{slot}:{func}: unknown device "{emul}"')

    node_name = f"pci.{bus}.{slot}.{func}"
    if tree.find_node(node_name) is not None:
        raise _fail(f"pci slot {bus}:{slot}:{func} already occupied!")
    node = tree.create_node(node_name)
    if node is None:
        # bhyve hands NULL on, and the *_node() calls then use the root.
        node = tree.root
    node.set_value("device", spec.device)
    spec.legacy_config(node, conf)
    return bus, slot, func


# --------------------------------------------------------------------------
# -l (amd64 pci_lpc.c)
# --------------------------------------------------------------------------

def lpc_help_lines(registered: Iterable[str]) -> list[str]:
    """``-l help``: bhyve's fixed entries, then other registered LPC devices."""
    lines = ["bootrom", *LPC_UART_NAMES]
    for name in registered:
        if name not in lines:
            lines.append(name)
    return lines


def parse_lpc_device(tree: ConfigTree, opts: str) -> bool:
    """``lpc_device_parse``: False for an unknown device (caller errx 64).

    ``bootrom``/``tpm`` syntax errors raise ``errx(4, ...)`` here.
    """
    lpcdev, comma, rest = opts.partition(",")
    rest_or_none = rest if comma else None
    kind = lpcdev.lower() if lpcdev.isascii() else lpcdev

    if kind == "bootrom":
        if rest_or_none is None:
            raise BhyveExit(f'invalid bootrom option "{opts}"', ExitStatus.ERROR)
        romfile, comma, rest = rest_or_none.partition(",")
        tree.set_value("lpc.bootrom", romfile)
        if not comma:
            return True
        varfile, comma, rest = rest.partition(",")
        lpc = _or_root(tree, tree.find_node("lpc"))
        if "=" not in varfile:
            tree.set_value("lpc.bootvars", varfile)
        else:
            generic_legacy_config(lpc, varfile)
        if comma:
            generic_legacy_config(lpc, rest)
        return True

    if kind == "tpm":
        node = _or_root(tree, tree.create_node("tpm"))
        if rest_or_none is None:
            raise BhyveExit(f'invalid tpm type "{opts}"', ExitStatus.ERROR)
        tpm_type, comma, rest = rest_or_none.partition(",")
        node.set_value("type", tpm_type)
        if not comma:
            raise BhyveExit(f'invalid tpm path "{opts}"', ExitStatus.ERROR)
        tpm_path, comma, rest = rest.partition(",")
        node.set_value("path", tpm_path)
        if comma:
            generic_legacy_config(_or_root(tree, tree.find_node("tpm")), rest)
        node.set_value_if_unset("version", "2.0")
        return True

    if kind in LPC_UART_NAMES:
        if rest_or_none is None:
            # bhyve stores a NULL string: libnv marks the node broken and the
            # UART gets no backend.  Only the (empty) node remains visible.
            if tree.create_node(f"lpc.{kind}") is None:
                raise BhyveExit(f"Failed to create configuration node lpc.{kind}",
                                ExitStatus.ERROR)
            return True
        tree.set_value(f"lpc.{kind}.path", rest_or_none)
        return True

    if kind == PCTESTDEV_NAME:
        tree.set_bool(f"lpc.{PCTESTDEV_NAME}", True)
        return True

    return False
