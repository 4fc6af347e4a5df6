"""Debian's 6.12 kernel as G on hyperpy inside H: Linux's own drivers against hyperpy's devices.

* ``usage``: the seed's command line (``--cpus 1 --memory size=512M --disk path=IMG,iommu=on
  ...``) with net, rng and console behind the virtio-iommu, plus a second disk that is not:
  G finds the virtio-iommu (1af4:1057) and one IOMMU group per endpoint, and uses every device
  through IOVAs: a dd pattern and an ext4 written by G (checked in H: the image holds the pattern,
  ``e2fsck -fn`` is clean), ping and an 8 MiB transfer to H over the tap, /dev/hwrng, /dev/hvc0
  both ways; MSI-X vectors that fired.
* ``smp2``: 2 vCPUs, no IOMMU, guest RAM on huge pages in H (``hugepages=on``), huge pages in G
  (``hugepagesz=2M hugepages=N``), the same device checks, then ``reboot -f`` (hyperpy boots G
  again, as cloud-hypervisor does) and an ACPI power-off that ends hyperpy with status 0.
"""

from __future__ import annotations

import hashlib
import re

import pytest

import guest as gm

VIRTIO = {"1af4:1042": "blk", "1af4:1041": "net", "1af4:1044": "rng", "1af4:1043": "console",
          "1af4:1057": "iommu"}
G_MODULES = ["virtio_blk", "virtio_net", "virtio_iommu", "virtio_rng"]

# In G: the device checks every run shares.  /dev/vda is the first disk (ext4 from H on its first
# 64 MiB, a pattern at 128 MiB), eth0 talks to H's tap at 192.168.77.1, H listens on 5001.
G_DEVICES = r"""
check blk-present waitfor test -b /dev/vda
check net-present waitfor ip link show eth0
echo "HPMAC $(cat /sys/class/net/eth0/address)"
check rng-present waitfor grep -q virtio /sys/class/misc/hw_random/rng_current
for b in /sys/block/vd*; do
    fact "disk-$(cat $b/serial)" "$(basename $(readlink -f $b/device/..))"
done
dd if=/dev/urandom of=/tmp/pat bs=64k count=32 2>/dev/null
fact pattern-sha "$(sha256sum /tmp/pat | cut -d' ' -f1)"
check blk-write dd if=/tmp/pat of=/dev/vda bs=64k seek=2048 conv=fsync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=64k skip=2048 count=32 2>/dev/null
check blk-pattern cmp /tmp/pat /tmp/back
check ext4-mount mount -t ext4 /dev/vda /mnt
echo hyperpy-nested-ext4 > /mnt/hello
dd if=/tmp/pat of=/mnt/big bs=64k 2>/dev/null
check ext4-sync sync
check ext4-umount umount /mnt
check ext4-remount mount -t ext4 -o ro /dev/vda /mnt
check ext4-read cmp /tmp/pat /mnt/big
umount /mnt
ip addr add 192.168.77.2/24 dev eth0
ip link set eth0 up
check ping waitfor ping -c 1 -W 2 192.168.77.1
dd if=/dev/urandom of=/tmp/bulk bs=64k count=128 2>/dev/null
fact bulk-sha "$(sha256sum /tmp/bulk | cut -d' ' -f1)"
check bulk-send nc 192.168.77.1 5001 < /tmp/bulk
check hwrng dd if=/dev/hwrng of=/tmp/rng bs=64 count=16
fact hwrng-bytes "$(wc -c < /tmp/rng)"
fact hwrng-distinct "$(od -An -tx1 -v /tmp/rng | tr ' ' '\n' | grep . | sort -u | wc -l)"
fact rng "$(cat /sys/class/misc/hw_random/rng_current)"
check hvc-out sh -c 'echo "hvc-from-guest-$(cat /proc/sys/kernel/random/boot_id)" > /dev/hvc0'
fact boot-id "$(cat /proc/sys/kernel/random/boot_id)"
stty -F /dev/hvc0 -echo 2>/dev/null
echo HVC-WAIT
read -t 60 line < /dev/hvc0
fact hvc-in "$line"
"""

# In H: make the disk (ext4 on the first 64 MiB), a fifo for the console's input, a TCP sink.
H_PRE = r"""
truncate -s 256M "$D/disk.img"
mkfs.ext4 -q -F -L hyperpy "$D/disk.img" 64M
truncate -s 16M "$D/disk2.img"
mkfifo "$D/in"; exec 7<>"$D/in"
python3 -c '
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1); s.settimeout(600)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b); n += len(b)
print(h.hexdigest(), n, flush=True)
' > "$D/sink.txt" 2>&1 &
"""
# While G runs: answer its console read, then ping G from H.
H_DURING = r"""
wait_serial HVC-WAIT 300 && echo "hvc-from-host-42" > "$D/in"
"""
H_POST = r"""
echo "=== sink"; cat "$D/sink.txt"
echo "=== e2fsck"; e2fsck -fn "$D/disk.img" 2>&1; echo "rc=$?"
echo "=== ext4-hello"; debugfs -R "cat /hello" "$D/disk.img" 2>/dev/null
echo "=== disk-pattern"; dd if="$D/disk.img" bs=64k skip=2048 count=32 2>/dev/null | sha256sum | cut -d' ' -f1
"""


