"""virtio-iommu request core: every request type and status, translation, IOTLB, faults, listeners.

A host-side "driver" builds the request bytes of the spec (struct layouts from
``<linux/virtio_iommu.h>``, sizes checked against the Cython module) and checks the status in the
tail.  Every scenario also runs on the pure-Python reference (``hyperpy/reference/iommu.py``).
"""

from __future__ import annotations

import os
import struct

import pytest

from hyperpy._fast import iommu as m
from hyperpy._fast.guestmem import GuestMemory
from hyperpy.reference import iommu as ref

EP, EP2, EP3 = 0x08, 0x10, 0x18
R, W, RW = m.MAP_F_READ, m.MAP_F_WRITE, m.MAP_F_READ | m.MAP_F_WRITE
K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30


def attach(dom, ep, flags=0, reserved=b"\0\0\0\0"):
    return struct.pack("<B3xIII", m.T_ATTACH, dom, ep, flags) + reserved


def detach(dom, ep):
    return struct.pack("<B3xII8x", m.T_DETACH, dom, ep)


def map_(dom, start, end, phys, flags=RW):
    return struct.pack("<B3xIQQQI", m.T_MAP, dom, start, end, phys, flags)


def unmap(dom, start, end):
    return struct.pack("<B3xIQQ4x", m.T_UNMAP, dom, start, end)


def probe(ep):
    return struct.pack("<B3xI64x", m.T_PROBE, ep)


def test_request_sizes_match_header():
    assert len(attach(1, 1)) == m.LAYOUT["attach"] - 4 == m.REQ_IN[m.T_ATTACH]
    assert len(detach(1, 1)) == m.LAYOUT["detach"] - 4
    assert len(map_(1, 0, 0, 0)) == m.LAYOUT["map"] - 4
    assert len(unmap(1, 0, 0)) == m.LAYOUT["unmap"] - 4
    assert len(probe(1)) == m.LAYOUT["probe"]
    assert m.LAYOUT["fault"] == 24 and m.LAYOUT["config"] == 40 and m.LAYOUT["resv_mem"] == 24


class Both:
    """Runs each request on the Cython core and the reference and checks they agree."""

    def __init__(self, eps=(EP, EP2, EP3), **kw):
        self.rec = m.RecordingListener()
        self.c = m.VirtioIommuCore(listener_factory=lambda d, e: self.rec, **kw)
        kw.pop("mem", None)
        self.r = ref.Core(**kw)
        for ep in eps:
            self.c.add_endpoint(ep)
            self.r.add_endpoint(ep)

    def req(self, data, resp_len=None):
        a = self.c.handle_py(data, resp_len)
        b = self.r.handle(data, resp_len)
        assert a == b
        return a

    def st(self, data, resp_len=None):
        out = self.req(data, resp_len)
        assert len(out) >= 4, out
        return m.STATUS_NAMES[out[-4]]

    def check(self):
        assert self.c.endpoints == self.r.endpoints
        assert sorted(self.c.domains) == sorted(self.r.domains)
        for d in self.c.domains:
            assert self.c.mappings(d) == self.r.mappings(d)
        assert self.rec.events == self.r.events


@pytest.fixture
def b():
    x = Both()
    yield x
    x.check()


# --- ATTACH / DETACH ---

def test_attach_ok_and_creates_domain(b):
    assert b.st(attach(1, EP)) == "OK"
    assert b.c.endpoints[EP] == 1 and list(b.c.domains) == [1]
    assert b.st(attach(1, EP)) == "OK"          # again: no-op
    assert b.st(attach(1, EP2)) == "OK"         # two endpoints share a domain
    assert b.c.domains[1].n_endpoints == 2


def test_attach_unknown_endpoint_noent(b):
    assert b.st(attach(1, 0x99)) == "NOENT"
    assert b.c.domains == {}


def test_attach_reserved_and_flags_inval(b):
    assert b.st(attach(1, EP, reserved=b"\0\1\0\0")) == "INVAL"
    assert b.st(attach(1, EP, flags=2)) == "INVAL"
    assert b.c.endpoints[EP] is None


