"""Guest reboots: a VM whose guest resets is torn down and built again from its configuration.

This is what cloud-hypervisor does, driven from its command line or its API: the process stays
and the guest boots again with the same configuration.  A guest reset is the i8042 pulse reset,
the ACPI reset register or KVM's reset system event (Linux's ``reboot``).  Any other end (guest
power-off, triple fault, a stop by the VMM, a signal) ends the VM.  With ``reboot=False``
(``--no-reboot``, spelled like QEMU's option) a guest reset ends the VM as well; the tiny test
guests signal "done" that way.

Both front ends use :class:`RebootingVm`: ``hyperpy run`` (:func:`hyperpy.vmm.run_vm`) in its
main thread, the API controller (:mod:`hyperpy.api.controller`) in its VM thread.

A rebuilt VM appends to its ``--serial``/``--console`` files (``append_output=True``), so the
output of every boot stays in them.  Devices, counters and the boot timer start afresh.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Callable, Protocol

from .errors import HyperpyError
from .vmexit import ExitReason, VmExit

log = logging.getLogger(__name__)


class Vm(Protocol):
    """What a :class:`RebootingVm` needs of a VM (:class:`hyperpy.vmm.VirtualMachine`)."""

    def run(self) -> VmExit: ...

    def finish(self, result: VmExit) -> None: ...

    def close(self) -> None: ...


VmFactory = Callable[..., Vm]      # factory(config, append_output=bool) -> Vm


class RebootingVm:
    """One configuration's VM across guest reboots.

    The constructor builds the first VM with ``factory(config, append_output=append_output)``
    (a :class:`~hyperpy.errors.HyperpyError` propagates); :meth:`run` runs it and every rebuilt
    one.  ``on_reboot(vm)`` is called from the thread in :meth:`run` when a rebuilt VM has
    replaced the old one, before it runs.  :meth:`stop` may be called from any thread: it takes
    no lock.  :meth:`current` lends the VM to another thread (the API's pause, counters, power
    button) without racing its close.
    """

    def __init__(self, config, factory: VmFactory, *, reboot: bool = True,
                 append_output: bool = False,
                 on_reboot: Callable[[Vm], None] | None = None) -> None:
        self.config = config
        self.reboot = reboot
        self._factory = factory
        self._on_reboot = on_reboot
        self._stop: VmExit | None = None
        self._lent = threading.Lock()     # held while another thread uses the VM
        self._vm: Vm | None = factory(config, append_output=append_output)
        self.boots = 1

    @property
    def vm(self) -> Vm | None:
        """The VM of the current boot; None once it ended (while a reboot rebuilds it, too)."""
        return self._vm

    @contextlib.contextmanager
    def current(self) -> Iterator[Vm | None]:
        """:attr:`vm`, kept from being closed until the block ends (None: there is none)."""
        with self._lent:
            yield self._vm

    def stop(self, result: VmExit) -> None:
        """End the VM with ``result`` and reboot no more."""
        # Set the flag before reading the VM; run() publishes a VM before reading the flag.
        # Whichever comes second sees the other, so a stop never misses a VM being rebuilt.
        if self._stop is None:
            self._stop = result
        vm = self._vm
        if vm is not None:
            vm.finish(result)

    def run(self) -> VmExit:
        """Run until the VM ends other than by a guest reset that reboots it; every VM built is
        closed on the way.  Returns how the last one ended."""
        vm = self._vm
        while vm is not None:
            if self._stop is not None:
                vm.finish(self._stop)     # stopped before this boot ran: it ends at once
            result = self._run_once(vm)
            with self._lent:              # no thread uses it once it is no longer lent out
                self._vm = None
            _close(vm)
            if result.reason is not ExitReason.RESET or not self.reboot:
                return result
            if self._stop is not None:
                return self._stop         # a reset raced with a stop: the stop wins
            vm = self._rebuild()
            if isinstance(vm, VmExit):
                return vm
        return self._stop or VmExit(ExitReason.STOPPED)

    @staticmethod
    def _run_once(vm: Vm) -> VmExit:
        try:
            return vm.run()
        except Exception as e:         # a VMM bug ends this VM, not its caller
            log.debug("the VM failed", exc_info=True)
            what = str(e) if isinstance(e, HyperpyError) else f"{type(e).__name__}: {e}"
            return VmExit(ExitReason.VMM_ERROR, what)

    def _rebuild(self) -> Vm | VmExit:
        """The next boot's VM (published as :attr:`vm`), or how the session ended instead."""
        log.info("guest reset: rebooting the VM (boot %d)", self.boots + 1)
        try:
            vm = self._factory(self.config, append_output=True)
        except Exception as e:
            log.debug("rebuilding the VM failed", exc_info=True)
            return VmExit(ExitReason.VMM_ERROR, f"rebooting after a guest reset failed: {e}")
        self.boots += 1
        self._vm = vm
        if self._stop is not None:        # see stop(): checked after publishing the VM
            with self._lent:
                self._vm = None
            _close(vm)
            return self._stop
        if self._on_reboot is not None:
            self._on_reboot(vm)
        return vm


def _close(vm: Vm) -> None:
    try:
        vm.close()
    except Exception as e:
        log.debug("closing the VM failed", exc_info=True)
        log.error("closing the VM failed: %s", e)
