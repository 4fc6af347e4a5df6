# cython: language_level=3
"""Host DMA mapping for passed-through devices: VFIO type1 containers and the DMA mapper.

``DmaContainer`` is the host side of one IOMMU domain (a VFIO container): ``dma_map`` and
``dma_unmap`` with the kernel's ``vfio_iommu_type1`` v2 semantics, callable without the GIL,
returning 0 or a negative errno.  ``VfioType1Container`` issues the real ioctls on a container
fd; ``SimulatedType1Container`` is a SIMULATION of the kernel's type1 (v2) bookkeeping for
tests and benchmarks on hosts without VFIO.  ``VfioDmaMapper`` is the virtual IOMMU's
``DmaListener`` that turns guest MAP/UNMAP into host mappings, coalescing a batch into extents.
"""

from libc.stdint cimport uint32_t, uint64_t
from hyperpy._fast.dmalistener cimport DmaListener
from hyperpy._fast.guestmem cimport GuestMemory

# One DMA range: a host entry, a mapper extent, a guest-level mapping or a queued map.
cdef struct DmaRange:
    uint64_t iova
    uint64_t size
    uint64_t vaddr
    uint32_t flags    # VFIO_DMA_MAP_FLAG_READ/WRITE
    uint32_t count    # mapper extents: how many guest-level mappings it holds

# A sorted, non-overlapping array of DmaRange (by iova), with room at both ends so inserts and
# erases near either end are O(1) and in the middle move the smaller half.
cdef struct RangeVec:
    DmaRange *buf
    size_t cap
    size_t lo
    size_t n


cdef class DmaContainer:
    """Abstract host DMA container (one IOMMU address space)."""
    cdef RangeVec _tab            # the entries the host holds (the simulation's model; the
                                  # real container's mirror of what the kernel accepted)
    cdef readonly uint64_t map_calls      # dma_map calls issued (failed ones included)
    cdef readonly uint64_t unmap_calls
    cdef readonly uint64_t entries        # current host DMA entries
    cdef readonly uint64_t peak_entries
    cdef readonly uint64_t dma_entry_limit
    cdef readonly bint simulated
    # Map [iova, iova+size) -> host [vaddr, vaddr+size); flags VFIO_DMA_MAP_FLAG_READ/WRITE.
    cdef int dma_map(self, uint64_t iova, uint64_t size, uint64_t vaddr,
                     uint32_t flags) noexcept nogil
    # Unmap every entry inside [iova, iova+size); *unmapped = bytes unmapped.
    cdef int dma_unmap(self, uint64_t iova, uint64_t size, uint64_t *unmapped) noexcept nogil
    cdef void _track_map(self, uint64_t iova, uint64_t size, uint64_t vaddr,
                         uint32_t flags) noexcept nogil
    cdef uint64_t _track_unmap(self, uint64_t iova, uint64_t size) noexcept nogil


cdef class VfioType1Container(DmaContainer):
    """The real thing: VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA on a container fd."""
    cdef readonly int fd
    cdef public object groups     # {group number: group fd} (Python side keeps them open)


cdef class SimulatedType1Container(DmaContainer):
    """SIMULATION of vfio_iommu_type1 (v2); see the class docstring."""
    cdef readonly uint64_t pin_ns_per_page
    cdef readonly uint64_t pages_pinned


cdef class VfioDmaMapper(DmaListener):
    cdef readonly GuestMemory memory
    cdef readonly DmaContainer container
    cdef readonly bint batching
    cdef readonly uint64_t max_extent     # 0, or a power of two: extents never cross a multiple
    cdef DmaRange *_pend          # queued maps (batching), unsorted until flush
    cdef size_t _npend
    cdef size_t _pend_cap
    cdef RangeVec _ext            # host extents we created (count = guest mappings inside)
    cdef RangeVec _maps           # guest-level mappings (iova, size, host vaddr, flags)
    cdef int _deferred_err        # a flush error met inside unmap(), returned by next flush()
    cdef readonly uint64_t maps_requested
    cdef readonly uint64_t unmaps_requested
    cdef readonly uint64_t host_map_calls
    cdef readonly uint64_t host_unmap_calls
    cdef readonly uint64_t remaps           # extents re-mapped after a partial guest UNMAP
    cdef readonly uint64_t extents
    cdef readonly uint64_t peak_extents
    cdef readonly uint64_t bytes_mapped     # bytes currently mapped on the host
    cdef readonly uint64_t map_errors       # host calls that failed
    cdef readonly int last_error            # last negative errno from the host (0 if none)

    cdef int map(self, uint64_t iova, uint64_t size, uint64_t gpa, uint32_t flags) noexcept nogil
    cdef int unmap(self, uint64_t iova, uint64_t size) noexcept nogil
    cdef int flush(self) noexcept nogil
    # Unmap every extent (domain detach / device removal).
    cdef int unmap_all(self) noexcept nogil
    cdef int _map_extent(self, DmaRange *ext, DmaRange *pieces, size_t npieces) noexcept nogil
    cdef int _flush_pending(self) noexcept nogil
    cdef int _maps_remove(self, uint64_t first, uint64_t last) noexcept nogil
