"""Builds a VM from a :class:`~hyperpy.config.VmConfig` and runs it.

Data flows one way: config -> :class:`VmBuilder` (KVM objects, memory, devices, loaded kernel)
-> :class:`VirtualMachine` (vCPU threads, pause/resume/stop) -> :class:`VmExit`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from .boot import BootInfo, load_kernel
from .boot.reset_vector import install_reset_vector
from .devices.legacy.boot_timer import BootTime, BootTimer
from .devices.legacy.i8042 import I8042
from .devices.legacy.serial import Serial
from ._fast import uapi as U
from .errors import ConfigError, DeviceError, HyperpyError
from .irq import InterruptRouter
from .memory import create_guest_memory
from .memslots import MemorySlots
from .vcpu_setup import setup_vcpu
from .vmexit import EXIT_STATUS, ExitReason, VmExit  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


@dataclass
class VmStats:
    exits: int = 0
    fast_exits: int = 0
    slow_exits: int = 0
    boot_time: BootTime | None = None
    vcpu_user_cpu_s: list[float] = field(default_factory=list)


def _serial_fd(serial_cfg, option: str = "--serial", append: bool = False) -> tuple[int | None, bool]:
    """(fd for guest output, whether hyperpy owns and must close it).  A ``file=`` output is
    truncated, or appended to with ``append`` (a rebooted VM continues the same file)."""
    mode = serial_cfg.mode
    if mode == "tty":
        return sys.stdout.fileno(), False
    if mode == "file":
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        try:
            return os.open(serial_cfg.path, flags, 0o644), True
        except OSError as e:
            raise ConfigError(f"{option}: cannot open {serial_cfg.path}: {e.strerror}",
                              "give a writable file path") from None
    return None, False


class VirtualMachine:
    """A built VM.  Create with :func:`build_vm`; call :meth:`run` once."""

    def __init__(self, config, *, run_loop: str = "cython", append_output: bool = False) -> None:
        """``run_loop="python"`` runs the vCPUs with the pure-Python reference loop
        (:mod:`hyperpy.reference.vcpu_loop`); it exists for benchmarks and tests.
        ``append_output`` appends to ``--serial``/``--console`` files instead of truncating them
        (:mod:`hyperpy.reboot` builds a rebooted VM so)."""
        from ._fast.iobus import IoBus
        from ._fast.kvm import Kvm
        from ._fast.nulldev import NullDevice

        if run_loop not in ("cython", "python"):
            raise ValueError(f"run_loop must be 'cython' or 'python', not {run_loop!r}")
        self.config = config
        self.run_loop = run_loop
        self.append_output = append_output
        self.start_wall = time.monotonic()
        self.start_cpu = time.process_time()
        self._result: VmExit | None = None
        self._done = threading.Event()
        self._cond = threading.Condition()
        self._paused = False
        self._parked = 0
        self._threads: list[threading.Thread] = []
        self._owned_fds: list[int] = []
        self.stats = VmStats()

        self.kvm = Kvm()
        self.kvm.require()
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(layout.KVM_TSS_START)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.irq_router = InterruptRouter(self.vm)

        self.memory = create_guest_memory(config.memory)
        for slot, (gpa, size, host) in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, gpa, size, host)
        self.memory_slots = MemorySlots(self.vm, len(self.memory.regions),
                                        self.kvm.check_extension("KVM_CAP_NR_MEMSLOTS") or 32)

        self.pio_bus = IoBus("port I/O bus")
        self.mmio_bus = IoBus("MMIO bus")
        out_fd, owned = _serial_fd(config.serial, "--serial", append_output)
        if owned:
            self._owned_fds.append(out_fd)
        self.serial = Serial(out_fd, irq_trigger=self._serial_irq)
        if config.serial.mode != "off":   # off: no UART at all (null: a UART that drops output)
            self.pio_bus.register(layout.SERIAL_COM1_PORT, 8, self.serial)
        self.i8042 = I8042(on_reset=lambda: self.finish(VmExit(ExitReason.RESET)))
        self.pio_bus.register(layout.I8042_DATA_PORT, 5, self.i8042)
        self.boot_timer = BootTimer(self.start_wall, self.start_cpu, on_boot=self._on_boot)
        self.pio_bus.register(layout.BOOT_TIMER_PORT, 1, self.boot_timer)
        self.post_port = NullDevice()
        self.pio_bus.register(layout.POST_CODE_PORT, 1, self.post_port)

        self._build_device_model(config)

        rsdp = self._install_acpi(config)
        install_reset_vector(self.memory)     # firmware-less Linux reboots through it

        payload = config.payload
        self.boot: BootInfo = load_kernel(self.memory, Path(payload.kernel), payload.cmdline or "",
                                          Path(payload.initramfs) if payload.initramfs else None,
                                          rsdp=rsdp)
        log.info("loaded %s kernel %s, entry %#x", self.boot.protocol, payload.kernel, self.boot.entry)

        supported = self.kvm.supported_cpuid()
        nr = config.cpus.boot
        self.vcpus = []
        for i in range(nr):
            vcpu = self.vm.create_vcpu(i)
            vcpu.attach_buses(self.pio_bus, self.mmio_bus)
            setup_vcpu(vcpu, supported, nr, tuple(config.cpus.features))
            self.vcpus.append(vcpu)
        boot_vcpu = self.vcpus[0]
        boot_vcpu.set_sregs(self.boot.sregs)
        boot_vcpu.set_regs(self.boot.regs)

    # --- PCI and virtio ------------------------------------------------------------------------
    def _build_device_model(self, config) -> None:
        from ._fast.addrspace import AddressSpace
        from .devices.pci.bus import PciBus, PciConfigIo, PciConfigMmio, PciHostBridge
        from .eventloop import EventLoop

        self.loop = EventLoop("virtio-devices")
        self.address_space = AddressSpace(self.memory)
        self.pci = PciBus(self.mmio_bus, self.pio_bus,
                          (layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE),
                          (layout.pci_mmio64_start(config.memory.size), layout.PCI_MMIO64_SIZE))
        self.pio_bus.register(layout.PCI_CONFIG_ADDRESS_PORT, 8, PciConfigIo(self.pci))
        self.mmio_bus.register(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, PciConfigMmio(self.pci))
        self.pci.add(PciHostBridge(), 0)
        self.virtio: list = []
        self.vfio_devices: list = []
        try:
            self._add_virtio_devices(config)
        except BaseException:
            self._close_devices()
            raise

    def _add_virtio_devices(self, config) -> None:
        from .devices.virtio.blk import Block
        from .devices.virtio.console import Console
        from .devices.virtio.net import Net
        from .devices.virtio.rng import Rng

        self.iommu_core = None
        self.iommu_endpoints: list[int] = []
        self.vfio_mappers: dict[int, object] = {}
        if config.iommu is not None:
            self._add_iommu(config.iommu)
        if config.console.mode != "off":
            fd, owned = _serial_fd(config.console, "--console", self.append_output)
            if owned:
                self._owned_fds.append(fd)
            self.console = Console(fd)
            self._plug(self.console, None, config.console.iommu)
        else:
            self.console = None
        for d in config.disks:
            self._plug(Block(d.path, readonly=d.readonly, direct=d.direct, num_queues=d.num_queues,
                             queue_size=d.queue_size, serial=d.id), d.pci_device_id, d.iommu)
        for n in config.nets:
            self._plug(Net(n.tap, n.mac, ip=n.ip, mask=n.mask, queue_size=n.queue_size,
                           num_queues=n.num_queues), n.pci_device_id, n.iommu)
        if config.rng is not None:
            self._plug(Rng(config.rng.src), config.rng.pci_device_id, config.rng.iommu)
        for dev in config.devices:
            self._add_vfio_device(dev)

    def _add_iommu(self, cfg) -> None:
        """The virtio-iommu: its Cython core, and its PCI function (plugged first)."""
        from ._fast.iommu import VirtioIommuCore
        from .devices.virtio.iommu import Iommu

        self.iommu_core = VirtioIommuCore(
            page_size_mask=sum(cfg.page_sizes), bypass=cfg.bypass, max_domains=cfg.max_domains,
            max_mappings=cfg.max_mappings, mem=self.memory, listener_factory=self._domain_listener,
            # An unknown request type gets UNSUPP in its tail (QEMU does the same): a driver that
            # reads the tail of a zero-length completion would see a stale status otherwise.
            unsupp_unknown_type=True)
        self.iommu_device = Iommu(self.iommu_core)
        self.iommu_slot = self._plug(self.iommu_device, cfg.pci_device_id)

    def _domain_listener(self, domain: int, endpoint: int | None = None):
        """The host DMA listener of a new IOMMU domain: a VFIO endpoint's mapper, else none."""
        return self.vfio_mappers.get(endpoint) if endpoint is not None else None

    def _add_vfio_device(self, dev) -> None:
        """A passed-through PCI function: its container (the host IOMMU side), its device fd
        (real vfio-pci or the explicit SIMULATION) and the PCI function the guest sees."""
        from ._fast.vfio import VfioDmaMapper
        from .devices.vfio_pci import VfioPciDevice
        from .vfio.container import close_container, open_container, open_device
        from .vfio.simdevice import SimulatedVfioDevice

        container = open_container(dev.path, entry_limit=dev.entry_limit, pin_ns_per_page=dev.pin_ns)
        try:
            device = (SimulatedVfioDevice(dev.path, container) if dev.simulated
                      else open_device(container, dev.path))
        except BaseException:
            close_container(container)
            raise
        slot = self.pci.free_slot() if dev.pci_device_id is None else dev.pci_device_id
        endpoint = slot << 3
        mapper = VfioDmaMapper(self.memory, container, batching=dev.batching)
        pci_dev = VfioPciDevice(device, router=self.irq_router, loop=self.loop,
                                slots=self.memory_slots, container=container, mapper=mapper)
        self.vfio_devices.append(pci_dev)
        self.pci.add(pci_dev, slot)
        if dev.iommu:
            # Nothing is mapped until the guest MAPs through the vIOMMU.
            self.vfio_mappers[endpoint] = mapper
            self.iommu_device.watch_host_limit(dev.path, container)
            self.iommu_core.add_endpoint(endpoint)
            self.iommu_endpoints.append(endpoint)
        else:
            # Without a vIOMMU the device may DMA anywhere in guest RAM: map all of it now.
            errs = [mapper.map_py(gpa, size, gpa, 3) for gpa, size, _host in self.memory.regions]
            err = next((e for e in errs if e), 0) or mapper.flush_py()
            if err:
                raise DeviceError(f"--device {dev.path}: mapping guest RAM for DMA failed "
                                  f"({os.strerror(-err)})",
                                  "raise the host's locked-memory limit (ulimit -l) or use iommu=on")

    def _plug(self, device, slot, iommu: bool = False) -> int:
        from ._fast.iommu import IommuAddressSpace
        from .devices.virtio.pci import VirtioPciDevice

        try:
            if slot is None:
                slot = self.pci.free_slot()
            space = self.address_space
            extra = 0
            if iommu:
                # Behind the vIOMMU: every ring and buffer address is an IOVA of this endpoint.
                endpoint = slot << 3
                self.iommu_core.add_endpoint(endpoint)
                self.iommu_endpoints.append(endpoint)
                space = IommuAddressSpace(self.memory, self.iommu_core, endpoint)
                extra = 1 << U.VIRTIO_F_ACCESS_PLATFORM
            pci_dev = VirtioPciDevice(device, vm=self.vm, router=self.irq_router, loop=self.loop,
                                      address_space=space, extra_features=extra)
        except BaseException:
            device.close()
            raise
        self.virtio.append(pci_dev)
        return self.pci.add(pci_dev, slot)

    def _close_devices(self) -> None:
        for d in getattr(self, "virtio", []) + getattr(self, "vfio_devices", []):
            try:
                d.close()
            except Exception:
                log.exception("closing %s failed", d.name)
        self.virtio = []

    def _install_acpi(self, config) -> int:
        """ACPI tables in guest RAM and the power-management registers they describe."""
        from .acpi.tables import build_acpi_tables, install_acpi_tables
        from .devices.legacy.acpi_pm import AcpiPm

        self.acpi_pm = AcpiPm(on_poweroff=lambda: self.finish(VmExit(ExitReason.POWEROFF)),
                              on_reset=lambda: self.finish(VmExit(ExitReason.RESET)))
        self.pio_bus.register(layout.ACPI_SLEEP_CONTROL_PORT, 3, self.acpi_pm)
        from .devices.legacy.ged import AcpiGed

        self.ged = AcpiGed(self._ged_irq)
        self.pio_bus.register(layout.ACPI_GED_PORT, 1, self.ged)
        extra = []
        if self.iommu_core is not None:
            from .acpi.viot import build_viot

            extra.append(build_viot(self.iommu_slot << 3, self.iommu_endpoints))
        blob = build_acpi_tables(config.cpus.boot, config.memory.size, extra)
        install_acpi_tables(self.memory, blob)
        return blob.rsdp_addr

    # --- interrupts and device callbacks ----------------------------------------------------
    def _serial_irq(self) -> None:
        # 8250 interrupts are edge-triggered ISA interrupts: pulse the IOAPIC/PIC pin.
        self.vm.irq_line(layout.SERIAL_COM1_IRQ, 1)
        self.vm.irq_line(layout.SERIAL_COM1_IRQ, 0)

    def _ged_irq(self) -> None:
        self.vm.irq_line(layout.ACPI_GED_IRQ, 1)
        self.vm.irq_line(layout.ACPI_GED_IRQ, 0)

    def power_button(self) -> None:
        """Press the ACPI power button: a GED event the guest's OSPM sees as PWRB notify 0x80."""
        self.ged.trigger(layout.ACPI_GED_POWER_BUTTON)

    def counters(self) -> dict[str, dict[str, int]]:
        """``{device: {counter: value}}`` for ``vm.counters``: every virtio and VFIO device
        (named by kind and plug order: blk0, net0, rng0, console0, iommu0, vfio0), the ACPI GED
        and each vCPU's exits.  Read while the VM runs, without stopping it."""
        out: dict[str, dict[str, int]] = {}
        seen: dict[str, int] = {}

        def name(kind: str) -> str:
            n = seen.get(kind, 0)
            seen[kind] = n + 1
            return f"{kind}{n}"

        for d in list(getattr(self, "virtio", [])):
            dev = d.device
            out[name(dev.name)] = {k: int(v) for k, v in dev.counters().items()}
        for d in list(getattr(self, "vfio_devices", [])):
            out[name("vfio")] = {k: int(v) for k, v in d.counters().items()
                                 if isinstance(v, (int, bool))}
        out["acpi-ged"] = {"events": self.ged.events, "reads": self.ged.reads}
        for v in self.vcpus:
            out[f"vcpu{v.index}"] = {"exits": int(v.exits)}
        return out

    def _on_boot(self, bt: BootTime) -> None:
        self.stats.boot_time = bt

    # --- lifecycle ------------------------------------------------------------------------------
    def finish(self, result: VmExit) -> None:
        """End the VM with ``result`` (the first call wins) and kick every vCPU out."""
        with self._cond:
            if self._result is None:
                self._result = result
            self._done.set()
            self._cond.notify_all()
        for v in self.vcpus:
            v.request_exit()

    def pause(self, timeout: float = 5.0) -> None:
        """Stop all vCPUs outside KVM_RUN until :meth:`resume`."""
        with self._cond:
            self._paused = True
        for v in self.vcpus:
            v.request_exit()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._parked < len(self._threads) and not self._done.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HyperpyError("pausing the VM timed out", "a vCPU did not leave KVM_RUN")
                self._cond.wait(left)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def _vcpu_main(self, vcpu) -> None:
        import resource

        t0 = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
        if self.run_loop == "python":
            from .reference.vcpu_loop import ReferenceVcpuLoop

            ref = ReferenceVcpuLoop(vcpu, self.pio_bus, self.mmio_bus)
            run = ref.run
        else:
            ref = None
            run = vcpu.run
        try:
            while not self._done.is_set():
                with self._cond:
                    if self._paused:
                        self._parked += 1
                        self._cond.notify_all()
                        while self._paused and not self._done.is_set():
                            self._cond.wait()
                        self._parked -= 1
                        continue
                event, details = run()
                if event == "kicked":
                    continue
                exit_ = self._exit_from_event(vcpu, event, details)
                if exit_ is not None:
                    self.finish(exit_)
        except Exception as e:  # a VMM bug must end the VM cleanly, not hang it
            log.exception("vCPU %d thread failed", vcpu.index)
            self.finish(VmExit(ExitReason.VMM_ERROR, f"vCPU {vcpu.index}: {e}", vcpu.index))
        finally:
            user = resource.getrusage(resource.RUSAGE_THREAD).ru_utime - t0
            with self._cond:
                self.stats.vcpu_user_cpu_s.append(user)
                self.stats.exits += ref.exits if ref is not None else vcpu.exits
                self.stats.fast_exits += vcpu.fast_exits
                self.stats.slow_exits += vcpu.slow_exits

    def _exit_from_event(self, vcpu, event: str, details) -> VmExit | None:
        idx = vcpu.index
        if event == "hlt":
            return VmExit(ExitReason.HALTED, f"vCPU {idx} halted", idx)
        if event == "shutdown":
            return VmExit(ExitReason.TRIPLE_FAULT, self._cpu_context(vcpu), idx)
        if event == "system_event":
            kind = details["type"]
            if kind == "reset":
                return VmExit(ExitReason.RESET, "", idx)
            if kind == "shutdown":
                return VmExit(ExitReason.POWEROFF, "", idx)
            return VmExit(ExitReason.CRASH, f"system event {kind}", idx)
        if event == "fail_entry":
            return VmExit(ExitReason.FAIL_ENTRY,
                          f"hardware entry failure reason {details['hardware_entry_failure_reason']:#x}; "
                          + self._cpu_context(vcpu), idx)
        if event == "internal_error":
            reason = (ExitReason.EMULATION_FAILURE if details["name"] == "emulation failure"
                      else ExitReason.INTERNAL_ERROR)
            insn = details.get("insn_bytes") or self._insn_bytes(vcpu)
            data = " ".join(f"{d:#x}" for d in details["data"]) or "none"
            msg = (f"{details['name']} on vCPU {idx}: {self._cpu_context(vcpu)}, instruction bytes "
                   f"{insn.hex(' ') if insn else 'unavailable'}, exit data [{data}]")
            if reason is ExitReason.EMULATION_FAILURE:
                msg += ("; the host's KVM cannot emulate this instruction: if the guest chose it "
                        "from CPUID, hide that feature with --cpus features=[-NAME]")
            return VmExit(reason, msg, idx)
        return VmExit(ExitReason.VMM_ERROR,
                      f"unhandled KVM exit {details.get('name')} ({details.get('exit_reason')}) on vCPU {idx}",
                      idx)

    def _cpu_context(self, vcpu) -> str:
        try:
            r = vcpu.get_regs()
            s = vcpu.get_sregs()
        except HyperpyError:
            return "registers unavailable"
        return (f"RIP {r['rip']:#x} CS {s['cs']['selector']:#x} RSP {r['rsp']:#x} "
                f"CR0 {s['cr0']:#x} CR3 {s['cr3']:#x} CR4 {s['cr4']:#x} EFER {s['efer']:#x}")

    def _insn_bytes(self, vcpu) -> bytes | None:
        """The 15 bytes at CS:RIP, read through the guest's own page tables."""
        try:
            rip = vcpu.get_regs()["rip"] + vcpu.get_sregs()["cs"]["base"]
            phys, valid = vcpu.translate(rip)
            if not valid:
                return None
            for n in range(15, 0, -1):
                if self.memory.contains(phys, n):
                    return self.memory.read(phys, n)
        except HyperpyError:
            pass
        return None

    def run(self) -> VmExit:
        """Start every vCPU and wait until the VM ends."""
        self.loop.start()
        stdin_restore = self._start_console_input()
        for v in self.vcpus:
            t = threading.Thread(target=self._vcpu_main, args=(v,), name=f"vcpu{v.index}", daemon=True)
            self._threads.append(t)
            t.start()
        try:
            while not self._done.wait(0.2):
                pass
        except KeyboardInterrupt:
            self.finish(VmExit(ExitReason.INTERRUPTED))
        finally:
            self.finish(VmExit(ExitReason.STOPPED))  # no-op when the VM already ended
            for t in self._threads:
                t.join(timeout=5)
            if stdin_restore is not None:
                stdin_restore()
            self.loop.stop()
            self._close_devices()
            for fd in self._owned_fds:
                os.close(fd)
            self._owned_fds.clear()
        result = self._result
        assert result is not None
        log.info("VM ended: %s%s", result.reason.value, f" ({result.message})" if result.message else "")
        return result

    def _start_console_input(self):
        """Feed stdin to the ``tty`` console (the UART, else hvc0), as cloud-hypervisor does:
        a terminal is put in raw mode (Ctrl-C still ends hyperpy); a pipe or file is read as it
        is, so a script can type into the guest; end of input stops the feed, not the VM."""
        if self.config.serial.mode == "tty":
            sink = self.serial.enqueue_input
        elif self.config.console.mode == "tty" and self.console is not None:
            sink = self.console.enqueue_input
        else:
            return None
        fd = 0
        try:
            interactive = os.isatty(fd)
            os.fstat(fd)
        except OSError:          # no stdin at all (closed): nothing to feed
            return None
        restore = None
        if interactive:
            saved = termios.tcgetattr(fd)
            tty.setraw(fd)
            attrs = termios.tcgetattr(fd)
            attrs[3] |= termios.ISIG    # keep Ctrl-C as the way out of hyperpy
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            restore = lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)  # noqa: E731

        def reader() -> None:
            # Wait in select, not read: a thread blocked in read() would outlive this VM and
            # swallow the first bytes typed for the next one (after a reboot).
            while not self._done.is_set():
                try:
                    if not select.select([fd], [], [], 0.2)[0] or self._done.is_set():
                        continue
                    data = os.read(fd, 256)
                except OSError:
                    return
                if not data:
                    return
                sink(data)

        threading.Thread(target=reader, name="stdin", daemon=True).start()
        return restore


    def close(self) -> None:
        """Release the VM's host resources now: KVM fds and guest RAM (huge pages included)."""
        if any(t.is_alive() for t in self._threads):
            # A vCPU thread did not stop: leave its memory mapped rather than pull it away
            # under a running KVM_RUN; the process exit releases it.
            log.error("a vCPU thread is still running; guest memory is left mapped")
            return
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.memory.close()


