"""Linux's own virtio drivers against hyperpy's vhost-user back-ends (the ``linux`` tier).

QEMU (q35, TCG, guest RAM in a shared memfd) boots Debian's 6.12 cloud kernel with a busybox
initramfs (tests/linuxkit.py; kit from scripts/build-guest-kit.sh) and plays the vhost-user
front-end; ``hyperpy vhost-user blk`` and ``hyperpy vhost-user net`` serve the virtqueues with the
same device code and Cython engine as hyperpy's built-in devices.  Inside the guest: a pattern
written with dd, synced, read back and compared (the host then checks the image file holds it),
an ext4 file system (made on the host) mounted, written and remounted, a ping across the tap to
the host end (the net back-end, its tap and that address in the test's own network namespace,
tests/netns.py).  Runs: one queue; several queues (two vCPUs, one dd per CPU); EVENT_IDX and
INDIRECT_DESC off; the disk behind a virtio-iommu (iommu_platform=on: IOVAs through the
back-end's IOTLB).  The one-queue run also reads Linux's /dev/hwrng from ``hyperpy vhost-user
rng`` (vhost-user-rng-pci).  Each run asserts the features the driver negotiated, from the back-end's log.

Skips only when QEMU is missing and CI is not set; with CI set a missing piece fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import linuxkit
from vhost_linux import Backend, Guest, blk_device, feature_line, net_device

pytestmark = pytest.mark.linux

MiB = 1 << 20
DISK_SIZE = 48 * MiB
FS_SIZE = 16 * MiB            # ext4 made by the host on the first 16 MiB
PATTERN_AT = 32 * MiB         # the dd pattern lives past the file system
PATTERN_LEN = 1 * MiB


MKFS = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
E2FSCK = shutil.which("e2fsck") or shutil.which("e2fsck", path="/sbin:/usr/sbin")
DEBUGFS = shutil.which("debugfs") or shutil.which("debugfs", path="/sbin:/usr/sbin")


@pytest.fixture
def disk(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(DISK_SIZE)
    if MKFS:
        subprocess.run([MKFS, "-q", "-F", "-L", "hyperpy", str(img), f"{FS_SIZE // 1024}k"],
                       check=True, capture_output=True)
    return img


def _ext4(kit) -> bool:
    """ext4 checks run when the kernel has ext4 built in and the host can make the file system
    (e2fsprogs; scripts/test.sh installs it)."""
    return kit.ext4 == "builtin" and MKFS is not None


def blk_script(seek_blocks: int, ext4: bool, cpus: int = 1) -> str:
    """Guest checks for /dev/vda: dd pattern (from CPU ``cpus-1``), read back, ext4."""
    pin = f"taskset {1 << (cpus - 1)} " if cpus > 1 else ""
    s = f"""
