"""cffi (API mode) builder for the FreeBSD binding: ``bhyvepy.vmm._vmmapi_ffi``.

Why API mode: ``struct vm_exit`` and friends carry bitfields (``struct
vm_inout``), a ``cpuset_t`` whose size is a kernel build option, and a
layout that changed between releases, so every structure below ends in
``...;`` and the C compiler, reading the installed ``<machine/vmm*.h>``,
decides sizes and offsets.  Nothing here hard-codes a layout.

Two flavours, chosen from the installed ``<vmmapi.h>`` at build time:

* ``"14"`` -- ``VMMAPI_VERSION`` 0200 (FreeBSD 14.x): vCPU handles,
  ``vm_create`` + ``vm_open``; segment ids come from ``<vmmapi.h>``.
* ``"15"`` -- ``VMMAPI_VERSION`` 0300 (FreeBSD 15.x): adds ``vm_openf`` with
  ``VMMAPI_OPEN_*`` flags (``/dev/vmmctl``); segment ids moved to
  ``<dev/vmm/vmm_mem.h>``.

FreeBSD 13 (0103, ``(ctx, vcpuid)`` signatures) is refused with a message.

The anonymous payload structs of ``struct vm_exit``'s union cannot be named
in a cdef, so the C side gives each one a typedef with ``__typeof__`` and
the cdef declares those typedefs (offsets still come from the compiler).

``vm_snapshot_req``, ``vm_restore_time`` and ``vm_restart_instruction`` are
referenced *weakly*: a libvmmapi built without snapshot support (newer
trees compile them only under ``WITH_VMMAPI_SNAPSHOT``) must not stop the
module from loading.  ``bhyvepy_missing_symbols()`` tells the backend which
of them are absent so it can refuse a checkpoint with a clear message
instead of calling a null pointer.

The cdef text is plain module-level strings (and :func:`cdef_text`) so that
tests on Linux can parse it and cross-compile it without a FreeBSD host.

Build standalone with ``python libvmmapi_ffi/vmmapi_build.py`` (the extension
lands in ``bhyvepy/vmm/``; on anything but FreeBSD it prints why it skipped
and exits 0), or through setuptools with
``cffi_modules=["libvmmapi_ffi/vmmapi_build.py:ffibuilder"]`` on FreeBSD only.
"""

from __future__ import annotations

import os
import re
import sys

MODULE_NAME = "bhyvepy.vmm._vmmapi_ffi"
FLAVOURS = ("14", "15")
#: Oldest libvmmapi with the vCPU-handle API, as the decimal digits of VMMAPI_VERSION.
MIN_VMMAPI_VERSION = 200
#: Optional header features detected at build time.
FEATURES = ("suspend_destroy",)

#: Bits returned by ``bhyvepy_missing_symbols()``.
MISSING_SNAPSHOT_REQ = 1
MISSING_RESTORE_TIME = 2
MISSING_RESTART_INSTRUCTION = 4


class BuildError(Exception):
    """The host cannot build the binding (wrong OS, too old a libvmmapi)."""


# --- cdef: types ---------------------------------------------------------------
# Only what bhyvepy uses is declared; enum lists end in "..." so the compiler
# supplies the values.

