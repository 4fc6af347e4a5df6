"""Figures collected by the benchmarks, printed side by side at the end of the run."""

from __future__ import annotations

from collections import defaultdict

RESULTS: dict[str, list[tuple[str, str]]] = defaultdict(list)


def record(table: str, label: str, value: str) -> None:
    RESULTS[table].append((label, value))
