"""Split virtqueue engine: the Cython engine and the pure-Python reference, side by side.

Every behavioural test runs against both implementations (the ``impl`` fixture), and the
differential tests run the same rings through both and compare chains, errors and ring bytes.
"""

from __future__ import annotations

import re

import pytest

from hyperpy._fast import virtqueue as vq
from hyperpy._fast.addrspace import AddressSpace
from hyperpy._fast.guestmem import GuestMemory
from hyperpy.errors import DeviceError
from hyperpy.reference import virtqueue as ref

from virtio_driver import F_INDIRECT, F_NEXT, F_WRITE, Driver, chain_gpas

RAM = 1 << 20
HIGH = 0x10_0000_0000          # a second RAM region, with a gap below it
HIGH_SIZE = 64 << 10


def new_mem() -> GuestMemory:
    m = GuestMemory()
    m.add_region(0, RAM)
    m.add_region(HIGH, HIGH_SIZE)
    return m


def make_queue(impl: str, mem: GuestMemory, max_size: int):
    if impl == "cython":
        return vq.SplitQueue(AddressSpace(mem), max_size)
    return ref.SplitQueue(mem, max_size)


@pytest.fixture(params=["cython", "python"])
def impl(request):
    return request.param


@pytest.fixture
def mem():
    return new_mem()


def setup_queue(impl, mem, size=16, **kw):
    d = Driver(mem, size, data=0x10000, data_end=RAM, **kw)
    q = make_queue(impl, mem, max(size, 256))
    d.attach(q)
    return d, q


def gpas(mem, chain):
    return chain_gpas(mem, chain)


# ---------------------------------------------------------------------------- layout, helpers

@pytest.mark.parametrize("n", [1, 2, 256, 32768])
def test_ring_sizes_follow_the_spec(n):
    assert vq.ring_sizes(n) == (16 * n, 6 + 2 * n, 6 + 8 * n)


def test_need_event_matches_the_header_formula():
    for event in (0, 1, 5, 0xFFFE, 0xFFFF):
        for old in (0, 3, 0xFFFD, 0xFFFF):
            for step in (0, 1, 2, 7, 0x8000):
                new = (old + step) & 0xFFFF
                assert ref.need_event(event, new, old) == vq.need_event(event, new, old)
    assert vq.need_event(4, 5, 4)          # moved past 4
    assert not vq.need_event(9, 5, 4)      # not there yet
    assert vq.need_event(0xFFFF, 2, 0xFFFE)  # across the wrap


def test_address_space_translate(mem):
    a = AddressSpace(mem)
    assert a.translate_py(0x1000, 16) == mem.host_address(0x1000, 16)
    assert a.translate_py(RAM - 4, 4, True) == mem.host_address(RAM - 4, 4)
    assert a.translate_py(RAM - 4, 8) is None            # straddles the end
    assert a.translate_py(RAM, 1) is None                # the gap
    assert a.translate_py(HIGH - 1, 2) is None           # into the second region from the gap
    assert a.translate_py(HIGH + 10, 6, True) == mem.host_address(HIGH + 10, 6)
    assert a.translate_py(2**64 - 1, 1) is None
    assert a.translate_py(2**64 - 1, 2**64 - 1) is None
    h = mem.host_address(0, RAM)
    assert a.host_range_ok_py(h, RAM) and not a.host_range_ok_py(h, RAM + 1)
    assert a.mem is mem


# ---------------------------------------------------------------------------- valid chains

