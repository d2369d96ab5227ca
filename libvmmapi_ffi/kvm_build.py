"""cffi (API mode) builder for the Linux KVM binding: ``bhyvepy.vmm._kvm_ffi``.

Why API mode: every structure below is declared with ``...;`` so the C
compiler, reading the installed ``<linux/kvm.h>``, decides sizes and offsets.
Nothing here hard-codes a layout or an ioctl number; a header from a newer or
older kernel simply gives the right values at build time.

``struct kvm_run`` keeps its exit payloads in an anonymous union of anonymous
structs, which cffi cannot name.  The C side gives each payload a typedef with
``__typeof__`` and the cdef lists them as overlapping members of ``kvm_run``
(offsets still come from the compiler).

Besides declarations, three small C pieces live here because they must not
run under the GIL or cannot be expressed in Python:

* ``bhyvepy_ioctl*``: ioctl returning ``-errno`` so no per-call errno lookup
  is needed in the vCPU loop;
* ``bhyvepy_vcpu_*``: the vCPU kick.  A real-time signal with a no-op handler
  installed *without* SA_RESTART interrupts ``KVM_RUN``; ``immediate_exit`` is
  set before the signal is sent, so a kick that lands just before the thread
  enters ``KVM_RUN`` is not lost (KVM checks the flag on entry).  The target
  thread is recorded under a mutex while it is inside ``Vcpu.run`` so a kick
  never signals a thread that has gone away;
* a sequence counter bumped around every ``KVM_RUN`` that the per-VM
  watchdog samples to spot vCPUs that stay inside the kernel.

Build standalone with ``python libvmmapi_ffi/kvm_build.py`` (the extension
lands in ``bhyvepy/vmm/``), or through setuptools with
``cffi_modules=["libvmmapi_ffi/kvm_build.py:ffibuilder"]``.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

ffibuilder = FFI()

# Constants that older <linux/kvm.h> may lack get a harmless fallback so the
# module still builds; the backend checks capabilities at run time.
_FALLBACKS = {
    "KVM_CAP_XSAVE2": "208",
    "KVM_GET_XSAVE2": "0",
    "KVM_CAP_IMMEDIATE_EXIT": "136",
    "KVM_EXIT_SYSTEM_EVENT": "24",
    "KVM_SYSTEM_EVENT_WAKEUP": "4",
    "KVM_SYSTEM_EVENT_SUSPEND": "5",
    "KVM_SYSTEM_EVENT_SEV_TERM": "6",
    "KVM_EXIT_X86_RDMSR": "29",
    "KVM_EXIT_X86_WRMSR": "30",
    "KVM_EXIT_X86_BUS_LOCK": "33",
    "KVM_EXIT_NOTIFY": "37",
    "KVM_INTERNAL_ERROR_EMULATION": "1",
    "KVM_INTERNAL_ERROR_SIMUL_EX": "2",
    "KVM_INTERNAL_ERROR_DELIVERY_EV": "3",
    "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON": "4",
    "KVM_VCPUEVENT_VALID_TRIPLE_FAULT": "0x20",
    "KVM_CLOCK_TSC_STABLE": "2",
}

_IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_GET_MSR_INDEX_LIST KVM_CHECK_EXTENSION
KVM_GET_VCPU_MMAP_SIZE KVM_GET_SUPPORTED_CPUID
KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2
KVM_SET_GSI_ROUTING KVM_IRQ_LINE KVM_IRQ_LINE_STATUS KVM_SIGNAL_MSI
KVM_SET_USER_MEMORY_REGION KVM_CREATE_VCPU KVM_SET_BOOT_CPU_ID
KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK KVM_SET_CLOCK
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_NMI
KVM_GET_LAPIC KVM_SET_LAPIC KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XSAVE2
KVM_GET_XCRS KVM_SET_XCRS KVM_GET_MSRS KVM_SET_MSRS
KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
KVM_GET_TSC_KHZ
""".split()