def test_attach_domain_out_of_range():
    b = Both(domain_range=(1, 10))
    assert b.st(attach(0, EP)) == "RANGE"
    assert b.st(attach(11, EP)) == "RANGE"
    assert b.st(attach(10, EP)) == "OK"
    b.check()


def test_attach_moves_endpoint_and_frees_empty_domain(b):
    assert b.st(attach(1, EP)) == "OK"
    assert b.st(map_(1, 0x10000, 0x1ffff, 0x40000)) == "OK"
    assert b.st(attach(2, EP)) == "OK"
    assert list(b.c.domains) == [2]             # domain 1 had no endpoint left: freed with maps
    assert ("unmap", 0x10000, 0x10000) in b.rec.events
    assert b.st(map_(1, 0x10000, 0x1ffff, 0x40000)) == "NOENT"


def test_attach_bypass_domain(b):
    assert b.st(attach(1, EP, flags=m.ATTACH_F_BYPASS)) == "OK"
    assert b.c.domains[1].bypass
    assert b.st(attach(1, EP2)) == "INVAL"      # not consistent with the bypass domain
    assert b.st(map_(1, 0, 0xfff, 0)) == "INVAL"
    assert b.st(unmap(1, 0, 0xfff)) == "INVAL"
    assert b.c.translate_py(EP, 0x1234, 4) == (m.X_OK, 0x1234)


def test_attach_bypass_flag_needs_bypass_config():
    b = Both()
    feats = b.c.offered & ~(1 << m.F_BYPASS_CONFIG)
    b.c.set_negotiated(feats)
    b.r.set_negotiated(feats)
    assert b.st(attach(1, EP, flags=m.ATTACH_F_BYPASS)) == "INVAL"
    b.check()


def test_max_domains_nomem():
    b = Both(max_domains=2)
    assert b.st(attach(1, EP)) == "OK"
    assert b.st(attach(2, EP2)) == "OK"
    assert b.st(attach(3, EP3)) == "NOMEM"
    assert b.st(attach(3, EP2)) == "OK"          # moving the only endpoint frees its slot
    assert sorted(b.c.domains) == [1, 3]
    b.check()


def test_detach(b):
    assert b.st(detach(1, 0x99)) == "NOENT"
    assert b.st(detach(1, EP)) == "INVAL"        # domain does not exist
    assert b.st(attach(1, EP)) == "OK"
    assert b.st(attach(2, EP2)) == "OK"
    assert b.st(detach(2, EP)) == "INVAL"        # attached, but to another domain
    assert b.st(detach(1, EP)) == "OK"
    assert b.c.endpoints[EP] is None and 1 not in b.c.domains


# --- MAP / UNMAP ---

@pytest.fixture
def d1(b):
    assert b.st(attach(1, EP)) == "OK"
    return b


def test_map_ok_and_listener(d1):
    assert d1.st(map_(1, 0x100000, 0x1fffff, 0x200000, R)) == "OK"
    assert d1.c.mappings(1) == [(0x100000, 0x1fffff, 0x200000, R)]
    assert d1.rec.events[-1] == ("map", 0x100000, 0x100000, 0x200000, R)
    assert d1.c.maps == 1


def test_map_unknown_domain_noent(d1):
    assert d1.st(map_(7, 0, 0xfff, 0)) == "NOENT"


def test_map_overlap_inval(d1):
    assert d1.st(map_(1, 0x10000, 0x1ffff, 0)) == "OK"
    for s, e in [(0x10000, 0x1ffff), (0xf000, 0x10fff), (0x1f000, 0x20fff), (0x11000, 0x11fff),
                 (0x0, 0xfffff)]:
        assert d1.st(map_(1, s, e, 0)) == "INVAL", (hex(s), hex(e))
    assert d1.st(map_(1, 0x20000, 0x20fff, 0)) == "OK"     # adjacent is fine
    assert d1.st(map_(1, 0xf000, 0xffff, 0)) == "OK"
    assert len(d1.c.mappings(1)) == 3


