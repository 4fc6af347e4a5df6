"""Boot to init and power-off: hyperpy vs QEMU ``-accel kvm`` in the same L1 host, same run.

The nested tier's L1 host H (tests/nested/l1host.py: Debian 6.12 with kvm_amd under QEMU TCG
``-cpu max``) boots the same G -- Debian's 6.12 cloud vmlinux (PVH entry on both VMMs) with a
busybox initramfs whose /init prints ``HPBOOT up`` and powers off -- alternately on

* ``hyperpy run --cpus boot=1 --memory size=512M --console off`` (the installed wheel),
* ``qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 512`` and ``-M q35`` (QEMU 7.2).

Per round and VMM: seconds from the VMM's start to G's init (``HPBOOT up`` on the serial log,
polled every 50 ms in H) and to the VMM's exit.  Everything runs at TCG speed, so the absolute
figures are not hardware figures; the ratio is the comparable part (both VMMs run the same guest
on the same emulated CPU, and both pay their own start-up: Python imports for hyperpy).
Figures only, never gated on a time.  HYPERPY_BENCH_NESTED_ROUNDS sets the rounds (default 2).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
from pathlib import Path

from benchutil import record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "nested"))

import linuxkit  # noqa: E402

TABLE = "nested boot: G (Debian 6.12) to init and power-off, hyperpy vs QEMU -accel kvm in one L1"
ROUNDS = int(os.environ.get("HYPERPY_BENCH_NESTED_ROUNDS", "2"))
CMDLINE = "console=ttyS0 panic=-1 quiet"

H_SCRIPT = r"""
set -u
D=$(mktemp -d /run/boot.XXXX)
boot() {  # boot NAME CMD...: prints "BOOT NAME init_s exit_s rc"
    local name=$1; shift
    rm -f "$D/serial.log"; touch "$D/serial.log"
    local t0=$(date +%s.%N) init=
    "$@" > "$D/$name.out" 2>&1 < /dev/null &
    local pid=$!
    ( sleep 300; kill -9 $pid 2>/dev/null ) & local wd=$!
    while kill -0 $pid 2>/dev/null; do
        if [ -z "$init" ] && grep -q "HPBOOT up" "$D/serial.log"; then init=$(date +%s.%N); fi
        sleep 0.05
    done
    wait $pid; local rc=$?
    kill $wd 2>/dev/null
    local t1=$(date +%s.%N)
    [ -n "$init" ] || init=$t1
    python3 -c "print('BOOT $name', round($init - $t0, 3), round($t1 - $t0, 3), $rc)"
    grep -q HPDONE "$D/serial.log" || { echo "no HPDONE from $name:"; tail -5 "$D/serial.log"; tail -5 "$D/$name.out"; }
}
for round in $(seq @ROUNDS@); do
    boot hyperpy @PY@ -m hyperpy run --kernel @K@ --initramfs @I@ --cmdline "@C@" \
        --cpus boot=1 --memory size=512M --console off --serial "file=$D/serial.log"
    boot qemu-microvm qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 512 -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -kernel @K@ -initrd @I@ \
        -append "@C@" -serial "file:$D/serial.log"
    boot qemu-q35 qemu-system-x86_64 -M q35 -accel kvm -cpu host -m 512 -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -kernel @K@ -initrd @I@ \
        -append "@C@" -serial "file:$D/serial.log"
done
rm -rf "$D"
"""


def test_nested_boot_hyperpy_vs_qemu(nested_host):
    kit, d, h = nested_host
    initrd = linuxkit.build_initramfs(kit, "", [], None, d / "g-boot.cpio")
    script = (H_SCRIPT.replace("@ROUNDS@", str(ROUNDS)).replace("@PY@", sys.executable)
              .replace("@K@", str(kit.vmlinux)).replace("@I@", str(initrd))
              .replace("@C@", CMDLINE))
    r = h.script("boot-bench", script, timeout=ROUNDS * 3 * 320)
    rows = re.findall(r"^BOOT (\S+) ([\d.]+) ([\d.]+) (\d+)$", r.out, re.M)
    assert len(rows) == ROUNDS * 3, r.out[-3000:]
    assert "no HPDONE" not in r.out, r.out[-3000:]
    times: dict[str, list[tuple[float, float]]] = {}
    for name, init, end, rc in rows:
        assert rc == "0", (name, r.out[-3000:])
        times.setdefault(name, []).append((float(init), float(end)))
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
           for k, v in times.items()}
    for name, (init, end) in med.items():
        record(TABLE, f"{name}: start -> init / -> exit (median of {ROUNDS})",
               f"{init:6.2f} s / {end:6.2f} s")
    hp = med["hyperpy"]
    for peer in ("qemu-microvm", "qemu-q35"):
        q = med[peer]
        record(TABLE, f"hyperpy / {peer}", f"to init {hp[0] / q[0]:.2f}x, to exit {hp[1] / q[1]:.2f}x")
    print(f"\nnested boot medians: {med}")
