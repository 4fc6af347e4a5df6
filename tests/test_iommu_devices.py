"""virtio-iommu on hyperpy: the VIOT, the request battery against the spec, block I/O through
IOVAs, a fault after UNMAP; the same guest on QEMU, compared; and the simulated VFIO endpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testutil import load_module

TESTS = Path(__file__).resolve().parent
expect = load_module("iommu_expect", TESTS / "iommu_expect.py")
vexpect = load_module("virtio_expect", TESTS / "virtio_expect.py")

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.kvm


def hyperpy(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "hyperpy", "run", "--no-reboot", "--memory", "size=256M",
                        *args],
                       capture_output=True, timeout=timeout, cwd=tempfile.gettempdir())
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


@pytest.fixture
def image(tmp_path):
    data = vexpect.blk_image(2048)
    img = tmp_path / "disk.img"
    img.write_bytes(data)
    return img, data


def test_blk_behind_the_virtio_iommu(kvm, guests, image):
    img, before = image
    rc, out, err = hyperpy("--kernel", str(guests["virtio_iommu"]), "--disk", f"path={img},iommu=on", "-v")
    assert rc == 0, err
    facts = expect.parse_iommu(out)
    expect.check_iommu(facts, before, differences={})     # hyperpy follows the spec exactly
    assert facts["viot"] and facts["viot"]["iommus"], facts["viot"]
    # The blk device reached guest memory only through the IOMMU: after UNMAP its next access
    # faulted, the device stopped safely (NEEDS_RESET), and the VMM went on running.
    assert facts["faults"] and facts["faults"][0]["reason"] == expect.FAULT_R_MAPPING
    assert "device needs reset" in err
    vexpect.check_blk_image_after(before, img.read_bytes(), sector=1)


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_same_facts_as_qemu_except_documented_differences(kvm, guests, tmp_path):
    data = vexpect.blk_image(2048)
    h_img, q_img = tmp_path / "h.img", tmp_path / "q.img"
    h_img.write_bytes(data)
    q_img.write_bytes(data)
    rc, out, err = hyperpy("--kernel", str(guests["virtio_iommu"]), "--disk", f"path={h_img},iommu=on")
    assert rc == 0, err
    q = subprocess.run([QEMU, "-M", "q35", "-accel", "tcg", "-nographic", "-no-reboot", "-m", "256",
                        "-net", "none", "-kernel", str(guests["virtio_iommu"]),
                        "-device", "virtio-iommu-pci",
                        "-device", "virtio-blk-pci,disable-legacy=on,iommu_platform=on,drive=d0",
                        "-drive", f"if=none,id=d0,file={q_img},format=raw"],
                       capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
    qout = q.stdout.decode(errors="replace").replace("\r\n", "\n")
    hf, qf = expect.comparable_iommu(expect.parse_iommu(out)), expect.comparable_iommu(expect.parse_iommu(qout))
    # Statuses where QEMU departs from the spec (docs/virtio-iommu.md) and requests QEMU's
    # configuration cannot exercise are set aside; everything else must match.
    skip = set(expect.QEMU_DIFFERENCES) | {k for k, v in qf["status"].items() if v == "skipped"}
    for k in skip:
        hf["status"].pop(k, None)
        qf["status"].pop(k, None)
    assert hf == qf
    assert h_img.read_bytes() == q_img.read_bytes()


def test_simulated_vfio_endpoint_is_labelled(kvm, hyperpy_cli):
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--device", "path=sim:gpu0,iommu=on", "-v")
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "SIMULATION" in err
    assert "virtio-iommu" in err


def test_real_vfio_device_gives_a_clear_error(kvm, hyperpy_cli, tmp_path):
    fake = tmp_path / "0000:00:1f.0"
    fake.mkdir()
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--device", f"path={fake},iommu=on")
    err = p.stderr.decode().strip()
    assert p.returncode == 2, err
    assert len(err.splitlines()) == 1 and "0000:00:1f.0" in err


@pytest.mark.parametrize("batching", ["on", "off"])
def test_host_entry_limit_reaches_the_guest_as_nomem(kvm, guests, batching):
    """Past the (simulated) host dma_entry_limit a MAP fails with NOMEM in the guest's status,
    whether the host call is made at once or when the batch is flushed; never silently."""
    rc, out, err = hyperpy("--kernel", str(guests["iommu_map"]),
                           "--device", f"path=sim:l2,iommu=on,pci_device_id=2,entry_limit=4,batching={batching}",
                           "--cmdline", "ep=0x10 mode=contig mib=8")
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("MAPB done"))
    words = line.split()
    errors, first = int(words[words.index("errors") + 1]), int(words[words.index("first_error") + 1])
    assert errors > 0 and first == expect.S_NOMEM, line
    assert "No space left on device" in err or batching == "off"


def test_host_refusals_are_faults_for_the_guest_and_one_error_line(kvm, guests, caplog):
    """Linux's driver never reads a queued MAP's status: a MAP the host refused is also a fault
    record on the event queue (which the driver logs), counted in vm.counters, and the VMM's log
    says it once, with the fixes, however many MAPs the host refuses."""
    import logging

    from hyperpy.config import build_vm_config
    from hyperpy.vmm import build_vm

    cfg = build_vm_config(cpus="boot=1", memory="size=256M", kernel=str(guests["iommu_map"]),
                          initramfs=None, cmdline="ep=0x10 mode=contig mib=8", serial="off",
                          console="off",
                          devices=["path=sim:l2,iommu=on,pci_device_id=2,entry_limit=4,batching=on"])
    caplog.set_level(logging.DEBUG, logger="hyperpy")
    vm = build_vm(cfg)
    try:
        device = next(d.device for d in vm.virtio if d.device.name == "iommu")
        vm.run()
        iommu = device.counters()
    finally:
        vm.close()
    assert iommu["host_refused_maps"] > 1 and iommu["faults"] >= 1, iommu
    # What the guest was answered: the refused MAPs are NOMEM, not OK.
    assert iommu["status_nomem"] == iommu["host_refused_maps"], iommu
    assert iommu["status_ok"] + iommu["status_nomem"] <= iommu["requests"], iommu
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "host DMA" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "dma_entry_limit" in errors[0].getMessage() and "huge pages" in errors[0].getMessage()
    # Before the first refusal: one early warning naming the device, the limit and the fixes.
    early = [r.getMessage() for r in caplog.records if "DMA mappings the host allows" in r.getMessage()]
    assert len(early) == 1 and "sim:l2" in early[0] and "4 DMA mappings" in early[0], early
    assert caplog.records.index(next(r for r in caplog.records if "host allows" in r.getMessage())) \
        < caplog.records.index(errors[0])


def test_huge_runs_stay_under_a_small_entry_limit(kvm, guests):
    rc, out, err = hyperpy("--kernel", str(guests["iommu_map"]),
                           "--device", "path=sim:l2,iommu=on,pci_device_id=2,entry_limit=4",
                           "--cmdline", "ep=0x10 mode=huge mib=64")
    assert rc == 0, err
    assert "errors 0 " in next(l for l in out.splitlines() if l.startswith("MAPB done"))


def test_kick_bucket_edges():
    from hyperpy.devices.virtio.iommu import KICK_BUCKETS, kick_bucket

    got = {n: KICK_BUCKETS[kick_bucket(n)] for n in (0, 1, 2, 3, 4, 31, 32, 255, 256, 5000)}
    assert got == {0: "0", 1: "1", 2: "2-3", 3: "2-3", 4: "4-7", 31: "16-31", 32: "32-63",
                   255: "128-255", 256: "256+", 5000: "256+"}


def test_requests_per_notification_histogram(kvm, guests):
    """vm.counters says how many requests each notification carried: the iommu_map guest queues
    32 MAPs and then notifies once, so most notifications land in the 32-63 bucket; and each
    notification was served on the vCPU's exit."""
    from hyperpy.config import build_vm_config
    from hyperpy.devices.virtio.iommu import KICK_BUCKETS
    from hyperpy.vmm import build_vm

    cfg = build_vm_config(cpus="boot=1", memory="size=256M", kernel=str(guests["iommu_map"]),
                          initramfs=None, cmdline="ep=0x10 mode=contig mib=8", serial="off",
                          console="off", devices=["path=sim:l2,iommu=on,pci_device_id=2"])
    vm = build_vm(cfg)
    try:
        device = next(d.device for d in vm.virtio if d.device.name == "iommu")
        vm.run()
        c = device.counters()
        exits = vm.counters()["vcpu0"]["exits"]
    finally:
        vm.close()
    hist = {b: c[f"kicks_with_{b}"] for b in KICK_BUCKETS}
    # The request queue is served on the kicking vCPU's own exit (no ioeventfd): each kick was
    # a vCPU exit to the VMM.
    assert exits >= c["kicks"], (exits, c)
    assert sum(hist.values()) == c["kicks"] > 0, c
    assert hist["32-63"] >= c["kicks"] // 2, hist
    assert c["requests"] >= 2048 and c["requests"] / c["kicks"] >= 16, c
