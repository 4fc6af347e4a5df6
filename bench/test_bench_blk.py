"""virtio-blk device side vs raw preadv: 4 KiB random reads, queue depth 1 and 32, same run.

A host-side driver (tests/virtio_driver.py) posts requests; only the device's work is timed
(`BlkWorker.process`: pop, preadv into guest RAM, status byte, push_used).  The baseline is the
same number of 4 KiB `preadv` calls at the same offsets, made in C.  Goal: >= 70% of raw IOPS.
The image is in the page cache, so both sides measure CPU cost, not the disk.
"""

from __future__ import annotations

import array
import os
import random
import struct
import sys
import time
from pathlib import Path

from benchutil import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

REQUESTS = int(os.environ.get("HYPERPY_BENCH_BLK_REQUESTS", "20000"))
DISK = 64 << 20
BLOCK = 4096
VIRTIO_BLK_T_IN = 0


def _device_iops(path: Path, offsets: list[int], depth: int) -> float:
    """Requests per second of device-side work at queue depth ``depth``.

    The driver builds ``depth`` request chains once and then re-offers them, like a guest that
    reuses its request buffers: per batch it only rewrites each header's sector and bumps the
    available index (host-side, untimed), so the timed part is the device alone.
    """
    from hyperpy._fast.addrspace import AddressSpace
    from hyperpy._fast.guestmem import GuestMemory
    from hyperpy._fast.virtqueue import SplitQueue
    from hyperpy.devices.virtio.blk import Block
    from virtio_driver import Driver

    mem = GuestMemory()
    mem.add_region(0, 64 << 20)
    dev = Block(path)
    q = SplitQueue(AddressSpace(mem), 256)
    drv = Driver(mem, 256, data=1 << 20)
    drv.attach(q)
    heads = [drv.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [BLOCK, 1], publish=False)
             for _ in range(depth)]
    sector_at = [drv.inflight[h].readable[0][0] + 8 for h in heads]   # header.sector
    for slot in range(256):
        drv.set_avail_entry(slot, heads[slot % depth])
    avail = drv.avail_idx - depth
    busy = 0
    try:
        for start in range(0, len(offsets) - depth + 1, depth):
            for i, off in enumerate(offsets[start:start + depth]):
                mem.write(sector_at[i], struct.pack("<Q", off // 512))
            avail = (avail + depth) & 0xFFFF
            drv.set_avail_idx(avail)
            t0 = time.perf_counter_ns()
            dev.worker.process(q)
            busy += time.perf_counter_ns() - t0
        done = (len(offsets) // depth) * depth
        assert dev.worker.errors == 0
        assert dev.worker.requests == done
    finally:
        dev.close()
    return done / (busy / 1e9)


def _raw_iops(path: Path, offsets: list[int]) -> float:
    from hyperpy._fast.blk import raw_preadv_loop

    fd = os.open(path, os.O_RDONLY)
    try:
        offs = array.array("Q", offsets)
        buf = bytearray(BLOCK)
        t0 = time.perf_counter_ns()
        ok = raw_preadv_loop(fd, offs, buf)
        elapsed = time.perf_counter_ns() - t0
    finally:
        os.close(fd)
    assert ok == len(offsets)
    return len(offsets) / (elapsed / 1e9)


def test_blk_random_reads_vs_raw_preadv(benchmark, tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(DISK))
    rnd = random.Random(1234)
    offsets = [rnd.randrange(DISK // BLOCK) * BLOCK for _ in range(REQUESTS)]
    results = {}

    def one_round():
        _raw_iops(path, offsets)                  # warm the page cache
        results["raw"] = _raw_iops(path, offsets)
        for depth in (1, 32):
            results[depth] = _device_iops(path, offsets, depth)

    benchmark.pedantic(one_round, rounds=1, iterations=1)
    raw = results["raw"]
    table = f"virtio-blk device side, 4 KiB random reads ({REQUESTS} requests, page cache)"
    record(table, "raw preadv (C loop)", f"{raw / 1e3:8.1f} kIOPS")
    for depth in (1, 32):
        r = results[depth]
        record(table, f"hyperpy virtio-blk, queue depth {depth}",
               f"{r / 1e3:8.1f} kIOPS  ({100 * r / raw:5.1f}% of raw; goal >= 70%)")
    benchmark.extra_info.update({k if isinstance(k, str) else f"qd{k}": v for k, v in results.items()})
