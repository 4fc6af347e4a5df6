# cython: language_level=3
"""Split virtqueue engine (virtio 1.x, section 2.7): the C-level API devices cimport.

A device written in Cython keeps a ``Chain`` (it is large: allocate it once, e.g. with malloc, or
use one per worker) and runs, without the GIL::

    while True:
        r = q.pop(c)
        if r <= 0:              # 0: ring empty; -1: the driver broke the ring (q.needs_reset)
            break
        n = preadv(fd, chain_writable(c), c.n_writable, off)   # iovecs point into guest RAM
        q.push_used(c.head, <uint32_t>n)
    if q.should_notify():
        raise_irq()

One queue is driven by one thread at a time (pop/push_used/should_notify are not locked).
Ring layouts, flags and ``vring_need_event`` come from ``<linux/virtio_ring.h>``.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

from hyperpy._fast.addrspace cimport AddressSpace


cdef extern from "<linux/virtio_ring.h>" nogil:
    enum:
        VRING_DESC_F_NEXT
        VRING_DESC_F_WRITE
        VRING_DESC_F_INDIRECT
        VRING_USED_F_NO_NOTIFY
        VRING_AVAIL_F_NO_INTERRUPT
        VRING_DESC_ALIGN_SIZE
        VRING_AVAIL_ALIGN_SIZE
        VRING_USED_ALIGN_SIZE

    struct vring_desc:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next

    struct vring_avail:
        uint16_t flags
        uint16_t idx
        uint16_t ring[1]        # flexible array: ring[size], then used_event at ring[size]

    struct vring_used_elem:
        uint32_t id
        uint32_t len

    struct vring_used:
        uint16_t flags
        uint16_t idx
        vring_used_elem ring[1]  # flexible array: ring[size], then avail_event after it

    int vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)


cdef enum:
    VQ_MAX_SIZE = 32768        # largest split-queue size the spec allows
    VQ_MAX_IOV = 1024          # most non-empty buffers one chain may have (readable + writable)
    VQ_MAX_INDIRECT = 65536    # most descriptors in one indirect table (`next` is 16 bits)
    VQ_REASON_LEN = 192


cdef struct Chain:
    uint16_t head              # descriptor index to hand back to push_used()
    uint32_t n_readable        # iov[0 : n_readable] are device-readable (driver -> device)
    uint32_t n_writable        # iov[n_readable : n_readable + n_writable] are device-writable
    uint64_t readable_len      # total bytes of the readable part
    uint64_t writable_len      # total bytes of the writable part
    iovec iov[VQ_MAX_IOV]      # host addresses inside guest RAM, ready for readv/writev/preadv...


cdef inline iovec *chain_readable(Chain *c) noexcept nogil:
    return &c.iov[0]


cdef inline iovec *chain_writable(Chain *c) noexcept nogil:
    return &c.iov[c.n_readable]


cdef class SplitQueue:
    cdef readonly AddressSpace mem
    cdef readonly uint32_t max_size
    cdef uint32_t _size
    cdef uint16_t _mask
    cdef uint64_t _desc_addr
    cdef uint64_t _avail_addr
    cdef uint64_t _used_addr
    cdef bint _event_idx
    cdef bint _ready
    cdef bint _broken
    # Host pointers of the ring areas, translated (bounds-checked) once when the queue is enabled.
    cdef vring_desc *_desc
    cdef vring_avail *_avail
    cdef vring_used *_used
    cdef uint16_t *_used_event     # &avail->ring[size] (driver's "interrupt me at" index)
    cdef uint16_t *_avail_event    # just after used->ring[size-1] (device's "kick me at" index)
    cdef uint16_t _last_avail      # next avail ring entry to consume
    cdef uint16_t _shadow_avail    # avail->idx as last read
    cdef uint16_t _next_used       # next used ring entry to fill (= used->idx published)
    cdef uint16_t _signalled_used  # _next_used at the last should_notify()
    cdef char _reason[VQ_REASON_LEN]
    cdef Chain *_scratch           # for the Python wrappers and the benchmark helper

    # 1: *c holds the next chain; 0: nothing available (or queue not enabled);
    # -1: the ring is malformed -- the queue is now broken (needs_reset, error) until reset().
    cdef int pop(self, Chain *c) noexcept nogil
    # Return a chain: used elem (head, written), then used->idx with release ordering.
    # 0, or -1 (queue not enabled/broken, or head >= size: nothing written).
    cdef int push_used(self, uint16_t head, uint32_t written) noexcept nogil
    # Whether the driver wants an interrupt for the chains pushed since the last call.
    cdef bint should_notify(self) noexcept nogil
    # Ask for / suppress driver kicks (VRING_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX).
    cdef void set_notify(self, bint enable) noexcept nogil
    cdef int _broke(self) noexcept nogil