CDEF_TYPES = r"""
typedef int... vm_paddr_t;
typedef int... vm_ooffset_t;
typedef int... time_t;
typedef struct { ...; } cpuset_t;

struct vmctx;
struct vcpu;

#define PROT_READ ...
#define PROT_WRITE ...
#define PROT_EXEC ...

#define VM_MEM_F_INCORE ...
#define VM_MEM_F_WIRED ...
#define VM_SYSMEM ...
#define VM_BOOTROM ...
#define VM_FRAMEBUFFER ...
#define VM_PCIROM ...
#define VM_MAX_NAMELEN ...
#define VM_MIN_NAMELEN ...
#define VIE_INST_SIZE ...
#define APIC_DELMODE_INIT ...
#define APIC_DELMODE_STARTUP ...

enum vm_mmap_style { VM_MMAP_NONE, VM_MMAP_ALL, VM_MMAP_SPARSE, ... };

enum vm_suspend_how {
    VM_SUSPEND_NONE, VM_SUSPEND_RESET, VM_SUSPEND_POWEROFF, VM_SUSPEND_HALT,
    VM_SUSPEND_TRIPLEFAULT, ...
};

enum vm_reg_name {
    VM_REG_GUEST_RAX, VM_REG_GUEST_RBX, VM_REG_GUEST_RCX, VM_REG_GUEST_RDX,
    VM_REG_GUEST_RSI, VM_REG_GUEST_RDI, VM_REG_GUEST_RBP,
    VM_REG_GUEST_R8, VM_REG_GUEST_R9, VM_REG_GUEST_R10, VM_REG_GUEST_R11,
    VM_REG_GUEST_R12, VM_REG_GUEST_R13, VM_REG_GUEST_R14, VM_REG_GUEST_R15,
    VM_REG_GUEST_CR0, VM_REG_GUEST_CR3, VM_REG_GUEST_CR4, VM_REG_GUEST_DR7,
    VM_REG_GUEST_RSP, VM_REG_GUEST_RIP, VM_REG_GUEST_RFLAGS,
    VM_REG_GUEST_ES, VM_REG_GUEST_CS, VM_REG_GUEST_SS, VM_REG_GUEST_DS,
    VM_REG_GUEST_FS, VM_REG_GUEST_GS, VM_REG_GUEST_LDTR, VM_REG_GUEST_TR,
    VM_REG_GUEST_IDTR, VM_REG_GUEST_GDTR, VM_REG_GUEST_EFER, VM_REG_GUEST_CR2,
    VM_REG_GUEST_INTR_SHADOW, VM_REG_LAST, ...
};

enum x2apic_state { X2APIC_DISABLED, X2APIC_ENABLED, ... };

enum vm_cap_type {
    VM_CAP_HALT_EXIT, VM_CAP_MTRAP_EXIT, VM_CAP_PAUSE_EXIT,
    VM_CAP_UNRESTRICTED_GUEST, VM_CAP_ENABLE_INVPCID, VM_CAP_IPI_EXIT, ...
};

enum vm_intr_trigger { EDGE_TRIGGER, LEVEL_TRIGGER, ... };

enum vm_cpu_mode {
    CPU_MODE_REAL, CPU_MODE_PROTECTED, CPU_MODE_COMPATIBILITY, CPU_MODE_64BIT, ...
};

enum vm_paging_mode {
    PAGING_MODE_FLAT, PAGING_MODE_32, PAGING_MODE_PAE, PAGING_MODE_64, ...
};

enum vm_exitcode {
    VM_EXITCODE_INOUT, VM_EXITCODE_VMX, VM_EXITCODE_BOGUS, VM_EXITCODE_RDMSR,
    VM_EXITCODE_WRMSR, VM_EXITCODE_HLT, VM_EXITCODE_MTRAP, VM_EXITCODE_PAUSE,
    VM_EXITCODE_PAGING, VM_EXITCODE_INST_EMUL, VM_EXITCODE_SPINUP_AP,
    VM_EXITCODE_RENDEZVOUS, VM_EXITCODE_IOAPIC_EOI, VM_EXITCODE_SUSPENDED,
    VM_EXITCODE_INOUT_STR, VM_EXITCODE_TASK_SWITCH, VM_EXITCODE_MONITOR,
    VM_EXITCODE_MWAIT, VM_EXITCODE_SVM, VM_EXITCODE_REQIDLE, VM_EXITCODE_DEBUG,
    VM_EXITCODE_VMINSN, VM_EXITCODE_BPT, VM_EXITCODE_IPI, VM_EXITCODE_MAX, ...
};

enum snapshot_req {
    STRUCT_VIOAPIC, STRUCT_VM, STRUCT_VLAPIC, VM_MEM, STRUCT_VHPET, STRUCT_VMCX,
    STRUCT_VATPIC, STRUCT_VATPIT, STRUCT_VPMTMR, STRUCT_VRTC, ...
};

enum vm_snapshot_op { VM_SNAPSHOT_SAVE, VM_SNAPSHOT_RESTORE, ... };

struct seg_desc { uint64_t base; uint32_t limit; uint32_t access; ...; };

struct vm_guest_paging {
    uint64_t cr3;
    int cpl;
    enum vm_cpu_mode cpu_mode;
    enum vm_paging_mode paging_mode;
    ...;
};

struct vie {
    uint8_t inst[15];
    uint8_t num_valid;
    uint8_t num_processed;
    uint8_t decoded;
    ...;
};

struct vm_inout {
    uint16_t bytes:3;
    uint16_t in:1;
    uint16_t string:1;
    uint16_t rep:1;
    uint16_t port;
    uint32_t eax;
};

struct vm_inout_str {
    struct vm_inout inout;
    struct vm_guest_paging paging;
    uint64_t rflags;
    uint64_t cr0;
    uint64_t index;
    uint64_t count;
    int addrsize;
    enum vm_reg_name seg_name;
    struct seg_desc seg_desc;
    ...;
};

typedef struct { uint64_t gpa; int fault_type; ...; } bhyvepy_exit_paging;
typedef struct {
    uint64_t gpa;
    uint64_t gla;
    uint64_t cs_base;
    int cs_d;
    struct vm_guest_paging paging;
    struct vie vie;
    ...;
} bhyvepy_exit_inst_emul;
typedef struct {
    int status;
    uint32_t exit_reason;
    uint64_t exit_qualification;
    int inst_type;
    int inst_error;
    ...;
} bhyvepy_exit_vmx;
typedef struct { uint64_t exitcode; uint64_t exitinfo1; uint64_t exitinfo2; ...; } bhyvepy_exit_svm;
typedef struct { uint32_t code; uint64_t wval; ...; } bhyvepy_exit_msr;
typedef struct { int vcpu; uint64_t rip; ...; } bhyvepy_exit_spinup_ap;
typedef struct { uint64_t rflags; uint64_t intr_status; ...; } bhyvepy_exit_hlt;
typedef struct { enum vm_suspend_how how; ...; } bhyvepy_exit_suspended;
typedef struct { uint32_t mode; uint8_t vector; ...; } bhyvepy_exit_ipi;

typedef union {
    struct vm_inout inout;
    struct vm_inout_str inout_str;
    bhyvepy_exit_paging paging;
    bhyvepy_exit_inst_emul inst_emul;
    bhyvepy_exit_vmx vmx;
    bhyvepy_exit_svm svm;
    bhyvepy_exit_msr msr;
    bhyvepy_exit_spinup_ap spinup_ap;
    bhyvepy_exit_hlt hlt;
    bhyvepy_exit_suspended suspended;
    bhyvepy_exit_ipi ipi;
    ...;
} bhyvepy_exit_u;

struct vm_exit {
    enum vm_exitcode exitcode;
    int inst_length;
    uint64_t rip;
    bhyvepy_exit_u u;
    ...;
};

struct vm_run {
    int cpuid;
    cpuset_t *cpuset;
    size_t cpusetsize;
    struct vm_exit *vm_exit;
    ...;
};

struct vm_snapshot_buffer {
    uint8_t *const buf_start;
    const size_t buf_size;
    uint8_t *buf;
    size_t buf_rem;
    ...;
};

struct vm_snapshot_meta {
    void *dev_data;
    const char *dev_name;
    enum snapshot_req dev_req;
    struct vm_snapshot_buffer buffer;
    enum vm_snapshot_op op;
    ...;
};
"""