def test_map_unaligned_range(d1):
    assert d1.st(map_(1, 0x1001, 0x1fff, 0)) == "RANGE"
    assert d1.st(map_(1, 0x1000, 0x1ffe, 0)) == "RANGE"
    assert d1.st(map_(1, 0x1000, 0x1fff, 0x10)) == "RANGE"
    assert d1.c.mappings(1) == []


def test_map_outside_input_range(d1):
    top = (1 << 48) - 1
    assert d1.st(map_(1, top + 1, top + K4, 0)) == "RANGE"
    assert d1.st(map_(1, top + 1 - K4, top + K4, 0)) == "RANGE"
    assert d1.st(map_(1, top + 1 - K4, top, 0)) == "OK"


def test_map_end_before_start_inval(d1):
    assert d1.st(map_(1, 0x2000, 0xfff, 0)) == "INVAL"


def test_map_flags(d1):
    assert d1.st(map_(1, 0, 0xfff, 0, 8)) == "INVAL"
    assert d1.st(map_(1, 0, 0xfff, 0, m.MAP_F_MMIO | R)) == "INVAL"   # F_MMIO not offered


def test_map_mmio_when_offered():
    b = Both(mmio=True)
    assert b.st(attach(1, EP)) == "OK"
    assert b.st(map_(1, 0, 0xfff, 0xfec00000, m.MAP_F_MMIO | RW)) == "OK"
    b.check()


def test_map_msi_window_rejected(d1):
    assert d1.st(map_(1, 0xfee00000, 0xfee00fff, 0)) == "RANGE"
    assert d1.st(map_(1, 0xfe000000, 0xffffffff, 0)) == "RANGE"


def test_map_phys_must_be_ram():
    mem = GuestMemory()
    mem.add_region(0, 1 << 20)
    c = m.VirtioIommuCore(mem=mem)
    c.add_endpoint(EP)
    assert c.handle_py(attach(1, EP))[0] == m.S_OK
    assert c.handle_py(map_(1, 0, 0xfffff, 0))[0] == m.S_OK
    assert c.handle_py(map_(1, 0x100000, 0x100fff, 0xff000 + K4))[0] == m.S_RANGE
    assert c.handle_py(map_(1, 0x100000, 0x101fff, 0xff000))[0] == m.S_RANGE  # straddles the end


def test_max_mappings_nomem():
    b = Both(max_mappings=3)
    assert b.st(attach(1, EP)) == "OK"
    for i in range(3):
        assert b.st(map_(1, i * K4, i * K4 + K4 - 1, 0)) == "OK"
    assert b.st(map_(1, 8 * K4, 9 * K4 - 1, 0)) == "NOMEM"
    assert b.st(unmap(1, 0, K4 - 1)) == "OK"
    assert b.st(map_(1, 8 * K4, 9 * K4 - 1, 0)) == "OK"
    b.check()


def test_unmap_spec_examples(b):
    # The spec's UNMAP examples (1)-(7), in 4K pages.
    P = K4

    def mp(s, e):
        return b.st(map_(1, s * P, (e + 1) * P - 1, 0))

    def um(s, e):
        return b.st(unmap(1, s * P, (e + 1) * P - 1))

    assert b.st(attach(1, EP)) == "OK"
    assert um(0, 4) == "OK"                                  # (1)
    assert mp(0, 9) == "OK" and um(0, 9) == "OK"             # (2)
    assert b.c.mappings(1) == []
    assert mp(0, 4) == "OK" and mp(5, 9) == "OK" and um(0, 9) == "OK"   # (3)
    assert b.c.mappings(1) == []
    assert mp(0, 9) == "OK" and um(0, 4) == "RANGE"          # (4): split, nothing removed
    assert len(b.c.mappings(1)) == 1
    assert um(0, 9) == "OK"
    assert mp(0, 4) == "OK" and mp(5, 9) == "OK" and um(0, 4) == "OK"   # (5)
    assert b.c.mappings(1) == [(5 * P, 10 * P - 1, 0, RW)]
    assert um(5, 9) == "OK"
    assert mp(0, 4) == "OK" and um(0, 9) == "OK"             # (6)
    assert mp(0, 4) == "OK" and mp(10, 14) == "OK" and um(0, 14) == "OK"   # (7)
    assert b.c.mappings(1) == []