check blk-present test -b /dev/vda
{pin}dd if=/pattern of=/dev/vda bs=64k seek={seek_blocks} conv=fsync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=64k skip={seek_blocks} count={PATTERN_LEN // 65536} 2>/dev/null
check blk-pattern cmp /pattern /tmp/back
"""
    if cpus > 1:   # the other CPU reads elsewhere on the disk, so each queue carries requests
        s += "check blk-read-cpu0 taskset 1 dd if=/dev/vda of=/dev/null bs=64k skip=400 count=64\n"
    if ext4:
        s += """
if mount -t ext4 /dev/vda /mnt; then
  echo HPCHECK ok ext4-mount
  echo hyperpy-ext4-data > /mnt/hello
  dd if=/pattern of=/mnt/big bs=64k 2>/dev/null
  sync
  check ext4-umount umount /mnt
  check ext4-remount mount -t ext4 -o ro /dev/vda /mnt
  check ext4-file grep -q hyperpy-ext4-data /mnt/hello
  check ext4-big cmp /pattern /mnt/big
  umount /mnt
else
  echo HPCHECK fail ext4-mount
fi
"""
    return s


def net_script(subnet: int) -> str:
    return f"""
check net-present ip link show eth0
ip addr add 192.168.{subnet}.2/24 dev eth0
ip link set eth0 up
check net-ping ping -c 3 -W 5 192.168.{subnet}.1
"""


RNG_SCRIPT = """
check rng-read sh -c 'dd if=/dev/hwrng of=/tmp/r bs=64 count=4 2>/dev/null && test $(wc -c < /tmp/r) -eq 256'
"""


def _boot(kit, tmp_path, script: str, modules: list[str], devices: list[str], smp: int = 1):
    pattern = os.urandom(PATTERN_LEN)
    initrd = linuxkit.build_initramfs(kit, script, modules, {"/pattern": pattern},
                                      tmp_path / "initrd.cpio")
    rc, console = Guest(kit.vmlinuz, initrd, smp=smp, devices=devices).run()
    checks = linuxkit.parse_checks(console)
    assert "HPDONE" in console, f"guest did not finish its script (QEMU rc {rc}):\n{console[-3000:]}"
    failed = [k for k, ok in checks.items() if not ok]
    assert not failed, f"guest checks failed: {failed}\n{console[-3000:]}"
    return pattern, checks, console


def _host_checks(disk: Path, pattern: bytes, ext4: bool) -> None:
    with open(disk, "rb") as f:
        f.seek(PATTERN_AT)
        assert f.read(PATTERN_LEN) == pattern, "the image file does not hold the guest's pattern"
    if ext4 and E2FSCK:
        r = subprocess.run([E2FSCK, "-f", "-n", str(disk)], capture_output=True, text=True)
        assert r.returncode == 0, f"e2fsck after the guest's writes:\n{r.stdout}{r.stderr}"
    if ext4 and DEBUGFS:
        out = subprocess.run([DEBUGFS, "-R", "cat /hello", str(disk)], capture_output=True)
        assert out.stdout.strip() == b"hyperpy-ext4-data"


def _features(b: Backend) -> set[str]:
    return set(feature_line(b.log).split())


def _record(request, name: str, backend: Backend) -> None:
    """The negotiated features, shown with -s and kept in the test report's properties."""
    feats = " ".join(sorted(_features(backend)))
    request.node.user_properties.append((f"{name} features", feats))
    print(f"\n{name}: driver negotiated {feats}")


# ---------------------------------------------------------------------------- the runs

RUNS = {
    # name: (vCPUs, blk queues, net queue pairs, extra device properties)
    "1q": (1, 1, 1, []),
    "mq": (2, 2, 2, []),
    "no-event-idx-indirect": (1, 1, 1, ["event_idx=off", "indirect_desc=off"]),
}
GENERATED_TAP = {"no-event-idx-indirect"}   # runs whose back-end gets no --tap: it makes vmtapN


@pytest.mark.parametrize("run", list(RUNS))
def test_linux_drivers_on_hyperpy_backends(kit, disk, tmp_path, run, request, netns):
    smp, blk_q, pairs, props = RUNS[run]
    subnet = 200 + list(RUNS).index(run)
    tap = [] if run in GENERATED_TAP else ["--tap", f"hpvu{os.getpid() % 1000}{list(RUNS).index(run)}"]
    blk = Backend("blk", tmp_path / "blk.sock", ["--disk", f"path={disk},num_queues={blk_q}",
                                                 "--no-iommu"], tmp_path / "blk.log")
    try:
        # The tap and its address live in the test's network namespace; the guest pings that
        # address, so no frame leaves the namespace.
        net = Backend("net", tmp_path / "net.sock",
                      [*tap, "--ip", f"192.168.{subnet}.1", "--mask", "255.255.255.0",
                       "--num-queues", str(2 * pairs), "--no-iommu"], tmp_path / "net.log",
                      netns=netns)
    except AssertionError:
        blk.stop()
        raise
    rng = None
    try:
        devices = (blk_device("blk0", blk.sock, f"num-queues={blk_q}", *props)
                   + net_device("net0", net.sock, "52:54:00:00:77:01", pairs, *props))
        ext4 = _ext4(kit)
        script = blk_script(PATTERN_AT // 65536, ext4, smp) + net_script(subnet)
        modules = ["virtio_blk", "virtio_net"]
        if run == "1q":     # virtio-rng too (vhost-user-rng-pci): Linux's hwrng reads from it
            rng = Backend("rng", tmp_path / "rng.sock", ["--no-iommu"], tmp_path / "rng.log")
            devices += ["-chardev", f"socket,id=rng0,path={rng.sock}",
                        "-device", "vhost-user-rng-pci,chardev=rng0"]
            script += RNG_SCRIPT
            modules.append("virtio_rng")
        pattern, checks, console = _boot(kit, tmp_path, script, modules, devices, smp)
    finally:
        blk.stop()
        net.stop()
        if rng is not None:
            rng.stop()
    if rng is not None:
        assert checks.get("rng-read") and "VERSION_1" in _features(rng)
    assert checks.get("net-ping") and checks.get("blk-pattern")
    if run in GENERATED_TAP:
        assert re.search(r"created tap vmtap\d+ \(from vmtap%d\)", net.log), net.log[-2000:]
    if ext4:
        assert checks.get("ext4-big")
    _host_checks(disk, pattern, ext4)
    fb, fn = _features(blk), _features(net)
    _record(request, f"blk-{run}", blk)
    _record(request, f"net-{run}", net)
    assert {"VERSION_1", "BLK_F_FLUSH", "BLK_F_SEG_MAX"} <= fb, fb
    assert "VERSION_1" in fn, fn
    want_ring = {"EVENT_IDX", "INDIRECT_DESC"}
    if props:
        assert not (want_ring & fb) and not (want_ring & fn), (fb, fn)
    else:
        assert want_ring <= fb and want_ring <= fn, (fb, fn)
    kicks = re.findall(r"kicks served per ring: ([\d ]+)", blk.log)
    assert kicks, blk.log[-2000:]
    per_ring = [int(x) for x in kicks[-1].split()]
    if blk_q > 1:
        assert "BLK_F_MQ" in fb and "NET_F_MQ" in fn, (fb, fn)
        assert all(k > 0 for k in per_ring[:blk_q]), f"blk kicks per ring {per_ring}"
        # Linux asked for both pairs (VQ_PAIRS_SET becomes SET_VRING_ENABLE of rings 2 and 3).
        assert "ring 2 enabled" in net.log and "ring 3 enabled" in net.log
    else:
        assert per_ring[0] > 0


def test_linux_blk_through_virtio_iommu(kit, disk, tmp_path, request):
    """virtio-iommu in front of the disk: the driver's DMA addresses are IOVAs, translated by the
    back-end's IOTLB (misses sent on the back-end channel, updates from QEMU)."""
    blk = Backend("blk", tmp_path / "blk.sock", ["--disk", f"path={disk}"], tmp_path / "blk.log")
    try:
        devices = (["-device", "virtio-iommu-pci"]
                   + blk_device("blk0", blk.sock, "disable-legacy=on", "iommu_platform=on"))
        ext4 = _ext4(kit)
        pattern, checks, console = _boot(kit, tmp_path, blk_script(PATTERN_AT // 65536, ext4),
                                         ["virtio_iommu", "virtio_blk"], devices)
    finally:
        blk.stop()
    _host_checks(disk, pattern, ext4)
    fb = _features(blk)
    _record(request, "blk-iommu", blk)
    assert {"ACCESS_PLATFORM", "VERSION_1"} <= fb, fb
    m = re.findall(r"IOTLB: (\d+) misses, (\d+) updates", blk.log)
    assert m and int(m[-1][0]) > 0 and int(m[-1][1]) > 0, blk.log[-2000:]
    assert "IOVAs through the IOTLB" in blk.log
