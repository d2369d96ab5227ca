"""bhyve(8) command line parsing (bhyvepy.cli, bhyvepy.legacy)."""

from __future__ import annotations

import io
import sys
import types
from dataclasses import dataclass

import pytest
from hypothesis import given, settings, strategies as st

from bhyvepy import cli, legacy
from bhyvepy.cli import expand_number, parse_args, parse_memsize, resolve_settings
from bhyvepy.config import PlainBhyveExit
from bhyvepy.errors import BhyveExit

DEFAULTS = ("acpi_tables=true\nacpi_tables_in_memory=true\nmemory.size=256M\n"
            "x86.strictmsr=true\nlpc.fwcfg=bhyve\n")


@dataclass
class Run:
    parsed: cli.ParsedCommandLine | None
    exc: BhyveExit | None
    out: str
    err: str

    @property
    def status(self) -> int:
        return 0 if self.exc is None else self.exc.status

    @property
    def dump(self) -> str:
        assert self.parsed is not None, (self.exc, self.err)
        return self.parsed.config.dump()

    def value(self, path: str) -> str | None:
        assert self.parsed is not None, (self.exc, self.err)
        return self.parsed.config.get_value(path)


def run(*argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    try:
        parsed = parse_args(list(argv), progname="bhyve", stdout=out, stderr=err)
    except BhyveExit as exc:
        return Run(None, exc, out.getvalue(), err.getvalue())
    return Run(parsed, None, out.getvalue(), err.getvalue())


def dump_of(*argv: str) -> str:
    """Dump minus the defaults and the trailing name line."""
    result = run(*argv, "vm")
    text = result.dump
    assert text.endswith("name=vm\n")
    return text[:-len("name=vm\n")]


def leaves(*argv: str) -> dict[str, str]:
    result = run(*argv, "vm")
    assert result.parsed is not None, (result.exc, result.err)
    return dict(result.parsed.config)


def failure(*argv: str) -> Run:
    result = run(*argv, "vm")
    assert result.exc is not None, result.dump
    return result


# -- defaults, operands, getopt ------------------------------------------------

def test_defaults_and_name_come_last():
    assert run("vm").dump == DEFAULTS + "name=vm\n"


def test_operand_is_required_unless_name_is_configured(tmp_path):
    result = run()
    assert result.status == 1 and result.err.startswith("Usage: bhyve ")
    assert run("-o", "name=fromopt").value("name") == "fromopt"
    conf = tmp_path / "c"
    conf.write_text("name=fromfile\n")
    assert run("-k", str(conf)).value("name") == "fromfile"
    # the operand wins over -o, and (re)sets name last
    assert run("-o", "name=a", "b").dump.endswith("name=b\n")


def test_restore_file_may_supply_the_name():
    result = run("-r", "/snap/vm.ckp")
    assert result.exc is None
    assert result.parsed.restore_file == "/snap/vm.ckp" and result.parsed.vmname is None


def test_extra_operands_are_a_usage_error():
    result = run("-H", "vm", "extra")
    assert result.status == 1 and "Usage:" in result.err


def test_options_stop_at_the_first_operand():
    # "-H" after the name is a second operand, not an option (no permutation)
    assert run("vm", "-H").status == 1
    assert run("--", "-H").value("name") == "-H"
    assert run("-").value("name") == "-"


def test_clustered_flags_and_attached_arguments():
    values = leaves("-AHPww", "-AI", "-s3:0,virtio-blk,/d.img", "-lcom1,/dev/nmdm0A",
                    "-c2", "-Sm1G")
    assert values["x86.vmexit_on_hlt"] == "true"
    assert values["x86.vmexit_on_pause"] == "true"
    assert values["x86.strictmsr"] == "false"
    assert values["pci.0.3.0.device"] == "virtio-blk"
    assert values["pci.0.3.0.path"] == "/d.img"
    assert values["lpc.com1.path"] == "/dev/nmdm0A"
    assert values["cpus"] == "2"
    assert values["memory.wired"] == "true"
    assert values["memory.size"] == "1G"


def test_argument_is_taken_from_next_word_even_if_it_looks_like_an_option():
    assert leaves("-U", "-H")["uuid"] == "-H"


def test_unknown_option():
    result = run("-z", "vm")
    assert result.status == 1
    assert result.err.startswith("bhyve: illegal option -- z\nUsage: bhyve ")
    assert run("-H-", "vm").err.startswith("bhyve: illegal option -- -\n")
    assert run("-:", "vm").err.startswith("bhyve: illegal option -- :\n")


def test_missing_option_argument():
    result = run("-s")
    assert result.status == 1
    assert result.err.startswith("bhyve: option requires an argument -- s\nUsage:")


def test_help_goes_to_stderr_with_status_zero():
    result = run("-h")
    assert result.status == 0 and result.out == ""
    assert "-u:" in result.err and "-c vcpus" not in result.err
    assert result.err.splitlines()[1].startswith(" " * (7 + len("bhyve")) + " [-c ")
    # later options are not looked at
    assert run("-h", "-z").status == 0


def test_options_apply_left_to_right_last_writer_wins():
    values = leaves("-x", "-a", "-m", "1G", "-o", "memory.size=2G")
    assert values["x86.x2apic"] == "false" and values["memory.size"] == "2G"


# -- every simple option ---------------------------------------------------------

@pytest.mark.parametrize("flag, path, value", [
    ("-a", "x86.x2apic", "false"),
    ("-C", "memory.guest_in_core", "true"),
    ("-D", "destroy_on_poweroff", "true"),
    ("-e", "x86.strictio", "true"),
    ("-H", "x86.vmexit_on_hlt", "true"),
    ("-M", "monitor", "true"),
    ("-P", "x86.vmexit_on_pause", "true"),
    ("-S", "memory.wired", "true"),
    ("-u", "rtc.use_localtime", "false"),
    ("-W", "virtio_msix", "false"),
    ("-w", "x86.strictmsr", "false"),
    ("-x", "x86.x2apic", "true"),
    ("-Y", "x86.mptable", "false"),
])
def test_flags(flag, path, value):
    assert leaves(flag)[path] == value


@pytest.mark.parametrize("flag", ["-A", "-I"])
def test_noop_flags(flag):
    assert dump_of(flag) == DEFAULTS


@pytest.mark.parametrize("option, arg, path", [
    ("-K", "de_DE.iso.kbd", "keyboard.layout"),
    ("-m", "4G", "memory.size"),
    ("-U", "0d9c27a4-1cf2-11ee-a6b6-589cfc000001", "uuid"),
])
def test_value_options(option, arg, path):
    assert leaves(option, arg)[path] == arg


@pytest.mark.parametrize("arg, expected", [
    ("1234", {"gdb.port": "1234"}),
    ("w1234", {"gdb.wait": "true", "gdb.port": "1234"}),
    ("127.0.0.1:1234", {"gdb.address": "127.0.0.1", "gdb.port": "1234"}),
    ("w[::1]:5", {"gdb.wait": "true", "gdb.address": "[::1]", "gdb.port": "5"}),
    ("w", {"gdb.wait": "true", "gdb.port": ""}),
])
def test_gdb(arg, expected):
    values = leaves("-G", arg)
    assert {k: v for k, v in values.items() if k.startswith("gdb.")} == expected


def test_o_sets_any_variable_and_splits_at_first_equals():
    values = leaves("-o", "a.b=c=d", "-o", "=root")
    assert values["a.b"] == "c=d" and values[""] == "root"


@pytest.mark.parametrize("arg", ["novalue", "empty=", "="])
def test_o_requires_a_value(arg):
    result = failure("-o", arg)
    assert result.status == 64
    assert result.exc.message == f"invalid configuration option '{arg}'"


def test_o_conflicts_use_config_tree_errors():
    result = failure("-o", "a=1", "-o", "a.b=2")
    assert result.status == 4
    assert result.exc.message == "Failed to create configuration node a"
    assert "bhyve: Configuration node a is a child of existing variable a\n" in result.err


def test_k_files_both_formats_mix_with_options_in_order(tmp_path):
    flat = tmp_path / "flat.conf"
    flat.write_text("cpus=4\n# x\nmemory.size=2G\n")
    js = tmp_path / "more.json5"
    js.write_text("{memory: {size: '3G'}, x86: {x2apic: true}}")
    values = leaves("-m", "1G", "-k", str(flat), "-k", str(js), "-c", "2")
    assert values["memory.size"] == "3G" and values["x86.x2apic"] == "true"
    assert values["cpus"] == "2"


def test_k_file_error(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("ok=1\nbroken\n")
    result = failure("-k", str(bad))
    assert result.status == 4
    assert result.exc.message == f"{bad} line 2: invalid config option 'broken'"


# -- -c -------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, expected", [
    ("4", {"cpus": "4"}),
    ("cpus=4", {"cpus": "4"}),
    ("4,sockets=2", {"cpus": "4", "sockets": "2"}),
    ("sockets=2,cores=3,threads=2", {"sockets": "2", "cores": "3", "threads": "2"}),
    ("", {"sockets": "1", "cores": "1", "threads": "1", "cpus": "1"}),
    ("2,,", {"cpus": ""}),   # bhyve's known quirk: empty tokens set cpus=""
])
def test_topology_is_stored_verbatim(arg, expected):
    values = leaves("-c", arg)
    assert {k: values[k] for k in expected} == expected


