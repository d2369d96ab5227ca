"""``bhyvepy`` = bhyve(8)'s command line: argv -> config tree -> VM.

The parser reproduces FreeBSD's amd64 ``bhyve_optparse`` (14.x optstring,
plus ``-M``/``-n`` from 2025 sources and ``-r`` as in BHYVE_SNAPSHOT builds)
on top of a small re-implementation of BSD ``getopt(3)``.  A library such as
click or argparse cannot be used: they permute options and operands, accept
``--long`` forms and abbreviations, treat ``-s`` arguments that start with
``-`` differently and print their own messages, while consumers (libvirt,
vm-bhyve, CBSD, ...) depend on POSIX getopt's exact behaviour: clustered
flags (``-AHPw``), attached arguments (``-s3:0,virtio-blk,...``), parsing
stops at the first operand, ``--`` ends options, and BSD's
``illegal option -- x`` message followed by the usage text and status 1.

Options are applied left to right to one :class:`~bhyvepy.config.ConfigTree`,
exactly as bhyve applies them; checks bhyve performs after ``config.dump``
(topology, vCPU pinning lists, memory size) are in :func:`resolve_settings`.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TextIO

from bhyvepy import legacy
from bhyvepy.config import (
    ConfigTree,
    PlainBhyveExit,
    c_scan_integer,
    c_sscanf,
    c_strtoul,
    parse_int_value,
    program_name,
    to_c_int,
    write_text,
)
from bhyvepy.errors import BhyveExit, ExitStatus

#: amd64 14.x optstring + ``M``, ``n`` (2025) + ``r`` (BHYVE_SNAPSHOT).
OPTSTRING = "aehuwxACDHIMPSWYk:f:o:p:G:c:s:m:n:l:K:U:r:"

MB = 1 << 20
UINT16_MAX = 0xFFFF
UINT64_MAX = (1 << 64) - 1
#: ``CPU_SETSIZE`` of FreeBSD 14+ userland.
CPU_SETSIZE = 1024
#: ``QEMU_FWCFG_MAX_NAME``.
FWCFG_MAX_NAME = 56
#: bhyve builds the pinning key in ``char key[16]``; longer keys are cut.
_CPUSET_KEY_MAX = 15


@dataclass(frozen=True)
class FwCfgFile:
    """A ``-f`` item: a QEMU fw_cfg file the guest firmware can read."""

    name: str
    data: bytes


@dataclass(frozen=True)
class VmSettings:
    """Values bhyve derives from the tree after ``config.dump`` is handled."""

    ncpus: int
    sockets: int
    cores: int
    threads: int
    memsize: int
    #: vCPU -> host CPUs it is pinned to (only vCPUs < ncpus, as bhyve).
    cpusets: dict[int, frozenset[int]] = field(default_factory=dict)


@dataclass
class ParsedCommandLine:
    """Everything the command line asked for.

    ``config`` is the tree bhyve would build.  The VM name is
    ``config.get_value("name")``; it may be missing only when
    ``restore_file`` is set (the snapshot then names the VM, as in bhyve).
    """

    config: ConfigTree
    restore_file: str | None = None
    fwcfg_files: list[FwCfgFile] = field(default_factory=list)
    settings: VmSettings | None = None

    @property
    def vmname(self) -> str | None:
        return self.config.get_value("name")


def usage_text(progname: str) -> str:
    """The ``-h`` text.  libvirt probes it: ``-u:`` present, ``-c vcpus`` absent."""
    pad = " " * len(progname)
    return (
        f"Usage: {progname} [-aCDeHhMPSuWwxY]\n"
        f"       {pad} [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]\n"
        f"       {pad} [-f [name=]name,string=data|file=path] [-G [w][address:]port]\n"
        f"       {pad} [-k config_file] [-K layout] [-l lpcdev[,conf]] [-m memsize]\n"
        f"       {pad} [-n id=N[,size=S][,cpus=LIST]] [-o var=value] [-p vcpu:hostcpu]\n"
        f"       {pad} [-r file] [-s slot,emulation[,conf]] [-U uuid] vmname\n"
        "       -a: use xAPIC mode for the local APICs (the default; deprecated)\n"
        "       -A, -I: accepted for compatibility; ACPI tables and the I/O APIC are always present\n"
        "       -C: include guest memory in core dumps\n"
        "       -c: vCPU count and/or CPU topology\n"
        "       -D: destroy the VM when the guest powers off\n"
        "       -e: exit when the guest touches an unemulated I/O port\n"
        "       -f: add a QEMU fw_cfg file\n"
        "       -G: run a GDB server (a leading 'w' waits for the debugger)\n"
        "       -H: leave the guest on HLT instead of spinning\n"
        "       -h: show this help\n"
        "       -k: read config variables from a file (key=value lines or JSON5)\n"
        "       -K: PS/2 keyboard layout for the VNC console\n"
        "       -l: LPC device ('-l help' lists them)\n"
        "       -M: monitor mode\n"
        "       -m: guest memory size\n"
        "       -n: NUMA domain\n"
        "       -o: set config variable 'var' to 'value'\n"
        "       -P: leave the guest on PAUSE\n"
        "       -p: pin vCPU 'vcpu' to host CPU 'hostcpu'\n"
        "       -r: restore the VM from a checkpoint file\n"
        "       -S: wire guest memory (required for passthru)\n"
        "       -s: PCI device ('-s help' lists them)\n"
        "       -U: SMBIOS system UUID\n"
        "       -u: RTC keeps UTC time\n"
        "       -W: virtio devices use single-vector MSI\n"
        "       -w: ignore accesses to unimplemented MSRs\n"
        "       -x: use x2APIC mode for the local APICs\n"
        "       -Y: do not build an MP table\n"
    )


class _GetOpt:
    """BSD ``getopt(3)`` without permutation; state lives in the instance."""

    def __init__(self, argv: Sequence[str], optstring: str,
                 error: Callable[[str], None]) -> None:
        self.argv = argv
        self.optstring = optstring
        self.error = error
        self.optind = 0
        self._place = ""

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        while True:
            item = self._next()
            if item is None:
                return
            yield item

    def _next(self) -> tuple[str, str | None] | None:
        argv = self.argv
        if not self._place:
            if self.optind >= len(argv) or not argv[self.optind].startswith("-"):
                return None
            self._place = argv[self.optind][1:]
            if self._place == "-":          # "--" ends the options
                self.optind += 1
                self._place = ""
                return None
            if self._place == "":           # a lone "-" is an operand
                return None
        opt, self._place = self._place[0], self._place[1:]
        index = self.optstring.find(opt) if opt != ":" else -1
        if index < 0:
            if not self._place:
                self.optind += 1
            self.error(f"illegal option -- {opt}")
            return "?", None
        if self.optstring[index + 1: index + 2] != ":":
            if not self._place:
                self.optind += 1
            return opt, None
        if self._place:
            optarg = self._place
        elif self.optind + 1 < len(argv):
            self.optind += 1
            optarg = argv[self.optind]
        else:
            self._place = ""
            self.optind += 1
            self.error(f"option requires an argument -- {opt}")
            return "?", None
        self._place = ""
        self.optind += 1
        return opt, optarg


class _Parser:
    """One run of ``bhyve_optparse`` and the operand handling of ``main``."""

    def __init__(self, progname: str, stdout: TextIO, stderr: TextIO) -> None:
        self.progname = progname
        self.stdout = stdout
        self.stderr = stderr
        self.tree = ConfigTree(warn=self.warnx)
        self.result = ParsedCommandLine(self.tree)

    # -- output -------------------------------------------------------------

    def warnx(self, message: str) -> None:
        write_text(self.stderr, f"{self.progname}: {message}\n")

    def eprint(self, message: str) -> None:
        write_text(self.stderr, f"{message}\n")

    def usage(self, status: int) -> BhyveExit:
        write_text(self.stderr, usage_text(self.progname))
        return BhyveExit(None, status)

    # -- the run --------------------------------------------------------------

    def run(self, argv: Sequence[str]) -> ParsedCommandLine:
        self._defaults()
        getopt = _GetOpt(argv, OPTSTRING, self.warnx)
        for opt, optarg in getopt:
            self._option(opt, optarg)
        operands = argv[getopt.optind:]
        if len(operands) > 1:
            raise self.usage(ExitStatus.USAGE)
        if operands:
            self.tree.set_value("name", operands[0])
        if self.tree.get_value("name") is None and self.result.restore_file is None:
            raise self.usage(ExitStatus.USAGE)
        return self.result

    def _defaults(self) -> None:
        # amd64 bhyve_init_config (14.x)
        tree = self.tree
        tree.set_bool("acpi_tables", True)
        tree.set_bool("acpi_tables_in_memory", True)
        tree.set_value("memory.size", "256M")
        tree.set_bool("x86.strictmsr", True)
        tree.set_value("lpc.fwcfg", "bhyve")

    _FLAGS = {
        "a": ("x86.x2apic", False),
        "C": ("memory.guest_in_core", True),
        "D": ("destroy_on_poweroff", True),
        "e": ("x86.strictio", True),
        "H": ("x86.vmexit_on_hlt", True),
        "M": ("monitor", True),
        "P": ("x86.vmexit_on_pause", True),
        "S": ("memory.wired", True),
        "u": ("rtc.use_localtime", False),
        "W": ("virtio_msix", False),
        "w": ("x86.strictmsr", False),
        "x": ("x86.x2apic", True),
        "Y": ("x86.mptable", False),
    }
    _VALUES = {"K": "keyboard.layout", "m": "memory.size", "U": "uuid"}

    def _option(self, opt: str, optarg: str | None) -> None:
        tree = self.tree
        if opt in self._FLAGS:
            path, value = self._FLAGS[opt]
            tree.set_bool(path, value)
        elif opt in ("A", "I"):
            pass  # no-ops kept for compatibility (ACPI and I/O APIC always on)
        elif opt == "h":
            raise self.usage(0)
        elif opt == "?" or optarg is None:
            raise self.usage(ExitStatus.USAGE)
        elif opt in self._VALUES:
            tree.set_value(self._VALUES[opt], optarg)
        elif opt == "o":
            if not tree.apply_option(optarg):
                raise BhyveExit(f"invalid configuration option '{optarg}'",
                                ExitStatus.EX_USAGE)
        elif opt == "k":
            tree.load_file(optarg)
        elif opt == "c":
            if not parse_topology(tree, optarg):
                raise BhyveExit(f"invalid cpu topology '{optarg}'", ExitStatus.EX_USAGE)
        elif opt == "p":
            self._pincpu(optarg)
        elif opt == "n":
            self._numa(optarg)
        elif opt == "G":
            parse_gdb(tree, optarg)
        elif opt == "f":
            item = parse_fwcfg(optarg, self.warnx)
            if item is None:
                raise BhyveExit(f"invalid fwcfg item '{optarg}'", ExitStatus.EX_USAGE)
            self.result.fwcfg_files.append(item)
        elif opt == "l":
            if "help".startswith(optarg):
                self._print_help(legacy.lpc_help_lines(_registry_lpc_names()))
            if not legacy.parse_lpc_device(tree, optarg):
                raise BhyveExit(f"invalid lpc device configuration '{optarg}'",
                                ExitStatus.EX_USAGE)
        elif opt == "s":
            if "help".startswith(optarg):
                self._print_help(legacy.pci_help_lines(_registry_pci_names()))
            legacy.parse_pci_slot(tree, optarg)
        elif opt == "r":
            self.result.restore_file = optarg

    def _print_help(self, lines: list[str]) -> None:
        write_text(self.stdout, "".join(f"{line}\n" for line in lines))
        raise BhyveExit(None, 0)

    def _pincpu(self, optarg: str) -> None:
        """``bhyve_pincpu_parse``: ``vcpu:hostcpu`` appended to ``vcpu.N.cpuset``."""
        values = c_sscanf(optarg, "%d:%d")
        error = None
        if len(values) != 2:
            error = f"invalid format: {optarg}"
        else:
            vcpu, pcpu = values
            if vcpu < 0:
                error = f"invalid vcpu '{vcpu}'"
            elif not 0 <= pcpu < CPU_SETSIZE:
                error = (f"hostcpu '{pcpu}' outside valid range from 0 to "
                         f"{CPU_SETSIZE - 1}")
        if error is not None:
            self.eprint(error)
            raise BhyveExit(f"invalid vcpu pinning configuration '{optarg}'",
                            ExitStatus.EX_USAGE)
        key = cpuset_key(vcpu)
        current = self.tree.get_value(key)
        self.tree.set_value(key, f"{current},{pcpu}" if current is not None else str(pcpu))

    def _numa(self, optarg: str) -> None:
        """``bhyve_numa_parse`` (2025 sources) and its ACPI requirement."""
        invalid = BhyveExit(f"invalid NUMA configuration '{optarg}'", ExitStatus.EX_USAGE)
        if optarg == "":
            raise invalid
        domain = -1
        size = cpus = policy = None
        for token in optarg.split(","):
            if token.startswith("id="):
                domain = parse_int_value("id", token[3:], 0, 255)
            elif token.startswith("size="):
                size = token[5:]
            elif token.startswith("domain_policy="):
                policy = token[len("domain_policy="):]
            elif token.startswith("cpus="):
                cpus = token[5:]
        if domain == -1:
            self.eprint(f"Missing NUMA domain ID in '{optarg}'")
            raise invalid
        path = f"domains.{domain}"
        node = self.tree.find_node(path)
        if node is None:
            node = self.tree.create_node(path)
        if node is None:
            node = self.tree.root  # bhyve passes NULL on: the root is used
        for name, value in (("size", size), ("domain_policy", policy), ("cpus", cpus)):
            if value is not None:
                node.set_value(name, value)
        if not self.tree.get_bool("acpi_tables"):
            raise BhyveExit("NUMA emulation requires ACPI", ExitStatus.EX_USAGE)


def _registry_pci_names() -> list[str]:
    from bhyvepy import registry

    return registry.pci_emulation_names()


def _registry_lpc_names() -> list[str]:
    from bhyvepy import registry

    return registry.lpc_device_names()


def cpuset_key(vcpu: int) -> str:
    """``vcpu.N.cpuset`` as bhyve spells it in a 16-byte buffer."""
    return f"vcpu.{vcpu}.cpuset"[:_CPUSET_KEY_MAX]


def parse_topology(tree: ConfigTree, optarg: str) -> bool:
    """``bhyve_topology_parse``: store the ``-c`` fields, validate later."""
    if optarg == "":
        for name in ("sockets", "cores", "threads", "cpus"):
            tree.set_value(name, "1")
        return True
    for token in optarg.split(","):
        for key in ("cpus", "sockets", "cores", "threads"):
            if token.startswith(key + "="):
                tree.set_value(key, token[len(key) + 1:])
                break
        else:
            if "=" in token:
                return False
            tree.set_value("cpus", token)
    return True


def parse_gdb(tree: ConfigTree, optarg: str) -> None:
    """``bhyve_parse_gdb_options``: ``[w][address:]port``, split at the last ``:``."""
    if optarg.startswith("w"):
        tree.set_bool("gdb.wait", True)
        optarg = optarg[1:]
    address, colon, port = optarg.rpartition(":")
    if colon:
        tree.set_value("gdb.address", address)
    tree.set_value("gdb.port", port)


def parse_fwcfg(optarg: str, warn: Callable[[str], None]) -> FwCfgFile | None:
    """``qemu_fwcfg_parse_cmdline_arg``; None after bhyve's warnings."""
    text = optarg[5:] if optarg.startswith("name=") else optarg
    name, comma, value = text.partition(",")

    def usage() -> None:
        warn(f'Invalid fw_cfg option "{optarg}"')
        warn("-f [name=]<name>,(string|file)=<value>")

    if not comma:
        usage()
        return None
    if len(name.encode("utf-8", "surrogateescape")) >= FWCFG_MAX_NAME:
        warn(f'fw_cfg name too long: "{optarg}"')
        return None
    if value.startswith("string="):
        return FwCfgFile(name, value[7:].encode("utf-8", "surrogateescape") + b"\0")
    if value.startswith("file="):
        path = value[5:]
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                data = handle.read(size)
        except (OSError, ValueError) as exc:
            reason = os.strerror(exc.errno) if getattr(exc, "errno", None) else str(exc)
            warn(f'Can\'t open fw_cfg_user_file file "{path}": {reason}')
            return None
        if len(data) != size:
            warn(f'Unable to read file "{path}"')
            return None
        return FwCfgFile(name, data)
    usage()
    return None