def build_vm(config, **kwargs) -> VirtualMachine:
    return VirtualMachine(config, **kwargs)


def run_vm(config, *, reboot: bool = True) -> int:
    """``hyperpy run``: build and run a VM until it ends; a guest reset reboots it (the same
    configuration, built again) unless ``reboot`` is false (``--no-reboot``).  SIGINT and SIGTERM
    end it, also between two boots.  Returns the process exit status (0 for a power-off, and for
    a reset with ``reboot=False``)."""
    from .reboot import RebootingVm

    session = RebootingVm(config, build_vm, reboot=reboot)
    with _signals_stop(session):
        result = session.run()
    if result.status != 0:
        print(f"hyperpy: VM stopped: {result.reason.value}"
              + (f": {result.message}" if result.message else ""), file=sys.stderr)
    return result.status


@contextlib.contextmanager
def _signals_stop(session):
    """SIGINT and SIGTERM stop ``session`` (status 130 and 143), also between two boots, when we
    own the main thread.  The handlers do nothing themselves: the signal's number arrives on a
    wakeup pipe and a thread calls ``session.stop``, so no handler waits for a lock that the
    main thread it interrupted holds."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reasons = {int(signal.SIGINT): ExitReason.INTERRUPTED, int(signal.SIGTERM): ExitReason.TERMINATED}
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def waiter() -> None:
        while True:
            select.select([rfd], [], [])
            try:
                data = os.read(rfd, 64)
            except BlockingIOError:
                continue
            if not data:          # the write end is closed: the run is over
                return
            for signum in data:
                if signum in reasons:
                    session.stop(VmExit(reasons[signum]))

    old = {sig: signal.signal(sig, lambda *_: None) for sig in reasons}
    old_fd = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    thread = threading.Thread(target=waiter, name="signals", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        os.close(wfd)
        thread.join(timeout=5)
        os.close(rfd)