@pytest.mark.parametrize("arg", ["maxcpus=4", "4,foo=1", "cores=2,x=y"])
def test_topology_unknown_key(arg):
    result = failure("-c", arg)
    assert result.status == 64 and result.exc.message == f"invalid cpu topology '{arg}'"


def settings_of(*argv: str) -> cli.VmSettings:
    result = run(*argv, "vm")
    assert result.parsed is not None, result.err
    return resolve_settings(result.parsed.config)


def settings_error(*argv: str) -> BhyveExit:
    result = run(*argv, "vm")
    assert result.parsed is not None, result.err
    with pytest.raises(BhyveExit) as info:
        resolve_settings(result.parsed.config)
    return info.value


@pytest.mark.parametrize("arg, topology", [
    ("4", (4, 4, 1, 1)),
    ("sockets=2,cores=2,threads=2", (8, 2, 2, 2)),
    ("cpus=2,sockets=1,cores=2,threads=1", (2, 1, 2, 1)),
    ("0x10", (16, 16, 1, 1)),
    ("", (1, 1, 1, 1)),
])
def test_topology_resolution(arg, topology):
    s = settings_of("-c", arg)
    assert (s.ncpus, s.sockets, s.cores, s.threads) == topology


@pytest.mark.parametrize("arg, message", [
    ("4,sockets=2", "Topology (2 sockets, 1 cores, 1 threads) does not match 4 vCPUs"),
    ("0", "Invalid value for cpus: '0'"),
    ("65536", "Invalid value for cpus: '65536'"),
    ("2x", "Invalid value for cpus: '2x'"),
    ("cores=0", "Invalid value for cores: '0'"),
    ("sockets=256,cores=256", "Computed number of vCPUs too high: 65536"),
])
def test_topology_errors_after_parsing(arg, message):
    exc = settings_error("-c", arg)
    assert exc.status == 4 and exc.message == message


