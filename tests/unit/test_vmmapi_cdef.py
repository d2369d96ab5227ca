"""The libvmmapi cdef: it parses, it covers what the backend calls, and the
builder picks the right flavour from the installed headers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import cffi
import pytest

from vmmapi_fake import ROOT, FakeLibvmmapi, load_builder

vb = load_builder()
BACKEND_SRC = ROOT / "bhyvepy" / "vmm" / "vmmapi.py"
ALL_FEATURES = frozenset(vb.FEATURES)


def declared_names(cdef: str) -> set[str]:
    """Functions, #define constants and enumerators a cdef declares."""
    names = set(re.findall(r"^\s*#define\s+(\w+)", cdef, re.M))
    for body in re.findall(r"enum\s+\w+\s*\{([^}]*)\}", cdef):
        names.update(n.strip().split("=")[0].strip() for n in body.split(",")
                     if n.strip() and n.strip() != "...")
    names.update(re.findall(r"\b(\w+)\s*\([^;{]*\)\s*;", cdef))
    return names


@pytest.mark.parametrize("flavour", vb.FLAVOURS)
@pytest.mark.parametrize("features", [frozenset(), ALL_FEATURES])
def test_cdef_parses(flavour: str, features: frozenset[str], tmp_path: Path) -> None:
    ffi = cffi.FFI()
    ffi.cdef(vb.cdef_text(flavour, features))
    # Fully declared structs get a layout now; partial ones only from the compiler,
    # so the generated C must ask it for every declared field.
    assert [f for f, _ in ffi.typeof("struct vm_inout").fields] == [
        "bytes", "in", "string", "rep", "port", "eax"]
    ffi.set_source(vb.MODULE_NAME, vb.c_source(flavour))
    out = tmp_path / "m.c"
    ffi.emit_c_code(str(out))
    c = out.read_text()
    for probe in ("offsetof(struct vm_exit, rip)", "offsetof(bhyvepy_exit_inst_emul, vie)",
                  "offsetof(struct vm_snapshot_meta, buffer)", "(VM_EXITCODE_INST_EMUL)"):
        assert probe in c
    assert ("vm_openf" in c) == (flavour == "15")


def test_flavours_differ_only_by_vm_openf() -> None:
    n14 = declared_names(vb.cdef_text("14"))
    n15 = declared_names(vb.cdef_text("15"))
    assert n15 - n14 == {"vm_openf", "VMMAPI_OPEN_CREATE", "VMMAPI_OPEN_REINIT"}
    assert n14 <= n15
    assert "VM_SUSPEND_DESTROY" in declared_names(vb.cdef_text("14", {"suspend_destroy"}))
    assert "VM_SUSPEND_DESTROY" not in n14


def test_unknown_flavour_and_feature_refused() -> None:
    with pytest.raises(ValueError):
        vb.cdef_text("13")
    with pytest.raises(ValueError):
        vb.cdef_text("15", {"no_such_feature"})


def test_function_prototypes_are_plain_c_for_the_standin_header() -> None:
    for flavour in vb.FLAVOURS:
        text = vb.function_prototypes(flavour)
        assert "..." not in text
        assert ("vm_openf" in text) == (flavour == "15")


def _lib_attributes(tree: ast.AST) -> set[str]:
    """Every ``lib.X`` and ``<expr>._lib.X`` the source touches."""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id == "lib":
            found.add(node.attr)
        elif isinstance(base, ast.Attribute) and base.attr == "_lib":
            found.add(node.attr)
    return found


def test_every_lib_name_the_backend_uses_is_declared() -> None:
    declared = declared_names(vb.cdef_text("15", ALL_FEATURES))
    used = _lib_attributes(ast.parse(BACKEND_SRC.read_text()))
    assert used, "the AST walk found no lib.<name> at all"
    assert "vm_run" in used and "VM_EXITCODE_INOUT" in used
    assert sorted(used - declared) == []


def test_names_built_at_run_time_are_declared() -> None:
    from bhyvepy.vmm import vmmapi

    declared = declared_names(vb.cdef_text("15", ALL_FEATURES))
    dynamic = {"VM_REG_GUEST_" + n for n in vmmapi.REG_NAMES} | set(vmmapi._CAPS.values())
    dynamic |= {"vm_openf", "vm_snapshot_req", "vm_restore_time", "bhyvepy_missing_symbols",
                "bhyvepy_cpuid", "VM_SUSPEND_DESTROY"}
    assert sorted(dynamic - declared) == []


def test_test_double_only_offers_declared_functions() -> None:
    declared = declared_names(vb.cdef_text("15", ALL_FEATURES))
    offered = {n for n in dir(FakeLibvmmapi) if re.match(r"(vm_|vcpu_|bhyvepy_)", n)}
    assert sorted(offered - declared) == []


def _headers(tmp_path: Path, vmmapi_h: str, vmm_h: str = "", vmm_mem: bool = False) -> Path:
    inc = tmp_path / "include"
    (inc / "machine").mkdir(parents=True)
    (inc / "vmmapi.h").write_text(vmmapi_h)
    (inc / "machine" / "vmm.h").write_text(vmm_h)
    if vmm_mem:
        (inc / "dev" / "vmm").mkdir(parents=True)
        (inc / "dev" / "vmm" / "vmm_mem.h").write_text("")
    return inc


def test_detect_flavour_14(tmp_path: Path) -> None:
    inc = _headers(tmp_path, "#define\tVMMAPI_VERSION\t0200\nint vm_create(const char *);\n",
                   "enum vm_suspend_how { VM_SUSPEND_NONE, VM_SUSPEND_LAST };\n")
    assert vb.detect_flavour(str(inc)) == ("14", frozenset())


def test_detect_flavour_15_with_destroy(tmp_path: Path) -> None:
    inc = _headers(tmp_path, "#define VMMAPI_VERSION 0300\nstruct vmctx *vm_openf(const char *name, int flags);\n",
                   "VM_SUSPEND_DESTROY,\n", vmm_mem=True)
    assert vb.detect_flavour(str(inc)) == ("15", frozenset({"suspend_destroy"}))


def test_detect_flavour_15_needs_vmm_mem_h(tmp_path: Path) -> None:
    inc = _headers(tmp_path, "#define VMMAPI_VERSION 0300\nstruct vmctx *vm_openf(const char *n, int f);\n")
    with pytest.raises(vb.BuildError, match="vmm_mem.h"):
        vb.detect_flavour(str(inc))


def test_detect_flavour_refuses_freebsd_13(tmp_path: Path) -> None:
    inc = _headers(tmp_path, "#define\tVMMAPI_VERSION\t0103\n")
    with pytest.raises(vb.BuildError, match="FreeBSD 14.0 or later"):
        vb.detect_flavour(str(inc))


def test_detect_flavour_without_headers(tmp_path: Path) -> None:
    with pytest.raises(vb.BuildError, match="vmmapi.h"):
        vb.detect_flavour(str(tmp_path))


@pytest.mark.skipif(sys.platform.startswith("freebsd"), reason="checks the non-FreeBSD skip path")
def test_builder_skips_cleanly_off_freebsd() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "libvmmapi_ffi" / "vmmapi_build.py")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "skipped: libvmmapi is FreeBSD-only" in r.stdout
    assert vb.ffibuilder is None
