# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Split virtqueues (virtio 1.x, section 2.7): the device side, in C without the GIL.

The guest driver owns the descriptor table and the available ring; the device (this engine)
consumes chains from the available ring and returns them on the used ring.  Everything the guest
wrote is untrusted:

* the three ring areas are translated through the queue's :class:`AddressSpace` once, when the
  queue is enabled, and every later ring access is an index below ``size`` into them;
* every descriptor is copied out of guest memory once (no re-reads a guest could race), every
  buffer and indirect table is translated as a whole (NULL unless all of it is RAM);
* a malformed ring (index out of range, loop, nested indirect table, readable after writable,
  avail idx running more than ``size`` ahead, ...) makes :meth:`SplitQueue.pop` return -1 and
  breaks the queue -- ``needs_reset`` and a one-line ``error`` -- until :meth:`reset`.

``hyperpy/reference/virtqueue.py`` is the same algorithm in plain Python; the tests and a fuzzer
check that both make the same decisions and the same used-ring writes.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.stdio cimport snprintf
from posix.uio cimport iovec
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

from collections import namedtuple

from hyperpy._fast.addrspace cimport AddressSpace
from hyperpy.errors import DeviceError


cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>
    #include <linux/virtio_ring.h>
    #if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "the virtqueue engine reads little-endian virtio 1.x rings natively"
    #endif
    static inline uint16_t hp_vq_load_acquire_u16(const uint16_t *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint16_t hp_vq_load_u16(const uint16_t *p)
    { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void hp_vq_store_u16(uint16_t *p, uint16_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline void hp_vq_store_release_u16(uint16_t *p, uint16_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    /* Full barrier: our used-idx store must be visible before we read the driver's event index
       or flags (store -> load ordering; an acquire or release alone does not give it). */
    static inline void hp_vq_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    /* Copy one descriptor out of guest memory exactly once: the compiler barrier stops the
       compiler from re-reading a field the guest may be changing under us. */
    static inline void hp_vq_read_desc(struct vring_desc *d, const struct vring_desc *s)
    { memcpy(d, s, sizeof(*d)); __asm__ __volatile__("" ::: "memory"); }
    #define HP_VQ_OFF_DESC_ADDR offsetof(struct vring_desc, addr)
    #define HP_VQ_OFF_DESC_LEN offsetof(struct vring_desc, len)
    #define HP_VQ_OFF_DESC_FLAGS offsetof(struct vring_desc, flags)
    #define HP_VQ_OFF_DESC_NEXT offsetof(struct vring_desc, next)
    #define HP_VQ_OFF_AVAIL_FLAGS offsetof(struct vring_avail, flags)
    #define HP_VQ_OFF_AVAIL_IDX offsetof(struct vring_avail, idx)
    #define HP_VQ_OFF_AVAIL_RING offsetof(struct vring_avail, ring)
    #define HP_VQ_OFF_USED_FLAGS offsetof(struct vring_used, flags)
    #define HP_VQ_OFF_USED_IDX offsetof(struct vring_used, idx)
    #define HP_VQ_OFF_USED_RING offsetof(struct vring_used, ring)
    #define HP_VQ_OFF_USED_ELEM_ID offsetof(struct vring_used_elem, id)
    #define HP_VQ_OFF_USED_ELEM_LEN offsetof(struct vring_used_elem, len)
    """
    uint16_t hp_vq_load_acquire_u16(const uint16_t *p) noexcept nogil
    uint16_t hp_vq_load_u16(const uint16_t *p) noexcept nogil
    void hp_vq_store_u16(uint16_t *p, uint16_t v) noexcept nogil
    void hp_vq_store_release_u16(uint16_t *p, uint16_t v) noexcept nogil
    void hp_vq_mb() noexcept nogil
    void hp_vq_read_desc(vring_desc *d, const vring_desc *s) noexcept nogil
    size_t HP_VQ_OFF_DESC_ADDR
    size_t HP_VQ_OFF_DESC_LEN
    size_t HP_VQ_OFF_DESC_FLAGS
    size_t HP_VQ_OFF_DESC_NEXT
    size_t HP_VQ_OFF_AVAIL_FLAGS
    size_t HP_VQ_OFF_AVAIL_IDX
    size_t HP_VQ_OFF_AVAIL_RING
    size_t HP_VQ_OFF_USED_FLAGS
    size_t HP_VQ_OFF_USED_IDX
    size_t HP_VQ_OFF_USED_RING
    size_t HP_VQ_OFF_USED_ELEM_ID
    size_t HP_VQ_OFF_USED_ELEM_LEN


class QueueError(DeviceError):
    """The driver broke a virtqueue (malformed ring) or configured it with impossible values."""


#: What ``SplitQueue.pop_py`` returns: ``readable``/``writable`` are lists of
#: ``(host_address, length)``; the lengths are the totals of each part.
ChainInfo = namedtuple("ChainInfo", "head readable writable readable_len writable_len")

# Flags and ring layout, from <linux/virtio_ring.h> (for the reference engine, the simulated
# driver and the tests, so that no Python file repeats a number).
DESC_F_NEXT = VRING_DESC_F_NEXT
DESC_F_WRITE = VRING_DESC_F_WRITE
DESC_F_INDIRECT = VRING_DESC_F_INDIRECT
USED_F_NO_NOTIFY = VRING_USED_F_NO_NOTIFY
AVAIL_F_NO_INTERRUPT = VRING_AVAIL_F_NO_INTERRUPT
MAX_QUEUE_SIZE = VQ_MAX_SIZE
MAX_IOV = VQ_MAX_IOV
MAX_INDIRECT = VQ_MAX_INDIRECT

LAYOUT = {
    "desc_size": sizeof(vring_desc),
    "desc_addr": HP_VQ_OFF_DESC_ADDR,
    "desc_len": HP_VQ_OFF_DESC_LEN,
    "desc_flags": HP_VQ_OFF_DESC_FLAGS,
    "desc_next": HP_VQ_OFF_DESC_NEXT,
    "avail_flags": HP_VQ_OFF_AVAIL_FLAGS,
    "avail_idx": HP_VQ_OFF_AVAIL_IDX,
    "avail_ring": HP_VQ_OFF_AVAIL_RING,
    "avail_entry_size": sizeof(uint16_t),
    "used_flags": HP_VQ_OFF_USED_FLAGS,
    "used_idx": HP_VQ_OFF_USED_IDX,
    "used_ring": HP_VQ_OFF_USED_RING,
    "used_elem_size": sizeof(vring_used_elem),
    "used_elem_id": HP_VQ_OFF_USED_ELEM_ID,
    "used_elem_len": HP_VQ_OFF_USED_ELEM_LEN,
    "desc_align": VRING_DESC_ALIGN_SIZE,
    "avail_align": VRING_AVAIL_ALIGN_SIZE,
    "used_align": VRING_USED_ALIGN_SIZE,
}


def ring_sizes(uint32_t size):
    """Bytes of (descriptor table, available ring, used ring) for a queue of ``size`` entries.

    The available ring ends with ``used_event`` and the used ring with ``avail_event``; both are
    counted whether or not VIRTIO_RING_F_EVENT_IDX is negotiated (spec 2.7: 6 + 2*size and
    6 + 8*size bytes).
    """
    return (sizeof(vring_desc) * size,
            HP_VQ_OFF_AVAIL_RING + sizeof(uint16_t) * (size + 1),
            HP_VQ_OFF_USED_RING + sizeof(vring_used_elem) * size + sizeof(uint16_t))


def need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old):
    """``vring_need_event`` from <linux/virtio_ring.h> (for tests)."""
    return bool(vring_need_event(event_idx, new_idx, old))


cdef inline bint _pow2(uint64_t n) noexcept nogil:
    return n != 0 and (n & (n - 1)) == 0


cdef class SplitQueue:
    """One split virtqueue, device side.

    Configure it the way a transport does (``size``, ``desc_addr``, ``avail_addr``, ``used_addr``,
    ``event_idx``, then ``ready = True``) or in one call with :meth:`configure`.  Devices in Cython
    ``cimport`` it and call ``pop``/``push_used``/``should_notify`` without the GIL; Python code
    uses ``pop_py``/``push_used_py``/``should_notify_py``.
    """

    def __cinit__(self, *args, **kwargs):
        self._scratch = <Chain *>malloc(sizeof(Chain))
        if self._scratch == NULL:
            raise MemoryError()
        self._reason[0] = 0

    def __dealloc__(self):
        free(self._scratch)
        self._scratch = NULL

    def __init__(self, AddressSpace mem not None, int max_size):
        if max_size < 1 or max_size > VQ_MAX_SIZE or not _pow2(max_size):
            raise QueueError(f"maximum queue size {max_size} is not a power of two between 1 "
                             f"and {VQ_MAX_SIZE}")
        self.mem = mem
        self.max_size = max_size
        self.reset()

    # ------------------------------------------------------------------ configuration (Python)

    def reset(self):
        """Back to the state after a device reset: disabled, size = max_size, counters 0."""
        self._ready = False
        self._broken = False
        self._reason[0] = 0
        self._size = self.max_size
        self._mask = <uint16_t>(self.max_size - 1)
        self._desc_addr = self._avail_addr = self._used_addr = 0
        self._event_idx = False
        self._desc = NULL
        self._avail = NULL
        self._used = NULL
        self._used_event = NULL
        self._avail_event = NULL
        self._last_avail = self._shadow_avail = 0
        self._next_used = self._signalled_used = 0

    def configure(self, uint64_t desc, uint64_t avail, uint64_t used, uint32_t size,
                  bint event_idx=False):
        """Reset, set the ring addresses, size and EVENT_IDX, and enable the queue."""
        self.reset()
        self.size = size
        self._desc_addr = desc
        self._avail_addr = avail
        self._used_addr = used
        self._event_idx = event_idx
        self.ready = True

    def _check_disabled(self):
        if self._ready:
            raise QueueError("queue is enabled; disable or reset it before changing its "
                             "configuration")

    @property
    def size(self):
        return self._size

    @size.setter
    def size(self, uint32_t value):
        self._check_disabled()
        if value > self.max_size or not _pow2(value):
            raise QueueError(f"queue size {value} is not a power of two between 1 and "
                             f"{self.max_size}")
        self._size = value
        self._mask = <uint16_t>(value - 1)

    @property
    def desc_addr(self):
        return self._desc_addr

    @desc_addr.setter
    def desc_addr(self, uint64_t value):
        self._check_disabled()
        self._desc_addr = value

    @property
    def avail_addr(self):
        return self._avail_addr

    @avail_addr.setter
    def avail_addr(self, uint64_t value):
        self._check_disabled()
        self._avail_addr = value

    @property
    def used_addr(self):
        return self._used_addr

    @used_addr.setter
    def used_addr(self, uint64_t value):
        self._check_disabled()
        self._used_addr = value

    @property
    def event_idx(self):
        return self._event_idx

    @event_idx.setter
    def event_idx(self, bint value):
        self._check_disabled()
        self._event_idx = value

    @property
    def ready(self):
        return self._ready

    @ready.setter
    def ready(self, bint value):
        if not value:
            self._ready = False
            return
        if self._ready:
            return
        self._activate()

    def remap(self):
        """Translate the ring areas again (after the address space's mappings changed)."""
        if self._ready:
            self._ready = False
            self._activate()

    def _fail_config(self, str reason):
        cdef bytes b = reason.encode()[:VQ_REASON_LEN - 1]
        self._broken = True
        self._ready = False
        memcpy(self._reason, <const char *>b, len(b))
        self._reason[len(b)] = 0
        raise QueueError(reason)

    def _activate(self):
        cdef uint8_t *d
        cdef uint8_t *a
        cdef uint8_t *u
        if self._broken:
            raise QueueError(self.error)
        dsz, asz, usz = ring_sizes(self._size)
        for name, addr, align in (("descriptor table", self._desc_addr, VRING_DESC_ALIGN_SIZE),
                                  ("available ring", self._avail_addr, VRING_AVAIL_ALIGN_SIZE),
                                  ("used ring", self._used_addr, VRING_USED_ALIGN_SIZE)):
            if addr % align:
                self._fail_config(f"{name} address 0x{addr:x} is not {align}-byte aligned")
        d = self.mem.translate(self._desc_addr, dsz, False)
        if d == NULL:
            self._fail_config(f"descriptor table 0x{self._desc_addr:x}+0x{dsz:x} is outside "
                              f"guest memory")
        a = self.mem.translate(self._avail_addr, asz, False)
        if a == NULL:
            self._fail_config(f"available ring 0x{self._avail_addr:x}+0x{asz:x} is outside "
                              f"guest memory")
        u = self.mem.translate(self._used_addr, usz, True)
        if u == NULL:
            self._fail_config(f"used ring 0x{self._used_addr:x}+0x{usz:x} is outside guest memory")
        self._desc = <vring_desc *>d
        self._avail = <vring_avail *>a
        self._used = <vring_used *>u
        self._used_event = &self._avail.ring[self._size]
        self._avail_event = <uint16_t *>&self._used.ring[self._size]
        self._shadow_avail = self._last_avail
        self._ready = True

    @property
    def last_avail_idx(self):
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, uint16_t value):
        self._last_avail = value
        self._shadow_avail = value

    @property
    def next_used_idx(self):
        return self._next_used

    @next_used_idx.setter
    def next_used_idx(self, uint16_t value):
        self._next_used = value
        self._signalled_used = value

    @property
    def needs_reset(self):
        return bool(self._broken)

    @property
    def error(self):
        """Why the queue is broken (one line), or None."""
        if not self._broken:
            return None
        return (<bytes>self._reason).decode(errors="replace")

    # ------------------------------------------------------------------ C fast path

    cdef int _broke(self) noexcept nogil:
        self._broken = True
        return -1

    cdef int pop(self, Chain *c) noexcept nogil:
        cdef uint16_t avail_idx, pending, head, idx
        cdef vring_desc d
        cdef const vring_desc *table
        cdef uint32_t table_n, count, n, nr
        cdef uint64_t rlen, wlen
        cdef bint seen_write, in_indirect, wr
        cdef uint8_t *p
        if self._broken:
            return -1
        if not self._ready:
            return 0
        if self._last_avail == self._shadow_avail:
            avail_idx = hp_vq_load_acquire_u16(&self._avail.idx)
            pending = <uint16_t>(avail_idx - self._last_avail)
            if pending == 0 and self._event_idx:
                # Going idle: ask for a kick when the next entry is published, then look again
                # (the driver may have published it before it could see our avail_event).
                hp_vq_store_u16(self._avail_event, self._last_avail)
                hp_vq_mb()
                avail_idx = hp_vq_load_acquire_u16(&self._avail.idx)
                pending = <uint16_t>(avail_idx - self._last_avail)
            if pending == 0:
                return 0
            if pending > self._size:
                snprintf(self._reason, VQ_REASON_LEN,
                         b"avail idx %u is %u entries ahead of last_avail_idx %u (queue size %u)",
                         <unsigned>avail_idx, <unsigned>pending, <unsigned>self._last_avail,
                         <unsigned>self._size)
                return self._broke()
            self._shadow_avail = avail_idx

        head = hp_vq_load_u16(&self._avail.ring[self._last_avail & self._mask])
        if head >= self._size:
            snprintf(self._reason, VQ_REASON_LEN,
                     b"avail ring entry %u names descriptor %u, outside the queue of %u",
                     <unsigned>self._last_avail, <unsigned>head, <unsigned>self._size)
            return self._broke()

        table = self._desc
        table_n = self._size
        idx = head
        count = 0
        n = 0
        nr = 0
        rlen = 0
        wlen = 0
        seen_write = False
        in_indirect = False
        while True:
            if count >= table_n:
                snprintf(self._reason, VQ_REASON_LEN,
                         b"descriptor chain longer than its table of %u descriptors (a loop?)",
                         <unsigned>table_n)
                return self._broke()
            count += 1
            hp_vq_read_desc(&d, &table[idx])
            if d.flags & VRING_DESC_F_INDIRECT:
                if in_indirect:
                    snprintf(self._reason, VQ_REASON_LEN,
                             b"indirect descriptor %u inside an indirect table", <unsigned>idx)
                    return self._broke()
                if d.flags & VRING_DESC_F_NEXT:
                    snprintf(self._reason, VQ_REASON_LEN,
                             b"indirect descriptor %u also has the NEXT flag", <unsigned>idx)
                    return self._broke()
                if d.len == 0 or d.len % sizeof(vring_desc):
                    snprintf(self._reason, VQ_REASON_LEN,
                             b"indirect table length %u is not a non-zero multiple of %u",
                             <unsigned>d.len, <unsigned>sizeof(vring_desc))
                    return self._broke()
                if d.len / sizeof(vring_desc) > VQ_MAX_INDIRECT:
                    snprintf(self._reason, VQ_REASON_LEN,
                             b"indirect table of %u descriptors is larger than %u",
                             <unsigned>(d.len / sizeof(vring_desc)), <unsigned>VQ_MAX_INDIRECT)
                    return self._broke()
                p = self.mem.translate(d.addr, d.len, False)
                if p == NULL:
                    snprintf(self._reason, VQ_REASON_LEN,
                             b"indirect table 0x%llx+0x%x is outside guest memory",
                             <unsigned long long>d.addr, <unsigned>d.len)
                    return self._broke()
                table = <const vring_desc *>p
                table_n = <uint32_t>(d.len / sizeof(vring_desc))
                idx = 0
                count = 0
                in_indirect = True
                continue
            if d.len != 0:
                wr = (d.flags & VRING_DESC_F_WRITE) != 0
                if wr:
                    seen_write = True
                elif seen_write:
                    snprintf(self._reason, VQ_REASON_LEN,
                             b"device-readable descriptor %u follows a device-writable one",
                             <unsigned>idx)
                    return self._broke()
                if n >= VQ_MAX_IOV:
                    snprintf(self._reason, VQ_REASON_LEN, b"chain has more than %u buffers",
                             <unsigned>VQ_MAX_IOV)
                    return self._broke()
                p = self.mem.translate(d.addr, d.len, wr)
                if p == NULL:
                    snprintf(self._reason, VQ_REASON_LEN,
                             b"buffer 0x%llx+0x%x of descriptor %u is outside guest memory",
                             <unsigned long long>d.addr, <unsigned>d.len, <unsigned>idx)
                    return self._broke()
                c.iov[n].iov_base = p
                c.iov[n].iov_len = d.len
                n += 1
                if wr:
                    wlen += d.len
                else:
                    nr += 1
                    rlen += d.len
            if not (d.flags & VRING_DESC_F_NEXT):
                break
            if d.next >= table_n:
                snprintf(self._reason, VQ_REASON_LEN,
                         b"descriptor %u chains to descriptor %u, outside its table of %u",
                         <unsigned>idx, <unsigned>d.next, <unsigned>table_n)
                return self._broke()
            idx = d.next

        c.head = head
        c.n_readable = nr
        c.n_writable = n - nr
        c.readable_len = rlen
        c.writable_len = wlen
        self._last_avail += 1
        return 1

    cdef int push_used(self, uint16_t head, uint32_t written) noexcept nogil:
        cdef uint16_t slot
        if self._broken or not self._ready or head >= self._size:
            return -1
        slot = self._next_used & self._mask
        self._used.ring[slot].id = head
        self._used.ring[slot].len = written
        self._next_used += 1
        if self._event_idx:
            hp_vq_store_u16(self._avail_event, self._last_avail)
        # Release: the element (and avail_event) are visible before the index that publishes it.
        hp_vq_store_release_u16(&self._used.idx, self._next_used)
        return 0

    cdef bint should_notify(self) noexcept nogil:
        cdef uint16_t old, new
        if self._broken or not self._ready:
            return False
        old = self._signalled_used
        new = self._next_used
        if old == new:
            return False
        self._signalled_used = new
        hp_vq_mb()
        if self._event_idx:
            return vring_need_event(hp_vq_load_u16(self._used_event), new, old) != 0
        return (hp_vq_load_u16(&self._avail.flags) & VRING_AVAIL_F_NO_INTERRUPT) == 0

    cdef void set_notify(self, bint enable) noexcept nogil:
        cdef uint16_t flags
        if self._broken or not self._ready:
            return
        if self._event_idx:
            if enable:
                hp_vq_store_u16(self._avail_event, self._last_avail)
        else:
            flags = hp_vq_load_u16(&self._used.flags)
            if enable:
                flags &= ~(<uint16_t>VRING_USED_F_NO_NOTIFY)
            else:
                flags |= VRING_USED_F_NO_NOTIFY
            hp_vq_store_u16(&self._used.flags, flags)
        hp_vq_mb()

    # ------------------------------------------------------------------ Python wrappers

    def pop_py(self):
        """The next chain as a :data:`ChainInfo`, None when the ring is empty, or QueueError."""
        cdef Chain *c = self._scratch
        cdef int r
        cdef uint32_t i
        # Keeps the GIL: Python callers are serialized by it (the scratch chain is shared).
        r = self.pop(c)
        if r == 0:
            return None
        if r < 0:
            raise QueueError(self.error)
        readable = [(<uint64_t>c.iov[i].iov_base, c.iov[i].iov_len) for i in range(c.n_readable)]
        writable = [(<uint64_t>c.iov[i].iov_base, c.iov[i].iov_len)
                    for i in range(c.n_readable, c.n_readable + c.n_writable)]
        return ChainInfo(c.head, readable, writable, c.readable_len, c.writable_len)

    def push_used_py(self, uint16_t head, uint32_t written):
        if self.push_used(head, written) < 0:
            if self._broken:
                raise QueueError(self.error)
            if not self._ready:
                raise QueueError("queue is not enabled")
            raise ValueError(f"descriptor head {head} is outside the queue of {self._size}")

    def should_notify_py(self):
        return bool(self.should_notify())

    def set_notify_py(self, bint enable):
        self.set_notify(enable)

    def read_chain_bytes(self, chain):
        """The device-readable bytes of ``chain`` (from :meth:`pop_py`), concatenated."""
        cdef uint64_t host, length, total = 0
        for host, length in chain.readable:
            if not self.mem.host_range_ok(host, length):
                raise ValueError(f"host range 0x{host:x}+0x{length:x} is not guest RAM")
            total += length
        out = PyBytes_FromStringAndSize(NULL, total)
        cdef char *dst = PyBytes_AS_STRING(out)
        for host, length in chain.readable:
            memcpy(dst, <void *>host, length)
            dst += length
        return out

    def write_chain_bytes(self, chain, const uint8_t[::1] data):
        """Scatter ``data`` over the writable part of ``chain``; returns the bytes written
        (``data`` beyond the chain's writable length is dropped)."""
        cdef uint64_t host, length, pos = 0, n
        cdef uint64_t total = data.shape[0]
        for host, length in chain.writable:
            if not self.mem.host_range_ok(host, length):
                raise ValueError(f"host range 0x{host:x}+0x{length:x} is not guest RAM")
        for host, length in chain.writable:
            if pos >= total:
                break
            n = min(length, total - pos)
            memcpy(<void *>host, &data[pos], n)
            pos += n
        return pos

    def bench_pop_push(self, uint64_t n, uint16_t refill=0):
        """Benchmark helper: pop and push_used ``n`` chains in C (no Python per chain).

        When the ring runs empty and ``refill`` is non-zero, play the driver re-offering the
        ``refill`` chains it just got back (avail idx += refill; the avail ring entries are
        reused as they are), which is valid when the ring holds ``refill`` distinct chains that
        repeat every ``refill`` slots.  Returns (chains processed, notifications wanted).
        """
        cdef uint64_t done = 0, notes = 0
        cdef Chain *c = self._scratch
        cdef int r
        if not self._ready:
            raise QueueError("queue is not enabled")
        with nogil:
            while done < n:
                r = self.pop(c)
                if r == 1:
                    self.push_used(c.head, 0)
                    done += 1
                elif r == 0 and refill != 0:
                    notes += self.should_notify()
                    hp_vq_store_release_u16(&self._avail.idx,
                                            <uint16_t>(hp_vq_load_u16(&self._avail.idx) + refill))
                else:
                    break
            notes += self.should_notify()
        if self._broken:
            raise QueueError(self.error)
        return done, notes
