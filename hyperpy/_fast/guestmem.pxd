# cython: language_level=3
from libc.stdint cimport uint8_t, uint64_t

cdef struct MemRegion:
    uint64_t gpa
    uint64_t size
    uint8_t *host

cdef class GuestMemory:
    # At most 8 RAM regions: low RAM, high RAM, and room for hotplug later.
    cdef MemRegion _regions[8]
    cdef int _nregions
    cdef readonly uint64_t size
    cdef list _keep  # per-region (gpa, size, host, length-of-mapping) for munmap
    cdef uint8_t *translate(self, uint64_t gpa, uint64_t length) noexcept nogil