# --------------------------------------------------------------------------
# After config.dump: topology, pinning, memory size (bhyve main()).
# --------------------------------------------------------------------------

def expand_number(text: str) -> int | None:
    """``expand_number(3)`` (FreeBSD 14+): ``N[bkmgtpe][b]``, None if invalid."""
    parsed = c_scan_integer(text, 0, 0)
    if parsed is None:
        return None
    value, end, negative = parsed
    if negative or value > UINT64_MAX:
        return None
    rest = text[end:]
    if rest == "":
        return value
    shifts = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
    unit = rest[0].lower()
    if unit not in shifts:
        return None
    rest = rest[1:]
    if shifts[unit] and rest[:1] in ("b", "B"):
        rest = rest[1:]
    if rest:
        return None
    result = value << shifts[unit]
    return result if result <= UINT64_MAX else None


def parse_memsize(text: str) -> int | None:
    """``vm_parse_memsize``: a bare number below 1 MiB counts megabytes."""
    value, end, _ = c_strtoul(text, 0)
    if text != "" and end == len(text):
        return value * MB if value < MB else value
    return expand_number(text)


def parse_cpuset(vcpu: int, text: str) -> frozenset[int]:
    """bhyve's ``parse_cpuset``: ``a,b,c-d`` host CPU lists."""
    def invalid() -> BhyveExit:
        return BhyveExit(f"invalid cpuset for vcpu {vcpu}: '{text}'", ExitStatus.ERROR)

    cpus: set[int] = set()
    start = -1
    pos = 0
    while True:
        token = text[pos:]
        raw, end, _ = c_strtoul(token, 0)
        if end == 0:
            raise invalid()
        pcpu = to_c_int(raw)
        if not 0 <= pcpu < CPU_SETSIZE:
            raise BhyveExit(f"hostcpu '{pcpu}' outside valid range from 0 to "
                            f"{CPU_SETSIZE - 1}", ExitStatus.ERROR)
        sep = token[end:end + 1]
        if sep in (",", ""):
            if start >= 0:
                if start > pcpu:
                    raise BhyveExit(f"Invalid hostcpu range {start}-{pcpu}",
                                    ExitStatus.ERROR)
                cpus.update(range(start, pcpu))
                start = -1
            cpus.add(pcpu)
        elif sep == "-":
            if start >= 0:
                raise invalid()
            start = pcpu
        else:
            raise invalid()
        if sep == "":
            return frozenset(cpus)
        pos += end + 1


