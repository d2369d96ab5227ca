"""Cross-compile the libvmmapi binding against real FreeBSD headers.

There is no FreeBSD host here, but the ``ziglang`` wheel (PyPI) ships
FreeBSD's system headers, including ``machine/vmm.h``, ``vmm_dev.h`` and
``vmm_snapshot.h`` (``ziglang/lib/libc/include/x86_64-freebsd-none/machine``).
The C source cffi would generate for the API-mode module is compiled with
``zig cc -target x86_64-freebsd -c`` (no linking), so every struct, field,
enumerator and constant the cdef names is checked by a real compiler.

``<vmmapi.h>`` itself is not in those headers: it is replaced by a stand-in
holding the project's own declarations (the cdef's prototypes plus the few
facts that header owns: segment ids, VM_MEM_F_*, VMMAPI_OPEN_*).  For the
FreeBSD 15 flavour a stand-in ``dev/vmm/vmm_mem.h`` supplies the segment ids,
and the kernel structures are those of the 14.x headers in the wheel.

A second compile (``-S``) makes the compiler print the value of every
constant the cdef names and the bytes of a ``struct vm_inout`` with known
bitfields; the test double's value table and cffi's bitfield layout must
agree with them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import cffi
import pytest

from vmmapi_fake import REAL_VALUES, concrete_cdef, load_builder

vb = load_builder()

zig = pytest.importorskip("ziglang", reason="ziglang (PyPI) is not installed: pip install ziglang")
ZIG_INCLUDE = Path(zig.__file__).parent / "lib" / "libc" / "include"
FREEBSD_MACHINE = ZIG_INCLUDE / "x86_64-freebsd-none" / "machine"
if not (FREEBSD_MACHINE / "vmm.h").exists():
    pytest.skip(f"this ziglang has no FreeBSD vmm headers ({FREEBSD_MACHINE}/vmm.h)", allow_module_level=True)

FEATURES = frozenset({"suspend_destroy"}) if "VM_SUSPEND_DESTROY" in (FREEBSD_MACHINE / "vmm.h").read_text() \
    else frozenset()

HEADER_PREFIX = """\
#include <sys/param.h>
#include <sys/cpuset.h>
#include <machine/vmm.h>
#include <machine/vmm_dev.h>
#include <stdbool.h>
struct vm_snapshot_meta;
enum vm_mmap_style { VM_MMAP_NONE, VM_MMAP_ALL, VM_MMAP_SPARSE };
#define VM_MEM_F_INCORE 0x01
#define VM_MEM_F_WIRED 0x02
"""
#: What <vmmapi.h> (14.x) or <dev/vmm/vmm_mem.h> (15.x) contribute.
VMMAPI_FACTS = {
    "14": "#define VMMAPI_VERSION 0200\nenum { VM_SYSMEM, VM_BOOTROM, VM_FRAMEBUFFER, VM_PCIROM };\n",
    "15": "#define VMMAPI_VERSION 0300\n#define VMMAPI_OPEN_CREATE 0x01\n#define VMMAPI_OPEN_REINIT 0x02\n",
}
VMM_MEM_H_15 = ("#define VM_MAXMEMDOM 8\n#define VM_MAXSYSMEM VM_MAXMEMDOM\n"
                "enum { VM_SYSMEM = 0, VM_BOOTROM = VM_MAXSYSMEM, VM_FRAMEBUFFER, VM_PCIROM, VM_MEMSEG_END };\n")
STANDIN = "bhyvepy_vmmapi_standin.h"


def _zig_cc(*args: str) -> list[str]:
    return [sys.executable, "-m", "ziglang", "cc", "-target", "x86_64-freebsd", *args]


def _standin(dir_: Path, flavour: str) -> Path:
    inc = dir_ / f"inc{flavour}"
    (inc / "dev" / "vmm").mkdir(parents=True)
    (inc / STANDIN).write_text(HEADER_PREFIX + VMMAPI_FACTS[flavour] + vb.function_prototypes(flavour))
    if flavour == "15":
        (inc / "dev" / "vmm" / "vmm_mem.h").write_text(VMM_MEM_H_15)
    return inc


def _constants(cdef: str) -> list[str]:
    names = re.findall(r"^\s*#define\s+(\w+)\s+\.\.\.", cdef, re.M)
    for body in re.findall(r"enum\s+\w+\s*\{([^}]*)\}", cdef):
        names += [n.strip() for n in body.split(",") if n.strip() and n.strip() != "..."]
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Both flavours' generated C and the value probe, compiled in parallel."""
    d = tmp_path_factory.mktemp("xc")
    py_inc = sysconfig.get_paths()["include"]
    procs = {}
    for flavour in vb.FLAVOURS:
        inc = _standin(d, flavour)
        ffi = vb.make_ffibuilder(flavour, FEATURES, vmmapi_header=STANDIN, libraries=())
        src = d / f"vmmapi_{flavour}.c"
        ffi.emit_c_code(str(src))
        procs[flavour] = subprocess.Popen(
            _zig_cc("-c", "-Werror", "-Wall", "-Wno-unused-function", f"-I{inc}", f"-I{py_inc}",
                    str(src), "-o", str(d / f"vmmapi_{flavour}.o")),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    names = _constants(vb.cdef_text("14", FEATURES))
    probe = d / "probe.c"
    probe.write_text(
        vb.c_source("14", STANDIN).split("/* Anonymous")[0]
        + "const long long bhyvepy_values[] = {\n" + ",\n".join(f"  (long long)({n})" for n in names) + "\n};\n"
        + "const union { struct vm_inout s; unsigned char b[sizeof(struct vm_inout)]; } bhyvepy_inout =\n"
        + "  {{ .bytes = 4, .in = 1, .string = 0, .rep = 1, .port = 0x1234, .eax = 0xdeadbeef }};\n")
    procs["probe"] = subprocess.Popen(
        _zig_cc("-S", "-g0", f"-I{d / 'inc14'}", str(probe), "-o", str(d / "probe.s")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {}
    for key, p in procs.items():
        stdout, _ = p.communicate(timeout=120)
        out[key] = subprocess.CompletedProcess(p.args, p.returncode, stdout, "")
    out["probe_asm"] = (d / "probe.s").read_text() if (d / "probe.s").exists() else ""  # type: ignore[assignment]
    out["probe_names"] = names  # type: ignore[assignment]
    return out


@pytest.mark.parametrize("flavour", vb.FLAVOURS)
def test_generated_module_compiles_against_freebsd_headers(compiled, flavour: str) -> None:
    r = compiled[flavour]
    assert r.returncode == 0, f"zig cc failed for flavour {flavour}:\n{r.stdout[-4000:]}"


def _asm_symbol_bytes(asm: str, symbol: str) -> bytes:
    """The initialised bytes of ``symbol`` in clang's assembly output."""
    lines = asm.splitlines()
    start = lines.index(f"{symbol}:") + 1
    widths = {".byte": 1, ".short": 2, ".value": 2, ".long": 4, ".quad": 8}
    data = bytearray()
    for line in lines[start:]:
        parts = line.split("#")[0].split()
        if not parts:
            continue
        if parts[0] == ".size" or parts[0].endswith(":"):
            break
        if parts[0] == ".zero":
            data += bytes(int(parts[1].rstrip(","), 0))
        elif parts[0] in widths:
            data += (int(parts[1], 0) & ((1 << (8 * widths[parts[0]])) - 1)).to_bytes(widths[parts[0]], "little")
    return bytes(data)


def test_test_double_constants_match_the_compiler(compiled) -> None:
    r = compiled["probe"]
    assert r.returncode == 0, r.stdout[-4000:]
    raw = _asm_symbol_bytes(compiled["probe_asm"], "bhyvepy_values")
    names = compiled["probe_names"]
    assert len(raw) == 8 * len(names)
    values = {n: int.from_bytes(raw[8 * i: 8 * i + 8], "little", signed=True) for i, n in enumerate(names)}
    wrong = {n: (REAL_VALUES.get(n), v) for n, v in values.items() if REAL_VALUES.get(n) != v}
    assert wrong == {}


def test_bitfield_layout_of_vm_inout_matches(compiled) -> None:
    assert compiled["probe"].returncode == 0
    want = _asm_symbol_bytes(compiled["probe_asm"], "bhyvepy_inout")
    ffi = cffi.FFI()
    ffi.cdef(concrete_cdef(vb.cdef_text("14", FEATURES)))
    s = ffi.new("struct vm_inout *")
    s.bytes, s.string, s.rep, s.port, s.eax = 4, 0, 1, 0x1234, 0xDEADBEEF
    setattr(s, "in", 1)
    assert bytes(ffi.buffer(s)) == want
