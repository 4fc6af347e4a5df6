"""A host-side simulated virtio *driver* for split virtqueues (tests and benchmarks).

It plays the guest: lays out the descriptor table, available ring and used ring in a
``GuestMemory``, adds buffers as descriptor chains (direct or through an indirect table), publishes
them, and reads completions back from the used ring.  It can also write anything at all into the
rings (``write_desc``, ``set_avail_entry``, ``set_avail_idx``...) for the malformed-ring tests and
the fuzzer.  Layout and flags come from ``hyperpy._fast.virtqueue`` (i.e. <linux/virtio_ring.h>).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hyperpy._fast import virtqueue as vq

L = vq.LAYOUT
F_NEXT = vq.DESC_F_NEXT
F_WRITE = vq.DESC_F_WRITE
F_INDIRECT = vq.DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")
assert DESC.size == L["desc_size"] and ELEM.size == L["used_elem_size"]


def align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def pack_desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF)


@dataclass
class Added:
    """What the driver put in one chain: guest addresses of the readable/writable buffers."""
    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    descs: list[int] = field(default_factory=list)   # direct descriptors it occupies


class Driver:
    """The guest side of one split queue in ``mem``.

    Ring areas start at ``base`` (descriptor table, then the available ring, then the used ring
    aligned per the header); buffers and indirect tables come from a bump allocator over
    ``[data, data_end)`` that wraps around (tests never keep that many buffers alive).
    """

    def __init__(self, mem, size: int, *, base: int = 0x1000, data: int | None = None,
                 data_end: int | None = None, start_idx: int = 0, event_idx: bool = False,
                 zero: bool = True) -> None:
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        dsz, asz, usz = vq.ring_sizes(size)
        self.desc_addr = align_up(base, L["desc_align"])
        self.avail_addr = align_up(self.desc_addr + dsz, L["avail_align"])
        self.used_addr = align_up(self.avail_addr + asz, max(L["used_align"], 4096))
        self.end = self.used_addr + usz
        if zero:
            for a, n in ((self.desc_addr, dsz), (self.avail_addr, asz), (self.used_addr, usz)):
                mem.fill(a, n, 0)
        self.data = align_up(self.end, 4096) if data is None else data
        self.data_end = (self.data + (1 << 20)) if data_end is None else data_end
        self._bump = self.data
        self.free = list(range(size))
        self.avail_idx = start_idx & 0xFFFF      # driver's next avail idx (published on publish())
        self.last_used = start_idx & 0xFFFF      # next used entry the driver will read
        self.inflight: dict[int, Added] = {}
        self._set16(self.avail_addr + L["avail_idx"], self.avail_idx)
        self._set16(self.used_addr + L["used_idx"], self.last_used)

    # ------------------------------------------------------------------ plumbing

    def queue_args(self) -> tuple[int, int, int, int, bool]:
        """Arguments for ``SplitQueue.configure``."""
        return self.desc_addr, self.avail_addr, self.used_addr, self.size, self.event_idx

    def attach(self, q) -> None:
        """Configure ``q`` for this ring and align its counters with the driver's start index."""
        q.configure(*self.queue_args())
        q.last_avail_idx = self.avail_idx
        q.next_used_idx = self.last_used

    def _get16(self, addr: int) -> int:
        return U16.unpack(self.mem.read(addr, 2))[0]

    def _set16(self, addr: int, value: int) -> None:
        self.mem.write(addr, U16.pack(value & 0xFFFF))

    def alloc(self, n: int, align: int = 16) -> int:
        """Guest memory for a buffer or indirect table (bump allocator, wraps around)."""
        a = align_up(self._bump, align)
        if a + max(n, 1) > self.data_end:
            a = align_up(self.data, align)
        if a + max(n, 1) > self.data_end:
            raise MemoryError(f"buffer of {n} bytes does not fit in the driver's data area")
        self._bump = a + max(n, 1)
        return a

    # ------------------------------------------------------------------ raw ring access

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0,
                   table: int | None = None) -> None:
        t = self.desc_addr if table is None else table
        self.mem.write(t + L["desc_size"] * i, pack_desc(addr, length, flags, nxt))

    def read_desc(self, i: int, table: int | None = None) -> tuple[int, int, int, int]:
        t = self.desc_addr if table is None else table
        return DESC.unpack(self.mem.read(t + L["desc_size"] * i, L["desc_size"]))

    def set_avail_entry(self, slot: int, head: int) -> None:
        self._set16(self.avail_addr + L["avail_ring"] + 2 * (slot % self.size), head)

    def set_avail_idx(self, value: int) -> None:
        self._set16(self.avail_addr + L["avail_idx"], value)

    def set_avail_flags(self, flags: int) -> None:
        self._set16(self.avail_addr + L["avail_flags"], flags)

    def set_no_interrupt(self, on: bool) -> None:
        self.set_avail_flags(vq.AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, value: int) -> None:
        self._set16(self.avail_addr + L["avail_ring"] + 2 * self.size, value)

    @property
    def avail_event(self) -> int:
        return self._get16(self.used_addr + L["used_ring"] + ELEM.size * self.size)

    @property
    def used_flags(self) -> int:
        return self._get16(self.used_addr + L["used_flags"])

    @property
    def used_idx(self) -> int:
        return self._get16(self.used_addr + L["used_idx"])

    def used_elem(self, slot: int) -> tuple[int, int]:
        a = self.used_addr + L["used_ring"] + ELEM.size * (slot % self.size)
        return ELEM.unpack(self.mem.read(a, ELEM.size))

    def ring_bytes(self) -> bytes:
        """The three ring areas, for comparing what two engines wrote."""
        return self.mem.read(self.desc_addr, self.end - self.desc_addr)

    # ------------------------------------------------------------------ driver operations

    def add_raw(self, descs: list[tuple[int, int, int]], *, indirect: bool = False,
                publish: bool = True, chain_flags: bool = True) -> int:
        """Add a chain of ``(addr, len, flags)`` descriptors; NEXT links are filled in.

        With ``indirect`` the descriptors go to a freshly allocated indirect table and the ring
        gets one INDIRECT descriptor.  ``chain_flags=False`` writes the flags exactly as given
        (no NEXT added, ``next`` = following index) for hand-made broken chains.
        """
        if indirect:
            table = self.alloc(L["desc_size"] * max(len(descs), 1))
            for i, (a, n, f) in enumerate(descs):
                if chain_flags:
                    f = (f | F_NEXT) if i + 1 < len(descs) else (f & ~F_NEXT)
                self.write_desc(i, a, n, f, i + 1, table=table)
            descs = [(table, L["desc_size"] * len(descs), F_INDIRECT)]
            chain_flags = False
        if len(descs) > len(self.free):
            raise RuntimeError("ring full")
        ids = [self.free.pop(0) for _ in descs]
        for k, (i, (a, n, f)) in enumerate(zip(ids, descs)):
            nxt = ids[k + 1] if k + 1 < len(ids) else 0
            if chain_flags:
                f = (f | F_NEXT) if k + 1 < len(ids) else (f & ~F_NEXT)
            self.write_desc(i, a, n, f, nxt)
        head = ids[0]
        self.inflight[head] = Added(head, [], [], ids)
        self.set_avail_entry(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return head

    def add(self, readable: list[bytes | int] = (), writable: list[int] = (), *,
            indirect: bool = False, publish: bool = True) -> int:
        """Add one request: ``readable`` buffers (bytes to send, or a length of 0xAB filler),
        then ``writable`` buffers of the given lengths (pre-filled with 0xEE)."""
        descs, rd, wr = [], [], []
        for item in readable:
            data = bytes([0xAB]) * item if isinstance(item, int) else bytes(item)
            a = self.alloc(len(data))
            if data:
                self.mem.write(a, data)
            descs.append((a, len(data), 0))
            rd.append((a, len(data)))
        for n in writable:
            a = self.alloc(n)
            if n:
                self.mem.fill(a, n, 0xEE)
            descs.append((a, n, F_WRITE))
            wr.append((a, n))
        head = self.add_raw(descs, indirect=indirect, publish=publish)
        self.inflight[head].readable = rd
        self.inflight[head].writable = wr
        return head

    def publish(self) -> None:
        """Make every added chain visible (the write to avail->idx)."""
        self.set_avail_idx(self.avail_idx)

    def get_used(self) -> list[tuple[int, int]]:
        """Completed ``(head, written)`` since the last call; frees their descriptors."""
        out = []
        end = self.used_idx
        while self.last_used != end:
            head, written = self.used_elem(self.last_used)
            out.append((head, written))
            added = self.inflight.pop(head, None)
            if added is not None:
                self.free.extend(added.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def host_to_gpa(mem, host: int, length: int = 1) -> int:
    """Guest-physical address of a host address inside ``mem``'s RAM (for comparing chains
    popped from two copies of the same guest memory)."""
    for gpa, size, base in mem.regions:
        if base <= host and host - base < size and length <= size - (host - base):
            return gpa + (host - base)
    raise AssertionError(f"host range 0x{host:x}+0x{length:x} is not inside guest RAM")


def chain_gpas(mem, chain):
    """A popped chain with its host addresses turned back into guest-physical ones."""
    if chain is None:
        return None
    return vq.ChainInfo(chain.head,
                        [(host_to_gpa(mem, h, n), n) for h, n in chain.readable],
                        [(host_to_gpa(mem, h, n), n) for h, n in chain.writable],
                        chain.readable_len, chain.writable_len)
