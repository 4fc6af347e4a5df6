# cython: language_level=3
"""virtio-iommu request handling core (virtio spec, "IOMMU Device", device ID 23): C-level API.

Requests, statuses, feature bits, the config layout, probe properties and the fault record all
come from ``<linux/virtio_iommu.h>``.  The transport (virtio-pci, the request/event queues) and the
ACPI VIOT live elsewhere; they call into :class:`VirtioIommuCore` without the GIL::

    n = core.handle(readable, readable_len, writable, writable_len)  # per request chain
    q.push_used(head, n)                     # n == 0: the request could not be parsed (spec)
    ...
    core.flush_listeners()                   # once per batch (all chains of one notification)
    while core.pop_fault(&fault):            # drain translation faults into the event queue
        ...

Emulated devices of an ``iommu=on`` endpoint walk their rings through an
:class:`IommuAddressSpace`, whose ``translate`` is IOVA -> (domain mappings) -> GPA -> host.
All multi-byte fields are little-endian; this module assumes a little-endian host (x86-64).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from hyperpy._fast.addrspace cimport AddressSpace
from hyperpy._fast.dmalistener cimport DmaListener
from hyperpy._fast.guestmem cimport GuestMemory


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass


cdef extern from "<linux/virtio_iommu.h>" nogil:
    enum:
        VIRTIO_IOMMU_F_INPUT_RANGE
        VIRTIO_IOMMU_F_DOMAIN_RANGE
        VIRTIO_IOMMU_F_MAP_UNMAP
        VIRTIO_IOMMU_F_BYPASS
        VIRTIO_IOMMU_F_PROBE
        VIRTIO_IOMMU_F_MMIO
        VIRTIO_IOMMU_F_BYPASS_CONFIG

        VIRTIO_IOMMU_T_ATTACH
        VIRTIO_IOMMU_T_DETACH
        VIRTIO_IOMMU_T_MAP
        VIRTIO_IOMMU_T_UNMAP
        VIRTIO_IOMMU_T_PROBE

        VIRTIO_IOMMU_S_OK
        VIRTIO_IOMMU_S_IOERR
        VIRTIO_IOMMU_S_UNSUPP
        VIRTIO_IOMMU_S_DEVERR
        VIRTIO_IOMMU_S_INVAL
        VIRTIO_IOMMU_S_RANGE
        VIRTIO_IOMMU_S_NOENT
        VIRTIO_IOMMU_S_FAULT
        VIRTIO_IOMMU_S_NOMEM

        VIRTIO_IOMMU_ATTACH_F_BYPASS
        VIRTIO_IOMMU_MAP_F_READ
        VIRTIO_IOMMU_MAP_F_WRITE
        VIRTIO_IOMMU_MAP_F_MMIO
        VIRTIO_IOMMU_MAP_F_MASK

        VIRTIO_IOMMU_PROBE_T_NONE
        VIRTIO_IOMMU_PROBE_T_RESV_MEM
        VIRTIO_IOMMU_PROBE_T_MASK
        VIRTIO_IOMMU_RESV_MEM_T_RESERVED
        VIRTIO_IOMMU_RESV_MEM_T_MSI

        VIRTIO_IOMMU_FAULT_R_UNKNOWN
        VIRTIO_IOMMU_FAULT_R_DOMAIN
        VIRTIO_IOMMU_FAULT_R_MAPPING
        VIRTIO_IOMMU_FAULT_F_READ
        VIRTIO_IOMMU_FAULT_F_WRITE
        VIRTIO_IOMMU_FAULT_F_EXEC
        VIRTIO_IOMMU_FAULT_F_ADDRESS

    struct virtio_iommu_range_64:
        uint64_t start
        uint64_t end

    struct virtio_iommu_range_32:
        uint32_t start
        uint32_t end

    struct virtio_iommu_config:
        uint64_t page_size_mask
        virtio_iommu_range_64 input_range
        virtio_iommu_range_32 domain_range
        uint32_t probe_size
        uint8_t bypass
        uint8_t reserved[3]

    struct virtio_iommu_req_head:
        uint8_t type
        uint8_t reserved[3]

    struct virtio_iommu_req_tail:
        uint8_t status
        uint8_t reserved[3]

    struct virtio_iommu_req_attach:
        virtio_iommu_req_head head
        uint32_t domain
        uint32_t endpoint
        uint32_t flags
        uint8_t reserved[4]
        virtio_iommu_req_tail tail

    struct virtio_iommu_req_detach:
        virtio_iommu_req_head head
        uint32_t domain
        uint32_t endpoint
        uint8_t reserved[8]
        virtio_iommu_req_tail tail

    struct virtio_iommu_req_map:
        virtio_iommu_req_head head
        uint32_t domain
        uint64_t virt_start
        uint64_t virt_end
        uint64_t phys_start
        uint32_t flags
        virtio_iommu_req_tail tail

    struct virtio_iommu_req_unmap:
        virtio_iommu_req_head head
        uint32_t domain
        uint64_t virt_start
        uint64_t virt_end
        uint8_t reserved[4]
        virtio_iommu_req_tail tail

    struct virtio_iommu_probe_property:
        uint16_t type
        uint16_t length

    struct virtio_iommu_probe_resv_mem:
        virtio_iommu_probe_property head
        uint8_t subtype
        uint8_t reserved[3]
        uint64_t start
        uint64_t end

    struct virtio_iommu_req_probe:
        virtio_iommu_req_head head
        uint32_t endpoint
        uint8_t reserved[64]

    struct virtio_iommu_fault:
        uint8_t reason
        uint8_t reserved[3]
        uint32_t flags
        uint32_t endpoint
        uint8_t reserved2[4]
        uint64_t address


cdef enum:
    # Results of VirtioIommuCore.translate / IommuDomain.translate (0 = translated).
    XLATE_OK = 0
    XLATE_DOMAIN = 1       # endpoint not attached and not in bypass  (fault reason R_DOMAIN)
    XLATE_MAPPING = 2      # no single mapping covers [iova, iova+length)  (R_MAPPING)
    XLATE_PERM = 3         # covered, but the access is not permitted by its flags  (R_MAPPING)
    XLATE_ENDPOINT = 4     # the endpoint is not registered with this IOMMU  (R_UNKNOWN)

    IOTLB_ENTRIES = 16     # per-domain direct-mapped translation cache, keyed by the 4K IOVA page
    FAULT_RING = 64        # pending fault records; more are dropped (counted in faults_dropped)
    N_STATUS = 9           # VIRTIO_IOMMU_S_OK .. VIRTIO_IOMMU_S_NOMEM


cdef struct IommuMapping:
    uint64_t start         # first IOVA (inclusive)
    uint64_t end           # last IOVA (inclusive)
    uint64_t phys          # guest-physical address of `start`
    uint32_t flags         # VIRTIO_IOMMU_MAP_F_*


cdef struct IotlbEntry:
    uint64_t start         # copy of a mapping (end < start: empty entry)
    uint64_t end
    uint64_t phys
    uint32_t flags


cdef struct EndpointSlot:
    uint32_t id
    void *domain           # borrowed IommuDomain (owned by VirtioIommuCore._domains), or NULL


cdef struct DomainSlot:
    uint32_t id
    void *domain           # borrowed IommuDomain


cdef class IommuDomain:
    """One address space: sorted, non-overlapping mappings; binary-searched; IOTLB in front."""
    cdef readonly uint32_t id
    cdef readonly bint bypass              # created with VIRTIO_IOMMU_ATTACH_F_BYPASS
    cdef readonly DmaListener listener
    cdef readonly uint32_t max_mappings
    cdef readonly uint32_t n_endpoints
    cdef IommuMapping *_maps
    cdef size_t _n
    cdef size_t _cap
    cdef bint _dirty                       # the listener saw map/unmap since its last flush
    cdef IotlbEntry _iotlb[IOTLB_ENTRIES]
    cdef readonly uint64_t iotlb_hits
    cdef readonly uint64_t iotlb_misses

    # VIRTIO_IOMMU_S_OK, INVAL (overlaps a mapping; nothing changed), NOMEM (max_mappings or
    # allocation), DEVERR/NOMEM (the listener refused: nothing changed).  end >= start.
    cdef int map(self, uint64_t start, uint64_t end, uint64_t phys, uint32_t flags) noexcept nogil
    # Remove every mapping inside [start, end]: S_OK (also when nothing was there), S_RANGE when a
    # mapping is only partly inside (then nothing is removed).  Invalidates the IOTLB.
    cdef int unmap(self, uint64_t start, uint64_t end) noexcept nogil
    # Drop every mapping (listener told), invalidate the IOTLB.
    cdef void clear(self) noexcept nogil
    # Index of the mapping that contains iova, or -1 (binary search).
    cdef long find(self, uint64_t iova) noexcept nogil
    # XLATE_OK with *gpa set, XLATE_MAPPING or XLATE_PERM; [iova, iova+length) inside ONE mapping.
    cdef int translate(self, uint64_t iova, uint64_t length, bint write, uint64_t *gpa) noexcept nogil
    cdef void iotlb_flush(self) noexcept nogil
    cdef uint32_t add_endpoints(self, int delta) noexcept nogil   # returns the new count
    cdef int flush(self) noexcept nogil   # listener.flush() if anything changed since the last


cdef class VirtioIommuCore:
    # Device configuration (struct virtio_iommu_config); fixed after construction except bypass.
    cdef readonly uint64_t page_size_mask
    cdef readonly uint64_t granule           # lowest bit of page_size_mask
    cdef readonly uint64_t input_start, input_end
    cdef readonly uint32_t domain_start, domain_end
    cdef readonly uint32_t probe_size
    cdef uint8_t _bypass                     # config field `bypass` (0/1), driver-writable
    cdef readonly uint32_t max_domains
    cdef readonly uint32_t max_mappings      # per domain
    cdef readonly uint64_t msi_start, msi_end  # RESV_MEM MSI region reported by PROBE
    cdef readonly uint64_t offered           # feature bits the device offers
    cdef readonly uint64_t negotiated        # feature bits the driver accepted (set by transport)
    cdef readonly bint unsupp_unknown_type   # answer unknown types with S_UNSUPP, not len 0
    cdef readonly GuestMemory mem            # or None: when set, a MAP's phys range must be RAM
    cdef object _listener_factory            # callable(domain_id) -> DmaListener, or None

    cdef EndpointSlot *_eps                  # sorted by id
    cdef size_t _n_eps
    cdef size_t _cap_eps
    cdef DomainSlot *_doms                   # sorted by id
    cdef size_t _n_doms
    cdef dict _domains                       # id -> IommuDomain (owns the domain objects)
    cdef pthread_mutex_t _lock
    cdef bint _lock_ok

    cdef virtio_iommu_fault _faults[FAULT_RING]
    cdef uint32_t _fault_head                # next to pop
    cdef uint32_t _fault_count
    cdef readonly int fault_eventfd          # readable when faults are pending (EFD_NONBLOCK)

    cdef readonly uint64_t requests
    cdef readonly uint64_t unwritten         # requests answered with used length 0
    cdef readonly uint64_t maps              # successful MAP requests
    cdef readonly uint64_t unmaps            # successful UNMAP requests
    cdef readonly uint64_t translations
    cdef readonly uint64_t faults
    cdef readonly uint64_t faults_dropped
    cdef readonly object last_error          # str: why the last domain could not be created
    cdef uint64_t _status_counts[N_STATUS]

    # One request chain: `req` is the device-readable part, `resp` the device-writable part.
    # Writes the tail (and PROBE properties) into resp; returns the used length: 4 for a tail at
    # resp[0] (PROBE: probe_size + 4, tail after the properties), or 0 when nothing could be
    # written (no head, writable part shorter than a tail, unknown type, PROBE not negotiated).
    cdef size_t handle(self, const uint8_t *req, size_t req_len, uint8_t *resp,
                       size_t resp_len) noexcept nogil
    # flush() every domain listener that saw a map/unmap; call once per notification batch.
    cdef int flush_listeners(self) noexcept nogil
    # 0 (XLATE_OK, *gpa set) or an XLATE_* code; every failure queues a fault record.
    cdef int translate(self, uint32_t endpoint, uint64_t iova, uint64_t length, bint write,
                       uint64_t *gpa) noexcept nogil
    # 1: *out holds the oldest pending fault (removed); 0: none pending.
    cdef int pop_fault(self, virtio_iommu_fault *out) noexcept nogil

    cdef int _status(self, uint8_t *resp, size_t off, int status) noexcept nogil
    cdef long _ep_index(self, uint32_t ep) noexcept nogil
    cdef long _dom_index(self, uint32_t dom) noexcept nogil
    cdef uint32_t _creating_for
    cdef void *_new_domain(self, uint32_t dom, bint bypass) noexcept nogil
    cdef void _drop_endpoint(self, long ep_index) noexcept nogil
    cdef void _record_fault(self, uint8_t reason, uint32_t flags, uint32_t endpoint,
                            uint64_t address) noexcept nogil
    cdef int _attach(self, const uint8_t *req, size_t req_len) noexcept nogil
    cdef int _detach(self, const uint8_t *req, size_t req_len) noexcept nogil
    cdef int _map(self, const uint8_t *req, size_t req_len) noexcept nogil
    cdef int _unmap(self, const uint8_t *req, size_t req_len) noexcept nogil
    cdef size_t _probe(self, const uint8_t *req, size_t req_len, uint8_t *resp,
                       size_t resp_len) noexcept nogil
    cdef void _free_domain(self, void *dom) noexcept nogil
    cdef bint _in_bypass(self, long ep_index) noexcept nogil


cdef class IommuAddressSpace(AddressSpace):
    """DMA addresses of one endpoint: IOVA -> core.translate -> GPA -> GuestMemory.translate."""
    cdef readonly VirtioIommuCore core
    cdef readonly uint32_t endpoint
