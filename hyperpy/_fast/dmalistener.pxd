# cython: language_level=3
"""What a virtual IOMMU tells the host side about a domain's DMA mappings.

The virtio-iommu core (``_fast/iommu.pyx``) calls a domain's listener for every MAP and UNMAP it
applies, then ``flush()`` once at the end of the requests popped in one notification, so a
listener can batch (the VFIO mapper coalesces adjacent mappings into one ioctl per extent).
All methods run without the GIL and return 0 or a negative errno.
"""

from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    DMA_READ = 1     # the device may read the range (VIRTIO_IOMMU_MAP_F_READ)
    DMA_WRITE = 2    # the device may write it (VIRTIO_IOMMU_MAP_F_WRITE)

cdef class DmaListener:
    # [iova, iova+size) now maps guest-physical [gpa, gpa+size) with `flags`.
    cdef int map(self, uint64_t iova, uint64_t size, uint64_t gpa, uint32_t flags) noexcept nogil
    # [iova, iova+size) is no longer mapped (it covered whole earlier maps).
    cdef int unmap(self, uint64_t iova, uint64_t size) noexcept nogil
    # The batch is complete: apply whatever was queued.
    cdef int flush(self) noexcept nogil
