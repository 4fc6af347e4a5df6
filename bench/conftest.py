"""Benchmark helpers: build guests, collect figures, print ratio tables at the end of the run.

Benchmarks never fail on a time: they assert only that the work was done (e.g. the guest made
the exits it was asked to).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from benchutil import RESULTS, nested_vfio_guest_mb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def guests(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("hyperpy_bench_guest_build",
                                                  ROOT / "tests" / "guests" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_all(tmp_path_factory.mktemp("guests"))


@pytest.fixture(scope="session")
def nested_host(tmp_path_factory):
    """One L1 host (tests/nested/l1host.py) for the nested benchmarks, with one QEMU NVMe to
    pass through and enough huge pages to back G's RAM with them."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "nested"))
    import l1host
    import linuxkit

    if l1host.QEMU is None or l1host.VIRTIOFSD is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but QEMU/virtiofsd are missing for the nested benchmarks")
        pytest.skip("QEMU and virtiofsd are needed for the nested benchmarks")
    kit = linuxkit.ensure_kit()
    d = tmp_path_factory.mktemp("nested-bench")
    g_mb = nested_vfio_guest_mb()
    # H holds G's RAM twice over at most (a huge-page pool for the hugepages=on runs, normal
    # memory for the others) and 2 GiB for itself.
    h = l1host.L1Host(kit, d / "h", nvme=1, mem_mb=max(6144, 2 * g_mb + 2048),
                      hugepages_2m=g_mb // 2 + 16)
    h.start()
    yield kit, d, h
    h.close()


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    for table, rows in RESULTS.items():
        tr.write_sep("=", table)
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            tr.write_line(f"  {label:<{width}}  {value}")
