# cython: language_level=3
"""Base DMA listener: accepts everything and does nothing (domains without host devices)."""

from libc.stdint cimport uint32_t, uint64_t


cdef class DmaListener:
    cdef int map(self, uint64_t iova, uint64_t size, uint64_t gpa, uint32_t flags) noexcept nogil:
        return 0

    cdef int unmap(self, uint64_t iova, uint64_t size) noexcept nogil:
        return 0

    cdef int flush(self) noexcept nogil:
        return 0
