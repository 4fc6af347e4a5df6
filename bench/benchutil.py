"""Figures collected by the benchmarks, printed side by side at the end of the run."""

from __future__ import annotations

import os
from collections import defaultdict

RESULTS: dict[str, list[tuple[str, str]]] = defaultdict(list)


def record(table: str, label: str, value: str) -> None:
    RESULTS[table].append((label, value))


def nested_vfio_sizes() -> list[int]:
    """G's buffer sizes (MiB) for bench/test_bench_nested_vfio.py: 32 in CI, the issue's
    64,256,1024 with HYPERPY_BENCH_NESTED_VFIO_MIB=64,256,1024."""
    return [int(x) for x in os.environ.get("HYPERPY_BENCH_NESTED_VFIO_MIB", "32").split(",")]


def nested_vfio_guest_mb() -> int:
    """G's RAM for those sizes: a hugetlbfs pool of the largest buffer, the fragmented 4 KiB
    case's filler (2x) and buffer, and 256 MiB for G itself."""
    return 4 * max(nested_vfio_sizes()) + 256
