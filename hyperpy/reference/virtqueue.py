"""The split-virtqueue engine in plain Python, for differential tests and the benchmark.

Same algorithm, same checks in the same order, same reason strings and the same writes to the
used ring as :class:`hyperpy._fast.virtqueue.SplitQueue`, but over ``GuestMemory``'s Python API
(``read``/``write``/``contains``/``host_address``) with ``struct``.  Offsets and flags come from
the Cython module, which reads them from ``<linux/virtio_ring.h>``.  Never used by a real VM.
"""

from __future__ import annotations

import struct

from .._fast import virtqueue as _vq
from .._fast.virtqueue import ChainInfo, QueueError

_L = _vq.LAYOUT
_DESC = struct.Struct("<QIHH")
assert _DESC.size == _L["desc_size"]
assert (_L["desc_addr"], _L["desc_len"], _L["desc_flags"], _L["desc_next"]) == (0, 8, 12, 14)
_U16 = struct.Struct("<H")
_ELEM = struct.Struct("<II")
assert _ELEM.size == _L["used_elem_size"] and (_L["used_elem_id"], _L["used_elem_len"]) == (0, 4)

F_NEXT = _vq.DESC_F_NEXT
F_WRITE = _vq.DESC_F_WRITE
F_INDIRECT = _vq.DESC_F_INDIRECT
DESC_SIZE = _L["desc_size"]


