# cython: language_level=3, boundscheck=False, wraparound=False
"""virtio-iommu request handling core, without the GIL (virtio 1.2/1.3, "IOMMU Device").

:class:`VirtioIommuCore` parses the requests of the request queue (ATTACH, DETACH, MAP, UNMAP,
PROBE), keeps the endpoints and domains, and translates device DMA (IOVA -> guest-physical) for
the endpoints behind it.  :class:`IommuDomain` holds one address space: mappings in a sorted C
array (binary search) with a small direct-mapped IOTLB in front, invalidated on every UNMAP and
DETACH, and a :class:`DmaListener` that hears about every applied MAP/UNMAP (host-side mappers:
VFIO).  :class:`IommuAddressSpace` plugs the translation into the virtqueue engine.

Statuses follow the spec's device requirements.  Where the spec leaves room, this core answers:

=====================================================  ========  ==============================
case                                                   status    spec / QEMU
=====================================================  ========  ==============================
no head, or writable part shorter than a tail          (none)    spec: return unwritten, len 0
unknown request type                                   (none)    spec SHOULD; QEMU: UNSUPP
                                                                 (``unsupp_unknown_type=True``)
request shorter than its type's readable part          INVAL     QEMU: INVAL
ATTACH reserved != 0 / unknown flag                    INVAL     spec MUST
ATTACH_F_BYPASS without BYPASS_CONFIG negotiated       INVAL     an unknown flag then
ATTACH unknown endpoint                                NOENT     spec MUST
ATTACH domain outside domain_range                     RANGE     spec: no status named
ATTACH bypass flag inconsistent with existing domain   INVAL     spec SHOULD
ATTACH a new domain past max_domains                   NOMEM
ATTACH listener factory failed                         DEVERR
DETACH unknown endpoint                                NOENT     spec MUST
DETACH unknown domain / endpoint not attached to it    INVAL     spec MAY
MAP/UNMAP without MAP_UNMAP negotiated                 UNSUPP    spec: no status named
MAP unknown flag bit, or MMIO without F_MMIO           INVAL     spec MUST
MAP/UNMAP unknown domain                               NOENT     spec SHOULD
MAP/UNMAP on a bypass domain                           INVAL     spec SHOULD
MAP/UNMAP virt_end < virt_start                        INVAL     driver MUST NOT; no status
MAP virt_start/phys_start/virt_end+1 unaligned         RANGE     spec SHOULD RANGE
MAP outside input_range                                RANGE     spec: "fails", no status
MAP overlapping the MSI RESV_MEM region                RANGE     spec: SHOULD reject, no status
MAP phys range not guest RAM (``mem`` set, not MMIO)   RANGE     spec: no status; QEMU: no check
MAP overlapping an existing mapping                    INVAL     spec SHOULD; QEMU: INVAL
MAP past max_mappings                                  NOMEM
MAP refused by the DMA listener                        NOMEM (-ENOSPC/-ENOMEM) else DEVERR
UNMAP splitting a mapping                              RANGE     spec SHOULD, nothing removed
UNMAP of nothing                                       OK        spec SHOULD
UNMAP reserved != 0                                    ignored   spec MAY INVAL
PROBE without F_PROBE negotiated                       (none)    spec SHOULD: len 0
PROBE writable part < probe_size + tail                INVAL     spec SHOULD; tail at its end
PROBE unknown endpoint                                 NOENT     spec SHOULD
=====================================================  ========  ==============================

The checks run in the order of that table within each request type (the reference does the
same).  ``hyperpy/reference/iommu.py`` is these semantics in plain Python, checked against this
module by ``tests/test_iommu_fuzz.py``.

Locking: one mutex per core serialises ``handle``, ``translate``, ``pop_fault``,
``flush_listeners`` and the Python helpers (which release the GIL before taking it).  Creating or
freeing a domain (ATTACH/DETACH) takes the GIL while holding the mutex (the listener factory is
Python); so a thread must not call ``handle``/``translate`` while *holding the GIL* if another
thread may be handling requests at the same time (the nogil engine paths never do).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, UINT64_MAX
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset, memmove
from libc.errno cimport ENOSPC, ENOMEM
from posix.unistd cimport read, write, close

from hyperpy._fast.addrspace cimport AddressSpace
from hyperpy._fast.dmalistener cimport DmaListener
from hyperpy._fast.guestmem cimport GuestMemory


cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC


# --- constants for Python (the reference implementation and the tests read them from here) ---

T_ATTACH = VIRTIO_IOMMU_T_ATTACH
T_DETACH = VIRTIO_IOMMU_T_DETACH
T_MAP = VIRTIO_IOMMU_T_MAP
T_UNMAP = VIRTIO_IOMMU_T_UNMAP
T_PROBE = VIRTIO_IOMMU_T_PROBE

S_OK = VIRTIO_IOMMU_S_OK
S_IOERR = VIRTIO_IOMMU_S_IOERR
S_UNSUPP = VIRTIO_IOMMU_S_UNSUPP
S_DEVERR = VIRTIO_IOMMU_S_DEVERR
S_INVAL = VIRTIO_IOMMU_S_INVAL
S_RANGE = VIRTIO_IOMMU_S_RANGE
S_NOENT = VIRTIO_IOMMU_S_NOENT
S_FAULT = VIRTIO_IOMMU_S_FAULT
S_NOMEM = VIRTIO_IOMMU_S_NOMEM
STATUS_NAMES = {VIRTIO_IOMMU_S_OK: "OK", VIRTIO_IOMMU_S_IOERR: "IOERR",
                VIRTIO_IOMMU_S_UNSUPP: "UNSUPP", VIRTIO_IOMMU_S_DEVERR: "DEVERR",
                VIRTIO_IOMMU_S_INVAL: "INVAL", VIRTIO_IOMMU_S_RANGE: "RANGE",
                VIRTIO_IOMMU_S_NOENT: "NOENT", VIRTIO_IOMMU_S_FAULT: "FAULT",
                VIRTIO_IOMMU_S_NOMEM: "NOMEM"}

F_INPUT_RANGE = VIRTIO_IOMMU_F_INPUT_RANGE
F_DOMAIN_RANGE = VIRTIO_IOMMU_F_DOMAIN_RANGE
F_MAP_UNMAP = VIRTIO_IOMMU_F_MAP_UNMAP
F_BYPASS = VIRTIO_IOMMU_F_BYPASS
F_PROBE = VIRTIO_IOMMU_F_PROBE
F_MMIO = VIRTIO_IOMMU_F_MMIO
F_BYPASS_CONFIG = VIRTIO_IOMMU_F_BYPASS_CONFIG

ATTACH_F_BYPASS = VIRTIO_IOMMU_ATTACH_F_BYPASS
MAP_F_READ = VIRTIO_IOMMU_MAP_F_READ
MAP_F_WRITE = VIRTIO_IOMMU_MAP_F_WRITE
MAP_F_MMIO = VIRTIO_IOMMU_MAP_F_MMIO
MAP_F_MASK = VIRTIO_IOMMU_MAP_F_MASK

PROBE_T_NONE = VIRTIO_IOMMU_PROBE_T_NONE
PROBE_T_RESV_MEM = VIRTIO_IOMMU_PROBE_T_RESV_MEM
RESV_MEM_T_RESERVED = VIRTIO_IOMMU_RESV_MEM_T_RESERVED
RESV_MEM_T_MSI = VIRTIO_IOMMU_RESV_MEM_T_MSI

FAULT_R_UNKNOWN = VIRTIO_IOMMU_FAULT_R_UNKNOWN
FAULT_R_DOMAIN = VIRTIO_IOMMU_FAULT_R_DOMAIN
FAULT_R_MAPPING = VIRTIO_IOMMU_FAULT_R_MAPPING
FAULT_F_READ = VIRTIO_IOMMU_FAULT_F_READ
FAULT_F_WRITE = VIRTIO_IOMMU_FAULT_F_WRITE
FAULT_F_ADDRESS = VIRTIO_IOMMU_FAULT_F_ADDRESS

X_OK = XLATE_OK
X_DOMAIN = XLATE_DOMAIN
X_MAPPING = XLATE_MAPPING
X_PERM = XLATE_PERM
X_ENDPOINT = XLATE_ENDPOINT

MSI_START = 0xfee00000
MSI_END = 0xfeefffff
DEFAULT_PAGE_SIZE_MASK = (1 << 12) | (1 << 21) | (1 << 30)

# Sizes of the structs in <linux/virtio_iommu.h>; each request's device-readable part is the
# struct without its tail (PROBE: the whole struct, properties are device-writable).
LAYOUT = {
    "head": sizeof(virtio_iommu_req_head),
    "tail": sizeof(virtio_iommu_req_tail),
    "attach": sizeof(virtio_iommu_req_attach),
    "detach": sizeof(virtio_iommu_req_detach),
    "map": sizeof(virtio_iommu_req_map),
    "unmap": sizeof(virtio_iommu_req_unmap),
    "probe": sizeof(virtio_iommu_req_probe),
    "probe_property": sizeof(virtio_iommu_probe_property),
    "resv_mem": sizeof(virtio_iommu_probe_resv_mem),
    "fault": sizeof(virtio_iommu_fault),
    "config": sizeof(virtio_iommu_config),
}

cdef size_t _TAIL = sizeof(virtio_iommu_req_tail)
cdef size_t _ATTACH_IN = sizeof(virtio_iommu_req_attach) - sizeof(virtio_iommu_req_tail)
cdef size_t _DETACH_IN = sizeof(virtio_iommu_req_detach) - sizeof(virtio_iommu_req_tail)
cdef size_t _MAP_IN = sizeof(virtio_iommu_req_map) - sizeof(virtio_iommu_req_tail)
MAP_REQ_LEN = _MAP_IN   # device-readable bytes of a MAP request
cdef size_t _UNMAP_IN = sizeof(virtio_iommu_req_unmap) - sizeof(virtio_iommu_req_tail)
cdef size_t _PROBE_IN = sizeof(virtio_iommu_req_probe)
REQ_IN = {VIRTIO_IOMMU_T_ATTACH: _ATTACH_IN, VIRTIO_IOMMU_T_DETACH: _DETACH_IN,
          VIRTIO_IOMMU_T_MAP: _MAP_IN, VIRTIO_IOMMU_T_UNMAP: _UNMAP_IN,
          VIRTIO_IOMMU_T_PROBE: _PROBE_IN}


cdef inline int _listener_status(int r) noexcept nogil:
    # A host mapper that ran out of entries/memory is NOMEM to the guest; anything else DEVERR.
    if r == -ENOSPC or r == -ENOMEM:
        return VIRTIO_IOMMU_S_NOMEM
    return VIRTIO_IOMMU_S_DEVERR


cdef class IommuDomain:
    """One domain's mappings (sorted, non-overlapping, inclusive ends) and its DMA listener."""

    def __cinit__(self):
        self._maps = NULL
        self._n = 0
        self._cap = 0
        self.iotlb_flush()

    def __init__(self, uint32_t id, bint bypass=False, DmaListener listener=None,
                 uint32_t max_mappings=1 << 18):
        self.id = id
        self.bypass = bypass
        self.listener = listener if listener is not None else DmaListener()
        self.max_mappings = max_mappings

    def __dealloc__(self):
        free(self._maps)
        self._maps = NULL

    cdef void iotlb_flush(self) noexcept nogil:
        cdef int i
        for i in range(IOTLB_ENTRIES):
            self._iotlb[i].start = UINT64_MAX
            self._iotlb[i].end = 0

    cdef long find(self, uint64_t iova) noexcept nogil:
        # Largest k with maps[k].start <= iova, then check its end.
        cdef size_t lo = 0, hi = self._n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._maps[mid].start <= iova:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0 or self._maps[lo - 1].end < iova:
            return -1
        return <long>(lo - 1)

    cdef int map(self, uint64_t start, uint64_t end, uint64_t phys, uint32_t flags) noexcept nogil:
        cdef size_t lo = 0, hi = self._n, mid, newcap
        cdef IommuMapping *m
        cdef int r
        while lo < hi:                       # lo = number of mappings starting at or below start
            mid = (lo + hi) >> 1
            if self._maps[mid].start <= start:
                lo = mid + 1
            else:
                hi = mid
        if lo > 0 and self._maps[lo - 1].end >= start:
            return VIRTIO_IOMMU_S_INVAL
        if lo < self._n and self._maps[lo].start <= end:
            return VIRTIO_IOMMU_S_INVAL
        if self._n >= self.max_mappings:
            return VIRTIO_IOMMU_S_NOMEM
        if self._n == self._cap:
            newcap = self._cap * 2 if self._cap else 64
            if newcap > self.max_mappings:
                newcap = self.max_mappings
            m = <IommuMapping *>realloc(self._maps, newcap * sizeof(IommuMapping))
            if m == NULL:
                return VIRTIO_IOMMU_S_NOMEM
            self._maps = m
            self._cap = newcap
        self._dirty = True
        r = self.listener.map(start, end - start + 1, phys, flags)
        if r < 0:
            return _listener_status(r)
        if lo < self._n:
            memmove(&self._maps[lo + 1], &self._maps[lo], (self._n - lo) * sizeof(IommuMapping))
        self._maps[lo].start = start
        self._maps[lo].end = end
        self._maps[lo].phys = phys
        self._maps[lo].flags = flags
        self._n += 1
        return VIRTIO_IOMMU_S_OK

    cdef int unmap(self, uint64_t start, uint64_t end) noexcept nogil:
        cdef size_t lo = 0, hi = self._n, mid, j, k
        cdef int status = VIRTIO_IOMMU_S_OK
        self.iotlb_flush()
        while lo < hi:                       # first mapping that ends at or after start
            mid = (lo + hi) >> 1
            if self._maps[mid].end < start:
                lo = mid + 1
            else:
                hi = mid
        j = lo
        while j < self._n and self._maps[j].start <= end:
            j += 1
        if j == lo:
            return VIRTIO_IOMMU_S_OK
        # Only the first and the last affected mappings can stick out of [start, end].
        if self._maps[lo].start < start or self._maps[j - 1].end > end:
            return VIRTIO_IOMMU_S_RANGE
        self._dirty = True
        for k in range(lo, j):
            if self.listener.unmap(self._maps[k].start,
                                   self._maps[k].end - self._maps[k].start + 1) < 0:
                status = VIRTIO_IOMMU_S_DEVERR
        if j < self._n:
            memmove(&self._maps[lo], &self._maps[j], (self._n - j) * sizeof(IommuMapping))
        self._n -= j - lo
        return status

    cdef void clear(self) noexcept nogil:
        cdef size_t k
        if self._n:
            self._dirty = True
        for k in range(self._n):
            self.listener.unmap(self._maps[k].start, self._maps[k].end - self._maps[k].start + 1)
        self._n = 0
        self.iotlb_flush()

    cdef int translate(self, uint64_t iova, uint64_t length, bint write, uint64_t *gpa) noexcept nogil:
        cdef uint64_t last
        cdef IotlbEntry *e = &self._iotlb[(iova >> 12) & (IOTLB_ENTRIES - 1)]
        cdef long k
        if length == 0:
            length = 1
        last = iova + (length - 1)
        if last < iova:
            return XLATE_MAPPING
        if e.start <= iova and last <= e.end:
            self.iotlb_hits += 1
        else:
            self.iotlb_misses += 1
            k = self.find(iova)
            if k < 0 or last > self._maps[k].end:
                return XLATE_MAPPING
            e.start = self._maps[k].start
            e.end = self._maps[k].end
            e.phys = self._maps[k].phys
            e.flags = self._maps[k].flags
        if write:
            if not (e.flags & VIRTIO_IOMMU_MAP_F_WRITE):
                return XLATE_PERM
        elif not (e.flags & VIRTIO_IOMMU_MAP_F_READ):
            return XLATE_PERM
        gpa[0] = e.phys + (iova - e.start)
        return XLATE_OK

    cdef uint32_t add_endpoints(self, int delta) noexcept nogil:
        self.n_endpoints += delta
        return self.n_endpoints

    cdef int flush(self) noexcept nogil:
        if not self._dirty:
            return 0
        self._dirty = False
        return self.listener.flush()

    # --- Python helpers (tests) ---

    @property
    def mappings(self):
        """[(start, end, phys, flags), ...] sorted by start (ends inclusive)."""
        return [(self._maps[i].start, self._maps[i].end, self._maps[i].phys, self._maps[i].flags)
                for i in range(self._n)]

    def __len__(self):
        return self._n

    def map_py(self, uint64_t start, uint64_t end, uint64_t phys, uint32_t flags):
        cdef int r
        with nogil:
            r = self.map(start, end, phys, flags)
        return r

    def unmap_py(self, uint64_t start, uint64_t end):
        cdef int r
        with nogil:
            r = self.unmap(start, end)
        return r

    def translate_py(self, uint64_t iova, uint64_t length=1, bint write=False):
        """(XLATE_* code, gpa or None)."""
        cdef uint64_t gpa = 0
        cdef int r
        with nogil:
            r = self.translate(iova, length, write, &gpa)
        return r, (gpa if r == XLATE_OK else None)

    def flush_py(self):
        cdef int r
        with nogil:
            r = self.flush()
        return r


