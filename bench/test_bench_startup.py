"""Start-up: wall time from `hyperpy run` to the guest's boot-timer write (hello guest)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

from benchutil import record

ROUNDS = int(os.environ.get("HYPERPY_BENCH_STARTUP_ROUNDS", "5"))
_LINE = re.compile(r"Guest-boot-time =\s+(\d+) us .*\(([\d.]+) ms since hyperpy started\)")


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is missing")
def test_startup_to_boot_timer(benchmark):
    samples = []

    def one():
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "hyperpy", "run", "--no-reboot",
                            "--kernel", "builtin:hello", "--memory", "size=128M", "--serial", "off", "-v"],
                           capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir())
        total = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        m = _LINE.search(p.stderr)
        assert m, p.stderr
        samples.append((int(m.group(1)) / 1e6, float(m.group(2)) / 1e3, total))

    benchmark.pedantic(one, rounds=ROUNDS, iterations=1)
    samples.sort(key=lambda s: s[1])
    vm_s, proc_s, total_s = samples[len(samples) // 2]
    table = f"start-up of the hello guest (median of {ROUNDS} runs)"
    record(table, "VM built -> boot-timer write", f"{vm_s * 1e3:7.1f} ms")
    record(table, "hyperpy import -> boot-timer write", f"{proc_s * 1e3:7.1f} ms")
    record(table, "whole `hyperpy run` process", f"{total_s * 1e3:7.1f} ms")