def test_unmap_split_tail_range_nothing_removed(d1):
    assert d1.st(map_(1, 0x0, 0xfff, 0)) == "OK"
    assert d1.st(map_(1, 0x1000, 0x2fff, 0)) == "OK"
    assert d1.st(unmap(1, 0x0, 0x1fff)) == "RANGE"           # first whole, second split
    assert len(d1.c.mappings(1)) == 2


def test_unmap_unknown_domain_and_inverted(d1):
    assert d1.st(unmap(9, 0, 0xfff)) == "NOENT"
    assert d1.st(unmap(1, 0x2000, 0x1000)) == "INVAL"


def test_map_unmap_need_feature():
    b = Both()
    feats = b.c.offered & ~(1 << m.F_MAP_UNMAP)
    b.c.set_negotiated(feats)
    b.r.set_negotiated(feats)
    assert b.st(attach(1, EP)) == "OK"
    assert b.st(map_(1, 0, 0xfff, 0)) == "UNSUPP"
    assert b.st(unmap(1, 0, 0xfff)) == "UNSUPP"
    b.check()


# --- PROBE ---

def test_probe_msi_region(b):
    out = b.req(probe(EP))
    assert len(out) == 512 + 4
    t, length, sub, start, end = struct.unpack_from("<HHB3xQQ", out)
    assert (t, length, sub) == (m.PROBE_T_RESV_MEM, 20, m.RESV_MEM_T_MSI)
    assert (start, end) == (0xfee00000, 0xfeefffff)
    assert out[24:512] == bytes(488)                         # then a NONE property, zeroes
    assert out[512:] == b"\0\0\0\0"


def test_probe_unknown_endpoint_and_short(b):
    out = b.req(probe(0x99))
    assert out == bytes(512) + bytes([m.S_NOENT, 0, 0, 0])
    out = b.req(probe(EP), resp_len=100)                    # properties smaller than probe_size
    assert out == bytes(96) + bytes([m.S_INVAL, 0, 0, 0])
    out = b.req(probe(EP)[:40])
    assert out == bytes(512) + bytes([m.S_INVAL, 0, 0, 0])


def test_probe_not_negotiated_writes_nothing():
    b = Both()
    feats = b.c.offered & ~(1 << m.F_PROBE)
    b.c.set_negotiated(feats)
    b.r.set_negotiated(feats)
    assert b.req(probe(EP)) == b""
    b.check()


# --- malformed requests ---

def test_unknown_type_and_truncated(b):
    assert b.req(b"\x09\0\0\0" + bytes(32)) == b""           # spec: not written, used len 0
    assert b.c.unwritten == 1
    assert b.req(b"") == b"" and b.req(b"\x01\0") == b""    # no head
    assert b.req(attach(1, EP), resp_len=3) == b""          # no room for the tail
    assert b.st(attach(1, EP)[:10]) == "INVAL"
    assert b.st(map_(1, 0, 0xfff, 0)[:35]) == "INVAL"
    assert b.st(unmap(1, 0, 0xfff)[:20]) == "INVAL"
    assert b.st(detach(1, EP)[:19]) == "INVAL"


def test_unknown_type_unsupp_knob():
    c = m.VirtioIommuCore(unsupp_unknown_type=True)
    assert c.handle_py(b"\x09\0\0\0") == bytes([m.S_UNSUPP, 0, 0, 0])


def test_longer_request_and_response_ok(b):
    assert b.req(attach(1, EP) + b"extra", resp_len=64) == b"\0\0\0\0"


def test_counters(b):
    b.st(attach(1, EP))
    b.st(attach(1, 0x99))
    b.st(map_(1, 0, 0xfff, 0))
    b.st(unmap(1, 0, 0xfff))
    assert b.c.requests == 4 and b.c.maps == 1 and b.c.unmaps == 1
    sc = b.c.status_counts
    assert sc["OK"] == 3 and sc["NOENT"] == 1