cdef class RecordingListener(DmaListener):
    """TEST HELPER: a DmaListener that records every call in ``events`` (takes the GIL).

    ``map_result`` / ``unmap_result`` are returned from map/unmap (0 or a negative errno), so tests
    can make the host side refuse.
    """
    cdef public list events
    cdef public int map_result
    cdef public int unmap_result

    def __init__(self):
        self.events = []
        self.map_result = 0
        self.unmap_result = 0

    cdef int map(self, uint64_t iova, uint64_t size, uint64_t gpa, uint32_t flags) noexcept nogil:
        with gil:
            self.events.append(("map", iova, size, gpa, flags))
            return self.map_result

    cdef int unmap(self, uint64_t iova, uint64_t size) noexcept nogil:
        with gil:
            self.events.append(("unmap", iova, size))
            return self.unmap_result

    cdef int flush(self) noexcept nogil:
        with gil:
            self.events.append(("flush",))
        return 0


cdef class VirtioIommuCore:
    """The virtio-iommu device model minus its transport: config, endpoints, domains, requests."""

    def __cinit__(self):
        self._eps = NULL
        self._doms = NULL
        self._n_eps = 0
        self._cap_eps = 0
        self._n_doms = 0
        self._domains = {}
        self.fault_eventfd = -1
        self._lock_ok = pthread_mutex_init(&self._lock, NULL) == 0
        if not self._lock_ok:
            raise MemoryError("pthread_mutex_init failed")

    def __init__(self, *, uint64_t page_size_mask=DEFAULT_PAGE_SIZE_MASK,
                 input_range=(0, (1 << 48) - 1), domain_range=(0, 0xffffffff),
                 uint32_t probe_size=512, bint bypass=False, uint32_t max_domains=64,
                 uint32_t max_mappings=1 << 18, bint mmio=False, msi_range=(MSI_START, MSI_END),
                 GuestMemory mem=None, listener_factory=None, bint unsupp_unknown_type=False):
        """Configuration (see docs/virtio-iommu.md).

        ``bypass``: initial config field `bypass` (endpoints not attached to a domain reach guest
        memory 1:1).  ``max_domains``/``max_mappings`` bound what a guest can make the VMM
        allocate (over them: NOMEM).  ``mem``: when given, MAP must name guest RAM (unless MMIO).
        ``listener_factory(domain_id, endpoint)`` returns the DmaListener of each new domain
        (``endpoint``: the one whose ATTACH created it) (None: a
        do-nothing DmaListener).  ``unsupp_unknown_type``: answer an unknown request type with
        S_UNSUPP (QEMU's behaviour) instead of the spec's "do not write, used length 0".
        """
        if page_size_mask == 0:
            raise ValueError("page_size_mask needs at least one page size")
        if input_range[0] > input_range[1] or domain_range[0] > domain_range[1]:
            raise ValueError("empty input or domain range")
        if probe_size < sizeof(virtio_iommu_probe_resv_mem):
            raise ValueError(f"probe_size must be at least {sizeof(virtio_iommu_probe_resv_mem)}")
        if max_domains == 0 or max_domains > (1 << 16):
            raise ValueError("max_domains must be 1..65536")
        if self._doms != NULL:
            raise RuntimeError("VirtioIommuCore.__init__ called twice")
        self.page_size_mask = page_size_mask
        self.granule = page_size_mask & (~page_size_mask + 1)
        self.input_start, self.input_end = input_range
        self.domain_start, self.domain_end = domain_range
        self.probe_size = probe_size
        self._bypass = 1 if bypass else 0
        self.max_domains = max_domains
        self.max_mappings = max_mappings
        self.msi_start, self.msi_end = msi_range
        self.mem = mem
        self._listener_factory = listener_factory
        self.unsupp_unknown_type = unsupp_unknown_type
        self.offered = ((1 << VIRTIO_IOMMU_F_INPUT_RANGE) | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE) |
                        (1 << VIRTIO_IOMMU_F_MAP_UNMAP) | (1 << VIRTIO_IOMMU_F_PROBE) |
                        (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG))
        if mmio:
            self.offered |= 1 << VIRTIO_IOMMU_F_MMIO
        self.negotiated = self.offered
        self._doms = <DomainSlot *>malloc((max_domains + 1) * sizeof(DomainSlot))
        if self._doms == NULL:
            raise MemoryError()
        self.fault_eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.last_error = None

    def __dealloc__(self):
        free(self._eps)
        free(self._doms)
        if self.fault_eventfd >= 0:
            close(self.fault_eventfd)
        if self._lock_ok:
            pthread_mutex_destroy(&self._lock)

    # --- lookups (sorted arrays, binary search) ---

    cdef long _ep_index(self, uint32_t ep) noexcept nogil:
        cdef size_t lo = 0, hi = self._n_eps, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._eps[mid].id < ep:
                lo = mid + 1
            else:
                hi = mid
        if lo < self._n_eps and self._eps[lo].id == ep:
            return <long>lo
        return -1

    cdef long _dom_index(self, uint32_t dom) noexcept nogil:
        cdef size_t lo = 0, hi = self._n_doms, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._doms[mid].id < dom:
                lo = mid + 1
            else:
                hi = mid
        if lo < self._n_doms and self._doms[lo].id == dom:
            return <long>lo
        return -1

    cdef bint _in_bypass(self, long e) noexcept nogil:
        cdef void *d = self._eps[e].domain
        if d == NULL:
            # Spec: bypass when the config field says so (BYPASS_CONFIG offered, whether or not
            # the driver accepted it), or legacy F_BYPASS negotiated.
            return self._bypass != 0 or (self.negotiated >> VIRTIO_IOMMU_F_BYPASS) & 1
        return (<IommuDomain>d).bypass

    # --- domains ---

    cdef void *_new_domain(self, uint32_t dom, bint bypass) noexcept nogil:
        cdef void *p
        cdef size_t lo = 0, hi = self._n_doms, mid
        with gil:
            try:
                listener = None
                if self._listener_factory is not None:
                    listener = self._listener_factory(dom, self._creating_for)
                d = IommuDomain(dom, bypass, listener, self.max_mappings)
            except BaseException as exc:
                self.last_error = f"domain {dom}: {exc!r}"
                return NULL
            self._domains[dom] = d
            p = <void *>d
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._doms[mid].id < dom:
                lo = mid + 1
            else:
                hi = mid
        memmove(&self._doms[lo + 1], &self._doms[lo], (self._n_doms - lo) * sizeof(DomainSlot))
        self._doms[lo].id = dom
        self._doms[lo].domain = p
        self._n_doms += 1
        return p

    cdef void _free_domain(self, void *p) noexcept nogil:
        cdef uint32_t id = (<IommuDomain>p).id
        cdef long i = self._dom_index(id)
        (<IommuDomain>p).clear()
        (<IommuDomain>p).flush()
        if i >= 0:
            memmove(&self._doms[i], &self._doms[i + 1],
                    (self._n_doms - <size_t>i - 1) * sizeof(DomainSlot))
            self._n_doms -= 1
        with gil:
            del self._domains[id]

    cdef void _drop_endpoint(self, long e) noexcept nogil:
        cdef void *p = self._eps[e].domain
        if p == NULL:
            return
        self._eps[e].domain = NULL
        (<IommuDomain>p).iotlb_flush()
        if (<IommuDomain>p).add_endpoints(-1) == 0:
            self._free_domain(p)

    # --- requests ---

    cdef int _status(self, uint8_t *resp, size_t off, int status) noexcept nogil:
        resp[off] = <uint8_t>status
        resp[off + 1] = 0
        resp[off + 2] = 0
        resp[off + 3] = 0
        if status < N_STATUS:
            self._status_counts[status] += 1
        return <int>(off + _TAIL)

    cdef size_t handle(self, const uint8_t *req, size_t req_len, uint8_t *resp,
                       size_t resp_len) noexcept nogil:
        cdef int st
        cdef size_t n
        cdef uint8_t t
        pthread_mutex_lock(&self._lock)
        self.requests += 1
        if req_len < sizeof(virtio_iommu_req_head) or resp_len < _TAIL:
            # Spec: a request the device cannot parse (no type, nowhere to put the tail) is
            # returned without writing to it.
            self.unwritten += 1
            pthread_mutex_unlock(&self._lock)
            return 0
        t = req[0]
        n = 0
        if t == VIRTIO_IOMMU_T_ATTACH:
            n = self._status(resp, 0, self._attach(req, req_len))
        elif t == VIRTIO_IOMMU_T_DETACH:
            n = self._status(resp, 0, self._detach(req, req_len))
        elif t == VIRTIO_IOMMU_T_MAP:
            n = self._status(resp, 0, self._map(req, req_len))
        elif t == VIRTIO_IOMMU_T_UNMAP:
            n = self._status(resp, 0, self._unmap(req, req_len))
        elif t == VIRTIO_IOMMU_T_PROBE:
            n = self._probe(req, req_len, resp, resp_len)
        elif self.unsupp_unknown_type:
            n = self._status(resp, 0, VIRTIO_IOMMU_S_UNSUPP)
        else:
            # Spec: "If a request type is not recognized, the device SHOULD NOT write the buffer
            # and SHOULD set the used length to zero."
            self.unwritten += 1
        pthread_mutex_unlock(&self._lock)
        return n

    cdef int _attach(self, const uint8_t *req, size_t req_len) noexcept nogil:
        cdef virtio_iommu_req_attach a
        cdef long e, d
        cdef void *old
        cdef void *dom
        cdef bint bypass, old_freed
        if req_len < _ATTACH_IN:
            return VIRTIO_IOMMU_S_INVAL
        memcpy(&a, req, _ATTACH_IN)
        if a.reserved[0] or a.reserved[1] or a.reserved[2] or a.reserved[3]:
            return VIRTIO_IOMMU_S_INVAL                       # spec: MUST INVAL
        if a.flags & ~(<uint32_t>VIRTIO_IOMMU_ATTACH_F_BYPASS):
            return VIRTIO_IOMMU_S_INVAL                       # spec: unknown flag, MUST INVAL
        bypass = (a.flags & VIRTIO_IOMMU_ATTACH_F_BYPASS) != 0
        if bypass and not ((self.negotiated >> VIRTIO_IOMMU_F_BYPASS_CONFIG) & 1):
            return VIRTIO_IOMMU_S_INVAL                       # the flag only exists with the feature
        e = self._ep_index(a.endpoint)
        if e < 0:
            return VIRTIO_IOMMU_S_NOENT                       # spec: MUST NOENT
        if a.domain < self.domain_start or a.domain > self.domain_end:
            return VIRTIO_IOMMU_S_RANGE                       # outside domain_range (our choice)
        old = self._eps[e].domain
        d = self._dom_index(a.domain)
        if d >= 0:
            dom = self._doms[d].domain
            if (<IommuDomain>dom).bypass != bypass:
                return VIRTIO_IOMMU_S_INVAL                   # spec: SHOULD INVAL
            if dom == old:
                return VIRTIO_IOMMU_S_OK
        else:
            # Moving the only endpoint of its old domain frees that domain's slot.
            old_freed = old != NULL and (<IommuDomain>old).n_endpoints == 1
            if self._n_doms - (1 if old_freed else 0) >= self.max_domains:
                return VIRTIO_IOMMU_S_NOMEM
            self._creating_for = a.endpoint   # the factory picks a listener per first endpoint
            dom = self._new_domain(a.domain, bypass)
            if dom == NULL:
                return VIRTIO_IOMMU_S_DEVERR
        if old != NULL:
            self._drop_endpoint(e)                            # spec: as if DETACH, then ATTACH
        self._eps[e].domain = dom
        (<IommuDomain>dom).add_endpoints(1)
        return VIRTIO_IOMMU_S_OK

    cdef int _detach(self, const uint8_t *req, size_t req_len) noexcept nogil:
        cdef virtio_iommu_req_detach a
        cdef long e, d
        if req_len < _DETACH_IN:
            return VIRTIO_IOMMU_S_INVAL
        memcpy(&a, req, _DETACH_IN)                           # reserved: ignored (spec: MUST)
        e = self._ep_index(a.endpoint)
        if e < 0:
            return VIRTIO_IOMMU_S_NOENT                       # spec: MUST NOENT
        d = self._dom_index(a.domain)
        if d < 0 or self._eps[e].domain != self._doms[d].domain:
            return VIRTIO_IOMMU_S_INVAL                       # spec: MAY INVAL
        self._drop_endpoint(e)
        return VIRTIO_IOMMU_S_OK

    cdef int _map(self, const uint8_t *req, size_t req_len) noexcept nogil:
        cdef virtio_iommu_req_map a
        cdef long d
        cdef void *dom
        cdef uint64_t g, size
        cdef int st
        if not ((self.negotiated >> VIRTIO_IOMMU_F_MAP_UNMAP) & 1):
            return VIRTIO_IOMMU_S_UNSUPP                      # request not available (our choice)
        if req_len < _MAP_IN:
            return VIRTIO_IOMMU_S_INVAL
        memcpy(&a, req, _MAP_IN)
        if a.flags & ~(<uint32_t>VIRTIO_IOMMU_MAP_F_MASK):
            return VIRTIO_IOMMU_S_INVAL                       # spec: MUST INVAL
        if (a.flags & VIRTIO_IOMMU_MAP_F_MMIO) and not ((self.negotiated >> VIRTIO_IOMMU_F_MMIO) & 1):
            return VIRTIO_IOMMU_S_INVAL                       # MMIO flag without F_MMIO: unknown bit
        d = self._dom_index(a.domain)
        if d < 0:
            return VIRTIO_IOMMU_S_NOENT                       # spec: SHOULD NOENT
        dom = self._doms[d].domain
        if (<IommuDomain>dom).bypass:
            return VIRTIO_IOMMU_S_INVAL                       # spec: SHOULD INVAL
        if a.virt_end < a.virt_start:
            return VIRTIO_IOMMU_S_INVAL                       # driver MUST end > start (our choice)
        g = self.granule - 1
        if (a.virt_start & g) or (a.phys_start & g) or ((a.virt_end + 1) & g):
            return VIRTIO_IOMMU_S_RANGE                       # spec: SHOULD RANGE
        if a.virt_start < self.input_start or a.virt_end > self.input_end:
            return VIRTIO_IOMMU_S_RANGE                       # outside input_range (our choice)
        size = a.virt_end - a.virt_start + 1
        if size == 0:
            return VIRTIO_IOMMU_S_RANGE                       # the whole 64-bit space
        if a.virt_start <= self.msi_end and self.msi_start <= a.virt_end:
            return VIRTIO_IOMMU_S_RANGE                       # spec: SHOULD reject RESV_MEM overlap
        if a.phys_start > UINT64_MAX - (size - 1):
            return VIRTIO_IOMMU_S_RANGE
        if self.mem is not None and not (a.flags & VIRTIO_IOMMU_MAP_F_MMIO):
            if self.mem.translate(a.phys_start, size) == NULL:
                return VIRTIO_IOMMU_S_RANGE                   # phys not guest RAM (our choice)
        st = (<IommuDomain>dom).map(a.virt_start, a.virt_end, a.phys_start, a.flags)
        if st == VIRTIO_IOMMU_S_OK:
            self.maps += 1
        return st

    cdef int _unmap(self, const uint8_t *req, size_t req_len) noexcept nogil:
        cdef virtio_iommu_req_unmap a
        cdef long d
        cdef void *dom
        cdef int st
        if not ((self.negotiated >> VIRTIO_IOMMU_F_MAP_UNMAP) & 1):
            return VIRTIO_IOMMU_S_UNSUPP
        if req_len < _UNMAP_IN:
            return VIRTIO_IOMMU_S_INVAL
        memcpy(&a, req, _UNMAP_IN)                            # reserved: ignored (spec: MAY INVAL)
        d = self._dom_index(a.domain)
        if d < 0:
            return VIRTIO_IOMMU_S_NOENT                       # spec: SHOULD NOENT
        dom = self._doms[d].domain
        if (<IommuDomain>dom).bypass:
            return VIRTIO_IOMMU_S_INVAL                       # spec: SHOULD INVAL
        if a.virt_end < a.virt_start:
            return VIRTIO_IOMMU_S_INVAL                       # our choice, as for MAP
        st = (<IommuDomain>dom).unmap(a.virt_start, a.virt_end)              # RANGE on a split (spec: SHOULD)
        if st == VIRTIO_IOMMU_S_OK:
            self.unmaps += 1
        return st

    cdef size_t _probe(self, const uint8_t *req, size_t req_len, uint8_t *resp,
                       size_t resp_len) noexcept nogil:
        cdef virtio_iommu_req_probe a
        cdef virtio_iommu_probe_resv_mem r
        cdef size_t ps = self.probe_size
        if not ((self.negotiated >> VIRTIO_IOMMU_F_PROBE) & 1):
            self.unwritten += 1                               # spec: don't write, used length 0
            return 0
        if resp_len < ps + _TAIL:
            # Spec: properties smaller than probe_size -> write no property, INVAL.  The tail goes
            # at the end of the device-writable part, where the driver looks for it.
            memset(resp, 0, resp_len - _TAIL)
            return self._status(resp, resp_len - _TAIL, VIRTIO_IOMMU_S_INVAL)
        memset(resp, 0, ps)
        if req_len < _PROBE_IN:
            return self._status(resp, ps, VIRTIO_IOMMU_S_INVAL)
        memcpy(&a, req, _PROBE_IN)                            # reserved: ignored (spec: MUST)
        if self._ep_index(a.endpoint) < 0:
            return self._status(resp, ps, VIRTIO_IOMMU_S_NOENT)
        memset(&r, 0, sizeof(r))
        r.head.type = VIRTIO_IOMMU_PROBE_T_RESV_MEM
        r.head.length = sizeof(virtio_iommu_probe_resv_mem) - sizeof(virtio_iommu_probe_property)
        r.subtype = VIRTIO_IOMMU_RESV_MEM_T_MSI
        r.start = self.msi_start
        r.end = self.msi_end
        memcpy(resp, &r, sizeof(r))                           # then zeroes: a NONE property
        return self._status(resp, ps, VIRTIO_IOMMU_S_OK)

    cdef int flush_listeners(self) noexcept nogil:
        cdef size_t i
        cdef int r, ret = 0
        pthread_mutex_lock(&self._lock)
        for i in range(self._n_doms):
            r = (<IommuDomain>self._doms[i].domain).flush()
            if r < 0 and ret == 0:
                ret = r
        pthread_mutex_unlock(&self._lock)
        return ret

    # --- translation and faults ---

    cdef void _record_fault(self, uint8_t reason, uint32_t flags, uint32_t endpoint,
                            uint64_t address) noexcept nogil:
        cdef virtio_iommu_fault *f
        cdef uint64_t one = 1
        self.faults += 1
        if self._fault_count >= FAULT_RING:
            self.faults_dropped += 1
            return
        f = &self._faults[(self._fault_head + self._fault_count) % FAULT_RING]
        memset(f, 0, sizeof(virtio_iommu_fault))
        f.reason = reason
        f.flags = flags
        f.endpoint = endpoint
        f.address = address
        self._fault_count += 1
        if self.fault_eventfd >= 0:
            write(self.fault_eventfd, &one, sizeof(one))

    cdef int translate(self, uint32_t endpoint, uint64_t iova, uint64_t length, bint write,
                       uint64_t *gpa) noexcept nogil:
        cdef long e
        cdef int r
        cdef void *d
        cdef uint32_t fflags = VIRTIO_IOMMU_FAULT_F_ADDRESS | (
            VIRTIO_IOMMU_FAULT_F_WRITE if write else VIRTIO_IOMMU_FAULT_F_READ)
        pthread_mutex_lock(&self._lock)
        self.translations += 1
        e = self._ep_index(endpoint)
        if e < 0:
            r = XLATE_ENDPOINT
            self._record_fault(VIRTIO_IOMMU_FAULT_R_UNKNOWN, fflags, endpoint, iova)
        elif self._in_bypass(e):
            gpa[0] = iova
            r = XLATE_OK
        else:
            d = self._eps[e].domain
            if d == NULL:
                r = XLATE_DOMAIN
                self._record_fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, fflags, endpoint, iova)
            else:
                r = (<IommuDomain>d).translate(iova, length, write, gpa)
                if r != XLATE_OK:
                    self._record_fault(VIRTIO_IOMMU_FAULT_R_MAPPING, fflags, endpoint, iova)
        pthread_mutex_unlock(&self._lock)
        return r

    cdef int pop_fault(self, virtio_iommu_fault *out) noexcept nogil:
        cdef uint64_t v
        cdef int r = 0
        pthread_mutex_lock(&self._lock)
        if self._fault_count:
            memcpy(out, &self._faults[self._fault_head], sizeof(virtio_iommu_fault))
            self._fault_head = (self._fault_head + 1) % FAULT_RING
            self._fault_count -= 1
            r = 1
            if self._fault_count == 0 and self.fault_eventfd >= 0:
                read(self.fault_eventfd, &v, sizeof(v))
        pthread_mutex_unlock(&self._lock)
        return r

    # --- Python API: configuration and endpoints (control plane) ---

    @property
    def bypass(self):
        return self._bypass

    @bypass.setter
    def bypass(self, value):
        """Config field `bypass` (the transport lets the driver write it with BYPASS_CONFIG)."""
        cdef uint8_t v = 1 if (int(value) & 1) else 0
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._bypass = v
            pthread_mutex_unlock(&self._lock)

    def set_negotiated(self, uint64_t features):
        """Record the driver's accepted features (only offered bits are kept)."""
        self.negotiated = features & self.offered

    def config_bytes(self):
        """struct virtio_iommu_config as the device presents it (little-endian)."""
        cdef virtio_iommu_config c
        memset(&c, 0, sizeof(c))
        c.page_size_mask = self.page_size_mask
        c.input_range.start = self.input_start
        c.input_range.end = self.input_end
        c.domain_range.start = self.domain_start
        c.domain_range.end = self.domain_end
        c.probe_size = self.probe_size
        c.bypass = self._bypass
        return (<char *>&c)[:sizeof(c)]

    def add_endpoint(self, uint32_t endpoint):
        """Register an endpoint ID (for PCI: the BDF of an iommu=on device)."""
        cdef int err = 0
        cdef size_t lo = 0, hi, mid, newcap
        cdef EndpointSlot *p
        with nogil:                     # never hold the core's mutex while holding the GIL
            pthread_mutex_lock(&self._lock)
            if self._ep_index(endpoint) >= 0:
                err = 1
            elif self._n_eps == self._cap_eps:
                newcap = self._cap_eps * 2 if self._cap_eps else 16
                p = <EndpointSlot *>realloc(self._eps, newcap * sizeof(EndpointSlot))
                if p == NULL:
                    err = 2
                else:
                    self._eps = p
                    self._cap_eps = newcap
            if err == 0:
                hi = self._n_eps
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if self._eps[mid].id < endpoint:
                        lo = mid + 1
                    else:
                        hi = mid
                memmove(&self._eps[lo + 1], &self._eps[lo],
                        (self._n_eps - lo) * sizeof(EndpointSlot))
                self._eps[lo].id = endpoint
                self._eps[lo].domain = NULL
                self._n_eps += 1
            pthread_mutex_unlock(&self._lock)
        if err == 1:
            raise ValueError(f"endpoint {endpoint:#x} is already registered")
        if err == 2:
            raise MemoryError()

    def remove_endpoint(self, uint32_t endpoint):
        """Forget an endpoint (hot-unplug): detached first, its domain freed if it was the last."""
        cdef long e
        with nogil:
            pthread_mutex_lock(&self._lock)
            e = self._ep_index(endpoint)
            if e >= 0:
                self._drop_endpoint(e)
                memmove(&self._eps[e], &self._eps[e + 1],
                        (self._n_eps - <size_t>e - 1) * sizeof(EndpointSlot))
                self._n_eps -= 1
            pthread_mutex_unlock(&self._lock)
        if e < 0:
            raise KeyError(endpoint)

    def reset(self):
        """Device reset: every endpoint detached, every domain (and its mappings) gone.

        The config field `bypass` keeps its value (spec: it changes on system reset only).
        """
        cdef size_t i
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(self._n_eps):
                self._drop_endpoint(<long>i)
            self._fault_head = 0
            self._fault_count = 0
            pthread_mutex_unlock(&self._lock)
        self.negotiated = self.offered

    @property
    def endpoints(self):
        """{endpoint: attached domain id or None}."""
        return {self._eps[i].id: ((<IommuDomain>self._eps[i].domain).id
                                  if self._eps[i].domain != NULL else None)
                for i in range(self._n_eps)}

    @property
    def domains(self):
        """{domain id: IommuDomain}."""
        return dict(self._domains)

    def mappings(self, uint32_t domain):
        d = self._domains.get(domain)
        return None if d is None else d.mappings

    @property
    def status_counts(self):
        return {STATUS_NAMES[i]: self._status_counts[i] for i in range(N_STATUS)}

    @property
    def pending_faults(self):
        return self._fault_count

    # --- Python API: the data path, for tests and tools ---

    def handle_py(self, const uint8_t[::1] req, resp_len=None):
        """Handle one request; returns the bytes written to the device-writable part.

        ``resp_len`` defaults to the size the spec gives the writable part: a tail, or
        ``probe_size`` + tail for PROBE.
        """
        cdef size_t rl, n, ql = req.shape[0]
        cdef const uint8_t *q = &req[0] if ql else NULL
        cdef uint8_t dummy = 0
        if resp_len is None:
            rl = self.probe_size + _TAIL if (ql and req[0] == VIRTIO_IOMMU_T_PROBE) else _TAIL
        else:
            rl = resp_len
        buf = bytearray(rl)
        cdef uint8_t[::1] b = buf if rl else None
        cdef uint8_t *r = &b[0] if rl else &dummy
        if q == NULL:
            q = &dummy
        with nogil:
            n = self.handle(q, ql, r, rl)
        return bytes(buf[:n])

    def handle_batch_py(self, reqs):
        """Handle [(req, resp_len or None), ...] like one notification, then flush the listeners."""
        out = [self.handle_py(r, l) for r, l in reqs]
        self.flush_listeners_py()
        return out

    def flush_listeners_py(self):
        cdef int r
        with nogil:
            r = self.flush_listeners()
        return r

    def translate_py(self, uint32_t endpoint, uint64_t iova, uint64_t length=1, bint write=False):
        """(XLATE_* code, gpa or None)."""
        cdef uint64_t gpa = 0
        cdef int r
        with nogil:
            r = self.translate(endpoint, iova, length, write, &gpa)
        return r, (gpa if r == XLATE_OK else None)

    def bench_translate(self, uint32_t endpoint, uint64_t iova, uint64_t length, uint64_t n,
                        bint write=False):
        """Benchmark helper: ``n`` translations of the same range without the GIL; the number of
        those that failed."""
        cdef uint64_t i, gpa, bad = 0
        with nogil:
            for i in range(n):
                if self.translate(endpoint, iova, length, write, &gpa) != XLATE_OK:
                    bad += 1
        return bad

    def record_refused_map_py(self, uint32_t domain, uint64_t address):
        """Report a MAP the host refused (past its DMA entry limit) as a fault record, reason
        MAPPING at ``address``, from the first endpoint attached to ``domain``: Linux's driver
        never reads the status of a MAP it queued, but it logs every fault it is sent.  False
        when no endpoint is attached to that domain."""
        cdef size_t i
        cdef bint found = False
        cdef void *d
        with nogil:
            pthread_mutex_lock(&self._lock)
            for i in range(self._n_eps):
                d = self._eps[i].domain
                if d != NULL and (<IommuDomain>d).id == domain:
                    self._record_fault(VIRTIO_IOMMU_FAULT_R_MAPPING,
                                       VIRTIO_IOMMU_FAULT_F_ADDRESS | VIRTIO_IOMMU_FAULT_F_READ
                                       | VIRTIO_IOMMU_FAULT_F_WRITE, self._eps[i].id, address)
                    found = True
                    break
            pthread_mutex_unlock(&self._lock)
        return found

    def pop_fault_py(self):
        """The oldest pending fault as a dict, or None."""
        cdef virtio_iommu_fault f
        cdef int r
        with nogil:
            r = self.pop_fault(&f)
        if not r:
            return None
        return {"reason": f.reason, "flags": f.flags, "endpoint": f.endpoint,
                "address": f.address, "bytes": (<char *>&f)[:sizeof(f)]}


cdef class IommuAddressSpace(AddressSpace):
    """The DMA view of one endpoint behind a :class:`VirtioIommuCore`.

    ``translate(iova, length, write)``: the whole ``[iova, iova+length)`` must lie inside ONE
    mapping of the endpoint's domain, with the permission the access needs, and the guest-physical
    range it maps to must be RAM; otherwise NULL (and, for IOMMU-level failures, a fault record).
    In bypass (not attached and config `bypass` = 1, or a bypass domain) the IOVA is the GPA.
    """

    def __init__(self, GuestMemory mem not None, VirtioIommuCore core not None, uint32_t endpoint):
        self.mem = mem
        self.core = core
        self.endpoint = endpoint

    cdef uint8_t *translate(self, uint64_t addr, uint64_t length, bint write) noexcept nogil:
        cdef uint64_t gpa
        if self.core.translate(self.endpoint, addr, length, write, &gpa) != XLATE_OK:
            return NULL
        return self.mem.translate(gpa, length)