# --- cdef: functions -----------------------------------------------------------
# Plain C prototypes, exactly as <vmmapi.h> spells them for the vCPU-handle API
# (14.x and 15.x), so the same text can serve as a stand-in header in tests.

CDEF_FUNCS_COMMON = r"""
int vm_create(const char *name);
struct vmctx *vm_open(const char *name);
void vm_close(struct vmctx *ctx);
void vm_destroy(struct vmctx *ctx);
int vm_reinit(struct vmctx *ctx);
const char *vm_get_name(struct vmctx *ctx);
struct vcpu *vm_vcpu_open(struct vmctx *ctx, int vcpuid);
void vm_vcpu_close(struct vcpu *vcpu);
int vcpu_id(struct vcpu *vcpu);
int vm_set_topology(struct vmctx *ctx, uint16_t sockets, uint16_t cores,
    uint16_t threads, uint16_t maxcpus);
int vm_get_topology(struct vmctx *ctx, uint16_t *sockets, uint16_t *cores,
    uint16_t *threads, uint16_t *maxcpus);

void vm_set_memflags(struct vmctx *ctx, int flags);
int vm_get_memflags(struct vmctx *ctx);
int vm_setup_memory(struct vmctx *ctx, size_t len, enum vm_mmap_style s);
void *vm_map_gpa(struct vmctx *ctx, vm_paddr_t gaddr, size_t len);
size_t vm_get_lowmem_size(struct vmctx *ctx);
size_t vm_get_highmem_size(struct vmctx *ctx);
void *vm_create_devmem(struct vmctx *ctx, int segid, const char *name, size_t len);
int vm_mmap_memseg(struct vmctx *ctx, vm_paddr_t gpa, int segid,
    vm_ooffset_t segoff, size_t len, int prot);
int vm_munmap_memseg(struct vmctx *ctx, vm_paddr_t gpa, size_t len);

int vm_run(struct vcpu *vcpu, struct vm_run *vmrun);
int vm_suspend(struct vmctx *ctx, enum vm_suspend_how how);
int vm_activate_cpu(struct vcpu *vcpu);
int vm_suspend_cpu(struct vcpu *vcpu);
int vm_resume_cpu(struct vcpu *vcpu);
int vm_suspend_all_cpus(struct vmctx *ctx);
int vm_resume_all_cpus(struct vmctx *ctx);
int vm_active_cpus(struct vmctx *ctx, cpuset_t *cpus);
int vm_suspended_cpus(struct vmctx *ctx, cpuset_t *cpus);
int vm_debug_cpus(struct vmctx *ctx, cpuset_t *cpus);
int vm_restart_instruction(struct vcpu *vcpu);

int vm_set_register(struct vcpu *vcpu, int reg, uint64_t val);
int vm_get_register(struct vcpu *vcpu, int reg, uint64_t *retval);
int vm_set_register_set(struct vcpu *vcpu, unsigned int count,
    const int *regnums, uint64_t *regvals);
int vm_get_register_set(struct vcpu *vcpu, unsigned int count,
    const int *regnums, uint64_t *regvals);
int vm_set_desc(struct vcpu *vcpu, int reg, uint64_t base, uint32_t limit,
    uint32_t access);
int vm_get_desc(struct vcpu *vcpu, int reg, uint64_t *base, uint32_t *limit,
    uint32_t *access);
int vcpu_reset(struct vcpu *vcpu);

int vm_get_capability(struct vcpu *vcpu, enum vm_cap_type cap, int *retval);
int vm_set_capability(struct vcpu *vcpu, enum vm_cap_type cap, int val);
int vm_get_x2apic_state(struct vcpu *vcpu, enum x2apic_state *s);
int vm_set_x2apic_state(struct vcpu *vcpu, enum x2apic_state s);

int vm_inject_exception(struct vcpu *vcpu, int vector, int errcode_valid,
    uint32_t errcode, int restart_instruction);
int vm_inject_nmi(struct vcpu *vcpu);
int vm_lapic_msi(struct vmctx *ctx, uint64_t addr, uint64_t msg);
int vm_ioapic_assert_irq(struct vmctx *ctx, int irq);
int vm_ioapic_deassert_irq(struct vmctx *ctx, int irq);
int vm_ioapic_pulse_irq(struct vmctx *ctx, int irq);
int vm_ioapic_pincount(struct vmctx *ctx, int *pincount);
int vm_isa_assert_irq(struct vmctx *ctx, int atpic_irq, int ioapic_irq);
int vm_isa_deassert_irq(struct vmctx *ctx, int atpic_irq, int ioapic_irq);
int vm_isa_pulse_irq(struct vmctx *ctx, int atpic_irq, int ioapic_irq);
int vm_isa_set_irq_trigger(struct vmctx *ctx, int atpic_irq,
    enum vm_intr_trigger trigger);

int vm_rtc_write(struct vmctx *ctx, int offset, uint8_t value);
int vm_rtc_read(struct vmctx *ctx, int offset, uint8_t *retval);
int vm_rtc_settime(struct vmctx *ctx, time_t secs);
int vm_rtc_gettime(struct vmctx *ctx, time_t *secs);

int vm_snapshot_req(struct vmctx *ctx, struct vm_snapshot_meta *meta);
int vm_restore_time(struct vmctx *ctx);
"""