_CONSTANTS = """
KVM_API_VERSION
KVM_CAP_IRQCHIP KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_SET_IDENTITY_MAP_ADDR
KVM_CAP_PIT2 KVM_CAP_PIT_STATE2 KVM_CAP_SIGNAL_MSI KVM_CAP_IMMEDIATE_EXIT KVM_CAP_READONLY_MEM
KVM_CAP_IRQ_ROUTING KVM_CAP_XSAVE KVM_CAP_XSAVE2 KVM_CAP_XCRS KVM_CAP_DEBUGREGS
KVM_CAP_VCPU_EVENTS KVM_CAP_MP_STATE KVM_CAP_NR_MEMSLOTS KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS
KVM_CAP_ADJUST_CLOCK KVM_CAP_EXT_CPUID KVM_CAP_GET_TSC_KHZ KVM_CAP_SYNC_MMU
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG
KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY
KVM_EXIT_INTR KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR
KVM_EXIT_SYSTEM_EVENT KVM_EXIT_IOAPIC_EOI KVM_EXIT_X86_RDMSR KVM_EXIT_X86_WRMSR
KVM_EXIT_X86_BUS_LOCK KVM_EXIT_NOTIFY
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_SYSTEM_EVENT_WAKEUP KVM_SYSTEM_EVENT_SUSPEND KVM_SYSTEM_EVENT_SEV_TERM
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC KVM_IOAPIC_NUM_PINS
KVM_IRQ_ROUTING_IRQCHIP KVM_IRQ_ROUTING_MSI
KVM_PIT_SPEAKER_DUMMY
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_INIT_RECEIVED
KVM_MP_STATE_HALTED KVM_MP_STATE_SIPI_RECEIVED
KVM_VCPUEVENT_VALID_NMI_PENDING KVM_VCPUEVENT_VALID_SIPI_VECTOR KVM_VCPUEVENT_VALID_SHADOW
KVM_VCPUEVENT_VALID_SMM KVM_VCPUEVENT_VALID_PAYLOAD KVM_VCPUEVENT_VALID_TRIPLE_FAULT
KVM_CPUID_FLAG_SIGNIFCANT_INDEX KVM_CLOCK_TSC_STABLE
KVM_MAX_XCRS KVM_APIC_REG_SIZE
MAP_NORESERVE
""".split()