def _usage_run() -> gm.GuestRun:
    return gm.GuestRun(
        "usage",
        ["--cpus", "1", "--memory", "size=512M",
         "--disk", "path=$D/disk.img,iommu=on,id=main",
         "--disk", "path=$D/disk2.img,id=plain",
         "--net", "tap=hpt0,ip=192.168.77.1,mask=255.255.255.0,iommu=on",
         "--rng", "src=/dev/urandom,iommu=on",
         "--console", "tty,iommu=on"],
        G_DEVICES, G_MODULES, pre=H_PRE, during=H_DURING, post=H_POST, stdin='"$D/in"')


@pytest.fixture(scope="module")
def usage(h, kit, nested_dir):
    return gm.run(h, kit, _usage_run(), nested_dir)


def _ok(o: gm.Outcome, *names: str) -> None:
    assert "HPDONE" in o.serial, o.explain()
    for n in names:
        assert o.checks.get(n), (n, o.explain())
    assert not o.failed(), (o.failed(), o.explain())


def test_usage_guest_finds_the_iommu_and_one_group_per_endpoint(usage):
    _ok(usage)
    pci = usage.pci()
    kinds = {}
    for d in pci:
        kinds.setdefault(VIRTIO.get(d["id"], d["id"]), []).append(d)
    assert len(kinds.get("iommu", [])) == 1, pci
    groups = usage.groups()
    # Every endpoint with iommu=on (main disk, net, rng, console) has a group of its own holding
    # exactly its BDF; the second disk (no iommu=on) and the IOMMU itself are in none.
    main, plain = usage.facts["disk-main"], usage.facts["disk-plain"]
    endpoints = [main] + [d["bdf"] for k in ("net", "rng", "console") for d in kinds[k]]
    assert len(endpoints) == 4, pci
    by_bdf = {d["bdf"]: d for d in pci}
    for bdf in endpoints:
        g = by_bdf[bdf]["group"]
        assert g != "-", (bdf, pci)
        assert groups[g]["devices"] == [bdf], groups
    assert by_bdf[plain]["group"] == "-", pci
    assert by_bdf[kinds["iommu"][0]["bdf"]]["group"] == "-", pci
    assert len(groups) == 4, groups
    assert all(g["type"].startswith("DMA") for g in groups.values()), groups


def test_usage_virtio_blk_pattern_and_ext4(usage):
    _ok(usage, "blk-write", "blk-pattern", "ext4-mount", "ext4-sync", "ext4-remount", "ext4-read")
    s = usage.sections
    assert s["disk-pattern"].strip() == usage.facts["pattern-sha"], s["disk-pattern"]
    assert "rc=0" in s["e2fsck"], s["e2fsck"]
    assert s["ext4-hello"].strip() == "hyperpy-nested-ext4"


def test_usage_virtio_net_ping_and_bulk(usage):
    _ok(usage, "ping", "bulk-send")
    sha, n = usage.sections["sink"].split()
    assert sha == usage.facts["bulk-sha"] and int(n) == 8 << 20


def test_usage_net_empty_tap_and_mac_are_picked(usage):
    # `--net tap=,mac=`: hyperpy created a tap with a name of its own and gave G a locally
    # administered unicast MAC.
    log = usage.sections["vmm-log"]
    m = re.search(r"tap (\S+)", log)
    assert m, log[-3000:]
    mac = re.search(r"HPMAC (\S+)", usage.serial)
    assert mac, usage.serial[-2000:]
    first = int(mac.group(1).split(":")[0], 16)
    assert first & 0x02 and not first & 0x01, mac.group(1)


def test_usage_virtio_rng(usage):
    _ok(usage, "hwrng")
    assert usage.facts["rng"].startswith("virtio_rng")
    assert int(usage.facts["hwrng-bytes"]) == 1024
    assert int(usage.facts["hwrng-distinct"]) > 200


def test_usage_virtio_console_both_ways(usage):
    _ok(usage, "hvc-out")
    assert f"hvc-from-guest-{usage.facts['boot-id']}" in usage.sections["vmm-out"]
    assert usage.facts["hvc-in"] == "hvc-from-host-42"


def test_usage_msix_vectors_fire_behind_the_iommu(usage):
    _ok(usage)
    irqs = re.findall(r"HPIRQ\s+\d+:\s+(\d+)\s+PCI-MSIX-(\S+)\s+\d+-edge\s+(\S+)", usage.serial)
    fired = {bdf for count, bdf, name in irqs if int(count) > 0 and "config" not in name}
    assert usage.facts["disk-main"] in fired, irqs


def test_usage_counters_show_iommu_traffic(usage):
    import json
    c = json.loads(usage.sections["counters"])
    iommu = next(v for k, v in c.items() if k.startswith("iommu"))
    assert iommu["maps"] > 100 and iommu["unmaps"] > 0, iommu
    assert c["blk0"]["write_bytes"] >= 2 << 20 and c["net0"]["tx_bytes"] >= 8 << 20, c