#: FreeBSD 15 (VMMAPI_VERSION 0300): open through /dev/vmmctl.
CDEF_CONSTANTS_15 = r"""
#define VMMAPI_OPEN_CREATE ...
#define VMMAPI_OPEN_REINIT ...
"""
CDEF_FUNCS_15 = r"""
struct vmctx *vm_openf(const char *name, int flags);
"""

#: Declared only where the installed <machine/vmm.h> has it (14.3+, 15).
CDEF_FEATURE = {
    "suspend_destroy": "#define VM_SUSPEND_DESTROY ...\n",
}

CDEF_HELPERS = r"""
#define BHYVEPY_MISSING_SNAPSHOT_REQ 1
#define BHYVEPY_MISSING_RESTORE_TIME 2
#define BHYVEPY_MISSING_RESTART_INSTRUCTION 4
int bhyvepy_missing_symbols(void);
void bhyvepy_cpuid(unsigned int leaf, unsigned int *regs);
"""

# --- C side -------------------------------------------------------------------

C_INCLUDES = r"""
#include <sys/param.h>
#include <sys/cpuset.h>
#include <sys/mman.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <machine/vmm.h>
#include <machine/vmm_dev.h>
#include <machine/vmm_snapshot.h>
#include <x86/apicreg.h>
"""

