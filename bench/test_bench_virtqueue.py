"""Virtqueue engine cost: a null device popping and returning chains, Cython vs the reference.

A simulated driver (tests/virtio_driver.py) fills a 256-entry split queue with chains of 1, 2
or 4 device-readable descriptors; the device pops each chain and returns it with push_used.
When the ring runs dry the "driver" re-offers the same chains (avail idx += chains), so one
setup serves millions of chains.  Reported: ns per chain for

* the Cython engine driven from C (``SplitQueue.bench_pop_push``: pop + push_used in a nogil
  loop, one should_notify per refill) -- what a Cython device pays;
* the Cython engine through its Python wrappers (``pop_py``/``push_used_py``) -- a Python device;
* the pure-Python reference (hyperpy/reference/virtqueue.py), same rings, same run.

Goal: <= 50 ns per 1-descriptor chain and >= 50x the reference.  Never asserts on a time.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from benchutil import record

from hyperpy._fast.addrspace import AddressSpace
from hyperpy._fast.guestmem import GuestMemory
from hyperpy._fast.virtqueue import SplitQueue
from hyperpy.reference.virtqueue import SplitQueue as RefSplitQueue

ROOT = Path(__file__).resolve().parents[1]
N_FAST = int(os.environ.get("HYPERPY_BENCH_VQ_CHAINS", "2000000"))
N_SLOW = max(1000, N_FAST // 100)
QSIZE = 256


def _driver_module():
    name = "hyperpy_bench_virtio_driver"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "virtio_driver.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod            # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _setup(make_queue, ndesc: int):
    """A queue whose avail ring holds QSIZE // ndesc distinct chains, repeated in every slot."""
    drv = _driver_module()
    mem = GuestMemory()
    mem.add_region(0, 4 << 20)
    d = drv.Driver(mem, QSIZE, data=1 << 20, data_end=4 << 20)
    q = make_queue(mem)
    d.attach(q)
    nchains = QSIZE // ndesc
    heads = [d.add([64] * ndesc, publish=False) for _ in range(nchains)]
    for slot in range(nchains, QSIZE):
        d.set_avail_entry(slot, heads[slot % nchains])
    d.publish()
    return q, d, nchains


def _cython_c_loop(ndesc: int, n: int) -> float:
    q, d, nchains = _setup(lambda m: SplitQueue(AddressSpace(m), QSIZE), ndesc)
    q.bench_pop_push(10 * nchains, nchains)                       # warm up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        done, _notes = q.bench_pop_push(n, nchains)
        best = min(best, (time.perf_counter_ns() - t0) / done)
        assert done == n and not q.needs_reset
    assert d.used_idx == q.next_used_idx
    return best


def _python_loop(make_queue, ndesc: int, n: int) -> float:
    q, d, nchains = _setup(make_queue, ndesc)
    avail = d.avail_idx

    def drain(count):
        nonlocal avail
        done = 0
        pop, push = q.pop_py, q.push_used_py
        while done < count:
            c = pop()
            if c is None:
                q.should_notify_py()
                avail = (avail + nchains) & 0xFFFF
                d.set_avail_idx(avail)
                continue
            push(c.head, 0)
            done += 1
        return done

    drain(nchains)
    t0 = time.perf_counter_ns()
    done = drain(n)
    elapsed = time.perf_counter_ns() - t0
    assert not q.needs_reset
    return elapsed / done


def test_virtqueue_pop_push_cython_vs_python(benchmark):
    results = {}

    def one_round():
        for ndesc in (1, 2, 4):
            results[ndesc] = (
                _cython_c_loop(ndesc, N_FAST),
                _python_loop(lambda m: SplitQueue(AddressSpace(m), QSIZE), ndesc, N_SLOW),
                _python_loop(lambda m: RefSplitQueue(m, QSIZE), ndesc, N_SLOW),
            )

    benchmark.pedantic(one_round, rounds=1, iterations=1)
    table = (f"Virtqueue null device: pop + push_used per chain (queue size {QSIZE}; "
             f"{N_FAST} chains from C, {N_SLOW} from Python)")
    for ndesc, (cy, cy_py, ref) in results.items():
        ratio = ref / cy if cy > 0 else float("inf")
        benchmark.extra_info[f"{ndesc}desc"] = {"cython_ns": cy, "cython_python_api_ns": cy_py,
                                                "reference_ns": ref, "ratio": ratio}
        record(table, f"{ndesc}-descriptor chains, Cython (C loop)", f"{cy:9.1f} ns/chain")
        record(table, f"{ndesc}-descriptor chains, Cython via pop_py/push_used_py",
               f"{cy_py:9.1f} ns/chain")
        record(table, f"{ndesc}-descriptor chains, pure-Python reference", f"{ref:9.1f} ns/chain")
        record(table, f"{ndesc}-descriptor chains, ratio (reference / Cython C loop)",
               f"{ratio:9.1f} x")
        print(f"\nvirtqueue {ndesc}-desc: cython {cy:.1f} ns, cython python-api {cy_py:.1f} ns, "
              f"reference {ref:.1f} ns, ratio {ratio:.0f}x")
    record(table, "goal", "<= 50 ns per 1-descriptor chain and >= 50x the reference")
