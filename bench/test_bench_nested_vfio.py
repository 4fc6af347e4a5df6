"""4 KiB versus 2 MiB nested-VFIO mapping on real VFIO: hyperpy vs QEMU in one L1 host.

The nested tier's L1 host H (tests/nested/l1host.py) has a QEMU-emulated NVMe bound to its
vfio-pci.  G (Debian's 6.12 kernel, busybox initramfs) gets it with ``iommu=on`` behind the
VMM's virtio-iommu, binds it to its own vfio-pci and, as an L2 VMM's VFIO does at L2 boot, maps
"L2 RAM" of N MiB with one ``VFIO_IOMMU_MAP_DMA`` (tests/linux/vfio_map.c), then unmaps it.  G's
vfio_iommu_type1 pins the buffer and sends the VMM one virtio-iommu MAP per physically
contiguous run, which the VMM turns into host ``VFIO_IOMMU_MAP_DMA`` calls on H's real VFIO.

Buffers (per N): ``4k`` (anonymous 4 KiB pages in a fresh G: long physical runs), ``4kfrag``
(the same after G fragmented its free memory: one run per page), ``huge`` (hugetlbfs, 2 MiB).
VMMs, one G boot each: hyperpy with batching on and off, and QEMU 7.2 ``-M q35 -device
virtio-iommu-pci -device vfio-pci`` as the peer, for each of H's backings of G's RAM.

Per buffer, H samples around the map (G pauses before and after it): host map/unmap calls of
any VMM (a kprobe on ``vfio_iommu_type1_ioctl`` with a hist trigger keyed by the ioctl), the
VMM's CPU time, and for hyperpy its ``vm.counters`` (MAP requests, requests per notification,
peak host entries, refusals).  G reports its own map/unmap wall time and the buffer's runs.

Everything runs at TCG speed: absolute times are not hardware times; the counts (requests, host
calls, entries) and the ratios between VMMs in the same H are what carry over.  Figures only,
never gated on a time.  CI runs N=32 with H's 2 MiB backing; the full matrix is
``HYPERPY_BENCH_NESTED_VFIO_MIB=64,256,1024 HYPERPY_BENCH_NESTED_VFIO_BACKING=4k,huge``, and
``HYPERPY_BENCH_NESTED_VFIO_JSON=path`` keeps every row (docs/benchmarks.md's tables and plot).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from benchutil import nested_vfio_guest_mb, nested_vfio_sizes, record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "nested"))

import guest as gm  # noqa: E402
import nested_vfio as nv  # noqa: E402

from hyperpy._fast.vfio import IOCTL_MAP_DMA, IOCTL_UNMAP_DMA  # noqa: E402

TABLE = "nested VFIO: G maps N MiB with one VFIO_IOMMU_MAP_DMA through the virtio-iommu (real VFIO in H)"
SIZES = nested_vfio_sizes()
BACKINGS = os.environ.get("HYPERPY_BENCH_NESTED_VFIO_BACKING", "huge").split(",")
MODES = ("4k", "4kfrag", "huge")
PAUSE = 10            # G's pause before and after each map: H's samples take seconds at TCG speed
NVME_CLASS = "0x010802"

G_SCRIPT = r"""
BDF=
for d in /sys/bus/pci/devices/*; do [ "$(cat $d/class)" = @CLASS@ ] && BDF=${d##*/}; done
check nvme-found [ -n "$BDF" ]
waitfor test -e /sys/bus/pci/devices/$BDF/iommu_group
@BIND@
for mib in @SIZES@; do
    for mode in @MODES@; do
        echo "NV ready $mode-$mib"; sleep @PAUSE@
        /vfio_map $GROUP $mib $mode /mnt/huge
        echo "VFIORC $mode-$mib $? faults $(dmesg | grep -c 'page fault from EP')"
        echo "NV end $mode-$mib"; sleep @PAUSE@
    done
done
"""

# H: the kprobe that counts every VMM's host map calls, set once per H boot.  It stays an int3
# (no jump optimisation): every change to H's kernel text is a chance for the stale-int3 race of
# L0's multi-threaded TCG (docs/testing.md), and the optimiser would patch again later.
H_PRE = r"""
T=/sys/kernel/tracing
mountpoint -q $T || mount -t tracefs tracefs $T
if [ ! -d $T/events/kprobes/hpvfio ]; then
    echo 0 > /proc/sys/debug/kprobes-optimization
    echo 'p:hpvfio vfio_iommu_type1_ioctl cmd=%si:u32' >> $T/kprobe_events
    echo 'hist:keys=cmd:vals=hitcount' > $T/events/kprobes/hpvfio/trigger
    echo 1 > $T/events/kprobes/hpvfio/enable
