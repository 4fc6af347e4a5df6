# cython: language_level=3, boundscheck=False, wraparound=False
"""The virtio-iommu request queue, walked in C.

One :meth:`RequestQueueWorker.drain` call per notification serves the queue without the GIL:
each round pops up to 256 request chains, gathers each request from its (possibly scattered)
descriptors, lets the core apply it, scatters the reply into the driver's buffers, flushes the
host DMA listeners once for the whole round, and publishes the used entries.  A round whose
flush failed is left unpublished (:meth:`pending_maps`, :meth:`set_status`, :meth:`complete`), so
the device can first turn the statuses of MAPs that never reached the host into NOMEM/DEVERR.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from posix.uio cimport iovec

from hyperpy._fast.virtqueue cimport SplitQueue, Chain
from hyperpy._fast.iommu cimport VirtioIommuCore

cdef extern from "<linux/virtio_iommu.h>" nogil:
    enum:
        VIRTIO_IOMMU_T_MAP
        VIRTIO_IOMMU_S_OK
    struct virtio_iommu_req_map:
        uint8_t head[4]
        uint32_t domain
        uint64_t virt_start
        uint64_t virt_end
    struct virtio_iommu_req_tail:
        uint8_t status

cdef enum:
    MAX_BATCH = 256        # requests per gather (a flush per round)
    BUF = 4096             # largest request / reply handled (a PROBE reply is probe_size + 4)


cdef struct Pending:
    uint16_t head
    uint32_t written
    uint8_t *status        # the reply's status byte in guest RAM, or NULL
    bint map_ok            # a MAP answered OK (its range below may need re-checking)
    uint32_t domain
    uint64_t start
    uint64_t end


cdef class RequestQueueWorker:
    cdef Chain *chain
    cdef Pending *pend
    cdef uint8_t *req
    cdef uint8_t *resp
    cdef int n
    cdef readonly uint64_t requests

    def __cinit__(self):
        self.chain = <Chain *>malloc(sizeof(Chain))
        self.pend = <Pending *>malloc(MAX_BATCH * sizeof(Pending))
        self.req = <uint8_t *>malloc(BUF)
        self.resp = <uint8_t *>malloc(BUF)
        if self.chain == NULL or self.pend == NULL or self.req == NULL or self.resp == NULL:
            raise MemoryError()
        self.n = 0
        self.requests = 0

    def __dealloc__(self):
        free(self.chain)
        free(self.pend)
        free(self.req)
        free(self.resp)

    cdef int _gather(self, SplitQueue q, VirtioIommuCore core, bint *broken) noexcept nogil:
        """One round: pop and apply up to MAX_BATCH requests (self.n), then flush the host
        listeners; returns the flush's status (< 0: a host call failed)."""
        cdef int r
        broken[0] = False
        self.n = 0
        while self.n < MAX_BATCH:
            r = q.pop(self.chain)
            if r <= 0:
                broken[0] = r < 0
                break
            self._one(core, &self.pend[self.n])
            self.n += 1
        self.requests += self.n
        if self.n:
            return core.flush_listeners()
        return 0

    cdef bint _complete(self, SplitQueue q) noexcept nogil:
        cdef int i
        cdef bint notify = False
        for i in range(self.n):
            q.push_used(self.pend[i].head, self.pend[i].written)
        if self.n:
            notify = q.should_notify()
        self.n = 0
        return notify

    def pending_maps(self):
        """``(index, domain, start, end)`` of the gathered batch's MAPs answered OK."""
        return [(i, self.pend[i].domain, self.pend[i].start, self.pend[i].end)
                for i in range(self.n) if self.pend[i].map_ok]

    def drain(self, SplitQueue q, VirtioIommuCore core):
        """Rounds of gather and complete, in C without the GIL, until the queue is empty, the
        ring is broken, or a round's host flush failed; that last round is left gathered but
        unpublished (``pending_maps``, ``set_status``, then ``complete``), since its statuses
        must be corrected first.  One Python call per notification on the fast path.

        Returns ``(requests, notify, broken, flush_rc)``.
        """
        cdef int rc = 0, served = 0, n
        cdef bint broken = False, notify = False
        with nogil:
            while True:
                rc = self._gather(q, core, &broken)
                n = self.n
                served += n
                if rc < 0:
                    break
                if self._complete(q):
                    notify = True
                if n == 0 or broken:
                    break
        return served, notify, broken, rc

    cdef void _one(self, VirtioIommuCore core, Pending *p) noexcept nogil:
        cdef Chain *c = self.chain
        cdef size_t rl = 0, wl, n, off, k
        cdef uint32_t i
        cdef virtio_iommu_req_map *m
        # Gather the device-readable part (a request longer than BUF is cut: the core then
        # answers it as malformed).
        for i in range(c.n_readable):
            k = c.iov[i].iov_len
            if k > BUF - rl:
                k = BUF - rl
            memcpy(self.req + rl, c.iov[i].iov_base, k)
            rl += k
        wl = c.writable_len if c.writable_len < BUF else BUF
        n = core.handle(self.req, rl, self.resp, wl)
        # Scatter the reply into the device-writable part; note where its status byte lands.
        p.head = c.head
        p.written = <uint32_t>n
        p.status = NULL
        off = 0
        for i in range(c.n_readable, c.n_readable + c.n_writable):
            if off >= n:
                break
            k = c.iov[i].iov_len
            if k > n - off:
                k = n - off
            memcpy(c.iov[i].iov_base, self.resp + off, k)
            if n >= sizeof(virtio_iommu_req_tail) and off <= n - 4 < off + k:
                p.status = <uint8_t *>c.iov[i].iov_base + (n - 4 - off)
            off += k
        p.map_ok = False
        if rl >= sizeof(virtio_iommu_req_map) - 4 and self.req[0] == VIRTIO_IOMMU_T_MAP \
                and n >= 4 and self.resp[n - 4] == VIRTIO_IOMMU_S_OK:
            m = <virtio_iommu_req_map *>self.req
            p.map_ok = True
            p.domain = m.domain
            p.start = m.virt_start
            p.end = m.virt_end

    def set_status(self, int index, uint8_t status):
        """Change the status the driver will read for request ``index`` of this batch."""
        if 0 <= index < self.n and self.pend[index].status != NULL:
            self.pend[index].status[0] = status

    def complete(self, SplitQueue q):
        """Publish the batch's used entries; returns whether the driver wants an interrupt."""
        cdef bint notify
        with nogil:
            notify = self._complete(q)
        return notify