# -- -m -------------------------------------------------------------------------------------

MiB = 1 << 20


@pytest.mark.parametrize("text, size", [
    ("214", 214 * MiB), ("0x100", 256 * MiB), ("010", 8 * MiB),
    ("1048576", 1048576), ("256M", 256 * MiB), ("256m", 256 * MiB),
    ("2G", 2 << 30), ("1T", 1 << 40), ("4096K", 4 * MiB), ("1kb", 1024),
    ("4096b", 4096), ("1GB", 1 << 30), (" 5", 5 * MiB),
])
def test_memsize(text, size):
    assert parse_memsize(text) == size
    assert settings_of("-m", text).memsize == size


@pytest.mark.parametrize("text", ["", "x", "1x", "1bb", "1kx", "16E", "-1k", "1.5G", "M"])
def test_bad_memsize(text):
    assert parse_memsize(text) is None
    exc = settings_error("-m", text)
    assert exc.status == 64 and exc.message == f"invalid memsize '{text}'"


def test_expand_number_limits():
    assert expand_number("15E") == 15 << 60
    assert expand_number("16E") is None
    assert expand_number("1e") == 1 << 60


# -- -p -----------------------------------------------------------------------------------

def test_pinning_accumulates():
    values = leaves("-c", "2", "-p", "0:1", "-p", "0:3", "-p", "1:0", "-p", "0:4")
    assert values["vcpu.0.cpuset"] == "1,3,4" and values["vcpu.1.cpuset"] == "0"
    s = settings_of("-c", "2", "-p", "0:1", "-p", "0:3", "-p", "1:0")
    assert s.cpusets == {0: frozenset({1, 3}), 1: frozenset({0})}


def test_pinning_key_is_truncated_like_bhyves_16_byte_buffer():
    assert "vcpu.1000.cpuse" in leaves("-p", "1000:1")


@pytest.mark.parametrize("arg, first_line", [
    ("x", "invalid format: x"),
    ("1", "invalid format: 1"),
    ("-1:0", "invalid vcpu '-1'"),
    ("0:1024", "hostcpu '1024' outside valid range from 0 to 1023"),
    ("0:-2", "hostcpu '-2' outside valid range from 0 to 1023"),
])
def test_pinning_errors(arg, first_line):
    result = failure("-p", arg)
    assert result.status == 64
    assert result.err == first_line + "\n"
    assert result.exc.message == f"invalid vcpu pinning configuration '{arg}'"


@pytest.mark.parametrize("cpuset, expected", [
    ("1-3,7", {1, 2, 3, 7}), ("0x2", {2}), ("5", {5}), ("2-2", {2}),
])
def test_cpuset_lists(cpuset, expected):
    assert settings_of("-o", f"vcpu.0.cpuset={cpuset}").cpusets == {0: frozenset(expected)}


