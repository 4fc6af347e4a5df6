"""Nested-VFIO boot: 4 KiB versus 2 MiB mappings through the virtio-iommu to a VFIO container.

The `iommu_map` guest plays L1's VFIO: it attaches a (SIMULATED) VFIO endpoint to a domain and
maps N MiB of "L2 RAM" with one MAP per physically contiguous run -- 4 KiB runs in a scattered
page order, 4 KiB runs in order, or 2 MiB runs -- then writes the boot-timer port.  The host side
is the simulated vfio_iommu_type1 container (this machine has no /dev/vfio): every host map call
is what a real `VFIO_IOMMU_MAP_DMA` would be, with the kernel's entry limit (65535).

Matrix: guest run size x host backing (4 KiB pages / hugepages) x N x batching on/off.
`HYPERPY_BENCH_IOMMU_MIB` picks N (default "64" for CI; the docs table used "64,256,1024").
`HYPERPY_BENCH_WRITE_DOCS=1` rewrites docs/benchmarks.md (and a PNG plot if matplotlib is there).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from benchutil import record

ROOT = Path(__file__).resolve().parents[1]
MIBS = [int(x) for x in os.environ.get("HYPERPY_BENCH_IOMMU_MIB", "64").split(",")]
ENDPOINT_SLOT = 2
HUGEPAGES = "/proc/sys/vm/nr_hugepages"
DMA_ENTRY_LIMIT = 65535


def _run(guest: Path, mode: str, mib: int, hugepages: bool, batching: bool) -> dict:
    from hyperpy.config import build_vm_config
    from hyperpy.vmm import ExitReason, build_vm

    size = mib + 128
    memory = f"size={size}M" + (",hugepages=on" if hugepages else "")
    cfg = build_vm_config(
        memory=memory, kernel=str(guest), serial="off",
        cmdline=f"ep={ENDPOINT_SLOT << 3:#x} mode={mode} mib={mib} timeout=600000",
        devices=[f"path=sim:l2,iommu=on,pci_device_id={ENDPOINT_SLOT},batching={'on' if batching else 'off'}"])
    u0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    vm = build_vm(cfg)
    result = vm.run()
    user = resource.getrusage(resource.RUSAGE_SELF).ru_utime - u0
    assert result.reason is ExitReason.RESET, result
    assert vm.stats.boot_time is not None, "the guest never reached the boot timer"
    dev = vm.vfio_devices[0]
    c = dev.container.counters()
    row = {
        "mode": mode, "mib": mib, "backing": "2M hugepages" if hugepages else "4K pages",
        "batching": batching, "boot_s": vm.stats.boot_time.wall_s,
        "requests": vm.iommu_core.requests, "map_calls": c["map_calls"],
        "peak_entries": c["peak_entries"], "map_errors": dev.mapper.map_errors,
        "vmm_user_s": user,
    }
    vm.close()
    return row


def _hugepages_available(pages: int) -> bool:
    """Make ``pages`` free 2 MiB huge pages available (root only)."""
    from hyperpy.memory import free_hugepages

    free = free_hugepages(2 << 20)
    if free >= pages:
        return True
    if os.geteuid() != 0:
        return False
    with open(HUGEPAGES) as f:
        have = int(f.read())
    with open(HUGEPAGES, "w") as f:
        f.write(str(have + pages - free))
    return free_hugepages(2 << 20) >= pages


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is missing")
def test_nested_vfio_boot_4k_vs_2m(benchmark, guests):
    guest = guests["iommu_map"]
    with open(HUGEPAGES) as f:
        old_hp = int(f.read())
    rows: list[dict] = []

    def all_runs():
        try:
            for mib in MIBS:
                huge_ok = _hugepages_available((mib + 128) // 2)
                for hugepages in (False, True):
                    if hugepages and not huge_ok:
                        continue
                    for mode in ("scatter", "contig", "huge"):
                        for batching in (False, True):
                            rows.append(_run(guest, mode, mib, hugepages, batching))
        finally:
            if os.geteuid() == 0:
                with open(HUGEPAGES, "w") as f:
                    f.write(str(old_hp))

    benchmark.pedantic(all_runs, rounds=1, iterations=1)
    table = "nested-VFIO boot through the virtio-iommu (host: SIMULATED vfio_iommu_type1 container)"
    for r in rows:
        record(table, f"{r['mib']:5d} MiB {r['mode']:7s} {r['backing']:12s} batching {'on ' if r['batching'] else 'off'}",
               f"boot {r['boot_s'] * 1e3:9.1f} ms  requests {r['requests']:7d}  map calls {r['map_calls']:7d}  "
               f"peak entries {r['peak_entries']:6d}/{DMA_ENTRY_LIMIT}  errors {r['map_errors']}  VMM user CPU {r['vmm_user_s']:.2f} s")
    # The work was done (never a time): each run made its requests, and batching never made more
    # host calls than requests.
    for r in rows:
        assert r["requests"] >= (r["mib"] << 20) // (2 << 20)
        assert r["map_calls"] <= r["requests"]
    by = {(r["mib"], r["mode"], r["backing"], r["batching"]): r for r in rows}
    for mib in MIBS:
        s, h = by[(mib, "scatter", "4K pages", False)], by[(mib, "huge", "4K pages", False)]
        record(table, f"{mib:5d} MiB ratio", f"4K scattered / 2M host map calls: {s['map_calls'] / max(h['map_calls'], 1):.0f}x "
               f"(goal >= 50x); boot time {s['boot_s'] / h['boot_s']:.0f}x")
    if os.environ.get("HYPERPY_BENCH_WRITE_DOCS") == "1":
        write_docs(rows)


def write_docs(rows: list[dict]) -> None:
    lines = [
        "## Nested-VFIO boot: 4 KiB versus 2 MiB mappings",
        "",
        "`bench/test_bench_iommu_boot.py`. The `iommu_map` guest acts as L1's VFIO: it maps N MiB of",
        "L2 RAM through the virtio-iommu, one MAP per physically contiguous run (4 KiB runs in a",
        "scattered page order, 4 KiB runs in order, or 2 MiB runs), then writes the boot-timer port.",
        "",
        "**Host backend: SIMULATED.** This machine has no `/dev/vfio`; every host map call below went",
        "to hyperpy's simulated `vfio_iommu_type1` (v2) container, which has the kernel's semantics",
        "and its 65535-entry `dma_entry_limit`, but pins nothing. The virtio-iommu, the guest and",
        "KVM are real.",
        "",
        "| L2 RAM | guest runs | host backing | batching | boot-to-ready | virtio-iommu requests | host map calls | peak host entries (limit 65535) | guest MAP errors | VMM user CPU |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"scatter": "4 KiB scattered", "contig": "4 KiB contiguous", "huge": "2 MiB"}
    for r in rows:
        lines.append(f"| {r['mib']} MiB | {names[r['mode']]} | {r['backing']} | {'on' if r['batching'] else 'off'} | "
                     f"{r['boot_s'] * 1e3:.0f} ms | {r['requests']} | {r['map_calls']} | {r['peak_entries']} | "
                     f"{r['map_errors']} | {r['vmm_user_s']:.2f} s |")
    lines += ["", "Ratios (4 KiB pages host backing, batching off):", ""]
    by = {(r["mib"], r["mode"], r["backing"], r["batching"]): r for r in rows}
    for mib in sorted({r["mib"] for r in rows}):
        s, h = by[(mib, "scatter", "4K pages", False)], by[(mib, "huge", "4K pages", False)]
        c0, c1 = by[(mib, "contig", "4K pages", False)], by[(mib, "contig", "4K pages", True)]
        lines.append(f"- {mib} MiB: 4 KiB scattered needs {s['map_calls'] / max(h['map_calls'], 1):.0f}x the host map calls "
                     f"of 2 MiB runs and boots {s['boot_s'] / h['boot_s']:.0f}x slower; batching turns "
                     f"{c0['map_calls']} contiguous 4 KiB map calls into {c1['map_calls']}.")
    out = ROOT / "docs" / "benchmarks.md"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for mode in ("scatter", "contig", "huge"):
            for batching in (False, True):
                pts = sorted((r["mib"], r["map_calls"]) for r in rows
                             if r["mode"] == mode and r["batching"] == batching and r["backing"] == "4K pages")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"{names[mode]}, batching {'on' if batching else 'off'}")
        ax.axhline(DMA_ENTRY_LIMIT, color="red", linestyle="--", label="dma_entry_limit")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L2 RAM mapped (MiB)")
        ax.set_ylabel("host VFIO map calls (simulated)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "benchmarks-iommu.png", dpi=100)
        lines += ["", "![host map calls](benchmarks-iommu.png)"]
    except ImportError:
        lines += ["", "(Install matplotlib for the plot.)"]
    # Keep what the file says before this section (the other benchmarks' figures).
    head = ""
    if out.exists():
        text = out.read_text()
        cut = text.find(lines[0])
        head = text[:cut] if cut >= 0 else text.rstrip("\n") + "\n\n"
    out.write_text(head + "\n".join(lines) + "\n")