def resolve_settings(tree: ConfigTree) -> VmSettings:
    """``calc_topology``, ``build_vcpumaps`` and the memory size, in bhyve's order."""
    value = tree.get_value("cpus")
    explicit = value is not None
    ncpus = parse_int_value("cpus", value, 1, UINT16_MAX) if value is not None else 1
    value = tree.get_value("cores")
    cores = parse_int_value("cores", value, 1, UINT16_MAX) if value is not None else 1
    value = tree.get_value("threads")
    threads = parse_int_value("threads", value, 1, UINT16_MAX) if value is not None else 1
    value = tree.get_value("sockets")
    sockets = parse_int_value("sockets", value, 1, UINT16_MAX) if value is not None else ncpus
    product = sockets * cores * threads
    if product > UINT16_MAX:
        raise BhyveExit(f"Computed number of vCPUs too high: {product}", ExitStatus.ERROR)
    if explicit and ncpus != product:
        raise BhyveExit(f"Topology ({sockets} sockets, {cores} cores, {threads} threads) "
                        f"does not match {ncpus} vCPUs", ExitStatus.ERROR)
    ncpus = product

    cpusets: dict[int, frozenset[int]] = {}
    for vcpu in range(ncpus):
        value = tree.get_value(cpuset_key(vcpu))
        if value is not None:
            cpusets[vcpu] = parse_cpuset(vcpu, value)

    value = tree.get_value("memory.size")
    memsize = parse_memsize(value) if value is not None else None
    if memsize is None:
        raise BhyveExit(f"invalid memsize '{value}'", ExitStatus.EX_USAGE)
    return VmSettings(ncpus, sockets, cores, threads, memsize, cpusets)