# --- translation, bypass, IOTLB, faults ---

def test_translation_and_iotlb_invalidation(d1):
    assert d1.st(map_(1, 0x10000, 0x1ffff, 0x80000, RW)) == "OK"
    assert d1.c.translate_py(EP, 0x10010, 16) == (m.X_OK, 0x80010)
    assert d1.c.translate_py(EP, 0x10020, 16, True) == (m.X_OK, 0x80020)   # IOTLB hit
    assert d1.c.domains[1].iotlb_hits >= 1
    assert d1.st(unmap(1, 0x10000, 0x1ffff)) == "OK"
    assert d1.c.translate_py(EP, 0x10010, 16) == (m.X_MAPPING, None)      # must fault now
    f = d1.c.pop_fault_py()
    assert f["reason"] == m.FAULT_R_MAPPING and f["endpoint"] == EP and f["address"] == 0x10010
    assert f["flags"] == m.FAULT_F_READ | m.FAULT_F_ADDRESS
    assert d1.c.pop_fault_py() is None


def test_translation_range_must_be_in_one_mapping(d1):
    assert d1.st(map_(1, 0x0, 0xfff, 0x10000)) == "OK"
    assert d1.st(map_(1, 0x1000, 0x1fff, 0x11000)) == "OK"   # contiguous, but two mappings
    assert d1.c.translate_py(EP, 0xff0, 0x20)[0] == m.X_MAPPING
    assert d1.c.translate_py(EP, 0xff0, 0x10) == (m.X_OK, 0x10ff0)
    assert d1.c.translate_py(EP, 0x1ff0, 0x11)[0] == m.X_MAPPING
    assert d1.c.translate_py(EP, 2 ** 64 - 4, 8)[0] == m.X_MAPPING       # wraps


def test_translation_permissions(d1):
    assert d1.st(map_(1, 0x0, 0xfff, 0x10000, R)) == "OK"
    assert d1.st(map_(1, 0x1000, 0x1fff, 0x20000, W)) == "OK"
    assert d1.c.translate_py(EP, 0x10, 4, False) == (m.X_OK, 0x10010)
    assert d1.c.translate_py(EP, 0x10, 4, True)[0] == m.X_PERM
    assert d1.c.translate_py(EP, 0x1010, 4, True) == (m.X_OK, 0x20010)
    assert d1.c.translate_py(EP, 0x1010, 4, False)[0] == m.X_PERM
    f = d1.c.pop_fault_py()
    assert f["flags"] == m.FAULT_F_WRITE | m.FAULT_F_ADDRESS


def test_bypass_on_off():
    for bypass in (False, True):
        c = m.VirtioIommuCore(bypass=bypass)
        c.add_endpoint(EP)
        code, gpa = c.translate_py(EP, 0x5000, 8)
        if bypass:
            assert (code, gpa) == (m.X_OK, 0x5000)
        else:
            assert code == m.X_DOMAIN
            assert c.pop_fault_py()["reason"] == m.FAULT_R_DOMAIN
        # Attached: the domain decides, whatever bypass says.
        assert c.handle_py(attach(1, EP))[0] == m.S_OK
        assert c.translate_py(EP, 0x5000, 8)[0] == m.X_MAPPING
        assert c.handle_py(detach(1, EP))[0] == m.S_OK
        assert c.translate_py(EP, 0x5000, 8)[0] == (m.X_OK if bypass else m.X_DOMAIN)
        c.bypass = not bypass                       # the driver flips the config field
        assert c.translate_py(EP, 0x5000, 8)[0] == (m.X_DOMAIN if bypass else m.X_OK)
        assert c.config_bytes()[36] == (0 if bypass else 1)


def test_unknown_endpoint_translate_faults():
    c = m.VirtioIommuCore(bypass=True)
    assert c.translate_py(0x77, 0, 1)[0] == m.X_ENDPOINT
    assert c.pop_fault_py()["reason"] == m.FAULT_R_UNKNOWN


