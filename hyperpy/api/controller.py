"""The VM's life cycle as the API sees it (cloud-hypervisor's ``VmState``).

::

    (no VM) --create--> Created --boot--> Running <--pause/resume--> Paused
                          ^                  |  \\--reboot: torn down and rebuilt, Running again
                          |               shutdown / guest power-off
                          +-- boot ---- Shutdown
    delete: from any state back to (no VM)

A :class:`VmController` owns at most one :class:`hyperpy.vmm.VirtualMachine`.  Building it
happens at ``boot`` (``create`` only validates and stores the configuration), and the VM runs in
a thread of its own, so API requests are served while the vCPUs run.  A guest reset reboots the
VM from the same configuration (as cloud-hypervisor does); a guest power-off leaves the VM in
``Shutdown``.  Operations are serialised; state reads are not blocked by a slow operation.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ..errors import HyperpyError

log = logging.getLogger(__name__)

CREATED, RUNNING, PAUSED, SHUTDOWN = "Created", "Running", "Paused", "Shutdown"


class ApiStateError(HyperpyError):
    """The VM's state does not allow the action; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, what: str, hint: str | None = None) -> None:
        super().__init__(what, hint)
        self.status = status


class VmController:
    """Owns the configuration and the running VM.  ``vm_factory(config)`` builds a
    :class:`~hyperpy.vmm.VirtualMachine` (injectable for tests)."""

    def __init__(self, vm_factory: Callable | None = None) -> None:
        self._factory = vm_factory
        self._op = threading.Lock()       # one life-cycle operation at a time
        self._mu = threading.Lock()       # guards the fields below (held briefly)
        self.config = None
        self.state: str | None = None
        self.vm = None
        self._thread: threading.Thread | None = None
        self._stop_requested = False
        self.last_exit = None
        self.boots = 0
        self.changed = threading.Condition(self._mu)

    # --- helpers --------------------------------------------------------------------------
    def _build(self):
        if self._factory is None:
            from ..vmm import VirtualMachine

            self._factory = VirtualMachine
        return self._factory(self.config)

    def _need_vm(self, action: str) -> None:
        if self.config is None:
            raise ApiStateError(404, f"cannot {action}: no VM is created", "create one with vm.create first")

    def _start(self, vm) -> None:
        """Run ``vm`` in the VM thread (state Running).  Called with ``_mu`` held."""
        self.vm = vm
        self._stop_requested = False
        self.state = RUNNING
        self.boots += 1
        self._thread = threading.Thread(target=self._runner, args=(vm,), name="vm", daemon=True)
        self._thread.start()
        self.changed.notify_all()

    def _runner(self, vm) -> None:
        while True:
            try:
                result = vm.run()
            except Exception as e:         # a VMM bug ends this VM, not the API server
                log.exception("the VM failed")
                from ..vmm import ExitReason, VmExit

                result = VmExit(ExitReason.VMM_ERROR, str(e))
            finally:
                vm.close()
            with self._mu:
                self.last_exit = result
                if self._stop_requested or self.vm is not vm:
                    return
                from ..vmm import ExitReason

                log.info("VM ended: %s", result.reason.value)
                if result.reason is ExitReason.RESET:
                    try:
                        vm = self._build()
                    except Exception as e:
                        log.error("rebooting after a guest reset failed: %s", e)
                        self.vm, self.state = None, SHUTDOWN
                        self.changed.notify_all()
                        return
                    self.vm = vm
                    self.boots += 1
                    self.changed.notify_all()
                    continue
                self.vm, self.state = None, SHUTDOWN
                self.changed.notify_all()
                return

    def _stop(self) -> None:
        """End the running VM and wait for its thread (state Shutdown).  ``_op`` held."""
        with self._mu:
            vm, thread = self.vm, self._thread
            self._stop_requested = True
        if vm is not None:
            from ..vmm import ExitReason, VmExit

            vm.finish(VmExit(ExitReason.STOPPED))
        if thread is not None:
            thread.join(timeout=30)
            if thread.is_alive():
                raise HyperpyError("the VM did not stop within 30 s", "a vCPU thread is stuck")
        with self._mu:
            self.vm, self._thread = None, None
            if self.config is not None:
                self.state = SHUTDOWN
            self.changed.notify_all()

    # --- operations ---------------------------------------------------------------------------
    def create(self, config) -> None:
        with self._op:
            if self.config is not None:
                raise ApiStateError(409, f"cannot create: a VM already exists (state {self.state})",
                                    "delete it with vm.delete first")
            with self._mu:
                self.config, self.state, self.last_exit = config, CREATED, None
                self.changed.notify_all()

    def boot(self) -> None:
        with self._op:
            self._need_vm("boot")
            if self.state in (RUNNING, PAUSED):
                raise ApiStateError(409, f"cannot boot: the VM is already booted (state {self.state})",
                                    "shut it down with vm.shutdown first, or use vm.reboot")
            vm = self._build()
            with self._mu:
                self._start(vm)

    def pause(self) -> None:
        with self._op:
            self._need_vm("pause")
            if self.state != RUNNING:
                raise ApiStateError(405, f"cannot pause: the VM is not running (state {self.state})")
            self.vm.pause()
            with self._mu:
                self.state = PAUSED
                self.changed.notify_all()

    def resume(self) -> None:
        with self._op:
            self._need_vm("resume")
            if self.state != PAUSED:
                raise ApiStateError(405, f"cannot resume: the VM is not paused (state {self.state})")
            self.vm.resume()
            with self._mu:
                self.state = RUNNING
                self.changed.notify_all()

    def shutdown(self) -> None:
        with self._op:
            self._need_vm("shut down")
            if self.state not in (RUNNING, PAUSED):
                raise ApiStateError(405, f"cannot shut down: the VM is not booted (state {self.state})")
            self._stop()

    def reboot(self) -> None:
        with self._op:
            self._need_vm("reboot")
            if self.state not in (RUNNING, PAUSED):
                raise ApiStateError(405, f"cannot reboot: the VM is not booted (state {self.state})")
            self._stop()
            vm = self._build()
            with self._mu:
                self._start(vm)

    def power_button(self) -> None:
        with self._op:
            self._need_vm("press the power button")
            if self.state != RUNNING:
                raise ApiStateError(405, f"cannot press the power button: the VM is not running "
                                    f"(state {self.state})")
            self.vm.power_button()

    def delete(self) -> None:
        with self._op:
            if self.state in (RUNNING, PAUSED):
                self._stop()
            with self._mu:
                self.config, self.state, self.vm = None, None, None
                self.changed.notify_all()

    def stop_all(self) -> None:
        """For the VMM's exit: end the VM if one runs."""
        with self._op:
            if self.state in (RUNNING, PAUSED):
                self._stop()

    def counters(self) -> dict:
        with self._op:
            self._need_vm("read counters")
            vm = self.vm
            return vm.counters() if vm is not None else {}

    def info(self) -> tuple[object, str]:
        with self._mu:
            if self.config is None:
                raise ApiStateError(404, "no VM is created", "create one with vm.create first")
            return self.config, self.state

    def wait_state(self, state: str, timeout: float) -> bool:
        """Block until the state is ``state`` (tests, CLI start-up)."""
        with self._mu:
            return self.changed.wait_for(lambda: self.state == state, timeout)
