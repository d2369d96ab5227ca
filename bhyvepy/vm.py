"""VM lifecycle: from a config tree to a running machine and back to an exit status.

Order of construction follows bhyve's main(): open or create the kernel VM,
topology, memory, boot ROM, platform (ISA) devices, PCI devices, then the
vCPU threads.  The main thread then only waits: for a vCPU to end the VM
(reset, power off, halt, triple fault, error), for a signal, or for a
checkpoint request.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from bhyvepy.bootrom import LoadedBootrom, load_bootrom
from bhyvepy.bus import MmioBus, PortBus
from bhyvepy.dispatch import Dispatcher
from bhyvepy.errors import BackendUnavailable, BhyveExit, ExitStatus
from bhyvepy.memory import GuestMemory
from bhyvepy.snapshot.registry import SnapshotRegistry
from bhyvepy.vcpu import VcpuGate, set_native_thread_name, vcpu_thread_main
from bhyvepy.vmm import Backend, Topology, Vcpu, VirtualMachine, get_backend

log = logging.getLogger("bhyvepy.vm")


@dataclass
class Machine:
    """Everything one running VM consists of; built by :func:`build_machine`."""

    config: Any
    backend: Backend
    vm: VirtualMachine
    mem: GuestMemory
    ports: PortBus
    mmio: MmioBus
    dispatcher: Dispatcher
    topology: Topology
    snapshots: SnapshotRegistry
    bootrom: LoadedBootrom | None = None
    pci: Any = None                 # bhyvepy.pci.bus.PciBus
    pm: Any = None                  # bhyvepy.dev.pm.PowerManagement (SIGTERM -> power button)
    vcpus: list[Vcpu] = field(default_factory=list)
    devices: list[Any] = field(default_factory=list)     # for pause/resume/close
    held_devices: list[Any] = field(default_factory=list)  # paused until start()
    cpusets: dict[int, frozenset[int]] = field(default_factory=dict)  # -p vcpu:hostcpu
    gate: VcpuGate = field(default_factory=VcpuGate)
    exit_status: int | None = None
    exit_message: str = ""
    _done: threading.Event = field(default_factory=threading.Event)
    _halted: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    # --- ending ---------------------------------------------------------
    def request_exit(self, status: int, message: str = "") -> None:
        with self._lock:
            if self.exit_status is None:
                self.exit_status = int(status)
                self.exit_message = message
        self.gate.stop()
        self._done.set()

    def _on_halt(self, vcpu_id: int, halted: bool) -> bool:
        with self._lock:
            self._halted.add(vcpu_id)
            return len(self._halted) >= len(self.vcpus)

    # --- running ----------------------------------------------------------
    def start(self) -> None:
        for v in self.vcpus:
            t = threading.Thread(
                target=self._vcpu_thread, name=f"vcpu {v.id}", args=(v,), daemon=True)
            self.threads.append(t)
        for d in self.held_devices:
            d.resume()
        self.held_devices.clear()
        for t in self.threads:
            t.start()
        # A checkpoint request may arrive as soon as we return: make sure every
        # vCPU thread has joined the gate, or pause() would not wait for it.
        self.gate.wait_registered(len(self.vcpus), timeout=10.0)

    def _vcpu_thread(self, v: Vcpu) -> None:
        set_native_thread_name(f"vcpu {v.id}")
        cpus = self.cpusets.get(v.id)
        if cpus:
            # -p vcpu:hostcpu: pin this vCPU's thread (bhyve pins the vCPU's
            # host thread the same way, with pthread_setaffinity_np).
            try:
                os.sched_setaffinity(0, cpus)
            except (OSError, AttributeError) as e:
                self.request_exit(ExitStatus.ERROR, f"vcpu {v.id}: cannot pin to CPUs {sorted(cpus)}: {e}")
                return
        vcpu_thread_main(v, self.dispatcher, self.gate, self.request_exit, self._on_halt)

    def wait(self) -> int:
        while not self._done.wait(0.5):
            pass
        return int(self.exit_status if self.exit_status is not None else ExitStatus.ERROR)

    def pause(self) -> bool:
        """Stop the vCPUs, then the devices (drains in-flight I/O)."""
        if not self.gate.pause():
            return False
        for d in self.devices:
            pause = getattr(d, "pause", None)
            if pause:
                pause()
        return True

    def resume(self) -> None:
        for d in reversed(self.devices):
            resume = getattr(d, "resume", None)
            if resume:
                resume()
        self.gate.resume()

    def close(self) -> None:
        self.gate.stop()
        for t in self.threads:
            t.join(timeout=5)
        for d in reversed(self.devices):
            close = getattr(d, "close", None)
            if close:
                try:
                    close()
                except Exception:
                    log.debug("closing %r failed", d, exc_info=True)
        if self.bootrom is not None:
            try:
                self.bootrom.flush_vars()
            except OSError as e:
                print(f"bhyvepy: could not save boot variables: {e}", file=sys.stderr)


def build_machine(cfg: Any, settings: Any, backend: Backend | None = None) -> Machine:
    """Create the kernel VM and every device named by ``cfg``.

    ``settings`` is :class:`bhyvepy.cli.VmSettings`: the values bhyve derives
    from the tree (topology, memory size) after validating them.
    """
    from bhyvepy.platform import build_pci, build_platform

    name = cfg.get_value("name", None)
    if not name:
        raise BhyveExit("no VM name given", ExitStatus.USAGE)
    if backend is None:
        try:
            backend = get_backend(cfg.get_value("backend", None))
        except BackendUnavailable as e:
            raise BhyveExit(f"cannot use the hypervisor: {e}", ExitStatus.ERROR) from None

    rom_path = cfg.get_value("bootrom", None) or cfg.get_value("lpc.bootrom", None)
    vars_path = cfg.get_value("bootvars", None) or cfg.get_value("lpc.bootvars", None)
    # bhyve's MSR policy (-w, x86.verbosemsr) is fixed when the VM is made;
    # backends that trap MSRs in userland (vmm.ko) read it from these.
    if hasattr(backend, "strict_msr"):
        backend.strict_msr = cfg.get_bool("x86.strictmsr", True)
        backend.verbose_msr = cfg.get_bool("x86.verbosemsr", False)
    vm = backend.create_vm(name) if rom_path else backend.open_vm(name)
    topo = Topology(cpus=settings.ncpus, sockets=settings.sockets, cores=settings.cores,
                    threads=settings.threads)
    vm.set_topology(topo)

    memsize = settings.memsize
    regions = vm.setup_memory(memsize, wired=cfg.get_bool("memory.wired", False),
                              in_core=cfg.get_bool("memory.guest_in_core", False))
    mem = GuestMemory(regions)
    ports, mmio = PortBus(), MmioBus()
    m = Machine(config=cfg, backend=backend, vm=vm, mem=mem, ports=ports, mmio=mmio,
                dispatcher=Dispatcher(ports, mmio, strictio=cfg.get_bool("x86.strictio", False)),
                topology=topo, snapshots=SnapshotRegistry())
    m.cpusets = dict(getattr(settings, "cpusets", {}) or {})
    if rom_path:
        m.bootrom = load_bootrom(vm, mem, rom_path, vars_path)

    for cap, var, refusal in (("hlt_exit", "x86.vmexit_on_hlt", "VM exit on HLT not supported"),
                              ("pause_exit", "x86.vmexit_on_pause",
                               "SMP mux requested, no pause support")):
        if cfg.get_bool(var, False) and not vm.set_capability(cap, True):
            raise BhyveExit(refusal, ExitStatus.ERROR)
    if cfg.get_bool("x86.x2apic", False):
        vm.set_capability("x2apic", True)

    build_platform(m)
    build_pci(m)

    for i in range(topo.cpus):
        v = vm.create_vcpu(i)
        m.vcpus.append(v)
    if rom_path:
        m.vcpus[0].reset_to_reset_vector()
    return m


def _install_signals(m: Machine) -> None:
    """SIGTERM presses the ACPI power button once the guest enabled ACPI (bhyve's
    pm.c); before that it ends the process like the default action would."""

    def on_term(signum: int, frame: object) -> None:
        pm = getattr(m, "pm", None)
        if pm is not None and pm.acpi_enabled:
            pm.power_button()
            return
        m.request_exit(128 + signum, "terminated")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)


def _cmdline_defaults() -> Any:
    """The tree an empty bhyve command line builds (bhyve's defaults), so that
    a restore can tell the options a user gave from the defaults."""
    import io

    from bhyvepy.cli import parse_args

    return parse_args(["-r", "-"], stdout=io.StringIO(), stderr=io.StringIO()).config


def prepare_restore(parsed: Any, *, resolve: bool = True) -> Any:
    """``-r FILE``: open and check the file, then build the config from it.

    The snapshot names the VM and fixes its vCPUs and memory; options on the
    command line override host resources (disk paths, tap names, console
    paths), and a positional name overrides the snapshot's, as in bhyve.
    """
    from bhyvepy.cli import resolve_settings
    from bhyvepy.snapshot.restore import open_snapshot, restore_config

    snap = open_snapshot(parsed.restore_file)
    try:
        parsed.config = restore_config(snap.config, parsed.config, _cmdline_defaults())
        if resolve:
            parsed.settings = resolve_settings(parsed.config)
    except BaseException:
        snap.close()
        raise
    return snap


def run_vm(parsed: Any) -> int:
    """Build, run and tear down the VM of a parsed command line; returns the exit status."""
    logging.basicConfig(level=os.environ.get("BHYVEPY_LOG", "WARNING").upper(),
                        format="bhyvepy: %(message)s")
    snap = prepare_restore(parsed) if getattr(parsed, "restore_file", None) else None
    cfg = parsed.config
    control = None
    try:
        m = build_machine(cfg, parsed.settings)
        try:
            _install_signals(m)
            if snap is not None:
                from bhyvepy.snapshot.restore import restore_machine
                restore_machine(m, snap)
            from bhyvepy.snapshot.control import start_control_server
            control = start_control_server(m, serve=False)
        except BaseException:
            m.close()
            raise
    finally:
        if snap is not None:
            snap.close()
    m.start()
    control.serve()
    try:
        status = m.wait()
    except KeyboardInterrupt:
        status = int(ExitStatus.ERROR)
    finally:
        if control is not None:
            control.close()
        m.close()
    if m.exit_message and status not in (0, 1, 2, 5):
        print(f"bhyvepy: {m.exit_message}", file=sys.stderr)
    if status >= 128:
        signal.signal(status - 128, signal.SIG_DFL)
        os.kill(os.getpid(), status - 128)
    if status == ExitStatus.POWEROFF and cfg.get_bool("destroy_on_poweroff", False):
        m.vm.destroy()
    return status
