"""Fuzz the virtio-iommu request core against the pure-Python reference.

Hypothesis draws a device configuration (page granule, ranges, limits, bypass, negotiated
features) and a sequence of requests: every type plus unknown ones, fields chosen near the
interesting edges (unaligned, overlapping, splitting, out of the input/domain range, the MSI
window, phys outside RAM, unknown domains and endpoints, bad flags and reserved bytes), truncated
requests, short or odd-sized writable parts, and raw random bytes, interleaved with translations.
The Cython core and the reference must write the same bytes for every request (so the status is
always a valid one, or nothing is written where the spec says so), and agree on translations,
fault records, endpoints, domains, mappings and the listener calls.

CI runs HYPERPY_FUZZ_EXAMPLES (default 10,000) examples.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperpy._fast import iommu as m
from hyperpy._fast.guestmem import GuestMemory
from hyperpy.reference import iommu as ref

from testutil import ByteCursor

EXAMPLES = int(os.environ.get("HYPERPY_FUZZ_EXAMPLES", "10000"))
RAM = 4 << 20
K4 = 1 << 12
MASKS = [m.DEFAULT_PAGE_SIZE_MASK, 1 << 21, 1, (1 << 16) | (1 << 12)]
EPS = [1, 2, 3]
VALID_STATUS = set(m.STATUS_NAMES)

_MEM = GuestMemory()
_MEM.add_region(0, RAM)


def _addr(c: ByteCursor, top: int) -> int:
    k = c.u8() % 16
    if k < 9:
        return c.below(32) * K4                        # small, page aligned: lots of overlap
    if k < 10:
        return c.below(32) * K4 + c.below(K4)          # unaligned
    if k < 11:
        return 0xfee00000 + c.below(4) * K4 - 2 * K4   # around the MSI window
    if k < 12:
        return top + 1 - c.below(4) * K4               # around the end of the input range
    if k < 13:
        return c.below(4) << 21                        # huge-page aligned
    if k < 15:
        return c.int(8)                                # anything
    return 2 ** 64 - 1 - c.below(K4)


def _end(c: ByteCursor, start: int) -> int:
    k = c.u8() % 8
    if k < 5:
        return (start + (c.below(6) + 1) * K4 - 1) % 2 ** 64
    if k < 6:
        return (start + c.below(3 * K4)) % 2 ** 64
    if k < 7:
        return (start - c.below(2 * K4)) % 2 ** 64      # before the start
    return c.int(8)


def _phys(c: ByteCursor) -> int:
    k = c.u8() % 8
    if k < 6:
        return c.below(RAM // K4 + 4) * K4             # mostly RAM, sometimes just past it
    if k < 7:
        return c.below(RAM)
    return c.int(8)


def _domain(c: ByteCursor) -> int:
    k = c.u8() % 8
    return c.below(3) if k < 6 else (c.below(8) if k < 7 else c.int(4))


def _live(c: ByteCursor, live: list) -> int:
    # MAP/UNMAP mostly name a domain that exists (the driver's view), else any.
    k = c.u8()
    return live[k % len(live)] if live and k < 200 else _domain(c)


def _endpoint(c: ByteCursor) -> int:
    k = c.u8() % 8
    return EPS[k % 3] if k < 6 else (4 if k == 6 else c.int(4))


def _request(c: ByteCursor, top: int, live: list) -> bytes:
    t = c.u8() % 12
    if t < 3:
        flags = c.u8()
        flags = 0 if flags < 200 else (1 if flags < 240 else c.int(4))
        reserved = bytes(4) if c.u8() < 240 else bytes([c.u8(), 0, c.u8(), 0])
        req = struct.pack("<B3xIII", m.T_ATTACH, _domain(c), _endpoint(c), flags) + reserved
    elif t < 4:
        req = struct.pack("<B3xII8x", m.T_DETACH, _domain(c), _endpoint(c))
    elif t < 7:
        start = _addr(c, top)
        f = c.u8()
        flags = 1 + f % 3 if f < 200 else ((f & 7) if f < 250 else c.int(4))
        req = struct.pack("<B3xIQQQI", m.T_MAP, _live(c, live), start, _end(c, start), _phys(c),
                          flags)
    elif t < 9:
        start = _addr(c, top)
        req = struct.pack("<B3xIQQ4x", m.T_UNMAP, _live(c, live), start, _end(c, start))
    elif t < 10:
        req = struct.pack("<B3xI64x", m.T_PROBE, _endpoint(c))
    elif t < 11:
        req = bytes([c.u8() % 8]) + bytes(c.u8() for _ in range(c.below(80)))
    else:
        req = bytes(c.u8() for _ in range(c.below(48)))
    if c.u8() < 24:                                     # truncated
        req = req[:c.below(len(req) + 1)]
    return req


def _run(blob: bytes) -> None:
    c = ByteCursor(blob)
    cfg = c.u8()
    top = (1 << (32 + cfg % 17)) - 1
    kw = dict(page_size_mask=MASKS[(cfg >> 4) % len(MASKS)], input_range=(0, top),
              domain_range=(0, 3 + c.u8() % 4), probe_size=24 + 8 * (c.u8() % 8),
              bypass=bool(c.u8() & 1), max_domains=1 + c.u8() % 3, max_mappings=1 + c.u8() % 6,
              mmio=bool(c.u8() & 1), unsupp_unknown_type=bool(c.u8() & 1))
    rec = m.RecordingListener()
    core = m.VirtioIommuCore(mem=_MEM, listener_factory=lambda d, e: rec, **kw)
    model = ref.Core(mem=_MEM, **kw)
    feats = core.offered if c.u8() < 192 else c.u8()
    core.set_negotiated(feats)
    model.set_negotiated(feats)
    for ep in EPS:
        core.add_endpoint(ep)
        model.add_endpoint(ep)
    if c.u8() < 200:                                   # usually start with a live domain
        req = struct.pack("<B3xIII4x", m.T_ATTACH, 0, 1, 0)
        assert core.handle_py(req) == model.handle(req)
    while c.more():
        k = c.u8() % 8
        if k < 6:
            req = _request(c, top, sorted(model.domains))
            rl = None if c.u8() < 220 else c.below(kw["probe_size"] + 40)
            got = core.handle_py(req, rl)
            want = model.handle(req, rl)
            assert got == want, (req.hex(), rl)
            if got:
                assert got[-4] in VALID_STATUS and got[-3:] == b"\0\0\0"
        elif k < 7:
            ep = _endpoint(c)
            iova = _addr(c, top)
            length = c.below(3 * K4)
            write = bool(c.u8() & 1)
            assert core.translate_py(ep, iova, length, write) == model.translate(ep, iova, length,
                                                                                 write)
        elif c.u8() & 1:
            core.flush_listeners_py()                  # end of a notification batch
            model.flush_listeners()
        else:
            core.bypass = model.bypass = 1 - model.bypass   # the driver writes config `bypass`
    core.flush_listeners_py()
    model.flush_listeners()
    assert core.endpoints == model.endpoints
    assert sorted(core.domains) == sorted(model.domains)
    for d in core.domains:
        assert core.mappings(d) == model.mappings(d)
        assert len(core.mappings(d)) <= kw["max_mappings"]
    assert len(core.domains) <= kw["max_domains"]
    assert rec.events == model.events
    faults = []
    while (f := core.pop_fault_py()) is not None:
        faults.append((f["reason"], f["flags"], f["endpoint"], f["address"]))
    assert faults == model.faults[:64]
    assert core.faults == len(model.faults)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.binary(min_size=0, max_size=600))


def test_iommu_core_matches_reference(blob):
    _run(blob)


def test_fuzz_smoke_all_zero_and_ones():
    _run(bytes(200))
    _run(b"\xff" * 200)
