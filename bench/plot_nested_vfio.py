"""Plot bench/test_bench_nested_vfio.py's rows (HYPERPY_BENCH_NESTED_VFIO_JSON) for the docs.

    python bench/plot_nested_vfio.py rows.json docs/benchmarks-nested-vfio.png

Needs matplotlib (not a dependency of hyperpy or its tests).  Left: host VFIO map calls per
buffer; right: G's map time per MAP request, hyperpy (batching on) next to QEMU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["4k", "4kfrag", "huge"]
    runs = [("hyperpy", "on"), ("hyperpy", "off"), ("qemu", "-")]
    sizes = sorted({r["mib"] for r in rows})
    backings = sorted({r["backing"] for r in rows})
    fig, (calls, per) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / (len(runs) * len(sizes) * len(backings))
    k = 0
    for vmm, batching in runs:
        for mib in sizes:
            for backing in backings:
                by = {r["mode"]: r for r in rows if (r["vmm"], r["batching"], r["mib"], r["backing"])
                      == (vmm, batching, mib, backing)}
                if not by:
                    continue
                label = f"{vmm}{'' if vmm == 'qemu' else ' batching ' + batching}, {mib} MiB, H {backing}"
                xs = [i + k * width for i in range(len(modes))]
                calls.bar(xs, [by[m]["host_map_calls"] for m in modes], width, label=label)
                per.bar(xs, [by[m]["map_ms"] / max(1, by[m]["runs"]) for m in modes], width, label=label)
                k += 1
    for ax, title in ((calls, "host VFIO_IOMMU_MAP_DMA calls"), (per, "G's map time per MAP request (ms, TCG)")):
        ax.set_xticks([i + (k - 1) * width / 2 for i in range(len(modes))])
        ax.set_xticklabels(["4 KiB fresh", "4 KiB fragmented", "2 MiB hugetlbfs"])
        ax.set_title(title, fontsize=10)
    calls.set_yscale("log")
    per.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