@pytest.mark.parametrize("shape", [
    ([b"a"], []), ([], [64]), ([b"hello"], [32]),
    ([b"x" * 100, b"y" * 3], []), ([], [8, 9]), ([b"q"], [1, 2, 3]),
    ([b"12", b"345", b"6789"], [4]), ([b"h" * 16], [512, 1, 7]),
], ids=lambda s: f"r{len(s[0])}w{len(s[1])}")
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_pop_returns_the_chain(impl, mem, shape, indirect):
    readable, writable = shape
    d, q = setup_queue(impl, mem)
    head = d.add(readable, writable, indirect=indirect)
    c = q.pop_py()
    assert c is not None and c.head == head
    g = gpas(mem, c)
    assert g.readable == d.inflight[head].readable
    assert g.writable == d.inflight[head].writable
    assert c.readable_len == sum(map(len, readable))
    assert c.writable_len == sum(writable)
    assert q.read_chain_bytes(c) == b"".join(readable)
    payload = bytes(range(256)) * 20
    n = q.write_chain_bytes(c, payload)
    assert n == min(len(payload), sum(writable))
    off = 0
    for a, ln in d.inflight[head].writable:
        assert mem.read(a, ln) == payload[off:off + ln]
        off += ln
    assert q.pop_py() is None
    assert q.last_avail_idx == 1
    q.push_used_py(c.head, n)
    assert q.next_used_idx == 1
    assert d.get_used() == [(head, n)]
    assert d.used_idx == 1