fi
"""

H_DURING = r"""
snap() {
    echo "=== snap-$1"
    echo "cpu $(cut -d' ' -f14,15 /proc/$VMM/stat)"
    echo "hist $(grep -o '{ cmd: *[0-9]* } hitcount: *[0-9]*' $T/events/kprobes/hpvfio/hist | tr -s ' ' | tr '\n' ';')"
    [ -S "$D/api.sock" ] && echo "counters $(counters)"
}
for tag in @TAGS@; do
    for step in ready end; do
        wait_serial "NV $step $tag" @WAIT@ || break 2
        snap $step-$tag
    done
done
"""


def _tags() -> list[str]:
    return [f"{m}-{n}" for n in SIZES for m in MODES]


def guest_run(vmm: str, backing: str, batching: str, bdf: str, helper: Path) -> gm.GuestRun:
    g_mb = nested_vfio_guest_mb()
    script = (G_SCRIPT.replace("@BIND@", nv.G_BIND_VFIO.strip())
              .replace("@CLASS@", NVME_CLASS).replace("@PAUSE@", str(PAUSE))
              .replace("@SIZES@", " ".join(map(str, SIZES))).replace("@MODES@", " ".join(MODES)))
    wait = 600 + 2 * max(SIZES)            # the slowest map (1 GiB fragmented) at TCG speed
    during = (H_DURING.replace("@TAGS@", " ".join(_tags())).replace("@WAIT@", str(wait)))
    if vmm == "hyperpy":
        mem = f"size={g_mb}M" + (",hugepages=on" if backing == "huge" else "")
        dev = f"path=/sys/bus/pci/devices/{bdf},iommu=on" + (",batching=off" if batching == "off" else "")
        args = ["--cpus", "boot=1", "--memory", mem, "--device", dev]
        name = f"nv-hyperpy-{backing}-b{batching}"
    else:
        args = ["-M", "q35", "-cpu", "host", "-smp", "1", "-m", f"{g_mb}M",
                "-device", "virtio-iommu-pci", "-device", f"vfio-pci,host={bdf}"]
        if backing == "huge":
            args += ["-object", f"memory-backend-file,id=ram,size={g_mb}M,mem-path=/dev/hugepages,"
                     "share=on,prealloc=on", "-machine", "memory-backend=ram"]
        name = f"nv-qemu-{backing}"
    return gm.GuestRun(name, args, script, list(nv.MODULES), files={"/vfio_map": helper},
                       cmdline=f"hugepagesz=2M hugepages={max(SIZES) // 2 + 8}", pre=H_PRE,
                       during=during, vmm=vmm, timeout=wait * len(_tags()) // 2 + 900)


def _snap(text: str) -> dict:
    out: dict = {"cpu_ticks": 0, "map_calls": 0, "unmap_calls": 0, "counters": {}}
    for line in text.splitlines():
        if line.startswith("cpu "):
            out["cpu_ticks"] = sum(int(x) for x in line.split()[1:])
        elif line.startswith("hist "):
            for cmd, hits in re.findall(r"cmd: (\d+) \} hitcount: (\d+)", line):
                if int(cmd) == IOCTL_MAP_DMA:
                    out["map_calls"] = int(hits)
                elif int(cmd) == IOCTL_UNMAP_DMA:
                    out["unmap_calls"] = int(hits)
        elif line.startswith("counters "):
            out["counters"] = json.loads(line[len("counters "):] or "{}")
    return out


def _device(counters: dict, prefix: str) -> dict:
    return next((v for k, v in counters.items() if k.startswith(prefix)), {})


def rows_of(o: gm.Outcome, vmm: str, backing: str, batching: str) -> list[dict]:
    rows = []
    for tag in _tags():
        mode, mib = tag.rsplit("-", 1)
        m = re.search(rf"VFIOMAP mode {mode} mib {mib} map_us (\d+) unmap_us (\d+) unmapped (\d+) "
                      rf"rc 0 runs (\d+)", o.serial)
        rc = re.search(rf"VFIORC {tag} (\d+) faults (\d+)", o.serial)
        a, b = o.sections.get(f"snap-ready-{tag}"), o.sections.get(f"snap-end-{tag}")
        row = {"vmm": vmm, "backing": backing, "batching": batching, "mode": mode, "mib": int(mib),
               "ok": bool(m and rc and rc.group(1) == "0" and a and b)}
        if m:
            row.update(map_ms=int(m.group(1)) / 1000, unmap_ms=int(m.group(2)) / 1000,
                       runs=int(m.group(4)))
        if rc:
            row["g_faults"] = int(rc.group(2))
        if a and b:
            s0, s1 = _snap(a), _snap(b)
            row.update(host_map_calls=s1["map_calls"] - s0["map_calls"],
                       host_unmap_calls=s1["unmap_calls"] - s0["unmap_calls"],
                       vmm_cpu_s=(s1["cpu_ticks"] - s0["cpu_ticks"]) / os.sysconf("SC_CLK_TCK"))
            i0, i1 = _device(s0["counters"], "iommu"), _device(s1["counters"], "iommu")
            v0, v1 = _device(s0["counters"], "vfio"), _device(s1["counters"], "vfio")
            if v1:
                # Both samples bracket the map only if the kprobe and hyperpy agree on its calls.
                own = v1["map_calls"] - v0.get("map_calls", 0)
                row["ok"] = row["ok"] and own == row["host_map_calls"]
            if i1:
                d = {k: i1[k] - i0.get(k, 0) for k in i1}
                row.update(maps=d["maps"], unmaps=d["unmaps"], kicks=d["kicks"],
                           refused=d["host_refused_maps"],
                           kick_hist={k[len("kicks_with_"):]: n for k, n in d.items()
                                      if k.startswith("kicks_with_") and n},
                           peak_entries=v1.get("peak_entries"),
                           entry_limit=v1.get("dma_entry_limit"))
        rows.append(row)
    return rows


def _fmt(r: dict) -> str:
    if "map_ms" not in r:
        return "no result"
    s = (f"map {r['map_ms']:8.1f} ms  unmap {r['unmap_ms']:7.1f} ms  runs {r['runs']:6d}  "
         f"host map/unmap calls {r.get('host_map_calls', '?')}/{r.get('host_unmap_calls', '?')}  "
         f"cpu {r.get('vmm_cpu_s', 0):.2f} s")
    if "maps" in r:
        hist = " ".join(f"{k}:{n}" for k, n in r["kick_hist"].items())
        s += (f"  MAPs {r['maps']}  UNMAPs {r['unmaps']}  per kick [{hist}]  "
              f"peak entries {r['peak_entries']}/{r['entry_limit']}  refused {r['refused']}")
    if r.get("g_faults"):
        s += f"  G faults {r['g_faults']}"
    return s


@pytest.fixture(scope="module")
def helper(nested_host):
    _, d, _ = nested_host
    return nv.build_helper(d)


def test_nested_vfio_map_4k_vs_2m_hyperpy_vs_qemu(nested_host, helper):
    kit, d, h = nested_host
    bdf = h.facts["nvme"][0][0]
    rows: list[dict] = []
    for backing in BACKINGS:
        runs = [("hyperpy", "on"), ("hyperpy", "off"), ("qemu", "-")]
        for vmm, batching in runs:
            o = gm.run(h, kit, guest_run(vmm, backing, batching, bdf, helper), d)
            got = rows_of(o, vmm, backing, batching)
            assert o.checks.get("g-vfio-bound") and all(r["ok"] for r in got), o.explain()[-6000:]
            rows += got
    for r in rows:
        label = f"{r['vmm']:7s} H:{r['backing']:4s} batch:{r['batching']:3s} {r['mode']:6s} {r['mib']:5d} MiB"
        record(TABLE, label, _fmt(r))
    by = {(r["vmm"], r["backing"], r["batching"], r["mode"], r["mib"]): r for r in rows}
    for backing in BACKINGS:
        for mib in SIZES:
            hp, q = by[("hyperpy", backing, "on", "4kfrag", mib)], by[("qemu", backing, "-", "4kfrag", mib)]
            hh = by[("hyperpy", backing, "on", "huge", mib)]
            record(TABLE, f"H:{backing} {mib} MiB 4kfrag/huge (hyperpy)",
                   f"host map calls {hp['host_map_calls'] / max(1, hh['host_map_calls']):.0f}x, "
                   f"G map time {hp['map_ms'] / max(1e-3, hh['map_ms']):.1f}x")
            per = [(x["map_ms"] / max(1, x["runs"])) for x in (hp, q)]
            record(TABLE, f"H:{backing} {mib} MiB 4kfrag hyperpy/QEMU",
                   f"G map time per MAP {per[0] / per[1]:.2f}x, host map calls "
                   f"{hp['host_map_calls']}/{q['host_map_calls']}")
    out = os.environ.get("HYPERPY_BENCH_NESTED_VFIO_JSON")
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
    (d / "nested-vfio.json").write_text(json.dumps(rows, indent=1))