# --------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------

def parse_args(argv: Sequence[str], *, progname: str | None = None,
               stdout: TextIO | None = None,
               stderr: TextIO | None = None) -> ParsedCommandLine:
    """Parse bhyve's arguments (``argv`` without the program name).

    Diagnostics bhyve prints while parsing (getopt errors, ``warnx``
    warnings, the usage text, ``-s help`` lists) are written as they happen;
    the condition that ends the run is raised as :class:`BhyveExit` (status 0
    for ``-h``/``-s help``/``-l help``, whose output is already written).
    """
    args = [arg.split("\0", 1)[0] for arg in argv]  # C strings end at NUL
    parser = _Parser(progname or program_name(),
                     stdout if stdout is not None else sys.stdout,
                     stderr if stderr is not None else sys.stderr)
    return parser.run(args)


def report(exc: BhyveExit, progname: str, stream: TextIO | None = None) -> None:
    """Print the final message the way bhyve does (errx prefix or plain)."""
    if not exc.message:
        return
    text = exc.message if isinstance(exc, PlainBhyveExit) else f"{progname}: {exc.message}"
    write_text(stream if stream is not None else sys.stderr, text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run bhyvepy like bhyve(8); returns the exit status, never a traceback.

    Set ``BHYVEPY_TRACEBACK=1`` to let unexpected exceptions propagate.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    progname = program_name()
    try:
        parsed = parse_args(args, progname=progname)
        if parsed.config.get_bool("config.dump", False):
            if parsed.restore_file:
                # Show the tree the restore would run with: the snapshot's,
                # with this command line's overrides applied.
                from bhyvepy.vm import prepare_restore

                prepare_restore(parsed, resolve=False).close()
            write_text(sys.stdout, parsed.config.dump())
            sys.stdout.flush()
            return ExitStatus.USAGE
        parsed.settings = resolve_settings(parsed.config)
        from bhyvepy.vm import run_vm

        return int(run_vm(parsed))
    except BhyveExit as exc:
        _flush_quietly(sys.stdout)
        report(exc, progname)
        return exc.status
    except BrokenPipeError:
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        # Die of SIGINT like the C program, without a Python traceback.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 - the promise is "no traceback"
        if os.environ.get("BHYVEPY_TRACEBACK"):
            raise
        write_text(sys.stderr, f"{progname}: internal error: "
                               f"{type(exc).__name__}: {exc}\n")
        return ExitStatus.ERROR


def _flush_quietly(stream: TextIO) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):
        pass