_CDEF = """
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef unsigned long uintptr_t;

/* --- kvm_run and its exit payloads (named via __typeof__ on the C side) */
typedef struct { uint64_t hardware_exit_reason; ...; } bhyvepy_exit_hw_t;
typedef struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; ...; } bhyvepy_exit_fail_entry_t;
typedef struct { uint32_t exception; uint32_t error_code; ...; } bhyvepy_exit_ex_t;
typedef struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
                 uint64_t data_offset; ...; } bhyvepy_exit_io_t;
typedef struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; ...; } bhyvepy_exit_mmio_t;
typedef struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; ...; } bhyvepy_exit_internal_t;
typedef struct { uint32_t type; uint32_t ndata; uint64_t data[16]; ...; } bhyvepy_exit_system_event_t;

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    bhyvepy_exit_hw_t hw;
    bhyvepy_exit_fail_entry_t fail_entry;
    bhyvepy_exit_ex_t ex;
    bhyvepy_exit_io_t io;
    bhyvepy_exit_mmio_t mmio;
    bhyvepy_exit_internal_t internal;
    bhyvepy_exit_system_event_t system_event;
    ...;
};

/* --- VM-level structures */
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr; ...;
};
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; ...; };
struct kvm_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data; uint32_t flags;
                 uint32_t devid; ...; };
struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; ...; };
struct kvm_irq_routing_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data; ...; };
typedef struct { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi; ...; }
    bhyvepy_routing_u_t;
struct kvm_irq_routing_entry { uint32_t gsi; uint32_t type; uint32_t flags; bhyvepy_routing_u_t u; ...; };
struct kvm_irq_routing { uint32_t nr; uint32_t flags; struct kvm_irq_routing_entry entries[]; ...; };
struct kvm_pic_state { uint8_t irr; uint8_t imr; uint8_t isr; uint8_t elcr; ...; };
struct kvm_ioapic_state { uint64_t base_address; uint32_t ioregsel; uint32_t id; uint32_t irr; ...; };
typedef struct { struct kvm_pic_state pic; struct kvm_ioapic_state ioapic; ...; } bhyvepy_irqchip_u_t;
struct kvm_irqchip { uint32_t chip_id; bhyvepy_irqchip_u_t chip; ...; };
struct kvm_pit_state2 { ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };

/* --- vCPU-level structures */
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
    ...;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector; uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl; uint8_t unusable; ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t interrupt_bitmap[...];
    ...;
};
struct kvm_fpu { ...; };
struct kvm_xsave { ...; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; ...; };
struct kvm_debugregs { uint64_t db[4]; uint64_t dr6; uint64_t dr7; uint64_t flags; ...; };
struct kvm_lapic_state { char regs[...]; ...; };
struct kvm_mp_state { uint32_t mp_state; ...; };
struct kvm_vcpu_events { uint32_t sipi_vector; uint32_t flags; ...; };
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; ...; };
struct kvm_msrs { uint32_t nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; ...; };
struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags;
    uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };

/* --- helpers */
struct bhyvepy_vcpu { int fd; uint64_t seq; int has_thread; ...; };
long bhyvepy_ioctl(int fd, unsigned long req, void *arg);
long bhyvepy_ioctl_val(int fd, unsigned long req, unsigned long arg);
int bhyvepy_kick_setup(void);
void bhyvepy_vcpu_init(struct bhyvepy_vcpu *v, int fd, struct kvm_run *run);
void bhyvepy_vcpu_enter(struct bhyvepy_vcpu *v);
void bhyvepy_vcpu_leave(struct bhyvepy_vcpu *v);
int bhyvepy_vcpu_run(struct bhyvepy_vcpu *v);
int bhyvepy_vcpu_kick(struct bhyvepy_vcpu *v);
void bhyvepy_vcpu_clear_kick(struct bhyvepy_vcpu *v);
void bhyvepy_vcpu_detach(struct bhyvepy_vcpu *v);
int mlock(const void *addr, size_t len);
"""

_SOURCE_HEAD = """
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>
"""

