"""VFIO host DMA mapping: the simulated type1 container, the batching mapper, the real-VFIO path.

This host has no /dev/vfio: the real container's ioctls are compiled but only its error path
runs here; the mapping semantics are checked against SimulatedType1Container, which models the
kernel's vfio_iommu_type1 (v2) rules.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hyperpy._fast.guestmem import GuestMemory
from hyperpy._fast.vfio import (DEFAULT_DMA_ENTRY_LIMIT, VFIO_DMA_MAP_FLAG_READ,
                                VFIO_DMA_MAP_FLAG_WRITE, SimulatedType1Container, VfioDmaMapper,
                                VfioType1Container)
from hyperpy.errors import DeviceError
from hyperpy.vfio import open_container, read_dma_entry_limit

K4 = 4096
M2 = 2 << 20
RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
R, W = 1, 2   # DmaListener flags (VIRTIO_IOMMU_MAP_F_READ/WRITE)
RAM = 16 << 20
VA = 0x7f0000000000  # any page-aligned host address will do for the simulation


def sim(limit=DEFAULT_DMA_ENTRY_LIMIT, pin_ns=0):
    return SimulatedType1Container(limit, pin_ns)


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0, RAM)
    m.add_region(1 << 32, 4 << 20)          # a second region with a hole before it
    return m


def host(mem, gpa):
    return mem.host_address(gpa)


# ---------------------------------------------------------------------------------------------
# The simulated type1 container


def test_sim_is_labelled_a_simulation():
    c = sim()
    assert c.simulated
    assert "SIMULATION" in repr(c)
    assert "SIMULATED" in c.counters()["backend"] and c.counters()["simulated"] is True
    assert "SIMULATION" in SimulatedType1Container.__doc__
    assert c.dma_entry_limit == 65535 == DEFAULT_DMA_ENTRY_LIMIT


def test_sim_map_and_overlap_is_eexist():
    c = sim()
    assert c.dma_map_py(0x10000, 0x4000, VA, RW) == 0
    assert c.entries_py() == [(0x10000, 0x4000, VA, RW)]
    for iova, size in [(0x10000, 0x4000), (0xf000, 0x2000), (0x13000, 0x1000), (0x8000, 0x20000),
                       (0x11000, 0x1000)]:
        assert c.dma_map_py(iova, size, VA, RW) == -errno.EEXIST, (hex(iova), hex(size))
    # adjacent on both sides is fine
    assert c.dma_map_py(0xf000, 0x1000, VA, RW) == 0
    assert c.dma_map_py(0x14000, 0x1000, VA, RW) == 0
    assert c.entries == 3 and c.peak_entries == 3 and c.map_calls == 8


@pytest.mark.parametrize("iova,size,vaddr,flags", [
    (0x1001, 0x1000, VA, RW),            # unaligned iova
    (0x1000, 0x1800, VA, RW),            # unaligned size
    (0x1000, 0x1000, VA + 0x10, RW),     # unaligned vaddr
    (0x1000, 0, VA, RW),                 # zero size
    (2**64 - 0x1000, 0x2000, VA, RW),    # iova wraps
    (0x1000, 0x2000, 2**64 - 0x1000, RW),  # vaddr wraps
    (0x1000, 0x1000, VA, 0),             # neither READ nor WRITE
    (0x1000, 0x1000, VA, RW | 0x100),    # unknown flag
])
def test_sim_map_einval(iova, size, vaddr, flags):
    c = sim()
    assert c.dma_map_py(iova, size, vaddr, flags) == -errno.EINVAL
    assert c.entries == 0


def test_sim_map_at_top_of_iova_space():
    c = sim()
    assert c.dma_map_py(2**64 - 0x2000, 0x2000, VA, RW) == 0
    assert c.dma_map_py(2**64 - 0x1000, 0x1000, VA, RW) == -errno.EEXIST
    assert c.dma_unmap_py(2**64 - 0x2000, 0x2000) == (0, 0x2000)


def test_sim_enospc_at_the_entry_limit():
    c = sim(limit=3)
    for i in range(3):
        assert c.dma_map_py(i * 0x10000, K4, VA, RW) == 0
    assert c.dma_map_py(0x100000, K4, VA, RW) == -errno.ENOSPC
    # EEXIST is checked before the limit, as in the kernel
    assert c.dma_map_py(0, K4, VA, RW) == -errno.EEXIST
    assert c.entries == 3 == c.peak_entries
    assert c.dma_unmap_py(0x10000, K4) == (0, K4)
    assert c.dma_map_py(0x100000, K4, VA, RW) == 0
    # one entry per MAP_DMA, whatever its size
    c2 = sim(limit=1)
    assert c2.dma_map_py(0, 1 << 30, VA, RW) == 0
    assert c2.dma_map_py(1 << 30, K4, VA, RW) == -errno.ENOSPC


def test_sim_unmap_whole_entries_reports_bytes():
    c = sim()
    c.dma_map_py(0x0, 0x4000, VA, RW)
    c.dma_map_py(0x4000, 0x2000, VA, RW)
    c.dma_map_py(0x10000, 0x1000, VA, RW)
    assert c.dma_unmap_py(0x0, 0x4000) == (0, 0x4000)
    assert c.entries == 2
    # a range covering several entries and holes unmaps every entry inside
    assert c.dma_unmap_py(0x0, 0x20000) == (0, 0x3000)
    assert c.entries == 0 and c.entries_py() == []
    # nothing there: success with 0 bytes
    assert c.dma_unmap_py(0x40000, 0x1000) == (0, 0)
    assert c.peak_entries == 3 and c.unmap_calls == 3


@pytest.mark.parametrize("iova,size", [
    (0x11000, 0x1000),   # middle
    (0x10000, 0x1000),   # head
    (0x13000, 0x1000),   # tail
    (0x8000, 0x9000),    # from before to the middle
    (0x12000, 0x8000),   # from the middle to past the end
])
def test_sim_bisecting_unmap_is_einval_and_unmaps_nothing(iova, size):
    c = sim()
    c.dma_map_py(0x0, 0x1000, VA, RW)          # another entry, entirely inside some ranges
    c.dma_map_py(0x10000, 0x4000, VA, RW)
    before = c.entries_py()
    assert c.dma_unmap_py(iova, size) == (-errno.EINVAL, 0)
    assert c.entries_py() == before


@pytest.mark.parametrize("iova,size", [(0x800, 0x1000), (0x1000, 0x800), (0x1000, 0),
                                       (2**64 - 0x1000, 0x2000)])
def test_sim_unmap_einval_bad_range(iova, size):
    c = sim()
    c.dma_map_py(0x1000, 0x1000, VA, RW)
    assert c.dma_unmap_py(iova, size) == (-errno.EINVAL, 0)
    assert c.entries == 1


def test_sim_pinning_cost_is_per_page():
    c = sim(pin_ns=20_000)
    t0 = time.perf_counter()
    assert c.dma_map_py(0, 64 * K4, VA, RW) == 0
    assert time.perf_counter() - t0 >= 64 * 20e-6
    assert c.pages_pinned == 64
    assert sim().pin_ns_per_page == 0


def test_sim_many_entries_out_of_order():
    """The sorted array stays sorted and correct through many inserts and removals."""
    c = sim()
    order = list(range(5000))
    random.Random(1).shuffle(order)
    for i in order:
        assert c.dma_map_py(i * 2 * K4, K4, VA + i * K4, RW) == 0
    ents = c.entries_py()
    assert [e[0] for e in ents] == [i * 2 * K4 for i in range(5000)]
    assert c.entries == 5000
    random.Random(2).shuffle(order)
    for i in order[:2500]:
        assert c.dma_unmap_py(i * 2 * K4, 2 * K4) == (0, K4)
    left = sorted(order[2500:])
    assert [e[0] for e in c.entries_py()] == [i * 2 * K4 for i in left]


# ---------------------------------------------------------------------------------------------
# The mapper


def test_mapper_batching_coalesces_contiguous_maps(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    for i in range(512):
        assert m.map_py(i * K4, K4, 0x200000 + i * K4, R | W) == 0
    assert c.map_calls == 0 and m.pending == 512
    assert m.flush_py() == 0
    assert m.host_map_calls == 1 == c.map_calls
    assert c.entries_py() == [(0, M2, host(mem, 0x200000), RW)]
    assert m.extents_py() == [(0, M2, host(mem, 0x200000), RW, 512)]
    assert len(m.mappings_py()) == 512
    assert m.bytes_mapped == M2 and m.maps_requested == 512 and m.extents == 1


def test_mapper_coalesces_regardless_of_submission_order(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    pages = list(range(64))
    random.Random(3).shuffle(pages)
    for i in pages:
        m.map_py(0x100000 + i * K4, K4, i * K4)
    assert m.flush_py() == 0
    assert c.map_calls == 1 and c.entries_py() == [(0x100000, 64 * K4, host(mem, 0), RW)]


def test_mapper_scattered_maps_do_not_coalesce(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    gpas = list(range(256))
    random.Random(4).shuffle(gpas)
    for i, g in enumerate(gpas):                       # contiguous IOVA, scattered guest pages
        m.map_py(i * K4, K4, g * K4)
    assert m.flush_py() == 0
    runs = 1 + sum(1 for a, b in zip(gpas, gpas[1:]) if b != a + 1)
    assert c.map_calls == runs == m.extents
    assert runs > 200


def test_mapper_needs_contiguous_iova_vaddr_and_equal_flags(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    m.map_py(0x0000, K4, 0x0000)
    m.map_py(0x1000, K4, 0x1000)
    m.map_py(0x2000, K4, 0x2000, R)                    # flags differ
    m.map_py(0x4000, K4, 0x3000)                       # IOVA gap
    m.map_py(0x5000, K4, 0x5000)                       # vaddr gap
    assert m.flush_py() == 0
    assert [(e[0], e[1], e[4]) for e in m.extents_py()] == [
        (0x0, 0x2000, 2), (0x2000, K4, 1), (0x4000, K4, 1), (0x5000, K4, 1)]
    assert c.entries_py()[1][3] == VFIO_DMA_MAP_FLAG_READ


def test_mapper_does_not_coalesce_across_ram_regions(mem):
    """The end of one RAM region and the start of another are not contiguous on the host."""
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    m.map_py(0, K4, RAM - K4)
    m.map_py(K4, K4, 1 << 32)
    assert m.flush_py() == 0
    if host(mem, RAM - K4) + K4 != host(mem, 1 << 32):
        assert c.map_calls == 2


def test_mapper_max_extent_splits_at_aligned_boundaries(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True, max_extent=M2)
    for i in range(1024 + 256):                         # 5 MiB from IOVA 1 MiB
        m.map_py((1 << 20) + i * K4, K4, i * K4)
    assert m.flush_py() == 0
    assert [(e[0], e[1]) for e in c.entries_py()] == [(1 << 20, 1 << 20), (M2, M2), (2 * M2, M2)]
    # a partial unmap re-maps only the rest of its 2 MiB extent
    assert m.unmap_py(M2, K4) == 0
    assert [(e[0], e[1]) for e in c.entries_py()] == [(1 << 20, 1 << 20), (M2 + K4, M2 - K4),
                                                      (2 * M2, M2)]
    with pytest.raises(ValueError):
        VfioDmaMapper(mem, c, max_extent=3 * K4)


def test_mapper_without_batching_maps_each_at_once(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=False)
    for i in range(512):
        assert m.map_py(i * K4, K4, i * K4) == 0
        assert c.map_calls == i + 1
    assert m.flush_py() == 0
    assert c.entries == 512 == m.extents == m.host_map_calls


def test_mapper_2m_maps_are_one_host_call_each(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=False)
    for i in range(4):
        assert m.map_py(0x40000000 + i * M2, M2, i * M2) == 0
    assert c.map_calls == 4 and m.bytes_mapped == 4 * M2


def test_mapper_efault_outside_ram(mem):
    c = sim()
    for batching in (True, False):
        m = VfioDmaMapper(mem, c, batching=batching)
        assert m.map_py(0, K4, RAM) == -errno.EFAULT                 # just past low RAM
        assert m.map_py(0, 2 * K4, RAM - K4) == -errno.EFAULT        # straddles its end
        assert m.map_py(0, K4, 0xE0000000) == -errno.EFAULT          # in the hole
        assert m.map_py(0, K4, (1 << 32) + (4 << 20)) == -errno.EFAULT
        assert m.map_py(0, K4, 2**64 - K4) == -errno.EFAULT
        assert m.map_py(0, 8 << 20, (1 << 32)) == -errno.EFAULT      # larger than the region
        assert m.flush_py() == 0 and m.pending == 0
    assert c.map_calls == 0 and c.entries == 0


def test_mapper_maps_without_permission_are_not_sent(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=False)
    assert m.map_py(0, K4, 0, 0) == 0
    assert c.map_calls == 0


def test_partial_unmap_of_coalesced_extent_keeps_the_rest(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    for i in range(512):
        m.map_py(i * K4, K4, 0x200000 + i * K4)
    m.flush_py()
    base = host(mem, 0x200000)
    assert m.unmap_py(100 * K4, K4) == 0                # the guest unmaps one page of 512
    assert c.entries_py() == [(0, 100 * K4, base, RW),
                              (101 * K4, 411 * K4, base + 101 * K4, RW)]
    assert [e[4] for e in m.extents_py()] == [100, 411]
    assert m.host_unmap_calls == 1 and m.remaps == 2 and m.map_errors == 0
    assert c.unmap_calls == 1          # the whole extent, never a bisecting range
    assert m.bytes_mapped == 511 * K4
    # unmap the head page of the left part, then a range over both parts
    assert m.unmap_py(0, K4) == 0
    assert c.entries_py()[0] == (K4, 99 * K4, base + K4, RW)
    assert m.unmap_py(50 * K4, 100 * K4) == 0
    assert c.entries_py() == [(K4, 49 * K4, base + K4, RW),
                              (150 * K4, 362 * K4, base + 150 * K4, RW)]
    assert m.map_errors == 0 and m.last_error == 0
    assert sum(e[1] for e in m.mappings_py()) == m.bytes_mapped == 411 * K4
    # the unmapped pages can be mapped again (no leftover host entry)
    assert m.map_py(100 * K4, K4, 0) == 0 and m.flush_py() == 0


def test_unmap_inside_one_guest_mapping_trims_the_record(mem):
    """Not what the virtio-iommu core sends (it unmaps whole mappings), but kept consistent."""
    c = sim()
    m = VfioDmaMapper(mem, c, batching=False)
    assert m.map_py(0, 8 * K4, 0) == 0
    assert m.unmap_py(3 * K4, 2 * K4) == 0
    base = host(mem, 0)
    assert c.entries_py() == [(0, 3 * K4, base, RW), (5 * K4, 3 * K4, base + 5 * K4, RW)]
    assert m.mappings_py() == c.entries_py()
    assert m.unmap_py(0, K4) == 0 and m.unmap_py(7 * K4, 4 * K4) == 0
    assert m.mappings_py() == c.entries_py() == [(K4, 2 * K4, base + K4, RW),
                                                 (5 * K4, 2 * K4, base + 5 * K4, RW)]
    assert m.map_errors == 0


def test_unmap_of_whole_extents_needs_no_remap(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    for i in range(16):
        m.map_py(i * K4, K4, i * K4)
    m.map_py(0x100000, K4, 0x100000)
    m.flush_py()
    assert m.unmap_py(0, 0x200000) == 0
    assert c.entries == 0 and m.remaps == 0 and m.host_unmap_calls == 2 and c.map_calls == 2
    assert m.extents == 0 and m.bytes_mapped == 0 and m.mappings_py() == []
    assert m.unmap_py(0, K4) == 0 and m.host_unmap_calls == 2    # nothing there


def test_unmap_flushes_pending_maps_first(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    for i in range(8):
        m.map_py(i * K4, K4, i * K4)
    assert m.unmap_py(0, 4 * K4) == 0
    assert m.pending == 0
    assert c.entries_py() == [(4 * K4, 4 * K4, host(mem, 4 * K4), RW)]


def test_unmap_all(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=True)
    for i in range(8):
        m.map_py(i * 2 * K4, K4, i * K4)
    assert m.unmap_all_py() == 0
    assert c.entries == 0 and m.extents == 0 and m.mappings_py() == []


def test_enospc_without_batching_and_under_the_limit_with_it(mem):
    limit = 100
    c = sim(limit=limit)
    m = VfioDmaMapper(mem, c, batching=False)
    results = [m.map_py(i * K4, K4, i * K4) for i in range(200)]
    assert results[:limit] == [0] * limit
    assert results[limit:] == [-errno.ENOSPC] * 100            # reaches the caller every time
    assert m.map_errors == 100 and m.last_error == -errno.ENOSPC and c.entries == limit
    assert m.extents == limit                                   # failed maps are not recorded

    c = sim(limit=limit)
    m = VfioDmaMapper(mem, c, batching=True)
    assert all(m.map_py(i * K4, K4, i * K4) == 0 for i in range(200))
    assert m.flush_py() == 0
    assert c.entries == 1 and c.peak_entries == 1 and m.map_errors == 0


def test_enospc_from_a_batch_reaches_flush(mem):
    c = sim(limit=10)
    m = VfioDmaMapper(mem, c, batching=True)
    for i in range(20):
        m.map_py(i * K4, K4, (20 - i) * 2 * K4)      # scattered: 20 extents
    assert m.flush_py() == -errno.ENOSPC
    assert c.entries == 10 == m.extents
    assert len(m.mappings_py()) == 10


def test_enospc_when_a_partial_unmap_needs_one_more_entry(mem):
    """Splitting an extent costs an entry; at the limit the right part cannot be re-mapped."""
    c = sim(limit=1)
    m = VfioDmaMapper(mem, c, batching=True)
    for i in range(8):
        m.map_py(i * K4, K4, i * K4)
    assert m.flush_py() == 0
    assert m.unmap_py(3 * K4, K4) == -errno.ENOSPC
    assert c.entries_py() == [(0, 3 * K4, host(mem, 0), RW)]
    assert m.extents_py() == [(0, 3 * K4, host(mem, 0), RW, 3)]
    assert [e[0] for e in m.mappings_py()] == [0, K4, 2 * K4]   # the record matches the host


def test_error_in_flush_inside_unmap_is_reported_by_next_flush(mem):
    c = sim(limit=1)
    m = VfioDmaMapper(mem, c, batching=True)
    m.map_py(0, K4, 0)
    m.map_py(0x10000, K4, 0x10000)
    assert m.unmap_py(0x40000, K4) == 0          # the unmap itself is fine
    assert m.flush_py() == -errno.ENOSPC          # the map that did not fit is not lost
    assert m.flush_py() == 0


def test_eexist_from_overlapping_guest_maps_propagates(mem):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=False)
    assert m.map_py(0, 2 * K4, 0) == 0
    assert m.map_py(K4, K4, 0) == -errno.EEXIST


# Differential: a random sequence of guest MAP/UNMAP/flush against a page-level model.  After
# every flush the simulation's entries must hold exactly the model's pages (same host address),
# and the host must never have refused anything (no bisecting unmap, no overlap).

PAGES = 24
EXAMPLES = int(os.environ.get("HYPERPY_VFIO_EXAMPLES", "1000"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["map", "next", "next", "next", "unmap", "unmap", "flush"]),
                              st.integers(0, PAGES - 1), st.integers(1, 4),
                              st.integers(0, PAGES - 1),
                              st.sampled_from([R | W, R | W, R | W, R, W]),
                              st.sampled_from([True, True, True, False])),
                    min_size=5, max_size=60),
       batching=st.booleans())
def test_mapper_matches_a_page_model(mem, ops, batching):
    c = sim()
    m = VfioDmaMapper(mem, c, batching=batching)
    model = {}          # iova page -> (host address, flags); includes queued maps
    mappings = []       # guest mappings as the IOMMU core would hold them (no overlap)
    nxt = 0             # "next" maps the pages after the last map, contiguous in IOVA and gpa
    for op, page, npages, gpage, flags, contig in ops:
        if op == "next":
            op, page, gpage, contig = "map", nxt, nxt, True
        if op == "map":
            nxt = page + npages
            pages = range(page, min(page + npages, PAGES))
            if not pages or any(p in model for p in pages):
                continue                       # the virtio-iommu core refuses overlaps
            gpa = (page if contig else gpage) * K4
            assert m.map_py(page * K4, len(pages) * K4, gpa, flags) == 0
            hflags = (VFIO_DMA_MAP_FLAG_READ if flags & R else 0) | (
                VFIO_DMA_MAP_FLAG_WRITE if flags & W else 0)
            for j, p in enumerate(pages):
                model[p] = (host(mem, gpa) + j * K4, hflags)
            mappings.append((page, len(pages)))
        elif op == "unmap":
            # the core unmaps whole mappings: cover every mapping that starts in [page, +npages)
            inside = [mp for mp in mappings if page <= mp[0] < page + npages]
            if not inside:
                continue
            lo = min(mp[0] for mp in inside)
            hi = max(mp[0] + mp[1] for mp in inside)
            if any(mp not in inside and mp[0] < hi and lo < mp[0] + mp[1] for mp in mappings):
                continue
            assert m.unmap_py(lo * K4, (hi - lo) * K4) == 0
            for mp in inside:
                mappings.remove(mp)
                for p in range(mp[0], mp[0] + mp[1]):
                    del model[p]
        else:
            assert m.flush_py() == 0
    assert m.flush_py() == 0
    got = {}
    for iova, size, vaddr, fl in c.entries_py():
        for j in range(size // K4):
            got[iova // K4 + j] = (vaddr + j * K4, fl)
    assert got == model
    assert m.map_errors == 0 and c.entries == m.extents
    assert m.bytes_mapped == len(model) * K4
    assert sum(e[1] for e in m.mappings_py()) == m.bytes_mapped
    assert [e[:4] for e in m.extents_py()] == c.entries_py()
    event(f"partial unmaps re-mapped parts: {'yes' if m.remaps else 'no'}")
    event(f"extents coalesced: {'yes' if m.extents < len(mappings) else 'no'}")


# ---------------------------------------------------------------------------------------------
# Opening a container: the real path and the explicit simulation


def test_sim_selector_returns_the_simulation_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="hyperpy.vfio"):
        c = open_container("sim:", entry_limit=1000, pin_ns_per_page=5)
    assert isinstance(c, SimulatedType1Container)
    assert c.dma_entry_limit == 1000 and c.pin_ns_per_page == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "SIMULATION" in warnings[0].getMessage()
    assert isinstance(open_container("sim:"), SimulatedType1Container)
    assert open_container("sim:").dma_entry_limit == 65535


def _one_line(e):
    s = str(e.value)
    assert "\n" not in s
    return s


@pytest.mark.skipif(os.path.exists("/dev/vfio/vfio"), reason="this host has VFIO")
def test_real_vfio_without_dev_vfio_is_a_clear_error():
    devices = sorted(Path("/sys/bus/pci/devices").glob("*")) if Path("/sys/bus/pci/devices").exists() else []
    if devices:
        with pytest.raises(DeviceError) as e:
            open_container(str(devices[0]))
        s = _one_line(e)
        assert devices[0].name in s and "/dev/vfio" in s and "modprobe vfio-pci" in s
    with pytest.raises(DeviceError) as e:
        open_container("/sys/bus/pci/devices/0000:7f:1f.7")
    s = _one_line(e)
    assert "0000:7f:1f.7" in s and "no such PCI device" in s


def _fake_sysfs(tmp_path, driver=None, group=7):
    sysfs = tmp_path / "sys"
    dev = sysfs / "bus" / "pci" / "devices" / "0000:03:00.0"
    dev.mkdir(parents=True)
    if group is not None:
        (sysfs / "kernel" / "iommu_groups" / str(group)).mkdir(parents=True)
        os.symlink(sysfs / "kernel" / "iommu_groups" / str(group), dev / "iommu_group")
    if driver:
        (sysfs / "bus" / "pci" / "drivers" / driver).mkdir(parents=True)
        os.symlink(sysfs / "bus" / "pci" / "drivers" / driver, dev / "driver")
    devvfio = tmp_path / "devvfio"
    devvfio.mkdir()
    (devvfio / "vfio").write_text("")
    return sysfs, dev, devvfio


def test_device_not_bound_to_vfio_pci(tmp_path):
    sysfs, dev, devvfio = _fake_sysfs(tmp_path, driver="virtio-pci")
    with pytest.raises(DeviceError) as e:
        open_container(str(dev), sysfs=sysfs, dev_vfio=devvfio)
    s = _one_line(e)
    assert "0000:03:00.0 is bound to virtio-pci, not vfio-pci" in s
    assert "bind it to vfio-pci" in s and "drivers/vfio-pci/bind" in s and "unbind" in s
    # a bare address works too, and an unbound device gets the same hint without unbind
    sysfs2, dev2, devvfio2 = _fake_sysfs(tmp_path / "b", driver=None)
    with pytest.raises(DeviceError) as e:
        open_container("0000:03:00.0", sysfs=sysfs2, dev_vfio=devvfio2)
    s = _one_line(e)
    assert "no driver" in s and "drivers/vfio-pci/bind" in s and "unbind" not in s


def test_device_without_iommu_group(tmp_path):
    sysfs, dev, devvfio = _fake_sysfs(tmp_path, driver="vfio-pci", group=None)
    with pytest.raises(DeviceError) as e:
        open_container(str(dev), sysfs=sysfs, dev_vfio=devvfio)
    assert "no IOMMU group" in _one_line(e) and "intel_iommu=on" in str(e.value)


def test_group_node_missing(tmp_path):
    sysfs, dev, devvfio = _fake_sysfs(tmp_path, driver="vfio-pci", group=7)
    with pytest.raises(DeviceError) as e:
        open_container(str(dev), sysfs=sysfs, dev_vfio=devvfio)
    assert "/7 does not exist" in _one_line(e)


def test_group_that_is_not_a_vfio_node_is_a_device_error(tmp_path):
    """A plain file in place of /dev/vfio/vfio: the ioctls fail, the error stays one line."""
    sysfs, dev, devvfio = _fake_sysfs(tmp_path, driver="vfio-pci", group=7)
    (devvfio / "7").write_text("")
    with pytest.raises(DeviceError) as e:
        open_container(str(dev), sysfs=sysfs, dev_vfio=devvfio)
    assert "0000:03:00.0" in _one_line(e)


def test_dma_entry_limit_from_sysfs(tmp_path):
    assert read_dma_entry_limit(tmp_path) == 65535
    p = tmp_path / "module" / "vfio_iommu_type1" / "parameters"
    p.mkdir(parents=True)
    (p / "dma_entry_limit").write_text("1234\n")
    assert read_dma_entry_limit(tmp_path) == 1234


def test_real_container_reports_errno_from_the_kernel():
    """On an fd that is not a VFIO container the real ioctls fail and the errno comes back."""
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        c = VfioType1Container(fd)
        assert not c.simulated and "SIMULAT" not in repr(c)
        assert c.dma_map_py(0, K4, VA, RW) == -errno.ENOTTY
        assert c.dma_unmap_py(0, K4) == (-errno.ENOTTY, 0)
        assert c.entries == 0 and c.map_calls == 1 and c.unmap_calls == 1
    finally:
        os.close(fd)


def test_dma_avail_query_on_a_non_vfio_fd_is_an_oserror(tmp_path):
    """VFIO_IOMMU_GET_INFO (the host's remaining DMA mappings) fails cleanly on a wrong fd; the
    real query runs in the nested tier (tests/nested/test_nested_vfio.py)."""
    from hyperpy._fast.vfio import VfioType1Container, iommu_dma_avail

    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(OSError, match="VFIO_IOMMU_GET_INFO"):
            iommu_dma_avail(fd)
        c = VfioType1Container(fd, 100)
        with pytest.raises(OSError):
            c.use_host_dma_avail()
        assert c.dma_entry_limit == 100
    finally:
        os.close(fd)
