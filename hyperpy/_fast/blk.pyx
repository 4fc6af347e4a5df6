# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""virtio-blk request processing: pop chains, preadv/pwritev straight into guest RAM, complete.

One call of :meth:`BlkWorker.process` drains a queue without the GIL.  Request layouts and
constants come from ``<linux/virtio_blk.h>``; the config space is built from its
``struct virtio_blk_config``, so offsets are the compiler's, not ours.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EINTR
from posix.uio cimport iovec, preadv, pwritev
from posix.unistd cimport fdatasync

from hyperpy._fast.virtqueue cimport SplitQueue, Chain, chain_readable, chain_writable

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, long offset, long length)
    int FALLOC_FL_KEEP_SIZE
    int FALLOC_FL_PUNCH_HOLE
    int FALLOC_FL_ZERO_RANGE

cdef extern from "<linux/virtio_blk.h>" nogil:
    enum:
        VIRTIO_BLK_T_IN
        VIRTIO_BLK_T_OUT
        VIRTIO_BLK_T_FLUSH
        VIRTIO_BLK_T_GET_ID
        VIRTIO_BLK_T_DISCARD
        VIRTIO_BLK_T_WRITE_ZEROES
        VIRTIO_BLK_S_OK
        VIRTIO_BLK_S_IOERR
        VIRTIO_BLK_S_UNSUPP
        VIRTIO_BLK_ID_BYTES
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    struct virtio_blk_outhdr:
        uint32_t type
        uint32_t ioprio
        uint64_t sector
    struct virtio_blk_discard_write_zeroes:
        uint64_t sector
        uint32_t num_sectors
        uint32_t flags
    struct virtio_blk_config:
        uint64_t capacity
        uint32_t size_max
        uint32_t seg_max
        uint32_t blk_size
        uint16_t num_queues
        uint32_t max_discard_sectors
        uint32_t max_discard_seg
        uint32_t discard_sector_alignment
        uint32_t max_write_zeroes_sectors
        uint32_t max_write_zeroes_seg
        uint8_t write_zeroes_may_unmap

# Per-request limits advertised to the driver (and enforced: a request beyond them is IOERR).
cdef enum:
    SECTOR_SHIFT = 9
    C_MAX_SEGMENTS = 126
    C_MAX_DISCARD_SECTORS = 1 << 22
    C_MAX_DISCARD_SEGMENTS = 16

MAX_SEGMENTS = C_MAX_SEGMENTS
MAX_DISCARD_SECTORS = C_MAX_DISCARD_SECTORS
MAX_DISCARD_SEGMENTS = C_MAX_DISCARD_SEGMENTS


def blk_config(uint64_t capacity_sectors, uint16_t num_queues, uint32_t seg_max=C_MAX_SEGMENTS):
    """The bytes of ``struct virtio_blk_config`` for a disk of ``capacity_sectors``."""
    cdef virtio_blk_config c
    memset(&c, 0, sizeof(c))
    c.capacity = capacity_sectors
    c.seg_max = seg_max
    c.blk_size = 512
    c.num_queues = num_queues
    c.max_discard_sectors = C_MAX_DISCARD_SECTORS
    c.max_discard_seg = C_MAX_DISCARD_SEGMENTS
    c.discard_sector_alignment = 1
    c.max_write_zeroes_sectors = C_MAX_DISCARD_SECTORS
    c.max_write_zeroes_seg = C_MAX_DISCARD_SEGMENTS
    c.write_zeroes_may_unmap = 1
    return (<char *>&c)[:sizeof(c)]


cdef inline uint64_t _copy_out(Chain *c, uint32_t first, uint32_t count, uint8_t *dst,
                               uint64_t want) noexcept nogil:
    """Copy up to ``want`` bytes from iovecs [first, first+count) into dst."""
    cdef uint64_t got = 0, n
    cdef uint32_t i
    for i in range(first, first + count):
        if got == want:
            break
        n = c.iov[i].iov_len
        if n > want - got:
            n = want - got
        memcpy(dst + got, c.iov[i].iov_base, n)
        got += n
    return got