@pytest.mark.parametrize("ndesc", [1, 2, 4])
def test_chains_of_1_2_4_descriptors_reuse_the_ring(impl, mem, ndesc):
    d, q = setup_queue(impl, mem, size=8)
    for round_ in range(10):                      # 10 x (8 // ndesc) chains through 8 descriptors
        heads = [d.add([bytes([round_])] * (ndesc - 1), [16]) for _ in range(8 // ndesc)]
        got = []
        while (c := q.pop_py()) is not None:
            assert c.readable_len == ndesc - 1 and c.writable_len == 16
            got.append(c.head)
            q.push_used_py(c.head, 16)
        assert got == heads
        assert [h for h, _ in d.get_used()] == heads
    assert not q.needs_reset and q.error is None


def test_mixed_direct_then_indirect(impl, mem):
    d, q = setup_queue(impl, mem)
    hdr = d.alloc(16)
    mem.write(hdr, b"H" * 16)
    b1, b2 = d.alloc(100), d.alloc(200)
    table = d.alloc(32)
    d.write_desc(0, b1, 100, F_NEXT, 1, table=table)              # readable in the table
    d.write_desc(1, b2, 200, F_WRITE, 0, table=table)             # writable in the table
    d.write_desc(3, hdr, 16, F_NEXT, 5)                           # direct readable header
    d.write_desc(5, table, 32, F_INDIRECT | F_WRITE)              # WRITE on INDIRECT is ignored
    d.set_avail_entry(0, 3)
    d.avail_idx = 1
    d.publish()
    c = q.pop_py()
    assert c.head == 3
    assert gpas(mem, c).readable == [(hdr, 16), (b1, 100)]
    assert gpas(mem, c).writable == [(b2, 200)]
    assert (c.readable_len, c.writable_len) == (116, 200)


def test_zero_length_descriptors_are_skipped(impl, mem):
    d, q = setup_queue(impl, mem)
    buf = d.alloc(8)
    # zero-length ones anywhere, even outside RAM, even a "readable" one after a writable one
    head = d.add_raw([(2**64 - 1, 0, 0), (buf, 8, 0), (RAM + 5, 0, F_WRITE),
                      (buf, 4, F_WRITE), (RAM * 4, 0, 0)])
    c = q.pop_py()
    assert c.head == head
    assert gpas(mem, c).readable == [(buf, 8)] and gpas(mem, c).writable == [(buf, 4)]
    # a chain of nothing but empty buffers is a valid, empty chain
    head = d.add_raw([(0, 0, 0), (0, 0, F_WRITE)], indirect=True)
    c = q.pop_py()
    assert c == vq.ChainInfo(head, [], [], 0, 0)


def test_buffers_in_the_high_region(impl, mem):
    d, q = setup_queue(impl, mem)
    head = d.add_raw([(HIGH, 16, 0), (HIGH + HIGH_SIZE - 8, 8, F_WRITE)])
    c = q.pop_py()
    assert c.head == head
    assert gpas(mem, c).writable == [(HIGH + HIGH_SIZE - 8, 8)]


@pytest.mark.parametrize("start", [65530, 65535, 0xFFF0])
def test_indices_wrap_around(impl, mem, start):
    d, q = setup_queue(impl, mem, size=4, start_idx=start)
    assert q.last_avail_idx == start and q.next_used_idx == start
    done = []
    for i in range(40):
        h = d.add([bytes([i])], [4], indirect=bool(i % 3 == 0))
        c = q.pop_py()
        assert c.head == h and q.read_chain_bytes(c) == bytes([i])
        q.push_used_py(c.head, i)
        done += d.get_used()
    assert done == [(h, i) for i, (h, _) in enumerate(done)]
    assert q.last_avail_idx == (start + 40) & 0xFFFF
    assert q.next_used_idx == (start + 40) & 0xFFFF == d.used_idx


def test_driver_adds_while_device_pops(impl, mem):
    d, q = setup_queue(impl, mem, size=8)
    d.add([b"1"])
    d.add([b"2"], publish=False)            # written but not yet published
    assert q.read_chain_bytes(q.pop_py()) == b"1"
    assert q.pop_py() is None
    d.publish()
    assert q.read_chain_bytes(q.pop_py()) == b"2"
    assert q.pop_py() is None


def test_full_ring_is_not_an_error(impl, mem):
    d, q = setup_queue(impl, mem, size=8)
    for i in range(8):
        d.add([bytes([i])])
    assert [q.read_chain_bytes(q.pop_py()) for _ in range(8)] == [bytes([i]) for i in range(8)]
    assert q.pop_py() is None


def test_not_enabled_queue_is_empty(impl, mem):
    q = make_queue(impl, mem, 16)
    assert not q.ready
    assert q.pop_py() is None
    assert not q.should_notify_py()
    with pytest.raises(vq.QueueError):
        q.push_used_py(0, 0)


def test_push_used_checks_the_head(impl, mem):
    d, q = setup_queue(impl, mem, size=8)
    with pytest.raises(ValueError):
        q.push_used_py(8, 0)
    assert d.used_idx == 0 and q.next_used_idx == 0


def test_forged_host_addresses_are_refused(impl, mem):
    d, q = setup_queue(impl, mem)
    d.add([b"abc"], [4])
    c = q.pop_py()
    bad = c._replace(readable=[(8, 3)], writable=[(c.writable[0][0], 1 << 40)])
    with pytest.raises(ValueError):
        q.read_chain_bytes(bad)
    with pytest.raises(ValueError):
        q.write_chain_bytes(bad, b"zz")


# ---------------------------------------------------------------------------- notifications

def test_no_interrupt_flag(impl, mem):
    d, q = setup_queue(impl, mem)
    assert not q.should_notify_py()            # nothing pushed yet
    d.add([b"x"])
    q.push_used_py(q.pop_py().head, 0)
    assert q.should_notify_py()
    assert not q.should_notify_py()            # already notified for that one
    d.set_no_interrupt(True)
    d.add([b"x"])
    q.push_used_py(q.pop_py().head, 0)
    assert not q.should_notify_py()
    d.set_no_interrupt(False)
    d.add([b"y"])
    q.push_used_py(q.pop_py().head, 0)
    assert q.should_notify_py()


def test_event_idx_suppression(impl, mem):
    d, q = setup_queue(impl, mem, size=16, event_idx=True)
    d.set_no_interrupt(True)                   # ignored with EVENT_IDX
    d.set_used_event(2)                        # "interrupt me once used idx passes 2"
    for i in range(6):
        d.add([bytes([i])])
    results = []
    for i in range(6):
        q.push_used_py(q.pop_py().head, 0)
        results.append(q.should_notify_py())
    # used idx goes 1..6; only the step 2 -> 3 crosses used_event = 2
    assert results == [False, False, True, False, False, False]
    # batching: push three, then ask once: 6 -> 9 passes used_event 7
    d.set_used_event(7)
    for i in range(3):
        d.add([b"z"])
    for i in range(3):
        q.push_used_py(q.pop_py().head, 0)
    assert q.should_notify_py()
    assert not q.should_notify_py()


def test_event_idx_across_the_wrap(impl, mem):
    d, q = setup_queue(impl, mem, size=8, event_idx=True, start_idx=0xFFFE)
    d.set_used_event(0xFFFF)
    for i in range(3):
        d.add([b"w"])
    q.push_used_py(q.pop_py().head, 0)          # used idx -> 0xFFFF
    assert not q.should_notify_py()
    q.push_used_py(q.pop_py().head, 0)          # -> 0, passes 0xFFFF
    assert q.should_notify_py()
    q.push_used_py(q.pop_py().head, 0)
    assert not q.should_notify_py()


def test_avail_event_is_published(impl, mem):
    d, q = setup_queue(impl, mem, size=8, event_idx=True)
    for i in range(3):
        d.add([b"e"])
    c = q.pop_py()
    q.push_used_py(c.head, 0)
    assert d.avail_event == 1                  # = last_avail_idx at the push
    q.pop_py()
    q.pop_py()
    assert q.pop_py() is None                  # going idle: kick me when entry 3 appears
    assert d.avail_event == 3
    q.set_notify_py(True)
    assert d.avail_event == 3
    assert d.used_flags == 0                   # with EVENT_IDX the flag is not used


def test_no_notify_flag_without_event_idx(impl, mem):
    d, q = setup_queue(impl, mem)
    q.set_notify_py(False)
    assert d.used_flags & vq.USED_F_NO_NOTIFY
    q.set_notify_py(True)
    assert d.used_flags == 0
    assert d.avail_event == 0                  # without EVENT_IDX avail_event is never written
    d.add([b"x"])
    q.push_used_py(q.pop_py().head, 0)
    assert d.avail_event == 0


# ---------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("size", [0, 3, 12, 512, 1000])
def test_bad_queue_sizes_are_refused(impl, mem, size):
    q = make_queue(impl, mem, 256)
    with pytest.raises(vq.QueueError, match="not a power of two"):
        q.size = size
    with pytest.raises(vq.QueueError):
        q.configure(0x1000, 0x2000, 0x3000, size)


@pytest.mark.parametrize("max_size", [0, 3, 65536])
def test_bad_max_size(impl, mem, max_size):
    with pytest.raises(vq.QueueError):
        make_queue(impl, mem, max_size)


@pytest.mark.parametrize("desc,avail,used,match", [
    (0x1008, 0x2000, 0x3000, "descriptor table address 0x1008 is not 16-byte aligned"),
    (0x1000, 0x2001, 0x3000, "available ring address 0x2001 is not 2-byte aligned"),
    (0x1000, 0x2000, 0x3002, "used ring address 0x3002 is not 4-byte aligned"),
    (RAM - 0xF0, 0x2000, 0x3000, "descriptor table 0xfff10\\+0x100 is outside guest memory"),
    (0x1000, RAM - 0x22, 0x3000, "available ring 0xfffde\\+0x26 is outside guest memory"),
    (0x1000, 0x2000, RAM, "used ring 0x100000\\+0x86 is outside guest memory"),
    (0x1000, 0x2000, HIGH - 0x40, "used ring .* is outside guest memory"),
    (2**64 - 16, 0x2000, 0x3000, "descriptor table .* is outside guest memory"),
])
def test_ring_areas_must_be_aligned_ram(impl, mem, desc, avail, used, match):
    q = make_queue(impl, mem, 16)
    with pytest.raises(vq.QueueError, match=match):
        q.configure(desc, avail, used, 16)
    assert q.needs_reset and not q.ready
    with pytest.raises(vq.QueueError):
        q.pop_py()
    q.reset()
    assert not q.needs_reset and q.error is None
    q.configure(0x1000, 0x2000, 0x3000, 16)
    assert q.ready and q.pop_py() is None


def test_transport_style_configuration(impl, mem):
    d = Driver(mem, 8, data=0x10000, data_end=RAM)
    q = make_queue(impl, mem, 64)
    assert q.size == 64
    q.size = 8
    q.desc_addr, q.avail_addr, q.used_addr = d.desc_addr, d.avail_addr, d.used_addr
    q.event_idx = False
    q.ready = True
    with pytest.raises(vq.QueueError, match="enabled"):
        q.size = 4
    with pytest.raises(vq.QueueError, match="enabled"):
        q.desc_addr = 0
    d.add([b"t"])
    assert q.read_chain_bytes(q.pop_py()) == b"t"
    q.remap()
    assert q.ready
    q.ready = False
    assert q.pop_py() is None
    q.reset()
    assert (q.size, q.ready, q.last_avail_idx, q.next_used_idx) == (64, False, 0, 0)


def test_queue_error_is_a_device_error():
    assert issubclass(vq.QueueError, DeviceError)


# ---------------------------------------------------------------------------- malformed rings

def _one(d, descs, **kw):
    return d.add_raw(descs, **kw)


def publish_head(d, head):
    d.set_avail_entry(d.avail_idx, head)
    d.avail_idx = (d.avail_idx + 1) & 0xFFFF
    d.publish()


def m_avail_jump(d, mem):
    d.add([b"x"])
    d.set_avail_idx(d.size + 1)


def m_avail_jump_wrapped(d, mem):
    d.set_avail_idx(0xFFFF)                       # = 65535 entries ahead


def m_head_out_of_range(d, mem):
    publish_head(d, d.size)


def m_next_out_of_range(d, mem):
    d.write_desc(0, 0x10000, 4, F_NEXT, d.size)
    publish_head(d, 0)


def m_loop(d, mem):
    d.write_desc(0, 0x10000, 4, F_NEXT, 1)
    d.write_desc(1, 0x10000, 4, F_NEXT, 0)
    publish_head(d, 0)


def m_self_loop_zero_len(d, mem):
    d.write_desc(2, 0, 0, F_NEXT, 2)
    publish_head(d, 2)


def m_indirect_loop(d, mem):
    t = d.alloc(48)
    d.write_desc(0, 0x10000, 4, F_NEXT, 1, table=t)
    d.write_desc(1, 0x10000, 4, F_NEXT, 2, table=t)
    d.write_desc(2, 0x10000, 4, F_NEXT, 1, table=t)
    _one(d, [(t, 48, F_INDIRECT)], chain_flags=False)


def m_indirect_next_out_of_range(d, mem):
    t = d.alloc(32)
    d.write_desc(0, 0x10000, 4, F_NEXT, 1, table=t)
    d.write_desc(1, 0x10000, 4, F_NEXT, 2, table=t)      # table has only 2 entries
    _one(d, [(t, 32, F_INDIRECT)], chain_flags=False)


def m_nested_indirect(d, mem):
    inner = d.alloc(16)
    d.write_desc(0, 0x10000, 4, 0, table=inner)
    t = d.alloc(16)
    d.write_desc(0, inner, 16, F_INDIRECT, table=t)
    _one(d, [(t, 16, F_INDIRECT)], chain_flags=False)


def m_indirect_with_next(d, mem):
    t = d.alloc(16)
    d.write_desc(0, 0x10000, 4, 0, table=t)
    d.write_desc(0, t, 16, F_INDIRECT | F_NEXT, 1)
    d.write_desc(1, 0x10000, 4, 0)
    publish_head(d, 0)


def m_indirect_len_zero(d, mem):
    _one(d, [(d.alloc(16), 0, F_INDIRECT)], chain_flags=False)


def m_indirect_len_odd(d, mem):
    _one(d, [(d.alloc(32), 24, F_INDIRECT)], chain_flags=False)


def m_indirect_too_large(d, mem):
    _one(d, [(0x10000, 16 * (vq.MAX_INDIRECT + 1), F_INDIRECT)], chain_flags=False)


def m_indirect_outside(d, mem):
    _one(d, [(RAM - 16, 32, F_INDIRECT)], chain_flags=False)


def m_indirect_in_gap(d, mem):
    _one(d, [(HIGH - 0x1000, 16, F_INDIRECT)], chain_flags=False)


def m_buffer_past_end(d, mem):
    _one(d, [(RAM - 4, 8, 0)])


def m_buffer_in_gap(d, mem):
    _one(d, [(0x10000, 4, 0), (RAM + 0x1000, 1, F_WRITE)])


def m_buffer_into_high_region(d, mem):
    _one(d, [(HIGH - 1, 2, 0)])


def m_buffer_past_high_region(d, mem):
    _one(d, [(HIGH + HIGH_SIZE - 1, 2, F_WRITE)])


def m_buffer_wraps(d, mem):
    _one(d, [(2**64 - 8, 16, 0)])


def m_buffer_huge(d, mem):
    _one(d, [(0, 0xFFFFFFFF, F_WRITE)])


def m_buffer_in_indirect_outside(d, mem):
    _one(d, [(0x10000, 4, 0), (RAM, 4, F_WRITE)], indirect=True)


def m_readable_after_writable(d, mem):
    _one(d, [(0x10000, 4, F_WRITE), (0x10000, 4, 0)])


def m_readable_after_writable_across_indirect(d, mem):
    t = d.alloc(16)
    d.write_desc(0, 0x10000, 4, 0, table=t)
    _one(d, [(0x10000, 4, F_WRITE), (t, 16, F_INDIRECT)])


def m_too_many_buffers(d, mem):
    n = vq.MAX_IOV + 1
    _one(d, [(0x10000 + i, 1, 0) for i in range(n)], indirect=True)


MALFORMED = {
    m_avail_jump: "avail idx 17 is 17 entries ahead of last_avail_idx 0 (queue size 16)",
    m_avail_jump_wrapped: "avail idx 65535 is 65535 entries ahead",
    m_head_out_of_range: "avail ring entry 0 names descriptor 16, outside the queue of 16",
    m_next_out_of_range: "descriptor 0 chains to descriptor 16, outside its table of 16",
    m_loop: "descriptor chain longer than its table of 16 descriptors (a loop?)",
    m_self_loop_zero_len: "descriptor chain longer than its table of 16 descriptors",
    m_indirect_loop: "descriptor chain longer than its table of 3 descriptors",
    m_indirect_next_out_of_range: "descriptor 1 chains to descriptor 2, outside its table of 2",
    m_nested_indirect: "indirect descriptor 0 inside an indirect table",
    m_indirect_with_next: "indirect descriptor 0 also has the NEXT flag",
    m_indirect_len_zero: "indirect table length 0 is not a non-zero multiple of 16",
    m_indirect_len_odd: "indirect table length 24 is not a non-zero multiple of 16",
    m_indirect_too_large: "indirect table of 65537 descriptors is larger than 65536",
    m_indirect_outside: "indirect table 0xffff0+0x20 is outside guest memory",
    m_indirect_in_gap: "indirect table 0xffffff000+0x10 is outside guest memory",
    m_buffer_past_end: "buffer 0xffffc+0x8 of descriptor 0 is outside guest memory",
    m_buffer_in_gap: "buffer 0x101000+0x1 of descriptor 1 is outside guest memory",
    m_buffer_into_high_region: "buffer 0xfffffffff+0x2 of descriptor 0 is outside guest memory",
    m_buffer_past_high_region: "buffer 0x100000ffff+0x2 of descriptor 0 is outside",
    m_buffer_wraps: "buffer 0xfffffffffffffff8+0x10 of descriptor 0 is outside guest memory",
    m_buffer_huge: "buffer 0x0+0xffffffff of descriptor 0 is outside guest memory",
    m_buffer_in_indirect_outside: "buffer 0x100000+0x4 of descriptor 1 is outside guest memory",
    m_readable_after_writable: "device-readable descriptor 1 follows a device-writable one",
    m_readable_after_writable_across_indirect:
        "device-readable descriptor 0 follows a device-writable one",
    m_too_many_buffers: "chain has more than 1024 buffers",
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=lambda f: f.__name__[2:])
def test_malformed_rings_break_the_queue(impl, mem, case):
    d, q = setup_queue(impl, mem, size=16)
    case(d, mem)
    before = mem.read(0, RAM) + mem.read(HIGH, HIGH_SIZE)
    with pytest.raises(vq.QueueError) as e:
        q.pop_py()
    assert MALFORMED[case] in str(e.value)
    assert q.needs_reset and q.error == str(e.value)
    assert q.last_avail_idx == 0
    # broken until reset: pop, push and notify all refuse, and nothing in RAM changed
    with pytest.raises(vq.QueueError, match="^" + re.escape(q.error) + "$"):
        q.pop_py()
    with pytest.raises(vq.QueueError):
        q.push_used_py(0, 0)
    assert not q.should_notify_py()
    assert mem.read(0, RAM) + mem.read(HIGH, HIGH_SIZE) == before
    q.reset()
    assert not q.needs_reset


@pytest.mark.parametrize("case", [c for c in MALFORMED
                                  if c not in (m_avail_jump, m_avail_jump_wrapped)],
                         ids=lambda f: f.__name__[2:])
def test_good_chains_before_a_bad_one_are_delivered(impl, case):
    m = new_mem()
    d, q = setup_queue(impl, m, size=16)
    good = 15                                  # out of the way of the cases' descriptors
    d.free.remove(good)
    buf = d.alloc(2)
    m.write(buf, b"ok")
    d.write_desc(good, buf, 2, 0)
    publish_head(d, good)
    case(d, m)                                 # the bad chain goes to avail slot 1
    c = q.pop_py()
    assert c.head == good and q.read_chain_bytes(c) == b"ok"
    q.push_used_py(c.head, 2)
    with pytest.raises(vq.QueueError):
        q.pop_py()
    assert d.used_elem(0) == (good, 2) and d.used_idx == 1


# ---------------------------------------------------------------------------- differential

def _scenario(impl, case):
    """Run a scenario on fresh memory; return (events, ring bytes, counters)."""
    m = new_mem()
    d, q = setup_queue(impl, m, size=16, event_idx=case.__name__.endswith("_ev"))
    case(d, m)
    events = []
    for _ in range(20):
        try:
            c = q.pop_py()
        except vq.QueueError as e:
            events.append(("error", str(e)))
            break
        if c is None:
            events.append(("empty",))
            break
        events.append(("chain", chain_gpas(m, c)))
        q.push_used_py(c.head, c.writable_len)
        events.append(("notify", q.should_notify_py()))
    return events, d.ring_bytes(), (q.last_avail_idx, q.next_used_idx, q.needs_reset, q.error)


def s_valid_mix(d, mem):
    d.add([b"a"], [3])
    d.add([b"bb", b"c"], [1, 2], indirect=True)
    d.add([], [7])
    d.add_raw([(0x10000, 0, 0), (0x10010, 5, F_WRITE)])


def s_valid_mix_ev(d, mem):
    d.set_used_event(1)
    s_valid_mix(d, mem)


def s_no_interrupt(d, mem):
    d.set_no_interrupt(True)
    d.add([b"a"])
    d.add([b"b"])


@pytest.mark.parametrize("case", [s_valid_mix, s_valid_mix_ev, s_no_interrupt, *MALFORMED],
                         ids=lambda f: f.__name__)
def test_cython_and_reference_agree(case):
    assert _scenario("cython", case) == _scenario("python", case)


def test_bench_helper_drains_and_refills(mem):
    d = Driver(mem, 8, data=0x10000, data_end=RAM)
    q = vq.SplitQueue(AddressSpace(mem), 8)
    d.attach(q)
    heads = [d.add([b"p"]) for _ in range(8)]
    done, notes = q.bench_pop_push(100, 8)
    assert done == 100 and not q.needs_reset
    assert q.last_avail_idx == 100 and q.next_used_idx == 100 == d.used_idx
    assert notes >= 1
    assert {d.used_elem(i)[0] for i in range(8)} == set(heads)