def test_detach_invalidates(d1):
    assert d1.st(attach(1, EP2)) == "OK"
    assert d1.st(map_(1, 0x0, 0xfff, 0x10000)) == "OK"
    assert d1.c.translate_py(EP, 0x10, 4)[0] == m.X_OK
    assert d1.st(detach(1, EP)) == "OK"
    assert d1.c.translate_py(EP, 0x10, 4)[0] == m.X_DOMAIN
    assert d1.c.translate_py(EP2, 0x10, 4)[0] == m.X_OK       # still attached


def test_fault_ring_bounded_and_eventfd():
    c = m.VirtioIommuCore()
    c.add_endpoint(EP)
    for i in range(100):
        c.translate_py(EP, i * K4, 1)
    assert c.faults == 100 and c.faults_dropped == 100 - 64 and c.pending_faults == 64
    assert os.read(c.fault_eventfd, 8)                        # readable while faults pending
    n = 0
    while c.pop_fault_py() is not None:
        n += 1
    assert n == 64
    f = m.VirtioIommuCore()
    f.add_endpoint(EP)
    f.translate_py(EP, 0x1000, 1, True)
    raw = f.pop_fault_py()["bytes"]
    assert raw == struct.pack("<B3xII4xQ", m.FAULT_R_DOMAIN,
                              m.FAULT_F_WRITE | m.FAULT_F_ADDRESS, EP, 0x1000)


def test_iommu_address_space_with_guest_memory():
    mem = GuestMemory()
    mem.add_region(0, 1 << 20)
    c = m.VirtioIommuCore(mem=mem)
    c.add_endpoint(EP)
    asp = m.IommuAddressSpace(mem, c, EP)
    assert asp.translate_py(0x1000, 16) is None                # not attached, bypass off
    c.bypass = True
    assert asp.translate_py(0x1000, 16) == mem.host_address(0x1000)
    assert asp.translate_py((1 << 20) - 8, 16) is None         # bypass still bounds-checked
    c.handle_py(attach(1, EP))
    assert c.handle_py(map_(1, 0x40000000, 0x40001fff, 0x8000, RW)) == b"\0\0\0\0"
    assert asp.translate_py(0x40000010, 32, True) == mem.host_address(0x8010)
    assert asp.translate_py(0x40001ff0, 0x20) is None          # runs past the mapping
    assert asp.translate_py(0x8010, 4) is None                 # GPA is not an IOVA
    c.handle_py(unmap(1, 0x40000000, 0x40001fff))
    assert asp.translate_py(0x40000010, 32) is None


def test_iommu_address_space_drives_virtqueue():
    # The virtqueue engine walks rings through the IOMMU: map the rings and a buffer at IOVAs.
    from hyperpy._fast import virtqueue as vq
    mem = GuestMemory()
    mem.add_region(0, 1 << 20)
    c = m.VirtioIommuCore(mem=mem)
    c.add_endpoint(EP)
    c.handle_py(attach(1, EP))
    IOVA = 0x7000_0000
    assert c.handle_py(map_(1, IOVA, IOVA + 0xffff, 0x10000, RW)) == b"\0\0\0\0"
    asp = m.IommuAddressSpace(mem, c, EP)
    q = vq.SplitQueue(asp, 16)
    desc, avail, used = IOVA, IOVA + 0x1000, IOVA + 0x2000
    # One readable descriptor of 64 bytes at IOVA+0x4000, made available.
    mem.write(0x10000, struct.pack("<QIHH", IOVA + 0x4000, 64, 0, 0))
    mem.write(0x11000, struct.pack("<HHH", 0, 1, 0))
    q.configure(desc, avail, used, 16)
    chain = q.pop_py()
    assert chain.readable == [(mem.host_address(0x14000), 64)]
    q.push_used_py(chain.head, 0)
    assert struct.unpack_from("<HH", mem.read(0x12000, 4))[1] == 1   # used idx, written via IOVA
    # After UNMAP the ring is gone: enabling the queue again must not reach guest memory.
    c.handle_py(unmap(1, IOVA, IOVA + 0xffff))
    with pytest.raises(vq.QueueError):
        q.configure(desc, avail, used, 16)
        q.pop_py()
    assert c.faults >= 1