@pytest.mark.parametrize("cpuset, message", [
    ("1-", "invalid cpuset for vcpu 0: '1-'"),
    ("a", "invalid cpuset for vcpu 0: 'a'"),
    ("1-2-3", "invalid cpuset for vcpu 0: '1-2-3'"),
    ("3-1", "Invalid hostcpu range 3-1"),
    ("2000", "hostcpu '2000' outside valid range from 0 to 1023"),
])
def test_cpuset_errors(cpuset, message):
    exc = settings_error("-o", f"vcpu.0.cpuset={cpuset}")
    assert exc.status == 4 and exc.message == message


def test_cpusets_of_absent_vcpus_are_ignored():
    assert settings_of("-p", "5:1").cpusets == {}


# -- -n ---------------------------------------------------------------------------------------

def test_numa_domains():
    values = leaves("-c", "8", "-n", "id=0,size=107,cpus=0-3",
                    "-n", "cpus=4-7,id=1,domain_policy=prefer:0,size=1G")
    assert values["domains.0.size"] == "107" and values["domains.0.cpus"] == "0-3"
    node = run("-n", "cpus=4-7,id=1,domain_policy=prefer:0,size=1G", "vm").parsed
    assert [name for name, _ in node.config.node("domains.1").items()] == \
        ["size", "domain_policy", "cpus"]


@pytest.mark.parametrize("arg, status, message, err", [
    ("", 64, "invalid NUMA configuration ''", ""),
    ("size=1G", 64, "invalid NUMA configuration 'size=1G'",
     "Missing NUMA domain ID in 'size=1G'\n"),
    ("id=256", 4, "Invalid value for id: '256'", ""),
    ("id=x", 4, "Invalid value for id: 'x'", ""),
])
def test_numa_errors(arg, status, message, err):
    result = failure("-n", arg)
    assert (result.status, result.exc.message, result.err) == (status, message, err)


def test_numa_requires_acpi():
    result = failure("-o", "acpi_tables=false", "-n", "id=0")
    assert result.status == 64 and result.exc.message == "NUMA emulation requires ACPI"


# -- -f -----------------------------------------------------------------------------------------

def test_fwcfg_items(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x00\x01data")
    result = run("-f", "opt/a,string=hello", "-f", f"name=opt/b,file={blob}", "vm")
    assert result.parsed.fwcfg_files == [
        cli.FwCfgFile("opt/a", b"hello\0"), cli.FwCfgFile("opt/b", b"\x00\x01data")]
    assert result.dump == DEFAULTS + "name=vm\n"     # not part of the tree


@pytest.mark.parametrize("arg, warning", [
    ("opt/a", 'Invalid fw_cfg option "opt/a"'),
    ("opt/a,data=x", 'Invalid fw_cfg option "opt/a,data=x"'),
    ("x" * 56 + ",string=a", 'fw_cfg name too long: "' + "x" * 56 + ',string=a"'),
    ("opt/a,file=/nonexistent/f",
     'Can\'t open fw_cfg_user_file file "/nonexistent/f": No such file or directory'),
])
def test_fwcfg_errors(arg, warning):
    result = failure("-f", arg)
    assert result.status == 64
    assert result.exc.message == f"invalid fwcfg item '{arg}'"
    assert result.err.startswith(f"bhyve: {warning}\n")


# -- -l ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, expected", [
    ("com1,stdio", {"lpc.com1.path": "stdio"}),
    ("COM2,/dev/nmdm0A", {"lpc.com2.path": "/dev/nmdm0A"}),
    ("com3,tcp=[::1]:4000", {"lpc.com3.path": "tcp=[::1]:4000"}),
    ("com4,a,b", {"lpc.com4.path": "a,b"}),
    ("bootrom,/u.fd", {"lpc.bootrom": "/u.fd"}),
    ("bootrom,/u.fd,/v.fd,fwcfg=qemu",
     {"lpc.bootrom": "/u.fd", "lpc.bootvars": "/v.fd", "lpc.fwcfg": "qemu"}),
    ("BootROM,/u.fd,fwcfg=qemu,x", {"lpc.bootrom": "/u.fd", "lpc.fwcfg": "qemu",
                                    "lpc.x": "true"}),
    ("tpm,passthru,/dev/tpm0", {"tpm.type": "passthru", "tpm.path": "/dev/tpm0",
                                "tpm.version": "2.0"}),
    ("tpm,swtpm,/s.sock,version=1.2", {"tpm.type": "swtpm", "tpm.path": "/s.sock",
                                       "tpm.version": "1.2"}),
    ("pc-testdev,ignored", {"lpc.pc-testdev": "true"}),
])
def test_lpc_devices(arg, expected):
    values = leaves("-l", arg)
    assert {k: values.get(k) for k in expected} == expected


