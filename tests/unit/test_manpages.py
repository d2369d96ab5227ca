"""The manual pages in man/: well-formed mdoc, and in step with the code.

The pages are the reference users read, so each check here ties a page to
the code it documents: every getopt letter of ``bhyvepy``, every PCI
emulation it can build (and every upstream one it only parses), every
``bhyvepyctl`` long option and every configuration variable the code reads.
A new option, device or variable without documentation fails here.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
PAGES = ("bhyvepy.8", "bhyvepy_config.5", "bhyvepyctl.8")

#: Variables read in the code that are deliberately not in bhyvepy_config(5),
#: each with the reason.  Keep this short: a user-visible variable belongs in
#: the page.
INTERNAL_VARIABLES: dict[str, str] = {
    # hostbridge's pre-14 ID spellings are documented as "vendor, devid" on one
    # .It line; "devid" is covered by that line, nothing is internal today.
}


def _page(name: str) -> str:
    return (MAN / name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_groff_lint_clean(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    proc = subprocess.run(["groff", "-mdoc", "-ww", "-z", str(MAN / page)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"groff warnings for {page}:\n{proc.stderr}"


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_clean(page: str) -> None:
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed (apt-get install mandoc)")
    # -W warning: style notes such as "referenced manual not found" depend on
    # the manuals installed on the host, not on the page.
    proc = subprocess.run(["mandoc", "-Tlint", "-W", "warning", str(MAN / page)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("page", PAGES)
def test_page_header_matches_file_name(page: str) -> None:
    name, section = page.rsplit(".", 1)
    text = _page(page)
    assert re.search(rf"^\.Dt {re.escape(name.upper())} {section}$", text, re.M)
    assert re.search(rf"^\.Nm {re.escape(name)}$", text, re.M)


# --------------------------------------------------------------------------
# bhyvepy(8)
# --------------------------------------------------------------------------

def test_every_getopt_letter_has_an_entry() -> None:
    from bhyvepy.cli import OPTSTRING

    text = _page("bhyvepy.8")
    letters = [c for c in OPTSTRING if c != ":"]
    assert letters, "empty optstring"
    missing = [c for c in letters
               if not re.search(rf"^\.It Fl {re.escape(c)}(\s|$)", text, re.M)]
    assert not missing, f"options without an '.It Fl X' entry in bhyvepy.8: {missing}"


def test_no_entry_for_an_option_that_does_not_exist() -> None:
    from bhyvepy.cli import OPTSTRING

    text = _page("bhyvepy.8")
    options = text[text.index(".Sh OPTIONS"):]
    options = options[:options.index("\n.Sh ", 1)]
    documented = re.findall(r"^\.It Fl (\w)(?:\s|$)", options, re.M)
    extra = sorted(set(documented) - set(OPTSTRING))
    assert not extra, f"bhyvepy.8 documents options the parser rejects: {extra}"


def _section(text: str, header: str) -> str:
    start = text.index(header)
    ends = [i for i in (text.find("\n.Ss ", start + 1), text.find("\n.Sh ", start + 1)) if i >= 0]
    return text[start:min(ends)]


def test_every_implemented_emulation_is_documented() -> None:
    from bhyvepy import registry

    text = _page("bhyvepy.8")
    implemented = _section(text, ".Ss Implemented emulations")
    names = registry.pci_emulation_names()
    assert names
    missing = [n for n in names
               if not re.search(rf"^\.It Cm {re.escape(n)}(\s|$)", implemented, re.M)]
    assert not missing, f"emulations missing from 'Implemented emulations': {missing}"


def test_parsed_only_emulations_are_listed_exactly() -> None:
    """Every upstream name bhyvepy cannot build is in the 'refused' list, and
    nothing it can build is listed there (update the page when a device lands)."""
    from bhyvepy import registry
    from bhyvepy.legacy import PCI_ALIASES, PCI_EMULATIONS

    text = _page("bhyvepy.8")
    refused = _section(text, ".Ss Emulations parsed but not built")
    listed = set(re.findall(r"^\.It Cm (\S+)", refused, re.M))
    buildable = set(registry.pci_emulation_names())
    expected = {n for n in PCI_EMULATIONS
                if n not in buildable and PCI_ALIASES.get(n) not in buildable}
    assert listed == expected, (f"not listed: {sorted(expected - listed)}; "
                                f"listed but buildable or unknown: {sorted(listed - expected)}")


def test_aliases_are_documented() -> None:
    from bhyvepy.legacy import PCI_ALIASES

    implemented = _section(_page("bhyvepy.8"), ".Ss Implemented emulations")
    refused = _section(_page("bhyvepy.8"), ".Ss Emulations parsed but not built")
    for alias in PCI_ALIASES:
        assert re.search(rf"^\.It Cm {re.escape(alias)}(\s|$)", implemented + refused, re.M), alias


def test_lpc_help_names_are_documented() -> None:
    from bhyvepy import legacy, registry

    text = _page("bhyvepy.8")
    lpc = _section(text, ".Sh LPC DEVICES")
    for name in legacy.lpc_help_lines(registry.lpc_device_names()):
        assert re.search(rf"^\.It Cm (.* )?{re.escape(name)}(\s|$)", lpc, re.M), name


def test_exit_statuses_are_documented() -> None:
    from bhyvepy.errors import ExitStatus

    text = _page("bhyvepy.8")
    block = _section(text, ".Sh EXIT STATUS")
    documented = {int(n) for n in re.findall(r"^\.It (\d+)$", block, re.M)}
    missing = sorted({int(s) for s in ExitStatus} - documented)
    assert not missing, f"exit statuses missing from bhyvepy.8: {missing}"


def _environment_variables() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "bhyvepy").rglob("*.py"):
        found.update(re.findall(r"""environ(?:\.get\(|\[)\s*["'](\w+)["']""",
                                path.read_text(encoding="utf-8")))
        found.update(re.findall(r"""getenv\(\s*["'](\w+)["']""", path.read_text(encoding="utf-8")))
    return found


def test_environment_variables_are_documented() -> None:
    text = _section(_page("bhyvepy.8"), ".Sh ENVIRONMENT")
    names = _environment_variables()
    assert "BHYVEPY_LOG" in names  # the scan itself works
    missing = [n for n in sorted(names) if not re.search(rf"^\.It Ev {n}$", text, re.M)]
    assert not missing, f"environment variables missing from bhyvepy.8: {missing}"


# --------------------------------------------------------------------------
# bhyvepyctl(8)
# --------------------------------------------------------------------------

def test_every_bhyvepyctl_option_is_documented() -> None:
    try:
        from bhyvepy import ctl
    except ImportError:
        pytest.skip("bhyvepy.ctl does not exist yet")
    text = _page("bhyvepyctl.8")
    names = [o.rstrip("=") for o in ctl.LONGOPTS]
    assert names
    missing = [n for n in names
               if not re.search(rf"^\.It Fl Fl {re.escape(n)}(\s|$)", text, re.M)]
    assert not missing, f"bhyvepyctl options without an entry: {missing}"
    synopsis = _section(text, ".Sh SYNOPSIS")
    assert all(f"Fl Fl {n}" in synopsis for n in names)


def test_snapshot_header_table_matches_the_format() -> None:
    from bhyvepy.snapshot import fileformat

    text = _page("bhyvepyctl.8")
    assert f"format version, {fileformat.FORMAT_VERSION}" in text
    assert f"header size, {fileformat.HEADER_SIZE}" in text
    rows = [(int(a), int(b)) for a, b in re.findall(r"^\.It (\d+) Ta (\d+) Ta ", text, re.M)]
    assert rows[0] == (0, len(fileformat.MAGIC))
    offset = 0
    for start, length in rows:
        assert start == offset, f"header table row at {start}, expected {offset}"
        offset += length
    assert offset == fileformat.HEADER_SIZE
    assert "BHYVEPY\\e0SNAPSHOT" in text and fileformat.MAGIC == b"BHYVEPY\0SNAPSHOT"


def test_kernel_sections_are_listed_in_order() -> None:
    from bhyvepy.vmm import KERNEL_SECTIONS

    text = _page("bhyvepyctl.8")
    line = ".Va " + " , ".join(KERNEL_SECTIONS) + " ."
    assert line in text


# --------------------------------------------------------------------------
# bhyvepy_config(5)
# --------------------------------------------------------------------------

_GETTERS = {"get_value", "get_bool", "get_int"}
_REG_HELPERS = {"config_read_reg": 1}      # helper -> index of the register name


@functools.lru_cache(maxsize=None)
def config_variables_in_code() -> frozenset[str]:
    """Literal variable names the code reads from the config tree.

    Calls ``x.get_value("name")``, ``get_bool``, ``get_int`` with a string
    constant first argument, and ``config_read_reg(ctx, "vendor", ...)``
    (which reads ``pcireg.<name>``).  Docstrings are not code and are not
    scanned (the AST is).  Names built at run time (f-strings) are not seen.
    """
    names: set[str] = set()
    for path in sorted((ROOT / "bhyvepy").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else \
                func.id if isinstance(func, ast.Name) else None
            if fname in _GETTERS:
                index, prefix = 0, ""
            elif fname in _REG_HELPERS:
                index, prefix = _REG_HELPERS[fname], "pcireg."
            else:
                continue
            if len(node.args) > index and isinstance(node.args[index], ast.Constant) \
                    and isinstance(node.args[index].value, str):
                names.add(prefix + node.args[index].value)
    return frozenset(names)


def documented_config_variables(text: str) -> set[str]:
    """Names that appear as ``Va`` arguments in the page.

    ``.It Va port . Ns Ar N Ns Va .type`` yields ``port.`` and ``.type``;
    ``.It Va gdb.address , gdb.port`` yields both names.
    """
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith(".") or " Va " not in f" {line[1:]} ":
            continue
        words = line.split()
        for i, word in enumerate(words):
            if word != "Va" and not (i == 0 and word == ".Va"):
                continue
            for arg in words[i + 1:]:
                if arg in {"Ns", "Ar", "Pq", "Cm", "No", "Ta", "Va", "Po", "Pc"} or \
                        arg.startswith("("):
                    break
                if arg not in {",", ".", ";", ":"}:
                    names.add(arg.rstrip(",;"))
    return names


def _is_documented(name: str, documented: set[str]) -> bool:
    """``name`` itself, or the tail of a documented path (``.type`` of
    ``port.N.type`` documents a device's relative name ``type``)."""
    return name in documented or any(d.endswith("." + name) for d in documented)


def test_config_scan_finds_known_variables() -> None:
    """The scan itself: if it finds nothing, the next test would pass vacuously."""
    names = config_variables_in_code()
    for known in ("memory.size", "x86.strictio", "rundir", "debugcon.path", "path",
                  "pcireg.vendor"):
        assert known in names, known


def test_every_config_variable_is_documented() -> None:
    text = _page("bhyvepy_config.5")
    documented = documented_config_variables(text)
    missing = sorted(n for n in config_variables_in_code()
                     if n not in INTERNAL_VARIABLES and not _is_documented(n, documented))
    assert not missing, f"config variables read by the code but not in bhyvepy_config.5: {missing}"


def test_every_option_variable_is_documented() -> None:
    """Variables the command line sets (a dump of a busy command line)."""
    from bhyvepy.cli import parse_args

    argv = ["-a", "-C", "-D", "-e", "-H", "-M", "-P", "-S", "-u", "-W", "-w", "-x", "-Y",
            "-c", "2,sockets=1,cores=2,threads=1", "-m", "1G", "-p", "0:1", "-U", "u",
            "-K", "us", "-G", "w127.0.0.1:1234", "-n", "id=0,size=1G,cpus=0-1",
            "-l", "com1,stdio", "-l", "bootrom,/rom,/vars,fwcfg=qemu",
            "-l", "tpm,swtpm,/s", "-l", "pc-testdev", "vm"]
    tree = parse_args(argv).config
    documented = documented_config_variables(_page("bhyvepy_config.5"))
    generic = {"lpc.fwcfg", "vcpu.0.cpuset", "domains.0.size", "domains.0.cpus"}
    missing = []
    for path, _value in tree:
        normal = re.sub(r"\.\d+\.", ".N.", path)
        if path in generic or _is_documented(path, documented) or \
                _is_documented(normal, documented):
            continue
        missing.append(path)
    assert not missing, f"variables set by options but not in bhyvepy_config.5: {missing}"