#: FreeBSD 15 moved the memory segment ids out of <vmmapi.h>.
C_INCLUDES_15 = "#include <dev/vmm/vmm_mem.h>\n"

C_HELPERS = r"""
/* Anonymous members of struct vm_exit's union, named for the cdef. */
typedef __typeof__(((struct vm_exit *)0)->u) bhyvepy_exit_u;
typedef __typeof__(((struct vm_exit *)0)->u.paging) bhyvepy_exit_paging;
typedef __typeof__(((struct vm_exit *)0)->u.inst_emul) bhyvepy_exit_inst_emul;
typedef __typeof__(((struct vm_exit *)0)->u.vmx) bhyvepy_exit_vmx;
typedef __typeof__(((struct vm_exit *)0)->u.svm) bhyvepy_exit_svm;
typedef __typeof__(((struct vm_exit *)0)->u.msr) bhyvepy_exit_msr;
typedef __typeof__(((struct vm_exit *)0)->u.spinup_ap) bhyvepy_exit_spinup_ap;
typedef __typeof__(((struct vm_exit *)0)->u.hlt) bhyvepy_exit_hlt;
typedef __typeof__(((struct vm_exit *)0)->u.suspended) bhyvepy_exit_suspended;
typedef __typeof__(((struct vm_exit *)0)->u.ipi) bhyvepy_exit_ipi;

/*
 * Built without WITH_VMMAPI_SNAPSHOT, libvmmapi lacks these; a weak
 * reference lets the module load anyway and the backend ask first.
 */
#pragma weak vm_snapshot_req
#pragma weak vm_restore_time
#pragma weak vm_restart_instruction

#define BHYVEPY_MISSING_SNAPSHOT_REQ 1
#define BHYVEPY_MISSING_RESTORE_TIME 2
#define BHYVEPY_MISSING_RESTART_INSTRUCTION 4

static int
bhyvepy_missing_symbols(void)
{
	int missing = 0;

	if (&vm_snapshot_req == NULL)
		missing |= BHYVEPY_MISSING_SNAPSHOT_REQ;
	if (&vm_restore_time == NULL)
		missing |= BHYVEPY_MISSING_RESTORE_TIME;
	if (&vm_restart_instruction == NULL)
		missing |= BHYVEPY_MISSING_RESTART_INSTRUCTION;
	return (missing);
}

/* CPUID for the host vendor: bhyve's userland MSR table depends on it. */
static void
bhyvepy_cpuid(unsigned int leaf, unsigned int *regs)
{
	__asm__ __volatile__("cpuid"
	    : "=a" (regs[0]), "=b" (regs[1]), "=c" (regs[2]), "=d" (regs[3])
	    : "a" (leaf), "c" (0));
}
"""


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown libvmmapi flavour {flavour!r} (expected one of {FLAVOURS})")


def cdef_text(flavour: str, features: frozenset[str] | set[str] = frozenset()) -> str:
    """The complete cdef for ``flavour`` ("14" or "15") and detected ``features``."""
    _check_flavour(flavour)
    parts = [CDEF_TYPES]
    for name in sorted(features):
        if name not in CDEF_FEATURE:
            raise ValueError(f"unknown header feature {name!r}")
        parts.append(CDEF_FEATURE[name])
    if flavour == "15":
        parts.append(CDEF_CONSTANTS_15)
    parts.append(CDEF_FUNCS_COMMON)
    if flavour == "15":
        parts.append(CDEF_FUNCS_15)
    parts.append(CDEF_HELPERS)
    return "\n".join(parts)