def test_listener_failure_rolls_back():
    rec = m.RecordingListener()
    c = m.VirtioIommuCore(listener_factory=lambda d, e: rec)
    c.add_endpoint(EP)
    c.handle_py(attach(1, EP))
    rec.map_result = -28                                        # -ENOSPC: host entry limit
    assert c.handle_py(map_(1, 0, 0xfff, 0))[0] == m.S_NOMEM
    rec.map_result = -5
    assert c.handle_py(map_(1, 0, 0xfff, 0))[0] == m.S_DEVERR
    assert c.mappings(1) == []


def test_listener_factory_failure_deverr():
    def boom(d, e):
        raise RuntimeError("no host container")
    c = m.VirtioIommuCore(listener_factory=boom)
    c.add_endpoint(EP)
    assert c.handle_py(attach(1, EP))[0] == m.S_DEVERR
    assert "no host container" in c.last_error and c.endpoints[EP] is None


def test_batch_flushes_each_dirty_listener_once():
    rec = m.RecordingListener()
    c = m.VirtioIommuCore(listener_factory=lambda d, e: rec)
    c.add_endpoint(EP)
    out = c.handle_batch_py([(attach(1, EP), None)] +
                            [(map_(1, i * K4, i * K4 + K4 - 1, i * K4), None) for i in range(4)])
    assert all(o == b"\0\0\0\0" for o in out)
    assert [e[0] for e in rec.events] == ["map"] * 4 + ["flush"]
    n = len(rec.events)
    c.handle_batch_py([(probe(EP), None)])
    assert len(rec.events) == n                                 # nothing changed: no flush


def test_domain_direct_api_binary_search():
    d = m.IommuDomain(5, max_mappings=100000)
    for i in range(0, 2000, 2):                                 # every other 4K page
        assert d.map_py(i * K4, i * K4 + K4 - 1, (i + 7) * K4, RW) == m.S_OK
    assert len(d) == 1000
    assert d.translate_py(500 * K4 + 3) == (m.X_OK, 507 * K4 + 3)
    assert d.translate_py(501 * K4)[0] == m.X_MAPPING
    assert d.unmap_py(0, 1000 * K4 - 1) == m.S_OK
    assert len(d) == 500 and d.mappings[0][0] == 1000 * K4


def test_reset_detaches_everything(b):
    b.st(attach(1, EP))
    b.st(map_(1, 0, 0xfff, 0))
    b.c.reset()
    assert b.c.domains == {} and b.c.endpoints[EP] is None
    b.r = ref.Core()
    for ep in (EP, EP2, EP3):
        b.r.add_endpoint(ep)
    b.rec.events.clear()
    b.r.events.clear()


def test_remove_endpoint():
    c = m.VirtioIommuCore()
    c.add_endpoint(EP)
    c.handle_py(attach(3, EP))
    c.remove_endpoint(EP)
    assert c.endpoints == {} and c.domains == {}
    with pytest.raises(KeyError):
        c.remove_endpoint(EP)
    with pytest.raises(ValueError):
        c.add_endpoint(EP2) or c.add_endpoint(EP2)


def test_config_bytes():
    c = m.VirtioIommuCore(domain_range=(1, 100), probe_size=256)
    psm, s, e, ds, de, ps, byp = struct.unpack("<QQQIIIB3x", c.config_bytes())
    assert psm == K4 | M2 | G1 and (s, e) == (0, (1 << 48) - 1)
    assert (ds, de, ps, byp) == (1, 100, 256, 0)
    assert c.offered == sum(1 << f for f in (m.F_INPUT_RANGE, m.F_DOMAIN_RANGE, m.F_MAP_UNMAP,
                                             m.F_PROBE, m.F_BYPASS_CONFIG))
