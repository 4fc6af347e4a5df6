"""vhost-user-blk: hyperpy's back-end vs qemu-storage-daemon's, same guest, same file, same run.

One QEMU (q35, TCG) boots Debian's 6.12 kernel with two vhost-user-blk disks backed by the SAME
raw file: /dev/vda served by ``hyperpy vhost-user blk``, /dev/vdb by ``qemu-storage-daemon
--export type=vhost-user-blk`` (file locking off, page cache on for both).  Inside the guest,
bench/blkio.c (static, O_DIRECT, queue depth 1: one operation = one virtio-blk request) runs
sequential 64 KiB and random 4 KiB reads and writes on each disk in turn, into separate regions.

Two kinds of figures:

* guest-side throughput (MB/s, IOPS): under TCG the guest's emulated CPU is the bottleneck, so
  these mostly measure QEMU's instruction emulation, not the back-ends;
* host CPU per request: the back-end process's user+system CPU time (``/proc/PID/stat``, all
  threads) over a phase divided by the requests in it -- what the back-end itself costs.  The
  goal is hyperpy <= qemu-storage-daemon.

Figures only; never gated on a time.  HYPERPY_BENCH_VU_OPS scales the operation counts.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchutil import record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import linuxkit  # noqa: E402
from vhost_linux import QEMU, QSD, Backend, Guest, blk_device  # noqa: E402

TABLE = "vhost-user-blk: hyperpy vs qemu-storage-daemon (same guest, same file; QD1, O_DIRECT)"
MiB = 1 << 20
IMAGE = 256 * MiB
OPS = int(os.environ.get("HYPERPY_BENCH_VU_OPS", "4000"))
# (name, read|write, seq|rand, block size, count, region offset)  -- regions per disk below
PHASES = [
    ("seq-read-64k", "read", "seq", 65536, OPS // 4, 0),
    ("rand-read-4k", "read", "rand", 4096, OPS, 0),
    ("seq-write-64k", "write", "seq", 65536, OPS // 4, 64 * MiB),
    ("rand-write-4k", "write", "rand", 4096, OPS, 64 * MiB),
]
REGION = 64 * MiB
DISKS = {"hyperpy": ("/dev/vda", 0), "qsd": ("/dev/vdb", 128 * MiB)}   # write regions differ


def _cpu(pid: int) -> float:
    """CPU seconds of every live thread of ``pid`` (schedstat: nanoseconds, not 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass      # a thread that just exited
    return total / 1e9


def _cpu_ticks(pid: int) -> float:
    """Whole-process CPU seconds (exited threads included; 10 ms resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def kit():
    if QEMU is None or QSD is None or shutil.which("gcc") is None:
        pytest.skip("needs qemu-system-x86_64, qemu-storage-daemon (qemu-system-common) and gcc")
    try:
        return linuxkit.load_kit()
    except linuxkit.KitError as e:
        pytest.skip(str(e))


def test_bench_vhost_user_blk_vs_qemu_storage_daemon(kit, tmp_path):
    blkio = tmp_path / "blkio"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(blkio), str(ROOT / "bench" / "blkio.c")],
                   check=True)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:                 # written data, so both read from the page cache
        chunk = os.urandom(MiB)
        for _ in range(IMAGE // MiB):
            f.write(chunk)

    script = []
    for name, rw, pattern, bs, count, region in PHASES:
        for who, (dev, wbase) in DISKS.items():
            off = region + (wbase if rw == "write" else 0)
            script.append(f"echo HPPHASE begin {who} {name}; /blkio {dev} {rw} {pattern} {bs} "
                          f"{count} {off} {REGION}; echo HPPHASE end {who} {name}")
    initrd = linuxkit.build_initramfs(kit, "chmod 755 /blkio\n" + "\n".join(script),
                                      ["virtio_blk"], {"/blkio": blkio}, tmp_path / "initrd.cpio")

    hp = Backend("blk", tmp_path / "hp.sock", ["--disk", f"path={img}", "--no-iommu"],
                 tmp_path / "hp.log")
    qsd_sock = tmp_path / "qsd.sock"
    qsd = subprocess.Popen(
        [QSD, "--blockdev", f"driver=file,node-name=f0,filename={img},cache.direct=off,locking=off",
         "--blockdev", "driver=raw,node-name=d0,file=f0",
         "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={qsd_sock},"
                     "writable=on,num-queues=1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not qsd_sock.exists():
            assert qsd.poll() is None, qsd.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "qemu-storage-daemon did not create its socket"
            time.sleep(0.05)
        guest = Guest(kit.vmlinuz, initrd,
                      devices=blk_device("hp", hp.sock) + blk_device("qsd", qsd_sock))
        pids = {"hyperpy": hp.proc.pid, "qsd": qsd.pid}
        before = {who: _cpu_ticks(pid) for who, pid in pids.items()}
        results, console = _run_phases(guest, pids)
        whole = {who: _cpu_ticks(pid) - before[who] for who, pid in pids.items()}
    finally:
        hp.stop()
        qsd.terminate()
        try:
            qsd.wait(10)
        except subprocess.TimeoutExpired:
            qsd.kill()
    assert "HPDONE" in console, console[-3000:]
    assert len(results) == len(PHASES) * len(DISKS), console[-3000:]

    for name, rw, pattern, bs, count, _ in PHASES:
        row = {}
        for who in DISKS:
            ops, nbytes, ns, cpu = results[(who, name)]
            assert ops == count
            us_per_req = cpu / ops * 1e6
            row[who] = us_per_req
            guest_rate = (f"{nbytes / ns * 1e3:.1f} MB/s" if pattern == "seq"
                          else f"{ops / ns * 1e9:.0f} IOPS")
            record(TABLE, f"{name} {who}",
                   f"guest {guest_rate} ({ns / ops / 1e3:.0f} us/op); back-end CPU "
                   f"{us_per_req:.1f} us/request")
        record(TABLE, f"{name} ratio",
               f"hyperpy/qsd back-end CPU per request = {row['hyperpy'] / max(row['qsd'], 1e-9):.2f}")
    reqs = sum(c for *_, c, _ in PHASES)
    record(TABLE, "whole run (boot + all phases)",
           "; ".join(f"{who} {whole[who]:.2f} s CPU = {whole[who] / reqs * 1e6:.1f} us/request"
                     for who in DISKS))


def _run_phases(guest: Guest, pids: dict[str, int]):
    """Boot; sample each back-end's CPU time at every phase marker the guest prints."""
    proc = subprocess.Popen(guest.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = b""
    begin: dict[tuple[str, str], float] = {}
    last: dict[str, str] = {}
    results = {}
    deadline = time.monotonic() + 600
    buf = b""
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not r:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                m = re.match(r"HPPHASE (begin|end) (\S+) (\S+)", text)
                if m:
                    key = (m.group(2), m.group(3))
                    cpu = _cpu(pids[key[0]])
                    if m.group(1) == "begin":
                        begin[key] = cpu
                    elif key in begin and key[0] in last:
                        ops, nbytes, ns = map(int, re.findall(r"\d+", last.pop(key[0])))
                        results[key] = (ops, nbytes, ns, cpu - begin[key])
                elif text.startswith("BLKIO"):
                    who = next((k for k in begin if k not in results), (None,))[0]
                    last[who] = text
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return results, out.decode(errors="replace")