def test_lpc_fwcfg_option_moves_to_the_end_of_lpc():
    assert dump_of("-l", "bootrom,/u.fd,/v.fd,fwcfg=qemu").startswith(
        "acpi_tables=true\nacpi_tables_in_memory=true\nmemory.size=256M\n"
        "x86.strictmsr=true\nlpc.bootrom=/u.fd\nlpc.bootvars=/v.fd\nlpc.fwcfg=qemu\n")


@pytest.mark.parametrize("arg, status, message", [
    ("com5,stdio", 64, "invalid lpc device configuration 'com5,stdio'"),
    ("helpx", 64, "invalid lpc device configuration 'helpx'"),
    ("bootrom", 4, 'invalid bootrom option "bootrom"'),
    ("tpm", 4, 'invalid tpm type "tpm"'),
    ("tpm,swtpm", 4, 'invalid tpm path "tpm,swtpm"'),
])
def test_lpc_errors(arg, status, message):
    result = failure("-l", arg)
    assert (result.status, result.exc.message) == (status, message)


def test_lpc_bootrom_is_a_valid_device():
    # libvirt's probe: "bhyve -l bootrom" must not say "invalid lpc device"
    assert "invalid lpc device" not in run("-l", "bootrom").err


@pytest.mark.parametrize("arg", ["help", "h", "hel", ""])
def test_lpc_help_prefix_quirk(arg, monkeypatch):
    monkeypatch.setattr(cli, "_registry_lpc_names", lambda: ["tpm", "com1"])
    result = run("-l", arg, "vm")
    assert result.status == 0 and result.exc.message is None
    assert result.out == "bootrom\ncom1\ncom2\ncom3\ncom4\ntpm\n"


# -- -s ---------------------------------------------------------------------------------------------

WORKED = [
    ("0,hostbridge", {"pci.0.0.0.device": "hostbridge"}),
    ("0,amd_hostbridge", {"pci.0.0.0.device": "hostbridge",
                          "pci.0.0.0.pcireg.vendor": "0x1022",
                          "pci.0.0.0.pcireg.device": "0x7432"}),
    ("2:1,virtio-net,tap0,mac=00:a0:98:00:00:01,mtu=9000",
     {"pci.0.2.1.device": "virtio-net", "pci.0.2.1.backend": "tap0",
      "pci.0.2.1.mac": "00:a0:98:00:00:01", "pci.0.2.1.mtu": "9000"}),
    ("1:3:0,virtio-blk,/d.img,ro,sectorsize=512/4096",
     {"pci.1.3.0.device": "virtio-blk", "pci.1.3.0.path": "/d.img",
      "pci.1.3.0.ro": "true", "pci.1.3.0.sectorsize": "512/4096"}),
    ("4,ahci-cd,/x.iso,ro", {"pci.0.4.0.device": "ahci", "pci.0.4.0.port.0.type": "cd",
                             "pci.0.4.0.port.0.path": "/x.iso",
                             "pci.0.4.0.port.0.ro": "true"}),
    ("5,ahci,hd:/a,nmrr=1,cd:/b", {"pci.0.5.0.device": "ahci",
                                   "pci.0.5.0.port.0.type": "hd",
                                   "pci.0.5.0.port.0.path": "/a",
                                   "pci.0.5.0.port.0.nmrr": "1",
                                   "pci.0.5.0.port.1.type": "cd",
                                   "pci.0.5.0.port.1.path": "/b"}),
    ("6,nvme,ram=1024,maxq=2", {"pci.0.6.0.device": "nvme", "pci.0.6.0.ram": "1024",
                                "pci.0.6.0.maxq": "2"}),
    ("7,passthru,2/0/0,rom=/r", {"pci.0.7.0.device": "passthru", "pci.0.7.0.bus": "2",
                                 "pci.0.7.0.slot": "0", "pci.0.7.0.func": "0",
                                 "pci.0.7.0.rom": "/r"}),
    ("8,virtio-9p,share=/tmp,ro", {"pci.0.8.0.device": "virtio-9p",
                                   "pci.0.8.0.sharename": "share",
                                   "pci.0.8.0.path": "/tmp", "pci.0.8.0.ro": "true"}),
    ("9,virtio-console,a=/s1,b=/s2", {"pci.0.9.0.device": "virtio-console",
                                      "pci.0.9.0.port.0.name": "a",
                                      "pci.0.9.0.port.0.path": "/s1",
                                      "pci.0.9.0.port.1.name": "b",
                                      "pci.0.9.0.port.1.path": "/s2"}),
    ("30,xhci,tablet", {"pci.0.30.0.device": "xhci",
                        "pci.0.30.0.slot.1.device": "tablet"}),
    ("29,fbuf,tcp=0.0.0.0:5900,w=800,h=600,wait",
     {"pci.0.29.0.device": "fbuf", "pci.0.29.0.tcp": "0.0.0.0:5900",
      "pci.0.29.0.w": "800", "pci.0.29.0.h": "600", "pci.0.29.0.wait": "true"}),
    ("3,virtio-net,netgraph,path=sw0:,peerhook=link2",
     {"pci.0.3.0.device": "virtio-net", "pci.0.3.0.backend": "netgraph",
      "pci.0.3.0.path": "sw0:", "pci.0.3.0.peerhook": "link2"}),
]


