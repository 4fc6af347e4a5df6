"""OPT-IN, for hosts with hardware KVM (not run by .ci/run: this project's CI host emulates
guest instructions and cannot boot Linux in useful time).  See docs/hardware-tests.md.

    HYPERPY_HW_KVM=1 pytest hwtest/test_hw_reboot.py -s

A Linux guest's ``reboot -f`` boots it again on hyperpy (as on cloud-hypervisor), and its
``poweroff -f`` ends hyperpy with status 0.  Debian's 6.12 cloud kernel boots with a busybox
initramfs (tests/linuxkit.py) and a small virtio-blk disk that remembers the first boot: the
first boot writes a marker to /dev/vda and runs ``reboot -f``; the second finds the marker and
the initramfs powers off.  Both of Linux's reset paths are tried: its default x86 method (the
ACPI reset register of hyperpy's FADT) and ``reboot=k`` (the i8042).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import linuxkit  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("HYPERPY_HW_KVM") != "1",
                                reason="opt-in hardware-KVM test: set HYPERPY_HW_KVM=1")

MARK = b"HPMARK"
# Runs inside the initramfs' /init; linuxkit's epilogue then prints HPDONE and powers off.
REBOOT_SCRIPT = f"""
if [ "$(head -c {len(MARK)} /dev/vda)" = {MARK.decode()} ]; then
    echo "HPREBOOT second boot"
else
    printf {MARK.decode()} | dd of=/dev/vda bs={len(MARK)} count=1 conv=notrunc,fsync 2>/dev/null
    echo "HPREBOOT first boot"
    reboot -f
    sleep 60
    echo "HPREBOOT reboot failed"
fi
"""


@pytest.mark.parametrize("reboot_arg", ["", "reboot=k"], ids=["acpi-default", "i8042"])
def test_linux_reboot_boots_again_and_poweroff_ends(tmp_path, reboot_arg):
    kit = linuxkit.ensure_kit()
    initrd = linuxkit.build_initramfs(kit, REBOOT_SCRIPT, ["virtio_blk"], out=tmp_path / "reboot.cpio")
    disk, serial = tmp_path / "disk.img", tmp_path / "serial.log"
    disk.write_bytes(bytes(1 << 20))
    p = subprocess.run(
        [sys.executable, "-m", "hyperpy", "run", "--kernel", str(kit.vmlinux),
         "--initramfs", str(initrd), "--cmdline", f"console=ttyS0 {reboot_arg}".strip(),
         "--memory", "size=512M", "--disk", f"path={disk}", "--serial", f"file={serial}", "-v"],
        capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
    out = serial.read_text(errors="replace") if serial.exists() else ""
    where = f"\n--- serial:\n{out[-3000:]}\n--- log:\n{p.stderr[-2000:]}"
    assert p.returncode == 0, where                       # poweroff -f: ACPI S5, status 0
    assert out.count("Linux version 6.12") == 2, where    # two boots in one appended file
    assert out.index("HPREBOOT first boot") < out.index("HPREBOOT second boot") < out.index("HPDONE"), where
    assert "reboot failed" not in out, where
    assert "guest reset: rebooting the VM (boot 2)" in p.stderr, where
    assert "VM ended: guest power-off" in p.stderr, where
    assert disk.read_bytes().startswith(MARK)
