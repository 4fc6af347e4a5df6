"""The VM's life cycle as the API sees it (cloud-hypervisor's ``VmState``).

::

    (no VM) --create--> Created --boot--> Running <--pause/resume--> Paused
                          ^                  |  \\--reboot: torn down and rebuilt, Running again
                          |               shutdown / guest power-off
                          +-- boot ---- Shutdown
    delete: from any state back to (no VM)

A :class:`VmController` owns at most one :class:`hyperpy.reboot.RebootingVm` and through it one
:class:`hyperpy.vmm.VirtualMachine`.  Building it happens at ``boot`` (``create`` only validates
and stores the configuration), and the VM runs in a thread of its own, so API requests are
served while the vCPUs run.  A guest reset reboots the VM from the same configuration (as
cloud-hypervisor does; :mod:`hyperpy.reboot`, shared with ``hyperpy run``), or shuts it down
with ``--no-reboot``; a guest power-off leaves the VM in ``Shutdown``.  A reboot (the guest's
or ``vm.reboot``) appends to the serial and console files; ``vm.boot`` starts them afresh.
Operations are serialised; state reads are not blocked by a slow operation.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Callable

from ..errors import HyperpyError
from ..reboot import RebootingVm
from ..vmexit import ExitReason, VmExit

log = logging.getLogger(__name__)

CREATED, RUNNING, PAUSED, SHUTDOWN = "Created", "Running", "Paused", "Shutdown"


class ApiStateError(HyperpyError):
    """The VM's state does not allow the action; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, what: str, hint: str | None = None) -> None:
        super().__init__(what, hint)
        self.status = status


class VmController:
    """Owns the configuration and the running VM.  ``vm_factory(config, append_output=bool)``
    builds a :class:`~hyperpy.vmm.VirtualMachine` (injectable for tests).  With ``reboot=False``
    (``--no-reboot``) a guest reset shuts the VM down instead of rebooting it."""

    def __init__(self, vm_factory: Callable | None = None, *, reboot: bool = True) -> None:
        self._factory = vm_factory
        self.reboot_on_reset = reboot
        self._op = threading.Lock()       # one life-cycle operation at a time
        self._mu = threading.Lock()       # guards the fields below (held briefly)
        self.config = None
        self.state: str | None = None
        self.session: RebootingVm | None = None
        self._thread: threading.Thread | None = None
        self.last_exit = None
        self.boots = 0
        self.changed = threading.Condition(self._mu)

    @property
    def vm(self):
        """The VM of the current boot (None when not booted, or while a guest reboot rebuilds it)."""
        session = self.session
        return session.vm if session is not None else None

    # --- helpers --------------------------------------------------------------------------
    def _factory_or_default(self) -> Callable:
        if self._factory is None:
            from ..vmm import VirtualMachine

            self._factory = VirtualMachine
        return self._factory

    def _need_vm(self, action: str) -> None:
        if self.config is None:
            raise ApiStateError(404, f"cannot {action}: no VM is created", "create one with vm.create first")

    @contextlib.contextmanager
    def _running_vm(self, action: str) -> Iterator:
        """The running VM, not closed before the block ends: 405 between boots."""
        session = self.session
        with session.current() if session is not None else contextlib.nullcontext() as vm:
            if vm is None:
                raise ApiStateError(405, f"cannot {action}: the VM is not running "
                                    "(it is rebooting or has just stopped)", "try again")
            yield vm

    def _boot(self, *, append_output: bool = False) -> None:
        """Build the VM (errors propagate) and run it in the VM thread (state Running)."""
        session = RebootingVm(self.config, self._factory_or_default(), reboot=self.reboot_on_reset,
                              append_output=append_output, on_reboot=self._on_guest_reboot)
        with self._mu:
            self.session = session
            self.state = RUNNING
            self.boots += 1
            self._thread = threading.Thread(target=self._runner, args=(session,), name="vm", daemon=True)
            self._thread.start()
            self.changed.notify_all()

    def _runner(self, session: RebootingVm) -> None:
        try:
            result = session.run()
        except Exception as e:             # a VMM bug ends this VM, not the API server
            log.debug("the VM failed", exc_info=True)
            result = VmExit(ExitReason.VMM_ERROR, f"{type(e).__name__}: {e}")
        with self._mu:
            self.last_exit = result
            if self.session is not session:      # stopped and replaced by an operation
                return
            log.info("VM ended: %s", result.reason.value)
            if result.reason is ExitReason.VMM_ERROR:
                log.error("the VM failed: %s", result.message)
            self.session, self.state = None, SHUTDOWN
            self.changed.notify_all()

    def _on_guest_reboot(self, _vm) -> None:
        """The guest reset and its VM was rebuilt: it runs (also if a pause raced the reset)."""
        with self._mu:
            self.boots += 1
            self.state = RUNNING
            self.changed.notify_all()

    def _stop(self) -> None:
        """End the running VM and wait for its thread (state Shutdown).  ``_op`` held."""
        with self._mu:
            session, thread = self.session, self._thread
        if session is not None:
            session.stop(VmExit(ExitReason.STOPPED))
        if thread is not None:
            thread.join(timeout=30)
            if thread.is_alive():
                raise HyperpyError("the VM did not stop within 30 s", "a vCPU thread is stuck")
        with self._mu:
            self.session, self._thread = None, None
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
            self._boot()

    def pause(self) -> None:
        with self._op:
            self._need_vm("pause")
            if self.state != RUNNING:
                raise ApiStateError(405, f"cannot pause: the VM is not running (state {self.state})")
            # The state is set while the VM is still lent: if it ended meanwhile (a guest
            # reset or power-off), the state the VM thread sets afterwards is the last word.
            with self._running_vm("pause") as vm:
                vm.pause()
                with self._mu:
                    self.state = PAUSED
                    self.changed.notify_all()

    def resume(self) -> None:
        with self._op:
            self._need_vm("resume")
            if self.state != PAUSED:
                raise ApiStateError(405, f"cannot resume: the VM is not paused (state {self.state})")
            with self._running_vm("resume") as vm:
                vm.resume()
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
            self._boot(append_output=True)      # a reboot: the output files go on

    def power_button(self) -> None:
        with self._op:
            self._need_vm("press the power button")
            if self.state != RUNNING:
                raise ApiStateError(405, f"cannot press the power button: the VM is not running "
                                    f"(state {self.state})")
            with self._running_vm("press the power button") as vm:
                vm.power_button()

    def delete(self) -> None:
        with self._op:
            if self.state in (RUNNING, PAUSED):
                self._stop()
            with self._mu:
                self.config, self.state, self.session = None, None, None
                self.changed.notify_all()

    def stop_all(self) -> None:
        """For the VMM's exit: end the VM if one runs."""
        with self._op:
            if self.state in (RUNNING, PAUSED):
                self._stop()

    def counters(self) -> dict:
        with self._op:
            self._need_vm("read counters")
            session = self.session
            if session is None:
                return {}
            with session.current() as vm:
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