@pytest.mark.parametrize("arg, expected", WORKED)
def test_worked_conversions(arg, expected):
    text = dump_of("-s", arg)
    assert text.startswith(DEFAULTS)
    lines = text[len(DEFAULTS):]
    assert lines == "".join(f"{k}={v}\n" for k, v in expected.items())


def test_worked_lpc_and_cpu_conversions():
    assert dump_of("-l", "com1,stdio") == DEFAULTS + "lpc.com1.path=stdio\n"
    assert dump_of("-c", "4,sockets=2") == DEFAULTS + "cpus=4\nsockets=2\n"
    assert dump_of("-p", "0:1", "-p", "0:3") == DEFAULTS + "vcpu.0.cpuset=1,3\n"


@pytest.mark.parametrize("arg, expected", [
    ("30,xhci,", {"pci.0.30.0.device": "xhci", "pci.0.30.0.slot.1.device": ""}),
    ("30,xhci,tablet=x=y,tablet", {"pci.0.30.0.slot.1.device": "tablet",
                                   "pci.0.30.0.slot.1.x": "y",
                                   "pci.0.30.0.slot.2.device": "tablet"}),
    ("4,fbuf,", {"pci.0.4.0.device": "fbuf", "pci.0.4.0.": "true"}),
    ("4,virtio-rnd", {"pci.0.4.0.device": "virtio-rnd"}),
    ("4,virtio-blk,", {"pci.0.4.0.path": ""}),
    ("4,ahci-hd,/d,ser=X,bootindex=2", {"pci.0.4.0.port.0.type": "hd",
                                        "pci.0.4.0.port.0.path": "/d",
                                        "pci.0.4.0.port.0.ser": "X",
                                        "pci.0.4.0.port.0.bootindex": "2"}),
    ("4,ahci,hd:,cd:/c", {"pci.0.4.0.port.1.type": "cd", "pci.0.4.0.port.1.path": "/c"}),
    ("4,nvme,/dev/nda0,maxq=4,ser=S", {"pci.0.4.0.path": "/dev/nda0",
                                       "pci.0.4.0.maxq": "4", "pci.0.4.0.ser": "S"}),
    ("4,nvme,ram=512", {"pci.0.4.0.ram": "512"}),
    ("4,passthru,ppt0,bootindex=1", {"pci.0.4.0.pptdev": "ppt0",
                                     "pci.0.4.0.bootindex": "1"}),
    ("4,passthru,pci0:3:0:1", {"pci.0.4.0.bus": "3", "pci.0.4.0.slot": "0",
                               "pci.0.4.0.func": "1"}),
    ("4,passthru,pci2:1:0", {"pci.0.4.0.bus": "2", "pci.0.4.0.slot": "1",
                             "pci.0.4.0.func": "0"}),
    ("4,virtio-scsi,/dev/cam/ctl0.1,iid=3", {"pci.0.4.0.dev": "/dev/cam/ctl0.1",
                                            "pci.0.4.0.iid": "3"}),
    ("4,virtio-input,/dev/input/event0", {"pci.0.4.0.path": "/dev/input/event0"}),
    ("4,uart,tcp=1.2.3.4:5,x", {"pci.0.4.0.path": "tcp=1.2.3.4:5,x"}),
    ("4,hda,play=/dev/dsp0,rec=/dev/dsp1", {"pci.0.4.0.play": "/dev/dsp0",
                                           "pci.0.4.0.rec": "/dev/dsp1"}),
    ("4,e1000,slirp,hostfwd=tcp::8022-:22", {"pci.0.4.0.device": "e1000",
                                            "pci.0.4.0.backend": "slirp",
                                            "pci.0.4.0.hostfwd": "tcp::8022-:22"}),
    ("4,lpc", {"pci.0.4.0.device": "lpc"}),
    ("4,virtio-console", {"pci.0.4.0.device": "virtio-console"}),
])
def test_more_conversions(arg, expected):
    values = leaves("-s", arg)
    assert {k: values.get(k) for k in expected} == expected


def test_ahci_ignores_ports_beyond_32():
    conf = ",".join(f"hd:/d{i}" for i in range(34))
    values = leaves("-s", f"4,ahci,{conf}")
    assert values["pci.0.4.0.port.31.path"] == "/d31"
    assert "pci.0.4.0.port.32.path" not in values