_SOURCE_BODY = r"""
typedef __typeof__(((struct kvm_run *)0)->hw) bhyvepy_exit_hw_t;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) bhyvepy_exit_fail_entry_t;
typedef __typeof__(((struct kvm_run *)0)->ex) bhyvepy_exit_ex_t;
typedef __typeof__(((struct kvm_run *)0)->io) bhyvepy_exit_io_t;
typedef __typeof__(((struct kvm_run *)0)->mmio) bhyvepy_exit_mmio_t;
typedef __typeof__(((struct kvm_run *)0)->internal) bhyvepy_exit_internal_t;
typedef __typeof__(((struct kvm_run *)0)->system_event) bhyvepy_exit_system_event_t;
typedef __typeof__(((struct kvm_irq_routing_entry *)0)->u) bhyvepy_routing_u_t;
typedef __typeof__(((struct kvm_irqchip *)0)->chip) bhyvepy_irqchip_u_t;

struct bhyvepy_vcpu {
    int fd;
    uint64_t seq;              /* odd while inside KVM_RUN */
    struct kvm_run *run;
    pthread_mutex_t lock;
    pthread_t thread;
    int has_thread;
};

static long bhyvepy_ioctl(int fd, unsigned long req, void *arg)
{
    long r = ioctl(fd, req, arg);
    return r < 0 ? -(long)errno : r;
}

static long bhyvepy_ioctl_val(int fd, unsigned long req, unsigned long arg)
{
    long r = ioctl(fd, req, arg);
    return r < 0 ? -(long)errno : r;
}

static int bhyvepy_kick_signo = -1;

static void bhyvepy_kick_handler(int sig)
{
    (void)sig;   /* only there to make KVM_RUN return EINTR */
}

/* Install the no-op handler once; returns the signal number or -errno. */
static int bhyvepy_kick_setup(void)
{
    static pthread_mutex_t once = PTHREAD_MUTEX_INITIALIZER;
    int r;
    pthread_mutex_lock(&once);
    if (bhyvepy_kick_signo < 0) {
        struct sigaction sa;
        int signo = SIGRTMIN + 6;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = bhyvepy_kick_handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;            /* no SA_RESTART: KVM_RUN must return */
        if (sigaction(signo, &sa, NULL) == 0) {
            sigset_t set;
            sigemptyset(&set);
            sigaddset(&set, signo);
            pthread_sigmask(SIG_UNBLOCK, &set, NULL);
            bhyvepy_kick_signo = signo;
        } else {
            r = -errno;
            pthread_mutex_unlock(&once);
            return r;
        }
    }
    r = bhyvepy_kick_signo;
    pthread_mutex_unlock(&once);
    return r;
}

static void bhyvepy_vcpu_init(struct bhyvepy_vcpu *v, int fd, struct kvm_run *run)
{
    v->fd = fd;
    v->seq = 0;
    v->run = run;
    v->has_thread = 0;
    pthread_mutex_init(&v->lock, NULL);
}

static void bhyvepy_vcpu_enter(struct bhyvepy_vcpu *v)
{
    pthread_mutex_lock(&v->lock);
    v->thread = pthread_self();
    v->has_thread = 1;
    pthread_mutex_unlock(&v->lock);
}

static void bhyvepy_vcpu_leave(struct bhyvepy_vcpu *v)
{
    pthread_mutex_lock(&v->lock);
    v->has_thread = 0;
    pthread_mutex_unlock(&v->lock);
}

static int bhyvepy_vcpu_run(struct bhyvepy_vcpu *v)
{
    int r, e;
    __atomic_add_fetch(&v->seq, 1, __ATOMIC_SEQ_CST);
    r = ioctl(v->fd, KVM_RUN, 0);
    e = errno;
    __atomic_add_fetch(&v->seq, 1, __ATOMIC_SEQ_CST);
    return r < 0 ? -e : r;
}

/* Make the vCPU leave (or not enter) KVM_RUN.  The flag goes first: KVM reads
   it on entry, so a signal that arrives before the thread is in the kernel
   still stops the next KVM_RUN. */
static int bhyvepy_vcpu_kick(struct bhyvepy_vcpu *v)
{
    int r = 0;
    pthread_mutex_lock(&v->lock);
    if (v->run != NULL) {
        __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        if (v->has_thread && bhyvepy_kick_signo > 0)
            r = pthread_kill(v->thread, bhyvepy_kick_signo);
    }
    pthread_mutex_unlock(&v->lock);
    return -r;
}

/* Only the thread inside Vcpu.run calls this, so run cannot go away under it. */
static void bhyvepy_vcpu_clear_kick(struct bhyvepy_vcpu *v)
{
    __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
}

/* Before the kvm_run page is unmapped: later kicks become no-ops. */
static void bhyvepy_vcpu_detach(struct bhyvepy_vcpu *v)
{
    pthread_mutex_lock(&v->lock);
    v->run = NULL;
    pthread_mutex_unlock(&v->lock);
}
"""


def _fallback_block() -> str:
    return "".join(f"#ifndef {k}\n#define {k} {v}\n#endif\n" for k, v in _FALLBACKS.items())


ffibuilder.cdef(_CDEF + "".join(f"#define {name} ...\n" for name in _IOCTLS + _CONSTANTS))
ffibuilder.set_source(
    "bhyvepy.vmm._kvm_ffi",
    _SOURCE_HEAD + _fallback_block() + _SOURCE_BODY,
    libraries=["pthread"],
)


def main() -> None:
    """Compile the extension in place, next to the backend that imports it."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    tmp = os.path.join(here, "_gen")
    so = ffibuilder.compile(tmpdir=tmp, verbose="-v" in sys.argv)
    target_dir = os.path.join(root, "bhyvepy", "vmm")
    name = os.path.basename(so)
    os.replace(so, os.path.join(target_dir, name))
    print(os.path.join(target_dir, name))


if __name__ == "__main__":
    main()
