"""The nested-VFIO check with real Linux: an L1 Linux guest binds a virtio device that sits
behind a virtio-iommu to vfio-pci and maps a 4 KiB-page buffer and a hugetlbfs buffer with
VFIO_IOMMU_MAP_DMA (tests/linux/vfio_map.c, a static helper), the way a nested VMM maps its
guest's RAM.  Linux's vfio_iommu_type1 then sends one virtio-iommu MAP per physically
contiguous run: the 4 KiB buffer costs up to 512x the requests of the 2 MiB one.

Two runners use this module:

* tests/test_linux_nested_vfio.py (CI): the guest under QEMU TCG with QEMU's virtio-iommu,
  which checks the guest side (modules, IOMMU groups, binding, the helper) with Linux's drivers;
* hwtest/test_hw_nested_vfio.py (opt-in, hardware KVM): the guest on hyperpy, whose
  virtio-iommu counts the MAP requests (read over the API between the two runs).

The guest prints (console):
    NV groups <n>                     entries in /sys/kernel/iommu_groups
    NV device <bdf> group <g>         the virtio device bound to vfio-pci
    NV ready <mode> (waits PAUSE s), NV begin <mode>, VFIOMAP ..., NV end <mode> (waits PAUSE s)
        for each mode, 4k then huge: a host reads counters in the pauses
and HPCHECK lines (tests/linuxkit.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELPER_SRC = HERE / "linux" / "vfio_map.c"
MODULES = ["virtio_iommu", "vfio", "vfio_iommu_type1", "vfio_pci"]
RNG_DEVICE_ID = "0x1044"          # virtio-rng, modern (0x1040 + 4)

# A Linux guest's passed-through PCI function $BDF to its own vfio-pci, ready for the helper:
# sets $GROUP, mounts hugetlbfs on /mnt/huge (the nested tier's G and its benchmark share it).
G_BIND_VFIO = r"""
GROUP=$(basename "$(readlink /sys/bus/pci/devices/$BDF/iommu_group)")
[ -e /sys/bus/pci/devices/$BDF/driver ] && echo $BDF > /sys/bus/pci/devices/$BDF/driver/unbind
echo vfio-pci > /sys/bus/pci/devices/$BDF/driver_override
echo $BDF > /sys/bus/pci/drivers_probe
check g-vfio-bound [ "$(basename "$(readlink /sys/bus/pci/devices/$BDF/driver)")" = vfio-pci ]
check g-vfio-node test -c /dev/vfio/$GROUP
echo 1 > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
mkdir -p /mnt/huge
check g-hugetlbfs mount -t hugetlbfs none /mnt/huge
chmod 755 /vfio_map
"""

GUEST_SCRIPT = r"""
MIB=$(sed -n 's/.*nv_mib=\([0-9]*\).*/\1/p' /proc/cmdline); MIB=${MIB:-64}
PAUSE=$(sed -n 's/.*nv_pause=\([0-9]*\).*/\1/p' /proc/cmdline); PAUSE=${PAUSE:-0}
echo "NV groups $(ls /sys/kernel/iommu_groups | wc -l)"
BDF=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = @RNG@ ]; then BDF=$(basename $d); fi
done
check device [ -n "$BDF" ]
GROUP=$(basename "$(readlink /sys/bus/pci/devices/$BDF/iommu_group)")
echo "NV device $BDF group $GROUP"
check group [ -n "$GROUP" ]
# virtio-pci (built in) holds every virtio function: release it, then let vfio-pci take it.
[ -e /sys/bus/pci/devices/$BDF/driver ] && echo $BDF > /sys/bus/pci/devices/$BDF/driver/unbind
echo vfio-pci > /sys/bus/pci/devices/$BDF/driver_override
echo $BDF > /sys/bus/pci/drivers_probe
check bound [ "$(basename "$(readlink /sys/bus/pci/devices/$BDF/driver)")" = vfio-pci ]
check vfio_node [ -c /dev/vfio/$GROUP ]
echo $((MIB / 2 + 8)) > /proc/sys/vm/nr_hugepages
mkdir -p /mnt/huge
check hugetlbfs mount -t hugetlbfs none /mnt/huge
echo "NV hugepages $(cat /proc/sys/vm/nr_hugepages)"
# x86 virtio-iommu has no interrupt remapping: type1 refuses a container (EPERM) unless told to
# accept that, as every nested-VFIO set-up on virtio-iommu does.
echo 1 > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
chmod 755 /vfio_map
for mode in 4k huge; do
    echo "NV ready $mode"
    sleep $PAUSE
    echo "NV begin $mode"
    check map_$mode /vfio_map $GROUP $MIB $mode /mnt/huge
    echo "NV end $mode"
    sleep $PAUSE
done
""".replace("@RNG@", RNG_DEVICE_ID)


def build_helper(out_dir: Path) -> Path:
    """Compile the static VFIO helper (gcc -static) into out_dir/vfio_map."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build tests/linux/vfio_map.c")
    out = out_dir / "vfio_map"
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(HELPER_SRC)],
                   check=True, capture_output=True)
    return out


def build_initramfs(linuxkit, kit, out_dir: Path) -> Path:
    helper = build_helper(out_dir)
    return linuxkit.build_initramfs(kit, GUEST_SCRIPT, MODULES, {"/vfio_map": helper},
                                    out_dir / "nested-vfio.cpio")


def cmdline(mib: int, pause: int = 0) -> str:
    return f"console=ttyS0 panic=-1 quiet nv_mib={mib} nv_pause={pause}"


_MAP = re.compile(r"VFIOMAP mode (\w+) mib (\d+) map_us (\d+) unmap_us (\d+) unmapped (\d+) rc 0")


def parse(out: str) -> dict:
    """{'groups': n, 'device': bdf, 'group': g, 'maps': {mode: {...}}, 'errors': [...]}"""
    facts: dict = {"maps": {}, "errors": re.findall(r"VFIOMAP error .*", out)}
    m = re.search(r"^NV groups (\d+)", out, re.M)
    facts["groups"] = int(m.group(1)) if m else None
    m = re.search(r"^NV device (\S+) group (\S+)", out, re.M)
    facts["device"], facts["group"] = (m.group(1), m.group(2)) if m else (None, None)
    for mode, mib, map_us, unmap_us, unmapped in _MAP.findall(out):
        facts["maps"][mode] = {"mib": int(mib), "map_us": int(map_us), "unmap_us": int(unmap_us),
                               "unmapped": int(unmapped)}
    return facts