@pytest.mark.parametrize("slot, bsf", [
    ("3", "0.3.0"), ("3:1", "0.3.1"), ("1:3:0", "1.3.0"), (" 3", "0.3.0"),
    ("+3:2", "0.3.2"), ("255:31:7", "255.31.7"), ("3x", "0.3.0"), ("3:1junk", "0.3.1"),
    ("4294967299", "0.3.0"),   # sscanf %d truncates to int
])
def test_slot_forms(slot, bsf):
    assert leaves("-s", f"{slot},hostbridge")[f"pci.{bsf}.device"] == "hostbridge"


@pytest.mark.parametrize("arg", [
    "32,hostbridge", "256:0:0,hostbridge", "0:8,hostbridge", "-1,hostbridge",
    "x,hostbridge", ",hostbridge", "3", "hostbridge",
])
def test_invalid_slots(arg):
    result = failure("-s", arg)
    assert isinstance(result.exc, PlainBhyveExit)
    assert result.status == 4
    assert result.exc.message == f'Invalid PCI slot info field "{arg}"'


def test_unknown_device():
    result = failure("-s", "0:0,bogus")
    assert result.status == 4
    assert result.exc.message == 'pci slot 0:0:0: unknown device "bogus"'
    assert failure("-s", "1:2:3,").exc.message == 'pci slot 1:2:3: unknown device ""'


def test_occupied_slot():
    result = failure("-s", "3,hostbridge", "-s", "3:0,virtio-rnd")
    assert result.status == 4
    assert result.exc.message == "pci slot 0:3:0 already occupied!"


def test_o_before_s_occupies_the_slot_but_after_is_fine():
    result = failure("-o", "pci.0.4.0.bootindex=1", "-s", "4,virtio-blk,/d")
    assert result.exc.message == "pci slot 0:4:0 already occupied!"
    values = leaves("-s", "4,virtio-blk,/d", "-o", "pci.0.4.0.bootindex=1")
    assert values["pci.0.4.0.bootindex"] == "1"


@pytest.mark.parametrize("arg, message", [
    ("4,ahci,/x", 'Missing or invalid type for port 0: "/x"'),
    ("4,ahci,hd:/a,sd:/b", None),  # ",sd:" is not a port separator: an option
    ("4,virtio-console,a", "vtcon: port a requires a path"),
    ("4,virtio-console," + ",".join(f"p{i}=/s{i}" for i in range(17)),
     "vtcon: too many ports"),
    ("4,virtio-9p,a=/x,b=/y", "virtio-9p: more than one share name given"),
    ("4,passthru,abc", 'passthru: invalid options "abc"'),
    ("4,passthru,1/2", 'passthru: invalid options "1/2"'),
])
def test_device_conversion_errors(arg, message):
    result = run("-s", arg, "vm")
    if message is None:
        assert result.exc is None
        return
    assert isinstance(result.exc, PlainBhyveExit)
    assert (result.status, result.exc.message) == (4, message)


def test_virtio_input_needs_a_path_and_fails_silently():
    result = failure("-s", "4,virtio-input")
    assert result.status == 4 and not result.exc.message and result.err == ""


def test_generic_config_rejects_dotted_names():
    result = failure("-s", "4,virtio-blk,/d,a.b=c")
    assert not isinstance(result.exc, PlainBhyveExit)
    assert (result.status, result.exc.message) == (4, "Invalid config node name a.b")


@pytest.mark.parametrize("arg", ["help", "he", ""])
def test_pci_help_prefix_quirk(arg, monkeypatch):
    monkeypatch.setattr(cli, "_registry_pci_names",
                        lambda: ["ahci", "hostbridge", "virtio-blk"])
    result = run("-s", arg, "vm")
    assert result.status == 0
    assert result.out.split() == ["ahci", "ahci-hd", "ahci-cd", "hostbridge",
                                  "amd_hostbridge", "virtio-blk"]


def test_pci_help_lists_the_registry():
    from bhyvepy import registry

    result = run("-s", "help")
    assert result.status == 0
    assert result.out.split() == legacy.pci_help_lines(registry.pci_emulation_names())


def test_every_upstream_emulation_converts_even_if_not_implemented():
    for number, name in enumerate(legacy.PCI_EMULATIONS):
        conf = ",/dev/input/event0" if name == "virtio-input" else ""
        values = leaves("-s", f"{number},{name}{conf}")
        assert values[f"pci.0.{number}.0.device"] == legacy.PCI_EMULATIONS[name].device


# -- main ----------------------------------------------------------------------------------------

def call_main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["/usr/sbin/bhyve", *argv])
    status = cli.main()
    out, err = capsys.readouterr()
    return status, out, err