def function_prototypes(flavour: str) -> str:
    """The libvmmapi prototypes the cdef declares, as plain C."""
    _check_flavour(flavour)
    return CDEF_FUNCS_COMMON + (CDEF_FUNCS_15 if flavour == "15" else "")


def c_source(flavour: str, vmmapi_header: str = "vmmapi.h") -> str:
    """The C preamble handed to ``set_source``."""
    _check_flavour(flavour)
    inc = C_INCLUDES + (C_INCLUDES_15 if flavour == "15" else "")
    return f"{inc}#include <{vmmapi_header}>\n{C_HELPERS}"


def detect_flavour(include_dir: str = "/usr/include") -> tuple[str, frozenset[str]]:
    """Read the installed headers: which flavour, and which optional features.

    Raises :class:`BuildError` when ``<vmmapi.h>`` is missing or predates
    the vCPU-handle API.
    """
    path = os.path.join(include_dir, "vmmapi.h")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise BuildError(f"cannot read {path}: {e.strerror}; install the FreeBSD base "
                         "system headers (libvmmapi is part of base)") from None
    m = re.search(r"#\s*define\s+VMMAPI_VERSION\s+(\d+)", text)
    if m is None:
        raise BuildError(f"{path} defines no VMMAPI_VERSION: libvmmapi too old "
                         "(bhyvepy needs FreeBSD 14.0 or later)")
    # The header writes it as "0200"/"0300" (an octal literal to C); read the digits.
    version = int(m.group(1), 10)
    if version < MIN_VMMAPI_VERSION:
        raise BuildError(f"libvmmapi VMMAPI_VERSION {m.group(1)} has the FreeBSD 13 API; "
                         "bhyvepy needs FreeBSD 14.0 or later (VMMAPI_VERSION 0200)")
    flavour = "15" if re.search(r"\bvm_openf\s*\(", text) else "14"
    features: set[str] = set()
    vmm_h = os.path.join(include_dir, "machine", "vmm.h")
    try:
        with open(vmm_h, encoding="utf-8", errors="replace") as f:
            if re.search(r"\bVM_SUSPEND_DESTROY\b", f.read()):
                features.add("suspend_destroy")
    except OSError as e:
        raise BuildError(f"cannot read {vmm_h}: {e.strerror}") from None
    if flavour == "15" and not os.path.exists(os.path.join(include_dir, "dev", "vmm", "vmm_mem.h")):
        raise BuildError(f"{include_dir}/dev/vmm/vmm_mem.h is missing although <vmmapi.h> is "
                         "the FreeBSD 15 one; reinstall the base headers (make installincludes)")
    return flavour, frozenset(features)


def make_ffibuilder(flavour: str | None = None, features: frozenset[str] | None = None, *,
                    vmmapi_header: str = "vmmapi.h", include_dirs: tuple[str, ...] = (),
                    libraries: tuple[str, ...] = ("vmmapi",)):
    """An ``FFI`` ready to compile; flavour and features default to the installed headers."""
    from cffi import FFI

    if flavour is None:
        flavour, detected = detect_flavour()
        if features is None:
            features = detected
    ffi = FFI()
    ffi.cdef(cdef_text(flavour, features or frozenset()))
    ffi.set_source(MODULE_NAME, c_source(flavour, vmmapi_header),
                   libraries=list(libraries), include_dirs=list(include_dirs))
    return ffi


def _is_freebsd() -> bool:
    return sys.platform.startswith("freebsd")


# setuptools' cffi_modules hook imports this name; setup.py lists the builder
# only on FreeBSD, and on other systems the module must still import (tests).
ffibuilder = make_ffibuilder() if _is_freebsd() else None


def main(argv: list[str] | None = None) -> int:
    if not _is_freebsd():
        print(f"skipped: libvmmapi is FreeBSD-only (this host is {sys.platform}); "
              "the vmm.ko backend will report itself unavailable")
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        builder = ffibuilder if ffibuilder is not None else make_ffibuilder()
        out = builder.compile(tmpdir=root, verbose=bool(os.environ.get("BHYVEPY_VERBOSE_BUILD")))
    except BuildError as e:
        print(f"vmmapi_build: {e}", file=sys.stderr)
        return 1
    print(f"built {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
