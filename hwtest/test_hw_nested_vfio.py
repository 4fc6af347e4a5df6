"""OPT-IN, for hosts with hardware KVM (not run by .ci/run: this project's CI host emulates
guest instructions and cannot boot Linux in useful time).  See docs/hardware-tests.md.

    HYPERPY_HW_KVM=1 pytest hwtest -s

Boots Debian's 6.12 cloud kernel on hyperpy with a virtio-iommu and a virtio-rng behind it
(``--rng iommu=on``).  Inside, the guest (tests/nested_vfio.py) checks
/sys/kernel/iommu_groups, binds the rng function to vfio-pci and maps a 4 KiB-page buffer and
a hugetlbfs buffer with VFIO_IOMMU_MAP_DMA from a static helper.  Between the runs the test
reads hyperpy's counters over the API (``vm.counters``): the virtio-iommu MAP requests each
buffer cost.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import linuxkit  # noqa: E402
import nested_vfio as nv  # noqa: E402

from hyperpy.api import client  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("HYPERPY_HW_KVM") != "1",
                                reason="opt-in hardware-KVM test: set HYPERPY_HW_KVM=1")
MIB = int(os.environ.get("HYPERPY_HW_MIB", "64"))
PAUSE = 3


def _wait_for(path: Path, text: str, proc, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = path.read_text(errors="replace") if path.exists() else ""
        if text in out:
            return out
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} on the console in {timeout} s:\n"
                         + (path.read_text(errors="replace")[-3000:] if path.exists() else ""))


def _iommu_maps(sock: Path) -> int:
    counters = client.call(str(sock), "counters")
    iommu = next(v for k, v in counters.items() if k.startswith("iommu"))
    return iommu["maps"]


@pytest.mark.parametrize("host_backing", ["4k", "hugepages"])
def test_nested_vfio_maps_on_hyperpy(tmp_path, host_backing):
    kit = linuxkit.ensure_kit()
    initrd = nv.build_initramfs(linuxkit, kit, tmp_path)
    sock, console = tmp_path / "api.sock", tmp_path / "console.log"
    memory = "size=1G" + (",hugepages=on" if host_backing == "hugepages" else "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hyperpy", "run", "--api-socket", f"path={sock}",
         "--kernel", str(kit.vmlinux), "--initramfs", str(initrd),
         "--cmdline", nv.cmdline(MIB, PAUSE), "--memory", memory, "--cpus", "boot=2",
         "--rng", "iommu=on", "--serial", f"file={console}", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        maps = {}
        for mode in ("4k", "huge"):
            _wait_for(console, f"NV ready {mode}", proc, 120)
            before = _iommu_maps(sock)
            _wait_for(console, f"NV end {mode}", proc, 300)
            maps[mode] = _iommu_maps(sock) - before
        out = _wait_for(console, "HPDONE", proc, 60)
        client.call(str(sock), "shutdown-vmm")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    checks = linuxkit.parse_checks(out)
    assert all(checks.values()) and checks.get("map_4k") and checks.get("map_huge"), out[-3000:]
    f = nv.parse(out)
    assert f["groups"] >= 1 and f["errors"] == []
    # One MAP per contiguous run: at least one per 2 MiB page; the 4 KiB buffer costs more.
    assert maps["huge"] >= MIB // 2 and maps["4k"] > maps["huge"], maps
    print(f"\nhyperpy nested VFIO ({host_backing} host backing, {MIB} MiB): virtio-iommu MAPs "
          f"4k {maps['4k']} vs huge {maps['huge']} ({maps['4k'] / maps['huge']:.0f}x); "
          f"map time 4k {f['maps']['4k']['map_us']} us vs huge {f['maps']['huge']['map_us']} us")