def test_main_config_dump_exits_1(monkeypatch, capsys):
    status, out, err = call_main(monkeypatch, capsys, "-o", "config.dump=1", "-c", "2", "vm")
    assert status == 1 and err == ""
    assert out == DEFAULTS.replace("lpc.fwcfg=bhyve\n", "lpc.fwcfg=bhyve\nconfig.dump=1\n") \
        + "cpus=2\nname=vm\n"


def test_main_dump_needs_a_name_and_a_valid_boolean(monkeypatch, capsys):
    status, out, err = call_main(monkeypatch, capsys, "-o", "config.dump=1")
    assert status == 1 and out == "" and err.startswith("Usage: bhyve")
    status, out, err = call_main(monkeypatch, capsys, "-o", "config.dump=maybe", "vm")
    assert status == 4
    assert err == "bhyve: Invalid value maybe for boolean variable config.dump\n"


def test_main_prefixes_errx_messages_but_not_eprintln_ones(monkeypatch, capsys):
    status, _, err = call_main(monkeypatch, capsys, "-l", "com9", "vm")
    assert (status, err) == (64, "bhyve: invalid lpc device configuration 'com9'\n")
    status, _, err = call_main(monkeypatch, capsys, "-s", "0,nope", "vm")
    assert (status, err) == (4, 'pci slot 0:0:0: unknown device "nope"\n')


def test_main_validates_settings_before_running(monkeypatch, capsys):
    status, _, err = call_main(monkeypatch, capsys, "-c", "3,sockets=2", "vm")
    assert status == 4
    assert err == "bhyve: Topology (2 sockets, 1 cores, 1 threads) does not match 3 vCPUs\n"
    status, _, err = call_main(monkeypatch, capsys, "-m", "lots", "vm")
    assert (status, err) == (64, "bhyve: invalid memsize 'lots'\n")


def test_main_runs_the_vm_with_resolved_settings(monkeypatch, capsys):
    seen = {}

    def run_vm(parsed):
        seen["parsed"] = parsed
        return 2

    monkeypatch.setitem(sys.modules, "bhyvepy.vm", types.SimpleNamespace(run_vm=run_vm))
    status, _, _ = call_main(monkeypatch, capsys, "-c", "2", "-m", "512", "guest")
    assert status == 2
    parsed = seen["parsed"]
    assert parsed.vmname == "guest"
    assert parsed.settings == cli.VmSettings(2, 2, 1, 1, 512 << 20, {})


def test_main_never_shows_a_traceback(monkeypatch, capsys):
    def run_vm(parsed):
        raise RuntimeError("boom")

    monkeypatch.setitem(sys.modules, "bhyvepy.vm", types.SimpleNamespace(run_vm=run_vm))
    monkeypatch.delenv("BHYVEPY_TRACEBACK", raising=False)
    status, _, err = call_main(monkeypatch, capsys, "vm")
    assert status == 4 and err == "bhyve: internal error: RuntimeError: boom\n"


def test_main_help_and_usage_statuses(monkeypatch, capsys):
    assert call_main(monkeypatch, capsys, "-h")[0] == 0
    assert call_main(monkeypatch, capsys, "-q", "vm")[0] == 1
    status, out, _ = call_main(monkeypatch, capsys, "-l", "help")
    assert status == 0 and out.startswith("bootrom\ncom1\n")


# -- fuzzing ---------------------------------------------------------------------------------------

_words = st.sampled_from([
    "-a", "-A", "-C", "-c", "-D", "-e", "-f", "-G", "-H", "-h", "-I", "-k", "-K",
    "-l", "-M", "-m", "-n", "-o", "-P", "-p", "-r", "-S", "-s", "-U", "-u", "-W",
    "-w", "-x", "-Y", "-z", "--", "-", "vm", "help", "com1,stdio", "bootrom,x",
    "tpm,a", "0,hostbridge", "3:0,ahci,hd:x", "4,virtio-console,a=b",
    "1:2:3,virtio-net,tap0", "config.dump=1", "name=x", "a=b", "a.b=c",
    "4,sockets=2", "id=0,size=1", "0:1", "1G", "w1:2", "x,string=y", "-AHPw",
    "-s3,xhci,tablet", "-lcom2,stdio", "pci.0.3.0.x=1", "cpus=",
])
_text = st.text(alphabet=st.characters(blacklist_characters="/\x00",
                                       blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_words, _text), max_size=10))
def test_random_argv_only_ever_succeeds_or_exits_cleanly(argv):
    result = run(*argv)
    if result.exc is not None:
        assert isinstance(result.exc.status, int)
        assert result.exc.status in (0, 1, 4, 64)
        return
    try:
        resolve_settings(result.parsed.config)
    except BhyveExit as exc:
        assert exc.status in (4, 64)
