"""Real Linux drivers on the guest side of nested VFIO: Debian's 6.12 kernel under QEMU TCG
with a virtio-iommu binds a virtio device behind it to vfio-pci and maps a 4 KiB-page and a
hugetlbfs buffer with VFIO_IOMMU_MAP_DMA from the static helper (tests/nested_vfio.py).

This checks, with Linux's own virtio_iommu, vfio, vfio_iommu_type1 and vfio_pci, everything
the opt-in hardware test (hwtest/test_hw_nested_vfio.py) runs inside a hyperpy guest; there,
hyperpy's virtio-iommu serves the MAP requests and counts them.
"""

from __future__ import annotations

import pytest

import linuxkit
import nested_vfio as nv
from vhost_linux import Guest

pytestmark = pytest.mark.linux


def test_linux_vfio_maps_through_a_virtio_iommu(kit, tmp_path):
    mib = 32
    initrd = nv.build_initramfs(linuxkit, kit, tmp_path)
    _, out = Guest(kit.vmlinuz, initrd, mem_mb=512, append=nv.cmdline(mib),
                   devices=["-device", "virtio-iommu-pci",
                            "-device", "virtio-rng-pci,disable-legacy=on,iommu_platform=on"]).run()
    checks = linuxkit.parse_checks(out)
    assert "HPDONE" in out, out[-3000:]
    failed = [k for k, ok in checks.items() if not ok]
    assert not failed, out[-3000:]
    for name in ("device", "group", "bound", "vfio_node", "hugetlbfs", "map_4k", "map_huge"):
        assert checks.get(name), (name, out[-3000:])
    f = nv.parse(out)
    assert f["groups"] and f["groups"] >= 1
    assert f["errors"] == []
    four_k, huge = f["maps"]["4k"], f["maps"]["huge"]
    assert four_k["unmapped"] == huge["unmapped"] == mib << 20
    # One MAP request per 4 KiB run against one per 2 MiB page: the 4 KiB map is slower.
    assert four_k["map_us"] > huge["map_us"], f["maps"]
    print(f"\nnested VFIO under QEMU TCG, {mib} MiB: map 4k {four_k['map_us']} us, "
          f"huge {huge['map_us']} us ({four_k['map_us'] / max(huge['map_us'], 1):.0f}x)")