cdef inline void _skip(Chain *c, uint32_t *first, uint32_t *count, uint64_t nbytes) noexcept nogil:
    """Drop the first ``nbytes`` of the iovec range [first, first+count) in place."""
    while nbytes and count[0]:
        if c.iov[first[0]].iov_len <= nbytes:
            nbytes -= c.iov[first[0]].iov_len
            first[0] += 1
            count[0] -= 1
        else:
            c.iov[first[0]].iov_base = <uint8_t *>c.iov[first[0]].iov_base + nbytes
            c.iov[first[0]].iov_len -= nbytes
            nbytes = 0


cdef class BlkWorker:
    """Serves one disk's requests.  ``fd`` stays owned by the Python device."""

    cdef int fd
    cdef uint64_t capacity        # sectors
    cdef bint readonly
    cdef uint8_t serial[20]
    cdef Chain *chain
    cdef readonly uint64_t requests
    cdef readonly uint64_t errors
    cdef readonly uint64_t read_bytes     # disk bytes read into guest buffers
    cdef readonly uint64_t write_bytes    # guest bytes written to the disk
    cdef readonly uint64_t reads          # completed read requests
    cdef readonly uint64_t writes         # completed write requests

    def __cinit__(self):
        self.chain = <Chain *>malloc(sizeof(Chain))
        if self.chain == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.chain)

    def __init__(self, int fd, uint64_t capacity_sectors, bint readonly, bytes serial):
        self.fd = fd
        self.capacity = capacity_sectors
        self.readonly = readonly
        memset(self.serial, 0, 20)
        memcpy(self.serial, <char *>serial, min(len(serial), 20))
        self.requests = 0
        self.errors = 0
        self.read_bytes = self.write_bytes = self.reads = self.writes = 0

    cpdef long process(self, SplitQueue q):
        """Complete every available request.

        Returns ``done << 2 | should_notify << 1 | broken`` (one C long rather than a tuple:
        this runs once per queue notification, often for a single request).
        """
        cdef int r
        cdef uint64_t done = 0
        cdef bint notify
        with nogil:
            while True:
                r = q.pop(self.chain)
                if r <= 0:
                    break
                q.push_used(self.chain.head, self._one(self.chain))
                done += 1
            notify = q.should_notify() if done else False
        self.requests += done
        return <long>(done << 2) | (2 if notify else 0) | (1 if r < 0 else 0)

    cdef uint32_t _one(self, Chain *c) noexcept nogil:
        """Serve one request chain; returns the bytes written into the guest's buffers."""
        cdef virtio_blk_outhdr hdr
        cdef uint32_t rfirst = 0, rcount = c.n_readable
        cdef uint32_t wfirst = c.n_readable, wcount = c.n_writable
        cdef uint8_t *status
        cdef uint8_t st = VIRTIO_BLK_S_OK
        cdef uint64_t written = 0, length
        cdef iovec *last
        # The status byte is the last byte of the device-writable part.
        if wcount == 0 or c.writable_len == 0:
            self.errors += 1
            return 0   # nowhere to put a status: drop the request (the driver broke the protocol)
        last = &c.iov[wfirst + wcount - 1]
        status = <uint8_t *>last.iov_base + last.iov_len - 1
        last.iov_len -= 1
        if last.iov_len == 0:
            wcount -= 1
        if _copy_out(c, rfirst, rcount, <uint8_t *>&hdr, sizeof(hdr)) != sizeof(hdr):
            st = VIRTIO_BLK_S_IOERR
        else:
            _skip(c, &rfirst, &rcount, sizeof(hdr))
            if hdr.type == VIRTIO_BLK_T_IN:
                length = c.writable_len - 1
                st = self._rw(c, wfirst, wcount, hdr.sector, length, False)
                if st == VIRTIO_BLK_S_OK:
                    written = length
                    self.reads += 1
                    self.read_bytes += length
            elif hdr.type == VIRTIO_BLK_T_OUT:
                if self.readonly:
                    st = VIRTIO_BLK_S_IOERR
                else:
                    length = c.readable_len - sizeof(hdr)
                    st = self._rw(c, rfirst, rcount, hdr.sector, length, True)
                    if st == VIRTIO_BLK_S_OK:
                        self.writes += 1
                        self.write_bytes += length
            elif hdr.type == VIRTIO_BLK_T_FLUSH:
                if not self.readonly and fdatasync(self.fd) != 0:
                    st = VIRTIO_BLK_S_IOERR
            elif hdr.type == VIRTIO_BLK_T_GET_ID:
                written = self._get_id(c, wfirst, wcount)
            elif hdr.type == VIRTIO_BLK_T_DISCARD or hdr.type == VIRTIO_BLK_T_WRITE_ZEROES:
                st = self._discard(c, rfirst, rcount, hdr.type == VIRTIO_BLK_T_WRITE_ZEROES)
            else:
                st = VIRTIO_BLK_S_UNSUPP
        if st != VIRTIO_BLK_S_OK:
            self.errors += 1
        status[0] = st
        return <uint32_t>(written + 1)

    cdef uint8_t _rw(self, Chain *c, uint32_t first, uint32_t count, uint64_t sector,
                     uint64_t length, bint write) noexcept nogil:
        cdef int64_t n
        cdef uint64_t offset, done = 0
        if length & 511 or sector > self.capacity or (length >> SECTOR_SHIFT) > self.capacity - sector:
            return VIRTIO_BLK_S_IOERR   # past the end of the disk, or not whole sectors
        offset = sector << SECTOR_SHIFT
        while count:
            if write:
                n = pwritev(self.fd, &c.iov[first], count, offset + done)
            else:
                n = preadv(self.fd, &c.iov[first], count, offset + done)
            if n < 0:
                if errno == EINTR:
                    continue
                return VIRTIO_BLK_S_IOERR
            if n == 0:
                return VIRTIO_BLK_S_IOERR   # image shorter than the request
            done += n
            _skip(c, &first, &count, n)
        return VIRTIO_BLK_S_OK if done == length else VIRTIO_BLK_S_IOERR

    cdef uint64_t _get_id(self, Chain *c, uint32_t first, uint32_t count) noexcept nogil:
        cdef uint64_t n, done = 0
        cdef uint32_t i
        for i in range(first, first + count):
            n = c.iov[i].iov_len
            if n > VIRTIO_BLK_ID_BYTES - done:
                n = VIRTIO_BLK_ID_BYTES - done
            memcpy(c.iov[i].iov_base, self.serial + done, n)
            done += n
        return done

    cdef uint8_t _discard(self, Chain *c, uint32_t first, uint32_t count, bint zeroes) noexcept nogil:
        cdef virtio_blk_discard_write_zeroes seg
        cdef uint64_t nseg
        cdef uint32_t s
        cdef int mode
        if self.readonly:
            return VIRTIO_BLK_S_IOERR
        nseg = 0
        while _copy_out(c, first, count, <uint8_t *>&seg, sizeof(seg)) == sizeof(seg):
            _skip(c, &first, &count, sizeof(seg))
            nseg += 1
            if nseg > C_MAX_DISCARD_SEGMENTS or seg.num_sectors > C_MAX_DISCARD_SECTORS:
                return VIRTIO_BLK_S_IOERR
            if seg.sector > self.capacity or seg.num_sectors > self.capacity - seg.sector:
                return VIRTIO_BLK_S_IOERR
            if seg.flags & ~(<uint32_t>VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) or (seg.flags and not zeroes):
                return VIRTIO_BLK_S_UNSUPP
            if zeroes and not seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            else:
                # Discard, or write-zeroes that may unmap: a punched hole reads back as zeroes.
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            if seg.num_sectors and fallocate(self.fd, mode, <long>(seg.sector << SECTOR_SHIFT),
                                             <long>(<uint64_t>seg.num_sectors << SECTOR_SHIFT)) != 0:
                if not zeroes:
                    continue   # discard is a hint: a file system without hole punching ignores it
                return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK if nseg else VIRTIO_BLK_S_IOERR


def raw_preadv_loop(int fd, const uint64_t[::1] offsets, uint8_t[::1] buf):
    """Benchmark baseline: one ``preadv`` of ``len(buf)`` bytes per offset, in C, no GIL.

    What a request costs without virtio: the same syscalls the device makes, nothing else.
    Returns the number of reads that returned the full length.
    """
    cdef iovec iov
    cdef Py_ssize_t i, n = offsets.shape[0]
    cdef long ok = 0
    iov.iov_base = &buf[0]
    iov.iov_len = buf.shape[0]
    with nogil:
        for i in range(n):
            if preadv(fd, &iov, 1, offsets[i]) == <long>iov.iov_len:
                ok += 1
    return ok
