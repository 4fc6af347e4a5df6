"""Benchmark helpers: build guests, collect figures, print ratio tables at the end of the run.

Benchmarks never fail on a time: they assert only that the work was done (e.g. the guest made
the exits it was asked to).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from benchutil import RESULTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def guests(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("hyperpy_bench_guest_build",
                                                  ROOT / "tests" / "guests" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_all(tmp_path_factory.mktemp("guests"))


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    for table, rows in RESULTS.items():
        tr.write_sep("=", table)
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            tr.write_line(f"  {label:<{width}}  {value}")
