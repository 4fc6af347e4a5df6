"""The virtio-iommu test guest (tests/guests/virtio_iommu.c), proven against QEMU (q35, TCG).

QEMU describes its virtio-iommu-pci and the PCI endpoints behind it with an ACPI VIOT table;
the virtio-blk device sits behind the IOMMU with iommu_platform=on (VIRTIO_F_ACCESS_PLATFORM).
Parsers and expectations: tests/iommu_expect.py (shared with hyperpy's tests). Skips without
qemu-system-x86_64 or gcc.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testutil import load_module

TESTS = Path(__file__).resolve().parent
GUEST_DIR = TESTS / "guests"
QEMU = shutil.which("qemu-system-x86_64")

needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 not installed (apt-get install -y qemu-system-x86)"
)




build = load_module("hyperpy_test_guest_build_iommu", GUEST_DIR / "build.py")
expect = load_module("iommu_expect", TESTS / "iommu_expect.py")


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return build.build_guest("virtio_iommu", tmp_path_factory.mktemp("iommu-guest"))


def guest_output(stdout: bytes) -> str:
    text = stdout.decode("latin-1").replace("\r\n", "\n")
    marker = "Booting from ROM.."
    return text.rsplit(marker, 1)[1] if marker in text else text


def run_qemu(image: Path, disk: Path, append: str = "", timeout: float = 90) -> tuple[int, str]:
    cmd = [QEMU, "-M", "q35", "-accel", "tcg", "-nographic", "-no-reboot", "-m", "256",
           "-net", "none", "-kernel", str(image), "-append", append,
           "-device", "virtio-iommu-pci",
           "-device", "virtio-blk-pci,disable-legacy=on,iommu_platform=on,drive=d0",
           "-drive", f"if=none,id=d0,file={disk},format=raw"]
    # QEMU's own diagnostics (stderr: "virtio_iommu_translate no mapping ...") are kept apart.
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)
    out = guest_output(proc.stdout)
    print(f"QEMU exit {proc.returncode}; guest output:\n{out}\nstderr:\n{proc.stderr.decode()}")
    return proc.returncode, out


@needs_qemu
def test_iommu_on_qemu(guest, tmp_path):
    image = expect.virtio_expect.blk_image(2048)
    disk = tmp_path / "disk.img"
    disk.write_bytes(image)
    rc, out = run_qemu(guest, disk)
    f = expect.parse_iommu(out)
    expect.check_iommu(f, image, differences=expect.QEMU_DIFFERENCES,
                       fault_flags=expect.QEMU_FAULT_FLAGS)
    assert not f["unparsed"], f["unparsed"]
    # QEMU 7.2 on q35: VIOT with the IOMMU node and one PCI range 00:00.0-00:1f.7 (ids = BDFs).
    assert f["viot"]["ranges"][0]["id"] == 0 and f["endpoint"] == int(f["blk_bdf"][3:5], 16) * 8
    # Full 64-bit input range and 32-bit domain range: nothing lies outside them.
    assert f["input_range"] == (0, 2**64 - 1) and f["domain_range"] == (0, 2**32 - 1)
    assert f["status"]["map_outside"] == f["status"]["attach_domain_range"] == "skipped"
    assert f["probe_size"] == 512 and f["bypass"] == 1
    # PROBE reports x86's MSI doorbell window as a reserved region of subtype MSI.
    assert (0xFEE0_0000, 0xFEEF_FFFF, expect.RESV_MEM_T_MSI) in f["resv"]
    # One event per failed translation, all on the blk endpoint inside the unmapped window.
    assert all(x["reason"] == expect.FAULT_R_MAPPING for x in f["faults"])
    assert out.endswith("IOMMU done\n")
    assert rc == 0
    after = disk.read_bytes()
    assert after[512:1024] == expect.virtio_expect.blk_write_pattern(1)
    assert after[:512] == image[:512] and after[1024:] == image[1024:]


def test_parser_on_sample_output():
    image = expect.virtio_expect.blk_image(16)
    s0 = expect.virtio_expect.sector_digest(image[:512])
    p1 = expect.virtio_expect.sector_digest(expect.virtio_expect.blk_write_pattern(1))
    statuses = dict(expect.SPEC_STATUS)
    lines = ["VIOT nodes 2", "VIOT virtio-pci iommu 0 00:02.0",
             "VIOT endpoints 0-0 00:00.0-00:1f.7 id 0 -> iommu",
             "IOMMU pci 00:02.0 1af4:1057", "IOMMU features device 0x10130000077 driver 0x100000057",
             "IOMMU page_size_mask 0xfffffffffffff000", "IOMMU input_range 0x0-0xffffffff",
             "IOMMU domain_range 0-255", "IOMMU probe_size 512", "IOMMU endpoint 24 blk 00:03.0"]
    for name in expect.BATTERY:
        lines.append(f"IOMMU {name} status {statuses[name]}")
        if name == "probe":
            lines.append("IOMMU probe resv 0xfee00000-0xfeefffff subtype 1")
    lines += ["BLK pci 00:03.0 1af4:1042", "BLK features device 0x10330006e54 driver 0x300000000",
              "BLK capacity 16", f"BLK read 0 status 0 data {s0[0]} sum {s0[1]}",
              "BLK write 1 status 0", f"BLK readback 1 status 0 data {p1[0]} sum {p1[1]}",
              "BLK write 1 OK", "IOMMU unmap status 0", "BLK unmapped read submitted",
              "IOMMU fault reason 2 flags 0x101 endpoint 24 address 0x40000402",
              "BLK unmapped read pending", "IOMMU isr 0x1", "IOMMU done", ""]
    f = expect.parse_iommu("\n".join(lines))
    assert not f["unparsed"], f["unparsed"]
    expect.check_iommu(f, image)
    assert f["resv"] == [(0xFEE00000, 0xFEEFFFFF, 1)]
    bad = expect.parse_iommu("\n".join(lines).replace("map_overlap status 4", "map_overlap status 0"))
    with pytest.raises(AssertionError):
        expect.check_iommu(bad, image)
    assert expect.comparable_iommu(f)["first_fault_reason"] == expect.FAULT_R_MAPPING


def test_image_is_small(guest):
    assert guest.read_bytes()[:4] == b"\x7fELF"
    assert guest.stat().st_size < 24 * 1024, guest.stat().st_size
