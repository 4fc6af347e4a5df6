"""vCPU exit cost: Cython dispatch vs the pure-Python reference loop, same guest, same run.

The `exits` guest writes one byte to port 0x80 (a null device) N times.  We report VMM user CPU
time per exit, measured on the vCPU thread (getrusage RUSAGE_THREAD), so the time the host kernel
spends emulating the guest does not count.  Goal: <= 1 us per exit and >= 10x the reference.
"""

from __future__ import annotations

import os

import pytest

from benchutil import record

N_EXITS = int(os.environ.get("HYPERPY_BENCH_EXITS", "200000"))


def _run_exits_guest(guest, run_loop: str, n: int):
    from hyperpy.config import build_vm_config
    from hyperpy.vmm import ExitReason, build_vm

    cfg = build_vm_config(cpus="boot=1", memory="size=64M", kernel=str(guest), initramfs=None,
                          cmdline=f"count={n}", serial="off", console="off")
    vm = build_vm(cfg, run_loop=run_loop)
    result = vm.run()
    assert result.reason is ExitReason.RESET, result
    assert vm.post_port.writes == n
    return vm


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is missing")
def test_exit_cost_cython_vs_python(benchmark, guests):
    results = {}

    def one_round():
        for loop in ("cython", "python"):
            vm = _run_exits_guest(guests["exits"], loop, N_EXITS)
            user = sum(vm.stats.vcpu_user_cpu_s)
            results[loop] = (user / N_EXITS, vm.stats.exits, vm.stats.boot_time.wall_s)

    benchmark.pedantic(one_round, rounds=1, iterations=1)
    cy, py = results["cython"][0], results["python"][0]
    ratio = py / cy if cy > 0 else float("inf")
    benchmark.extra_info.update({"cython_us_per_exit": cy * 1e6, "python_us_per_exit": py * 1e6,
                                 "ratio": ratio, "exits": N_EXITS})
    table = f"vCPU exit dispatch, {N_EXITS} port writes to a null device (VMM user CPU per exit)"
    record(table, "Cython run loop", f"{cy * 1e6:8.3f} us/exit  (wall to boot-timer {results['cython'][2]:.2f} s)")
    record(table, "pure-Python reference", f"{py * 1e6:8.3f} us/exit  (wall to boot-timer {results['python'][2]:.2f} s)")
    record(table, "ratio (Python / Cython)", f"{ratio:8.1f} x   (goal: <= 1 us and >= 10x)")
    print(f"\nexit cost: cython {cy * 1e6:.3f} us, python {py * 1e6:.3f} us, ratio {ratio:.1f}x")
