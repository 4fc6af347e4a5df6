"""hyperpy.reboot.RebootingVm with stand-in VMs (no KVM): a guest reset rebuilds the VM from the
same configuration with its output appended, anything else ends it, and a stop is never lost,
not even while a reboot rebuilds the VM."""

from __future__ import annotations

import threading

import pytest

from hyperpy.errors import BootError
from hyperpy.reboot import RebootingVm
from hyperpy.vmexit import ExitReason, VmExit

RESET, POWEROFF = VmExit(ExitReason.RESET), VmExit(ExitReason.POWEROFF)


class ScriptedVm:
    """Ends with the next result of ``script`` when run (or waits for finish() when it is
    None); records how it was built and whether it was closed."""

    def __init__(self, config, script: list, log: list, append_output: bool = False) -> None:
        self.config = config
        self.append_output = append_output
        self.planned = script.pop(0) if script else None
        self.result: VmExit | None = None
        self.done = threading.Event()
        self.ran = False
        self.closed = False
        log.append(self)

    def run(self) -> VmExit:
        assert not self.closed
        self.ran = True
        if isinstance(self.planned, Exception):
            raise self.planned
        if self.planned is not None:
            self.finish(self.planned)
        self.done.wait(10)
        return self.result

    def finish(self, result: VmExit) -> None:
        if self.result is None:
            self.result = result
        self.done.set()

    def close(self) -> None:
        self.closed = True


def make(script: list, **kw) -> tuple[RebootingVm, list[ScriptedVm]]:
    vms: list[ScriptedVm] = []
    config = object()
    return RebootingVm(config, lambda cfg, **a: ScriptedVm(cfg, script, vms, **a), **kw), vms


def test_resets_reboot_until_a_power_off():
    session, vms = make([RESET, RESET, POWEROFF])
    assert session.run() == POWEROFF
    assert len(vms) == 3 and session.boots == 3
    assert all(v.ran and v.closed and v.config is vms[0].config for v in vms)
    assert [v.append_output for v in vms] == [False, True, True]
    assert session.vm is None


@pytest.mark.parametrize("end", [ExitReason.TRIPLE_FAULT, ExitReason.HALTED, ExitReason.EMULATION_FAILURE])
def test_other_ends_do_not_reboot(end):
    session, vms = make([VmExit(end, "x")])
    assert session.run().reason is end
    assert len(vms) == 1 and vms[0].closed


def test_no_reboot_ends_on_the_reset():
    session, vms = make([RESET, POWEROFF], reboot=False)
    assert session.run() == RESET
    assert len(vms) == 1 and vms[0].closed


def test_on_reboot_sees_each_rebuilt_vm_before_it_runs():
    seen = []
    vms: list[ScriptedVm] = []
    script = [RESET, RESET, POWEROFF]
    session = RebootingVm("cfg", lambda cfg, **a: ScriptedVm(cfg, script, vms, **a),
                          on_reboot=lambda vm: seen.append((vm, vm.ran, session.vm is vm)))
    session.run()
    assert seen == [(vms[1], False, True), (vms[2], False, True)]


def test_first_build_error_propagates():
    def factory(cfg, **kw):
        raise BootError("--kernel: no such file: /k")

    with pytest.raises(BootError):
        RebootingVm("cfg", factory)


def test_a_failed_rebuild_ends_with_one_line():
    vms: list[ScriptedVm] = []

    def factory(cfg, **kw):
        if vms:
            raise BootError("--kernel: no such file: /k", "give the path of a kernel")
        return ScriptedVm(cfg, [RESET], vms, **kw)

    result = RebootingVm("cfg", factory).run()
    assert result.reason is ExitReason.VMM_ERROR
    assert result.message == ("rebooting after a guest reset failed: --kernel: no such file: /k: "
                              "give the path of a kernel")
    assert vms[0].closed


def test_a_failing_vm_is_closed_and_reported():
    session, vms = make([RuntimeError("bug in a device")])
    result = session.run()
    assert result == VmExit(ExitReason.VMM_ERROR, "RuntimeError: bug in a device")
    assert vms[0].closed


def test_stop_ends_the_running_vm_and_reboots_no_more():
    session, vms = make([None])          # runs until finished
    results: list[VmExit] = []
    t = threading.Thread(target=lambda: results.append(session.run()))
    t.start()
    assert _wait(lambda: vms[0].ran)
    session.stop(VmExit(ExitReason.TERMINATED))
    t.join(10)
    assert results == [VmExit(ExitReason.TERMINATED)] and len(vms) == 1 and vms[0].closed


def test_stop_before_run_ends_at_once():
    session, vms = make([None])
    session.stop(VmExit(ExitReason.INTERRUPTED))
    assert session.run() == VmExit(ExitReason.INTERRUPTED)
    assert vms[0].closed


def test_stop_while_a_reboot_rebuilds_discards_the_new_vm():
    building, release = threading.Event(), threading.Event()
    vms: list[ScriptedVm] = []

    def factory(cfg, **kw):
        if vms:
            building.set()
            release.wait(10)
        return ScriptedVm(cfg, [RESET] if not vms else [None], vms, **kw)

    session = RebootingVm("cfg", factory)
    results: list[VmExit] = []
    t = threading.Thread(target=lambda: results.append(session.run()))
    t.start()
    assert building.wait(10)
    assert session.vm is None                    # between two boots
    session.stop(VmExit(ExitReason.TERMINATED))
    release.set()
    t.join(10)
    assert results == [VmExit(ExitReason.TERMINATED)]
    assert len(vms) == 2 and vms[1].closed and not vms[1].ran


def test_a_stop_right_after_a_reset_ends_the_session():
    """Whether the reboot has begun or not when the stop comes, the stop ends it."""
    session, vms = make([None])
    results: list[VmExit] = []
    t = threading.Thread(target=lambda: results.append(session.run()))
    t.start()
    assert _wait(lambda: vms[0].ran)
    vms[0].finish(RESET)                          # the guest reset first...
    session.stop(VmExit(ExitReason.STOPPED))     # ...then the VMM stops it
    t.join(10)
    assert results == [VmExit(ExitReason.STOPPED)]
    assert all(v.closed for v in vms) and len(vms) <= 2


def test_a_lent_vm_is_not_closed_under_its_borrower():
    """The API presses the power button on the VM it got from current(): the VM may end
    meanwhile, but it is closed only after the borrower is done with it."""
    import time

    session, vms = make([None])
    results: list[VmExit] = []
    t = threading.Thread(target=lambda: results.append(session.run()))
    t.start()
    assert _wait(lambda: vms[0].ran)
    with session.current() as vm:
        assert vm is vms[0]
        vm.finish(POWEROFF)              # the guest powers off while it is lent
        time.sleep(0.2)
        assert not vm.closed
    t.join(10)
    assert results == [POWEROFF] and vms[0].closed
    with session.current() as vm:
        assert vm is None


def _wait(pred, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()
