"""Fuzz the split virtqueue engine against the pure-Python reference.

Hypothesis writes random rings into a small guest memory (one 64 KiB region): descriptor tables
with random addresses (many near and past the end of RAM), lengths, flags and next indices,
random indirect tables, random avail indices and ring entries, sometimes misplaced ring areas.
The same bytes go into two memories; the Cython engine runs on one, the reference on the other,
and they must agree on everything: configure errors, each chain (as guest addresses), each error
reason, notifications, counters, and every byte of guest memory afterwards (used-ring writes and
the device's writes into chains).  Every iovec the engine returns must lie inside guest RAM.

CI runs HYPERPY_FUZZ_EXAMPLES (default 10,000) examples.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hyperpy._fast import virtqueue as vq
from hyperpy._fast.addrspace import AddressSpace
from hyperpy._fast.guestmem import GuestMemory
from hyperpy.reference import virtqueue as ref

from testutil import ByteCursor
from virtio_driver import F_INDIRECT, F_NEXT, F_WRITE, U16, chain_gpas, pack_desc

MEM = 64 << 10
SIZES = [1, 2, 4, 8, 16]
DESC_AT, AVAIL_AT, USED_AT = 0x0, 0x400, 0x800
TABLES = [0x1000, 0x1400, 0x1800]           # where random indirect tables are written
TABLE_MAX = 12
DATA = 0x2000
L = vq.LAYOUT
EXAMPLES = int(os.environ.get("HYPERPY_FUZZ_EXAMPLES", "10000"))


def _addr(c: ByteCursor) -> int:
    k = c.u8() % 32
    if k < 20:
        return DATA + c.below(MEM - DATA - 0x100)         # inside RAM
    if k < 24:
        return MEM - 80 + c.below(160)                    # straddling / just past the end
    if k < 27:
        return c.below(MEM)                               # anywhere in RAM, rings included
    if k < 29:
        return TABLES[c.u8() % len(TABLES)]
    if k < 31:
        return c.int(8)                                   # anywhere at all
    return 2**64 - 1 - c.u8()                             # wrapping around


def _len(c: ByteCursor) -> int:
    k = c.u8() % 16
    if k < 2:
        return 0
    if k < 10:
        return c.u8() % 65
    if k < 12:
        return 16 * (c.u8() % 14)                         # indirect-table shaped (0 included)
    if k < 14:
        return (0, 24, 4096, 8, 0xFF)[c.u8() % 5]
    if k == 14:
        return MEM - DATA - c.below(0x200)
    return c.int(4)


def _desc(c: ByteCursor, n_next: int):
    k = c.u8()
    if k < 32:                                            # an indirect descriptor, likely valid
        addr = TABLES[c.u8() % len(TABLES)]
        length = (16, 32, 48, 64, 96, 192, 8, 0)[c.u8() % 8]
        flags = (F_INDIRECT, F_INDIRECT | F_WRITE, F_INDIRECT | F_NEXT)[c.u8() % 3]
        return addr, length, flags, c.below(n_next + 1)
    addr, length = _addr(c), _len(c)
    fk = c.u8()
    flags = fk & 3 if fk < 232 else (fk & 7 if fk < 248 else c.int(2))
    nxt = c.below(n_next) if c.u8() < 240 else c.below(n_next + 2) if c.u8() < 128 else c.int(2)
    return addr, length, flags, nxt


def _tidy_desc(c: ByteCursor, i: int, n: int, split: int):
    """A descriptor of a plausible chain: next = i + 1, readable ones before writable ones."""
    if c.u8() < 16:
        return _desc(c, n)                                # the odd corrupted one
    addr = DATA + c.below(MEM - DATA - 0x100)
    length = c.u8() % 65 if c.u8() < 224 else 0
    flags = (F_WRITE if i >= split else 0) | (F_NEXT if i + 1 < n and c.u8() < 160 else 0)
    return addr, length, flags, i + 1


def _descs(c: ByteCursor, n: int, tidy: bool):
    if not tidy:
        return [_desc(c, n) for _ in range(n)]
    split = c.below(n + 1)
    return [_tidy_desc(c, i, n, split) for i in range(n)]


BLOB = 1600


def scenario(blob: bytes):
    c = ByteCursor(blob)
    size = SIZES[c.u8() % len(SIZES)]
    s = {"size": size}
    tidy = c.bool()
    s["descs"] = _descs(c, size, tidy)
    s["tables"] = [_descs(c, c.u8() % (TABLE_MAX + 1), tidy) for _ in TABLES]
    k = c.u8() % 4
    s["start"] = (0, 0xFFF0 + c.u8() % 16, c.int(2), 0xFFFF)[k]
    s["used_start"] = s["start"] if c.u8() < 224 else c.int(2)
    k = c.u8() % 16
    s["ahead"] = (1 + c.below(size) if k < 12 else 0 if k < 14 else
                  size + 1 + c.u8() % 2 if k == 14 else c.int(2))
    s["ring"] = [c.below(size) if c.u8() < 240 else c.int(2) for _ in range(size)]
    s["event_idx"] = c.bool()
    s["avail_flags"] = c.u8() & 1 if c.u8() < 224 else c.int(2)
    s["used_event"] = c.below(2 * size + 1) if c.u8() < 192 else c.int(2)
    if c.u8() < 236:
        s["rings"] = (DESC_AT, AVAIL_AT, USED_AT)
    else:
        s["rings"] = ((DESC_AT, DESC_AT + 8, MEM - 16 * size, MEM - 16 * size + 16)[c.u8() % 4],
                      (AVAIL_AT, AVAIL_AT + 1, MEM - 6 - 2 * size, MEM - 4)[c.u8() % 4],
                      (USED_AT, USED_AT + 2, MEM - 6 - 8 * size, MEM - 8 * size)[c.u8() % 4])
    s["push"] = [c.u8() < 200 for _ in range(size + 2)]
    s["written"] = [c.below(301) if c.u8() < 200 else c.int(4) for _ in range(size + 2)]
    s["fill"] = c.bool()
    s["set_notify"] = (None, False, True)[c.u8() % 3]
    return s


def build(mem: GuestMemory, s) -> None:
    mem.fill(0, MEM, 0)
    size = s["size"]
    desc_at, avail_at, used_at = s["rings"]
    # Rings at the standard spot (misplaced ring areas only matter to configure()).
    mem.write(DESC_AT, b"".join(pack_desc(*d) for d in s["descs"]))
    for t, entries in zip(TABLES, s["tables"]):
        if entries:
            mem.write(t, b"".join(pack_desc(*d) for d in entries))
    avail = U16.pack(s["avail_flags"]) + U16.pack((s["start"] + s["ahead"]) & 0xFFFF)
    avail += b"".join(U16.pack(h) for h in s["ring"]) + U16.pack(s["used_event"])
    mem.write(AVAIL_AT, avail)
    mem.write(USED_AT + L["used_idx"], U16.pack(s["used_start"]))
    for i in range(0, MEM - DATA, 4096):        # recognisable data
        mem.fill(DATA + i, 4096, (i >> 12) + 1)


def run(q, mem: GuestMemory, s):
    size = s["size"]
    events = []
    try:
        q.configure(*s["rings"], size, s["event_idx"])
    except vq.QueueError as e:
        events.append(("config", str(e)))
        return events, mem.read(0, MEM), (q.needs_reset, q.error, q.ready)
    q.last_avail_idx = s["start"]
    q.next_used_idx = s["used_start"]
    for i in range(size + 2):
        try:
            c = q.pop_py()
        except vq.QueueError as e:
            events.append(("error", str(e)))
            try:
                q.pop_py()
                events.append(("not sticky",))
            except vq.QueueError as e2:
                events.append(("again", str(e2)))
            break
        if c is None:
            events.append(("empty",))
            break
        g = chain_gpas(mem, c)                 # asserts every iovec is inside guest RAM
        assert len(g.readable) + len(g.writable) <= vq.MAX_IOV
        assert c.readable_len == sum(n for _, n in c.readable) and c.writable_len == sum(
            n for _, n in c.writable)
        data = q.read_chain_bytes(c) if c.readable_len <= 4096 else None
        events.append(("chain", g, data))
        if s["fill"] and c.writable_len:
            fill = bytes([0x5A ^ i]) * min(300, c.writable_len)
            events.append(("wrote", q.write_chain_bytes(c, fill)))
        if s["push"][i]:
            q.push_used_py(c.head, s["written"][i])
            events.append(("notify", q.should_notify_py()))
    events.append(("notify", q.should_notify_py()))
    if s["set_notify"] is not None:
        q.set_notify_py(s["set_notify"])
    return events, mem.read(0, MEM), (q.last_avail_idx, q.next_used_idx, q.needs_reset, q.error,
                                      q.ready)


_MEMS = []


def _mems():
    if not _MEMS:
        for _ in range(2):
            m = GuestMemory()
            m.add_region(0, MEM)
            _MEMS.append(m)
    return _MEMS


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.binary(min_size=BLOB, max_size=BLOB))
def test_cython_engine_matches_reference_on_random_rings(blob):
    s = scenario(blob)
    m_cy, m_py = _mems()
    build(m_cy, s)
    build(m_py, s)
    q_cy = vq.SplitQueue(AddressSpace(m_cy), 16)
    q_py = ref.SplitQueue(m_py, 16)
    got_cy = run(q_cy, m_cy, s)
    got_py = run(q_py, m_py, s)
    for ev in got_cy[0]:                       # shown by --hypothesis-show-statistics
        if ev[0] in ("config", "error"):
            event(f"{ev[0]}: " + " ".join(w for w in ev[1].split() if not w[0].isdigit())[:48])
    n = sum(ev[0] == "chain" for ev in got_cy[0])
    event(f"chains popped: {min(n, 3)}{'+' if n >= 3 else ''}")
    assert got_cy[0] == got_py[0]
    assert got_cy[2] == got_py[2]
    assert got_cy[1] == got_py[1]              # identical guest memory afterwards