def need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """vring_need_event: did moving from ``old`` to ``new_idx`` pass ``event_idx``?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class SplitQueue:
    """Pure-Python twin of :class:`hyperpy._fast.virtqueue.SplitQueue` (Python API only)."""

    def __init__(self, mem, max_size: int) -> None:
        # Takes a GuestMemory, or an AddressSpace (its identity mapping onto guest RAM).
        self._m = getattr(mem, "mem", mem)
        if max_size < 1 or max_size > _vq.MAX_QUEUE_SIZE or not _pow2(max_size):
            raise QueueError(f"maximum queue size {max_size} is not a power of two between 1 "
                             f"and {_vq.MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.reset()

    # ------------------------------------------------------------------ configuration

    def reset(self) -> None:
        self._ready = False
        self._broken = False
        self._reason = ""
        self._size = self.max_size
        self._desc_addr = self._avail_addr = self._used_addr = 0
        self._event_idx = False
        self._last_avail = self._shadow_avail = 0
        self._next_used = self._signalled_used = 0

    def configure(self, desc: int, avail: int, used: int, size: int,
                  event_idx: bool = False) -> None:
        self.reset()
        self.size = size
        self._desc_addr, self._avail_addr, self._used_addr = desc, avail, used
        self._event_idx = bool(event_idx)
        self.ready = True

    def _check_disabled(self) -> None:
        if self._ready:
            raise QueueError("queue is enabled; disable or reset it before changing its "
                             "configuration")

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._check_disabled()
        if value > self.max_size or not _pow2(value):
            raise QueueError(f"queue size {value} is not a power of two between 1 and "
                             f"{self.max_size}")
        self._size = value

    def _addr_prop(name):  # noqa: N805 - property factory
        attr = "_" + name

        def get(self):
            return getattr(self, attr)

        def set_(self, value):
            self._check_disabled()
            setattr(self, attr, value)
        return property(get, set_)

    desc_addr = _addr_prop("desc_addr")
    avail_addr = _addr_prop("avail_addr")
    used_addr = _addr_prop("used_addr")
    del _addr_prop

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @event_idx.setter
    def event_idx(self, value: bool) -> None:
        self._check_disabled()
        self._event_idx = bool(value)

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        if not value:
            self._ready = False
            return
        if self._ready:
            return
        self._activate()

    def remap(self) -> None:
        if self._ready:
            self._ready = False
            self._activate()

    def _fail_config(self, reason: str):
        self._broken = True
        self._ready = False
        self._reason = reason
        raise QueueError(reason)

    def _activate(self) -> None:
        if self._broken:
            raise QueueError(self.error)
        dsz, asz, usz = _vq.ring_sizes(self._size)
        for name, addr, align in (("descriptor table", self._desc_addr, _L["desc_align"]),
                                  ("available ring", self._avail_addr, _L["avail_align"]),
                                  ("used ring", self._used_addr, _L["used_align"])):
            if addr % align:
                self._fail_config(f"{name} address 0x{addr:x} is not {align}-byte aligned")
        m = self._m
        if not m.contains(self._desc_addr, dsz):
            self._fail_config(f"descriptor table 0x{self._desc_addr:x}+0x{dsz:x} is outside "
                              f"guest memory")
        if not m.contains(self._avail_addr, asz):
            self._fail_config(f"available ring 0x{self._avail_addr:x}+0x{asz:x} is outside "
                              f"guest memory")
        if not m.contains(self._used_addr, usz):
            self._fail_config(f"used ring 0x{self._used_addr:x}+0x{usz:x} is outside guest memory")
        self._used_event_addr = self._avail_addr + _L["avail_ring"] + 2 * self._size
        self._avail_event_addr = self._used_addr + _L["used_ring"] + _ELEM.size * self._size
        self._shadow_avail = self._last_avail
        self._ready = True

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        self._last_avail = self._shadow_avail = value & 0xFFFF

    @property
    def next_used_idx(self) -> int:
        return self._next_used

    @next_used_idx.setter
    def next_used_idx(self, value: int) -> None:
        self._next_used = self._signalled_used = value & 0xFFFF

    @property
    def needs_reset(self) -> bool:
        return self._broken

    @property
    def error(self) -> str | None:
        return self._reason if self._broken else None

    # ------------------------------------------------------------------ ring access

    def _u16(self, addr: int) -> int:
        return _U16.unpack(self._m.read(addr, 2))[0]

    def _put_u16(self, addr: int, value: int) -> None:
        self._m.write(addr, _U16.pack(value & 0xFFFF))

    def _fail(self, reason: str):
        self._broken = True
        self._reason = reason
        raise QueueError(reason)

    def pop_py(self) -> ChainInfo | None:
        if self._broken:
            raise QueueError(self._reason)
        if not self._ready:
            return None
        m = self._m
        size = self._size
        last = self._last_avail
        if last == self._shadow_avail:
            avail_idx = self._u16(self._avail_addr + _L["avail_idx"])
            pending = (avail_idx - last) & 0xFFFF
            if pending == 0 and self._event_idx:
                self._put_u16(self._avail_event_addr, last)
                avail_idx = self._u16(self._avail_addr + _L["avail_idx"])
                pending = (avail_idx - last) & 0xFFFF
            if pending == 0:
                return None
            if pending > size:
                self._fail(f"avail idx {avail_idx} is {pending} entries ahead of last_avail_idx "
                           f"{last} (queue size {size})")
            self._shadow_avail = avail_idx

        head = self._u16(self._avail_addr + _L["avail_ring"] + 2 * (last & (size - 1)))
        if head >= size:
            self._fail(f"avail ring entry {last} names descriptor {head}, outside the queue of "
                       f"{size}")

        table, table_n = self._desc_addr, size
        idx, count = head, 0
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        seen_write = in_indirect = False
        while True:
            if count >= table_n:
                self._fail(f"descriptor chain longer than its table of {table_n} descriptors "
                           f"(a loop?)")
            count += 1
            addr, length, flags, nxt = _DESC.unpack(m.read(table + DESC_SIZE * idx, DESC_SIZE))
            if flags & F_INDIRECT:
                if in_indirect:
                    self._fail(f"indirect descriptor {idx} inside an indirect table")
                if flags & F_NEXT:
                    self._fail(f"indirect descriptor {idx} also has the NEXT flag")
                if length == 0 or length % DESC_SIZE:
                    self._fail(f"indirect table length {length} is not a non-zero multiple of "
                               f"{DESC_SIZE}")
                if length // DESC_SIZE > _vq.MAX_INDIRECT:
                    self._fail(f"indirect table of {length // DESC_SIZE} descriptors is larger "
                               f"than {_vq.MAX_INDIRECT}")
                if not m.contains(addr, length):
                    self._fail(f"indirect table 0x{addr:x}+0x{length:x} is outside guest memory")
                table, table_n = addr, length // DESC_SIZE
                idx, count = 0, 0
                in_indirect = True
                continue
            if length:
                wr = bool(flags & F_WRITE)
                if wr:
                    seen_write = True
                elif seen_write:
                    self._fail(f"device-readable descriptor {idx} follows a device-writable one")
                if len(readable) + len(writable) >= _vq.MAX_IOV:
                    self._fail(f"chain has more than {_vq.MAX_IOV} buffers")
                if not m.contains(addr, length):
                    self._fail(f"buffer 0x{addr:x}+0x{length:x} of descriptor {idx} is outside "
                               f"guest memory")
                host = m.host_address(addr, length)
                if wr:
                    writable.append((host, length))
                    wlen += length
                else:
                    readable.append((host, length))
                    rlen += length
            if not flags & F_NEXT:
                break
            if nxt >= table_n:
                self._fail(f"descriptor {idx} chains to descriptor {nxt}, outside its table of "
                           f"{table_n}")
            idx = nxt

        self._last_avail = (last + 1) & 0xFFFF
        return ChainInfo(head, readable, writable, rlen, wlen)

    def push_used_py(self, head: int, written: int) -> None:
        if self._broken:
            raise QueueError(self._reason)
        if not self._ready:
            raise QueueError("queue is not enabled")
        if not 0 <= head < self._size:
            raise ValueError(f"descriptor head {head} is outside the queue of {self._size}")
        slot = self._next_used & (self._size - 1)
        self._m.write(self._used_addr + _L["used_ring"] + _ELEM.size * slot,
                      _ELEM.pack(head, written & 0xFFFFFFFF))
        self._next_used = (self._next_used + 1) & 0xFFFF
        if self._event_idx:
            self._put_u16(self._avail_event_addr, self._last_avail)
        self._put_u16(self._used_addr + _L["used_idx"], self._next_used)

    def should_notify_py(self) -> bool:
        if self._broken or not self._ready:
            return False
        old, new = self._signalled_used, self._next_used
        if old == new:
            return False
        self._signalled_used = new
        if self._event_idx:
            return need_event(self._u16(self._used_event_addr), new, old)
        return not self._u16(self._avail_addr + _L["avail_flags"]) & _vq.AVAIL_F_NO_INTERRUPT

    def set_notify_py(self, enable: bool) -> None:
        if self._broken or not self._ready:
            return
        if self._event_idx:
            if enable:
                self._put_u16(self._avail_event_addr, self._last_avail)
        else:
            a = self._used_addr + _L["used_flags"]
            flags = self._u16(a)
            flags = flags & ~_vq.USED_F_NO_NOTIFY if enable else flags | _vq.USED_F_NO_NOTIFY
            self._put_u16(a, flags)

    # ------------------------------------------------------------------ chain data

    def _host_to_gpa(self, host: int, length: int) -> int:
        for gpa, size, base in self._m.regions:
            if base <= host and host - base < size and length <= size - (host - base):
                return gpa + (host - base)
        raise ValueError(f"host range 0x{host:x}+0x{length:x} is not guest RAM")

    def read_chain_bytes(self, chain: ChainInfo) -> bytes:
        gpas = [(self._host_to_gpa(h, n), n) for h, n in chain.readable]
        return b"".join(self._m.read(g, n) for g, n in gpas)

    def write_chain_bytes(self, chain: ChainInfo, data) -> int:
        data = bytes(data)
        gpas = [(self._host_to_gpa(h, n), n) for h, n in chain.writable]
        pos = 0
        for g, n in gpas:
            if pos >= len(data):
                break
            part = data[pos:pos + n]
            self._m.write(g, part)
            pos += len(part)
        return pos
