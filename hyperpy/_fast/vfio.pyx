# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""VFIO type1 DMA containers (real and SIMULATED) and the virtual IOMMU's VFIO DMA mapper.

Every number and struct layout comes from ``<linux/vfio.h>`` at compile time.  The hot calls
(``dma_map``, ``dma_unmap``, the mapper's ``map``/``unmap``/``flush``) run without the GIL and
return 0 or a negative errno.  See ``vfio.pxd`` for the API.
"""

from libc.stdint cimport uint8_t, uint16_t, int32_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, realloc, free, qsort
from libc.string cimport memmove, memcpy, memset
from libc.errno cimport errno, EINVAL, EEXIST, ENOSPC, EFAULT, ENOMEM, ENOSYS
from posix.ioctl cimport ioctl
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from hyperpy._fast.dmalistener cimport DmaListener, DMA_READ, DMA_WRITE
from hyperpy._fast.guestmem cimport GuestMemory

import os

cdef extern from "<linux/vfio.h>" nogil:
    int VFIO_API_VERSION_ "VFIO_API_VERSION"
    int VFIO_TYPE1v2_IOMMU_ "VFIO_TYPE1v2_IOMMU"
    unsigned long VFIO_GET_API_VERSION
    unsigned long VFIO_CHECK_EXTENSION
    unsigned long VFIO_SET_IOMMU
    unsigned long VFIO_GROUP_GET_STATUS
    unsigned long VFIO_GROUP_SET_CONTAINER
    unsigned long VFIO_GROUP_GET_DEVICE_FD
    unsigned long VFIO_IOMMU_MAP_DMA
    unsigned long VFIO_IOMMU_UNMAP_DMA
    uint32_t VFIO_DMA_MAP_FLAG_READ_ "VFIO_DMA_MAP_FLAG_READ"
    uint32_t VFIO_DMA_MAP_FLAG_WRITE_ "VFIO_DMA_MAP_FLAG_WRITE"
    uint32_t VFIO_GROUP_FLAGS_VIABLE_ "VFIO_GROUP_FLAGS_VIABLE"
    uint32_t VFIO_GROUP_FLAGS_CONTAINER_SET_ "VFIO_GROUP_FLAGS_CONTAINER_SET"

    struct vfio_group_status:
        uint32_t argsz
        uint32_t flags

    struct vfio_iommu_type1_dma_map:
        uint32_t argsz
        uint32_t flags
        uint64_t vaddr
        uint64_t iova
        uint64_t size

    struct vfio_iommu_type1_dma_unmap:
        uint32_t argsz
        uint32_t flags
        uint64_t iova
        uint64_t size

    # Device fds (VFIO_GROUP_GET_DEVICE_FD): regions, interrupts, reset.
    unsigned long VFIO_DEVICE_GET_INFO
    unsigned long VFIO_DEVICE_GET_REGION_INFO
    unsigned long VFIO_DEVICE_GET_IRQ_INFO
    unsigned long VFIO_DEVICE_SET_IRQS
    unsigned long VFIO_DEVICE_RESET
    uint32_t VFIO_DEVICE_FLAGS_PCI_ "VFIO_DEVICE_FLAGS_PCI"
    uint32_t VFIO_DEVICE_FLAGS_RESET_ "VFIO_DEVICE_FLAGS_RESET"
    uint32_t VFIO_REGION_INFO_FLAG_READ_ "VFIO_REGION_INFO_FLAG_READ"
    uint32_t VFIO_REGION_INFO_FLAG_WRITE_ "VFIO_REGION_INFO_FLAG_WRITE"
    uint32_t VFIO_REGION_INFO_FLAG_MMAP_ "VFIO_REGION_INFO_FLAG_MMAP"
    uint32_t VFIO_REGION_INFO_FLAG_CAPS_ "VFIO_REGION_INFO_FLAG_CAPS"
    uint16_t VFIO_REGION_INFO_CAP_SPARSE_MMAP_ "VFIO_REGION_INFO_CAP_SPARSE_MMAP"
    uint16_t VFIO_REGION_INFO_CAP_MSIX_MAPPABLE_ "VFIO_REGION_INFO_CAP_MSIX_MAPPABLE"
    uint32_t VFIO_IRQ_INFO_EVENTFD_ "VFIO_IRQ_INFO_EVENTFD"
    uint32_t VFIO_IRQ_INFO_MASKABLE_ "VFIO_IRQ_INFO_MASKABLE"
    uint32_t VFIO_IRQ_INFO_NORESIZE_ "VFIO_IRQ_INFO_NORESIZE"
    uint32_t VFIO_IRQ_SET_DATA_NONE_ "VFIO_IRQ_SET_DATA_NONE"
    uint32_t VFIO_IRQ_SET_DATA_EVENTFD_ "VFIO_IRQ_SET_DATA_EVENTFD"
    uint32_t VFIO_IRQ_SET_ACTION_TRIGGER_ "VFIO_IRQ_SET_ACTION_TRIGGER"
    int VFIO_PCI_BAR0_REGION_INDEX_ "VFIO_PCI_BAR0_REGION_INDEX"
    int VFIO_PCI_ROM_REGION_INDEX_ "VFIO_PCI_ROM_REGION_INDEX"
    int VFIO_PCI_CONFIG_REGION_INDEX_ "VFIO_PCI_CONFIG_REGION_INDEX"
    int VFIO_PCI_NUM_REGIONS_ "VFIO_PCI_NUM_REGIONS"
    int VFIO_PCI_INTX_IRQ_INDEX_ "VFIO_PCI_INTX_IRQ_INDEX"
    int VFIO_PCI_MSI_IRQ_INDEX_ "VFIO_PCI_MSI_IRQ_INDEX"
    int VFIO_PCI_MSIX_IRQ_INDEX_ "VFIO_PCI_MSIX_IRQ_INDEX"

    struct vfio_device_info:
        uint32_t argsz
        uint32_t flags
        uint32_t num_regions
        uint32_t num_irqs

    struct vfio_region_info:
        uint32_t argsz
        uint32_t flags
        uint32_t index
        uint32_t cap_offset
        uint64_t size
        uint64_t offset

    struct vfio_info_cap_header:
        uint16_t id
        uint16_t version
        uint32_t next

    # The container's IOMMU info (VFIO_IOMMU_GET_INFO) and its DMA_AVAIL capability: how many
    # more DMA mappings the host's dma_entry_limit allows this container.
    unsigned long VFIO_IOMMU_GET_INFO
    uint32_t VFIO_IOMMU_INFO_CAPS_ "VFIO_IOMMU_INFO_CAPS"
    uint16_t VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL_ "VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL"

    struct vfio_iommu_type1_info:
        uint32_t argsz
        uint32_t flags
        uint64_t iova_pgsizes
        uint32_t cap_offset

    struct vfio_iommu_type1_info_dma_avail:
        vfio_info_cap_header header
        uint32_t avail

    struct vfio_region_sparse_mmap_area:
        uint64_t offset
        uint64_t size

    struct vfio_region_info_cap_sparse_mmap:
        vfio_info_cap_header header
        uint32_t nr_areas
        vfio_region_sparse_mmap_area areas[1]

    struct vfio_irq_info:
        uint32_t argsz
        uint32_t flags
        uint32_t index
        uint32_t count

    struct vfio_irq_set:
        uint32_t argsz
        uint32_t flags
        uint32_t index
        uint32_t start
        uint32_t count

# Python-visible constants (from the header).
VFIO_API_VERSION = VFIO_API_VERSION_
# The ioctl request numbers themselves, for tools that count a VMM's host map calls (a kprobe
# on vfio_iommu_type1_ioctl keyed by cmd: bench/test_bench_nested_vfio.py).
IOCTL_MAP_DMA = VFIO_IOMMU_MAP_DMA
IOCTL_UNMAP_DMA = VFIO_IOMMU_UNMAP_DMA
VFIO_TYPE1v2_IOMMU = VFIO_TYPE1v2_IOMMU_
VFIO_DMA_MAP_FLAG_READ = VFIO_DMA_MAP_FLAG_READ_
VFIO_DMA_MAP_FLAG_WRITE = VFIO_DMA_MAP_FLAG_WRITE_
VFIO_GROUP_FLAGS_VIABLE = VFIO_GROUP_FLAGS_VIABLE_
VFIO_GROUP_FLAGS_CONTAINER_SET = VFIO_GROUP_FLAGS_CONTAINER_SET_
VFIO_DEVICE_FLAGS_PCI = VFIO_DEVICE_FLAGS_PCI_
VFIO_DEVICE_FLAGS_RESET = VFIO_DEVICE_FLAGS_RESET_
VFIO_REGION_INFO_FLAG_READ = VFIO_REGION_INFO_FLAG_READ_
VFIO_REGION_INFO_FLAG_WRITE = VFIO_REGION_INFO_FLAG_WRITE_
VFIO_REGION_INFO_FLAG_MMAP = VFIO_REGION_INFO_FLAG_MMAP_
VFIO_REGION_INFO_FLAG_CAPS = VFIO_REGION_INFO_FLAG_CAPS_
VFIO_REGION_INFO_CAP_SPARSE_MMAP = VFIO_REGION_INFO_CAP_SPARSE_MMAP_
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = VFIO_REGION_INFO_CAP_MSIX_MAPPABLE_
VFIO_IRQ_INFO_EVENTFD = VFIO_IRQ_INFO_EVENTFD_
VFIO_IRQ_INFO_MASKABLE = VFIO_IRQ_INFO_MASKABLE_
VFIO_IRQ_INFO_NORESIZE = VFIO_IRQ_INFO_NORESIZE_
VFIO_PCI_BAR0_REGION_INDEX = VFIO_PCI_BAR0_REGION_INDEX_
VFIO_PCI_ROM_REGION_INDEX = VFIO_PCI_ROM_REGION_INDEX_
VFIO_PCI_CONFIG_REGION_INDEX = VFIO_PCI_CONFIG_REGION_INDEX_
VFIO_PCI_NUM_REGIONS = VFIO_PCI_NUM_REGIONS_
VFIO_PCI_INTX_IRQ_INDEX = VFIO_PCI_INTX_IRQ_INDEX_
VFIO_PCI_MSI_IRQ_INDEX = VFIO_PCI_MSI_IRQ_INDEX_
VFIO_PCI_MSIX_IRQ_INDEX = VFIO_PCI_MSIX_IRQ_INDEX_

# The smallest IOMMU page size type1 accepts on x86 (mappings must be aligned to it).
cdef enum:
    PAGE_MASK = 0xfff
DEFAULT_DMA_ENTRY_LIMIT = 65535     # vfio_iommu_type1's dma_entry_limit default (U16_MAX)
cdef uint64_t U64_MAX = 0xffffffffffffffff

# --------------------------------------------------------------------------------------------
# RangeVec: sorted array of non-overlapping DmaRange with room at both ends.

cdef inline DmaRange *rv_at(RangeVec *v, size_t i) noexcept nogil:
    return &v.buf[v.lo + i]


cdef size_t rv_lower(RangeVec *v, uint64_t addr) noexcept nogil:
    """First index whose range ends at or after ``addr`` (last byte >= addr)."""
    cdef size_t a = 0, b = v.n, m
    cdef DmaRange *e
    while a < b:
        m = (a + b) >> 1
        e = &v.buf[v.lo + m]
        if e.iova + (e.size - 1) < addr:
            a = m + 1
        else:
            b = m
    return a


cdef size_t rv_upper(RangeVec *v, uint64_t addr) noexcept nogil:
    """First index whose range starts after ``addr``."""
    cdef size_t a = 0, b = v.n, m
    while a < b:
        m = (a + b) >> 1
        if v.buf[v.lo + m].iova <= addr:
            a = m + 1
        else:
            b = m
    return a


cdef int rv_insert(RangeVec *v, size_t i, size_t count) noexcept nogil:
    """Open a gap of ``count`` entries before index ``i``; 0 or -ENOMEM."""
    cdef size_t n = v.n, newcap, newlo
    cdef DmaRange *nb
    cdef size_t sz = sizeof(DmaRange)
    if i < n - i:
        if v.lo >= count:
            memmove(&v.buf[v.lo - count], &v.buf[v.lo], i * sz)
            v.lo -= count
            v.n += count
            return 0
    elif v.lo + n + count <= v.cap:
        memmove(&v.buf[v.lo + i + count], &v.buf[v.lo + i], (n - i) * sz)
        v.n += count
        return 0
    # The cheap side has no room: re-lay-out (and grow) with free space at both ends.
    newcap = v.cap
    if newcap < 2 * (n + count) + 16:
        newcap = 2 * (n + count) + 16
    nb = <DmaRange *>malloc(newcap * sz)
    if nb == NULL:
        return -ENOMEM
    newlo = (newcap - n - count) // 2
    if v.buf != NULL:
        memcpy(&nb[newlo], &v.buf[v.lo], i * sz)
        memcpy(&nb[newlo + i + count], &v.buf[v.lo + i], (n - i) * sz)
        free(v.buf)
    v.buf = nb
    v.cap = newcap
    v.lo = newlo
    v.n = n + count
    return 0


cdef void rv_erase(RangeVec *v, size_t i, size_t count) noexcept nogil:
    cdef size_t sz = sizeof(DmaRange)
    if i < v.n - i - count:
        memmove(&v.buf[v.lo + count], &v.buf[v.lo], i * sz)
        v.lo += count
    else:
        memmove(&v.buf[v.lo + i], &v.buf[v.lo + i + count], (v.n - i - count) * sz)
    v.n -= count


cdef void rv_free(RangeVec *v) noexcept nogil:
    free(v.buf)
    v.buf = NULL
    v.cap = v.lo = v.n = 0


cdef list rv_list(RangeVec *v, bint with_count):
    cdef size_t i
    cdef DmaRange *e
    out = []
    for i in range(v.n):
        e = rv_at(v, i)
        if with_count:
            out.append((e.iova, e.size, e.vaddr, e.flags, e.count))
        else:
            out.append((e.iova, e.size, e.vaddr, e.flags))
    return out


cdef inline bint bad_range(uint64_t iova, uint64_t size, uint64_t vaddr) noexcept nogil:
    """type1's checks: non-zero, 4 KiB aligned, no wrap of iova or vaddr."""
    if size == 0 or ((size | iova | vaddr) & PAGE_MASK):
        return True
    return iova + (size - 1) < iova or vaddr + (size - 1) < vaddr


cdef void busy_wait_ns(uint64_t ns) noexcept nogil:
    cdef timespec t0, t
    cdef int64_t elapsed
    clock_gettime(CLOCK_MONOTONIC, &t0)
    while True:
        clock_gettime(CLOCK_MONOTONIC, &t)
        elapsed = (<int64_t>t.tv_sec - <int64_t>t0.tv_sec) * 1000000000 + (t.tv_nsec - t0.tv_nsec)
        if elapsed >= <int64_t>ns:
            return


# --------------------------------------------------------------------------------------------
# Containers

cdef class DmaContainer:
    """Host side of one IOMMU address space: the abstract interface (every call fails ENOSYS).

    Subclasses: ``VfioType1Container`` (real ioctls) and ``SimulatedType1Container``.
    """

    def __cinit__(self, *args, **kwargs):
        self._tab.buf = NULL
        self._tab.cap = self._tab.lo = self._tab.n = 0
        self.dma_entry_limit = DEFAULT_DMA_ENTRY_LIMIT

    def __dealloc__(self):
        rv_free(&self._tab)

    cdef int dma_map(self, uint64_t iova, uint64_t size, uint64_t vaddr,
                     uint32_t flags) noexcept nogil:
        return -ENOSYS

    cdef int dma_unmap(self, uint64_t iova, uint64_t size, uint64_t *unmapped) noexcept nogil:
        unmapped[0] = 0
        return -ENOSYS

    cdef void _track_map(self, uint64_t iova, uint64_t size, uint64_t vaddr,
                         uint32_t flags) noexcept nogil:
        cdef size_t i = rv_lower(&self._tab, iova)
        cdef DmaRange *e
        self.entries += 1
        if self.entries > self.peak_entries:
            self.peak_entries = self.entries
        if rv_insert(&self._tab, i, 1) == 0:
            e = rv_at(&self._tab, i)
            e.iova = iova
            e.size = size
            e.vaddr = vaddr
            e.flags = flags
            e.count = 1

    cdef uint64_t _track_unmap(self, uint64_t iova, uint64_t size) noexcept nogil:
        """Forget the entries inside [iova, iova+size); returns their bytes."""
        cdef uint64_t last = iova + (size - 1)
        cdef size_t i = rv_lower(&self._tab, iova), j = i
        cdef uint64_t total = 0
        cdef DmaRange *e
        if last < iova:
            last = U64_MAX
        while j < self._tab.n:
            e = rv_at(&self._tab, j)
            if e.iova > last:
                break
            total += e.size
            j += 1
        if j > i:
            rv_erase(&self._tab, i, j - i)
            self.entries -= j - i
        return total

    # ---- Python wrappers (tests, tools) ----
    def dma_map_py(self, uint64_t iova, uint64_t size, uint64_t vaddr, uint32_t flags):
        """dma_map from Python: 0 or -errno."""
        cdef int r
        with nogil:
            r = self.dma_map(iova, size, vaddr, flags)
        return r

    def dma_unmap_py(self, uint64_t iova, uint64_t size):
        """dma_unmap from Python: (0 or -errno, bytes unmapped)."""
        cdef int r
        cdef uint64_t unmapped = 0
        with nogil:
            r = self.dma_unmap(iova, size, &unmapped)
        return r, unmapped

    def entries_py(self):
        """[(iova, size, vaddr, flags), ...] sorted by iova."""
        return rv_list(&self._tab, False)

    def translate_py(self, uint64_t iova, uint64_t size, bint write):
        """The host pieces ``[(vaddr, length), ...]`` behind ``[iova, iova+size)`` as this
        container maps it, or ``None`` when a byte of it is unmapped or lacks the permission
        (READ for a device read, WRITE for a device write).  A simulated device's DMA uses it
        in place of the host IOMMU; a real device's DMA never reaches the VMM."""
        cdef list out = []
        cdef uint64_t at = iova, left = size, n
        cdef uint32_t need = VFIO_DMA_MAP_FLAG_WRITE_ if write else VFIO_DMA_MAP_FLAG_READ_
        cdef size_t i
        cdef DmaRange *e
        if size == 0 or iova + (size - 1) < iova:
            return None
        while left:
            i = rv_upper(&self._tab, at)
            if i == 0:
                return None
            e = rv_at(&self._tab, i - 1)
            if at - e.iova >= e.size or not (e.flags & need):
                return None
            n = e.size - (at - e.iova)
            if n > left:
                n = left
            out.append((e.vaddr + (at - e.iova), n))
            at += n
            left -= n
        return out

    def counters(self):
        return {"backend": self.backend, "simulated": bool(self.simulated),
                "map_calls": self.map_calls, "unmap_calls": self.unmap_calls,
                "entries": self.entries, "peak_entries": self.peak_entries,
                "dma_entry_limit": self.dma_entry_limit}

    @property
    def backend(self):
        return "abstract"


cdef class VfioType1Container(DmaContainer):
    """A real VFIO container (``/dev/vfio/vfio``) set to VFIO_TYPE1v2_IOMMU.

    The fd is opened, checked and attached by ``hyperpy.vfio.container``; this class issues
    VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA on it and mirrors what the kernel accepted.
    """

    def __init__(self, int fd, uint64_t dma_entry_limit=DEFAULT_DMA_ENTRY_LIMIT):
        self.fd = fd
        self.dma_entry_limit = dma_entry_limit
        self.simulated = False
        self.groups = {}

    cdef int dma_map(self, uint64_t iova, uint64_t size, uint64_t vaddr,
                     uint32_t flags) noexcept nogil:
        cdef vfio_iommu_type1_dma_map m
        m.argsz = sizeof(m)
        m.flags = flags
        m.vaddr = vaddr
        m.iova = iova
        m.size = size
        self.map_calls += 1
        if ioctl(self.fd, VFIO_IOMMU_MAP_DMA, &m) < 0:
            return -errno
        self._track_map(iova, size, vaddr, flags)
        return 0

    cdef int dma_unmap(self, uint64_t iova, uint64_t size, uint64_t *unmapped) noexcept nogil:
        cdef vfio_iommu_type1_dma_unmap u
        u.argsz = sizeof(u)
        u.flags = 0
        u.iova = iova
        u.size = size
        unmapped[0] = 0
        self.unmap_calls += 1
        if ioctl(self.fd, VFIO_IOMMU_UNMAP_DMA, &u) < 0:
            return -errno
        unmapped[0] = u.size
        self._track_unmap(iova, size)
        return 0

    def use_host_dma_avail(self):
        """Take the host's own count of the mappings left to this container (DMA_AVAIL, see
        :func:`iommu_dma_avail`) as its limit: ``entries + avail``.  Returns ``avail``, or None
        (the limit stays as given) when the kernel does not report it."""
        avail = iommu_dma_avail(self.fd)
        if avail is not None:
            self.dma_entry_limit = self.entries + avail
        return avail

    @property
    def backend(self):
        return "vfio-type1v2"

    def __repr__(self):
        return (f"<VfioType1Container fd={self.fd} entries={self.entries} "
                f"dma_entry_limit={self.dma_entry_limit}>")


cdef class SimulatedType1Container(DmaContainer):
    """SIMULATION of the kernel's vfio_iommu_type1 (v2) container: no host IOMMU, no pinning.

    For tests and benchmarks on hosts without VFIO.  It keeps the DMA entries as a sorted array
    and applies the kernel's rules (drivers/vfio/vfio_iommu_type1.c, v2 mode):

    * MAP: EINVAL for unknown flags or neither READ nor WRITE, zero size, iova/size/vaddr not
      4 KiB aligned, or a range that wraps; EEXIST when it overlaps an existing entry; ENOSPC
      when ``entries == dma_entry_limit`` (one entry per successful MAP_DMA, default 65535).
    * UNMAP: EINVAL for unaligned iova/size, zero size or wrap, and (v2) when the range would
      bisect an entry (nothing is unmapped then); otherwise every entry inside is removed and
      the bytes unmapped are reported (0 when there were none).
    * ``pin_ns_per_page``: a busy loop per 4 KiB page mapped, to model the host's pinning cost.

    Not modelled: the vaddr being mapped memory (the kernel would fail the pin with EFAULT),
    locked-memory limits, VFIO_DMA_MAP_FLAG_VADDR and dirty tracking.
    """

    def __init__(self, uint64_t dma_entry_limit=DEFAULT_DMA_ENTRY_LIMIT,
                 uint64_t pin_ns_per_page=0):
        self.dma_entry_limit = dma_entry_limit
        self.pin_ns_per_page = pin_ns_per_page
        self.simulated = True

    cdef int dma_map(self, uint64_t iova, uint64_t size, uint64_t vaddr,
                     uint32_t flags) noexcept nogil:
        cdef size_t i
        cdef uint32_t prot = VFIO_DMA_MAP_FLAG_READ_ | VFIO_DMA_MAP_FLAG_WRITE_
        self.map_calls += 1
        if (flags & ~prot) or not (flags & prot):
            return -EINVAL
        if bad_range(iova, size, vaddr):
            return -EINVAL
        i = rv_lower(&self._tab, iova)
        if i < self._tab.n and rv_at(&self._tab, i).iova <= iova + (size - 1):
            return -EEXIST
        if self.entries >= self.dma_entry_limit:
            return -ENOSPC
        if self.pin_ns_per_page:
            busy_wait_ns((size >> 12) * self.pin_ns_per_page)
        self.pages_pinned += size >> 12
        self._track_map(iova, size, vaddr, flags)
        return 0

    cdef int dma_unmap(self, uint64_t iova, uint64_t size, uint64_t *unmapped) noexcept nogil:
        cdef uint64_t last = iova + (size - 1)
        cdef size_t i
        cdef DmaRange *e
        unmapped[0] = 0
        self.unmap_calls += 1
        if size == 0 or ((iova | size) & PAGE_MASK) or last < iova:
            return -EINVAL
        # v2: refuse to bisect an entry at either end of the range.
        i = rv_lower(&self._tab, iova)
        if i < self._tab.n:
            e = rv_at(&self._tab, i)
            if e.iova < iova:
                return -EINVAL
        i = rv_lower(&self._tab, last)
        if i < self._tab.n:
            e = rv_at(&self._tab, i)
            if e.iova <= last and e.iova + (e.size - 1) != last:
                return -EINVAL
        unmapped[0] = self._track_unmap(iova, size)
        self.pages_pinned -= unmapped[0] >> 12
        return 0

    @property
    def backend(self):
        return "SIMULATED vfio-type1v2 (no host IOMMU)"

    def counters(self):
        d = DmaContainer.counters(self)
        d["pin_ns_per_page"] = self.pin_ns_per_page
        d["pages_pinned"] = self.pages_pinned
        return d

    def __repr__(self):
        return (f"<SimulatedType1Container SIMULATION of vfio_iommu_type1 v2 "
                f"entries={self.entries} peak={self.peak_entries} "
                f"dma_entry_limit={self.dma_entry_limit} pin_ns_per_page={self.pin_ns_per_page}>")


# --------------------------------------------------------------------------------------------
# Plain ioctls for the Python side (hyperpy.vfio.container): raise OSError on failure.

cdef object _ret(long r, str what):
    cdef int e
    if r < 0:
        e = errno
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return r


def get_api_version(int fd):
    return _ret(ioctl(fd, VFIO_GET_API_VERSION), "VFIO_GET_API_VERSION")


def check_extension(int fd, unsigned long ext):
    return _ret(ioctl(fd, VFIO_CHECK_EXTENSION, ext), "VFIO_CHECK_EXTENSION")


def set_iommu(int fd, unsigned long iommu_type):
    return _ret(ioctl(fd, VFIO_SET_IOMMU, iommu_type), "VFIO_SET_IOMMU")


def group_get_status(int group_fd):
    """The group's flags (VFIO_GROUP_FLAGS_VIABLE, VFIO_GROUP_FLAGS_CONTAINER_SET)."""
    cdef vfio_group_status st
    st.argsz = sizeof(st)
    st.flags = 0
    _ret(ioctl(group_fd, VFIO_GROUP_GET_STATUS, &st), "VFIO_GROUP_GET_STATUS")
    return st.flags


def group_set_container(int group_fd, int container_fd):
    cdef int cfd = container_fd
    return _ret(ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &cfd), "VFIO_GROUP_SET_CONTAINER")


def group_get_device_fd(int group_fd, str name):
    cdef bytes b = name.encode()
    cdef const char *s = b
    return _ret(ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, s), "VFIO_GROUP_GET_DEVICE_FD")


def iommu_dma_avail(int container_fd):
    """The DMA mappings the host still allows this (type1) container, from VFIO_IOMMU_GET_INFO's
    DMA_AVAIL capability (Linux 5.10 and later), or None when the kernel does not report it.
    The capability chain is fetched with a second call when the kernel asks for more room."""
    cdef vfio_iommu_type1_info first
    cdef vfio_iommu_type1_info *info = &first
    cdef char *buf = NULL
    cdef vfio_info_cap_header *hdr
    cdef uint32_t off, hops = 0
    memset(&first, 0, sizeof(first))
    first.argsz = sizeof(first)
    _ret(ioctl(container_fd, VFIO_IOMMU_GET_INFO, &first), "VFIO_IOMMU_GET_INFO")
    if not (first.flags & VFIO_IOMMU_INFO_CAPS_) or first.argsz <= sizeof(first):
        return None
    if first.argsz > 65536:
        raise OSError(EINVAL, f"VFIO_IOMMU_GET_INFO: capability chain of {first.argsz} bytes")
    buf = <char *>malloc(first.argsz)
    if buf == NULL:
        raise MemoryError()
    try:
        memset(buf, 0, first.argsz)
        info = <vfio_iommu_type1_info *>buf
        info.argsz = first.argsz
        _ret(ioctl(container_fd, VFIO_IOMMU_GET_INFO, info), "VFIO_IOMMU_GET_INFO (capabilities)")
        off = info.cap_offset
        # Every header must lie inside the buffer; the walk is bounded.
        while off and off + sizeof(vfio_iommu_type1_info_dma_avail) <= info.argsz and hops < 64:
            hdr = <vfio_info_cap_header *>(buf + off)
            if hdr.id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL_:
                return (<vfio_iommu_type1_info_dma_avail *>hdr).avail
            off = hdr.next
            hops += 1
        return None
    finally:
        free(buf)


# --------------------------------------------------------------------------------------------
# Device fds: the ioctls a VMM needs to pass a PCI function through (hyperpy.vfio.device).

def device_get_info(int device_fd):
    """(flags, num_regions, num_irqs) of a VFIO device fd."""
    cdef vfio_device_info info
    memset(&info, 0, sizeof(info))
    info.argsz = sizeof(info)
    _ret(ioctl(device_fd, VFIO_DEVICE_GET_INFO, &info), "VFIO_DEVICE_GET_INFO")
    return info.flags, info.num_regions, info.num_irqs


def device_get_region_info(int device_fd, uint32_t index):
    """(flags, size, offset, sparse mmap areas or None, msix_mappable) of one region.

    The capability chain is fetched with a second call when the kernel says it needs more
    room (VFIO_REGION_INFO_FLAG_CAPS with a larger argsz)."""
    cdef vfio_region_info first
    cdef vfio_region_info *info = &first
    cdef char *buf = NULL
    cdef vfio_info_cap_header *hdr
    cdef vfio_region_info_cap_sparse_mmap *sp
    cdef uint32_t off, k, hops = 0
    cdef list areas = None
    cdef bint msix_mappable = False
    memset(&first, 0, sizeof(first))
    first.argsz = sizeof(first)
    first.index = index
    _ret(ioctl(device_fd, VFIO_DEVICE_GET_REGION_INFO, &first),
         f"VFIO_DEVICE_GET_REGION_INFO (region {index})")
    try:
        if (first.flags & VFIO_REGION_INFO_FLAG_CAPS_) and first.argsz > sizeof(first):
            if first.argsz > 65536:
                raise OSError(EINVAL, f"region {index}: capability chain of {first.argsz} bytes")
            buf = <char *>malloc(first.argsz)
            if buf == NULL:
                raise MemoryError()
            memset(buf, 0, first.argsz)
            info = <vfio_region_info *>buf
            info.argsz = first.argsz
            info.index = index
            _ret(ioctl(device_fd, VFIO_DEVICE_GET_REGION_INFO, info),
                 f"VFIO_DEVICE_GET_REGION_INFO (region {index}, capabilities)")
            off = info.cap_offset
            # Walk the chain; every header must lie inside the buffer and the walk is bounded.
            while off and off + sizeof(vfio_info_cap_header) <= info.argsz and hops < 64:
                hdr = <vfio_info_cap_header *>(buf + off)
                if hdr.id == VFIO_REGION_INFO_CAP_SPARSE_MMAP_:
                    sp = <vfio_region_info_cap_sparse_mmap *>hdr
                    areas = []
                    for k in range(sp.nr_areas):
                        if off + 16 + (k + 1) * sizeof(vfio_region_sparse_mmap_area) > info.argsz:
                            break
                        areas.append((sp.areas[k].offset, sp.areas[k].size))
                elif hdr.id == VFIO_REGION_INFO_CAP_MSIX_MAPPABLE_:
                    msix_mappable = True
                off = hdr.next
                hops += 1
        return info.flags, info.size, info.offset, areas, msix_mappable
    finally:
        free(buf)


def device_get_irq_info(int device_fd, uint32_t index):
    """(flags, count) of interrupt index ``index`` (VFIO_PCI_MSIX_IRQ_INDEX, ...)."""
    cdef vfio_irq_info info
    memset(&info, 0, sizeof(info))
    info.argsz = sizeof(info)
    info.index = index
    _ret(ioctl(device_fd, VFIO_DEVICE_GET_IRQ_INFO, &info),
         f"VFIO_DEVICE_GET_IRQ_INFO (index {index})")
    return info.flags, info.count


def device_set_irq_eventfds(int device_fd, uint32_t index, uint32_t start, fds):
    """VFIO_DEVICE_SET_IRQS, ACTION_TRIGGER with DATA_EVENTFD: vector start+i signals
    ``fds[i]`` (-1 detaches that vector).  An empty ``fds`` with start 0 disables the index."""
    cdef uint32_t n = len(fds), i
    cdef size_t sz = sizeof(vfio_irq_set) + n * sizeof(int32_t)
    cdef vfio_irq_set *s = <vfio_irq_set *>malloc(sz)
    cdef int32_t *data
    if s == NULL:
        raise MemoryError()
    try:
        memset(s, 0, sz)
        s.argsz = sz
        s.index = index
        s.start = start
        s.count = n
        if n:
            s.flags = VFIO_IRQ_SET_DATA_EVENTFD_ | VFIO_IRQ_SET_ACTION_TRIGGER_
            data = <int32_t *>(<char *>s + sizeof(vfio_irq_set))
            for i in range(n):
                data[i] = fds[i]
        else:
            s.flags = VFIO_IRQ_SET_DATA_NONE_ | VFIO_IRQ_SET_ACTION_TRIGGER_
        _ret(ioctl(device_fd, VFIO_DEVICE_SET_IRQS, s), f"VFIO_DEVICE_SET_IRQS (index {index})")
    finally:
        free(s)


def device_reset(int device_fd):
    return _ret(ioctl(device_fd, VFIO_DEVICE_RESET), "VFIO_DEVICE_RESET")


def mmap_shared(int fd, uint64_t size, uint64_t offset):
    """mmap(fd, offset) read/write shared; returns the host address (a BAR for a KVM slot)."""
    cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)
    cdef int e
    if p == MAP_FAILED:
        e = errno
        raise OSError(e, f"mmap of {size:#x} bytes at offset {offset:#x}: {os.strerror(e)}")
    return <uint64_t>p


def munmap_shared(uint64_t addr, uint64_t size):
    munmap(<void *>addr, size)


# --------------------------------------------------------------------------------------------
# The virtual IOMMU -> host mapper

cdef int cmp_iova(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const DmaRange *>a).iova, y = (<const DmaRange *>b).iova
    return -1 if x < y else (1 if x > y else 0)


cdef class VfioDmaMapper(DmaListener):
    """DmaListener that mirrors one domain's guest mappings into a host DmaContainer.

    ``map()`` translates gpa -> host vaddr through ``GuestMemory.translate`` (-EFAULT unless the
    whole range is guest RAM).  With ``batching`` the map is queued and ``flush()`` sorts the
    queue by iova and coalesces runs contiguous in IOVA *and* host vaddr with equal flags into
    extents, one ``dma_map`` each; without it every map is one ``dma_map`` at once.
    ``unmap()`` flushes, then unmaps each overlapping extent whole; when the guest unmapped only
    part of an extent, the parts left over are re-mapped (each as one extent), so no bisecting
    unmap ever reaches the host.  Errors come back as -errno (ENOSPC past the host's entry limit).

    ``max_extent`` (0 = unlimited, else a power of two, e.g. 2 MiB) stops coalescing at IOVA
    multiples of it: more host entries, but a partial UNMAP then re-maps (re-pins) at most one
    ``max_extent`` instead of the rest of a large extent.
    """

    def __cinit__(self, *args, **kwargs):
        self._pend = NULL
        self._npend = self._pend_cap = 0
        self._ext.buf = NULL
        self._ext.cap = self._ext.lo = self._ext.n = 0
        self._maps.buf = NULL
        self._maps.cap = self._maps.lo = self._maps.n = 0

    def __init__(self, GuestMemory memory not None, DmaContainer container not None,
                 bint batching=True, uint64_t max_extent=0):
        if max_extent & (max_extent - 1):
            raise ValueError(f"max_extent {max_extent:#x} is not a power of two")
        self.memory = memory
        self.container = container
        self.batching = batching
        self.max_extent = max_extent

    def __dealloc__(self):
        free(self._pend)
        self._pend = NULL
        rv_free(&self._ext)
        rv_free(&self._maps)

    cdef int _map_extent(self, DmaRange *ext, DmaRange *pieces, size_t npieces) noexcept nogil:
        """One host dma_map for ``ext``; on success record it and its guest-level pieces."""
        cdef int r
        cdef size_t i
        self.host_map_calls += 1
        r = self.container.dma_map(ext.iova, ext.size, ext.vaddr, ext.flags)
        if r < 0:
            self.map_errors += 1
            self.last_error = r
            return r
        i = rv_lower(&self._ext, ext.iova)
        if rv_insert(&self._ext, i, 1) < 0:
            return -ENOMEM
        rv_at(&self._ext, i)[0] = ext[0]
        rv_at(&self._ext, i).count = <uint32_t>npieces
        self.extents += 1
        if self.extents > self.peak_extents:
            self.peak_extents = self.extents
        self.bytes_mapped += ext.size
        if npieces and pieces != NULL:
            i = rv_lower(&self._maps, ext.iova)
            if rv_insert(&self._maps, i, npieces) < 0:
                return -ENOMEM
            memcpy(rv_at(&self._maps, i), pieces, npieces * sizeof(DmaRange))
        return 0

    cdef int map(self, uint64_t iova, uint64_t size, uint64_t gpa, uint32_t flags) noexcept nogil:
        cdef uint8_t *host
        cdef uint32_t hflags = 0
        cdef DmaRange d
        cdef DmaRange *nb
        cdef size_t cap
        self.maps_requested += 1
        if size == 0:
            return -EINVAL
        host = self.memory.translate(gpa, size)
        if host == NULL:
            return -EFAULT
        if flags & DMA_READ:
            hflags |= VFIO_DMA_MAP_FLAG_READ_
        if flags & DMA_WRITE:
            hflags |= VFIO_DMA_MAP_FLAG_WRITE_
        if hflags == 0:
            return 0            # no access granted: nothing for the host to map
        d.iova = iova
        d.size = size
        d.vaddr = <uint64_t>host
        d.flags = hflags
        d.count = 1
        if not self.batching:
            return self._map_extent(&d, &d, 1)
        if self._npend == self._pend_cap:
            cap = self._pend_cap * 2 if self._pend_cap else 256
            nb = <DmaRange *>realloc(self._pend, cap * sizeof(DmaRange))
            if nb == NULL:
                return -ENOMEM
            self._pend = nb
            self._pend_cap = cap
        self._pend[self._npend] = d
        self._npend += 1
        return 0

    cdef int _flush_pending(self) noexcept nogil:
        cdef size_t i = 0, j
        cdef DmaRange ext
        cdef DmaRange *p
        cdef int r, first = 0
        if self._npend == 0:
            return 0
        qsort(self._pend, self._npend, sizeof(DmaRange), cmp_iova)
        while i < self._npend:
            ext = self._pend[i]
            j = i + 1
            while j < self._npend:
                p = &self._pend[j]
                if (p.iova != ext.iova + ext.size or p.vaddr != ext.vaddr + ext.size
                        or p.flags != ext.flags or ext.iova + ext.size < ext.iova
                        or ext.size + p.size < ext.size
                        or (self.max_extent and (p.iova & (self.max_extent - 1)) == 0)):
                    break
                ext.size += p.size
                j += 1
            r = self._map_extent(&ext, &self._pend[i], j - i)
            if r < 0 and first == 0:
                first = r
            i = j
        self._npend = 0
        return first

    cdef int flush(self) noexcept nogil:
        cdef int r = self._flush_pending()
        if r == 0:
            r = self._deferred_err
        self._deferred_err = 0
        return r

    cdef int _maps_remove(self, uint64_t first, uint64_t last) noexcept nogil:
        """Drop the guest-level mappings in [first, last], trimming ones that straddle it."""
        cdef size_t i = rv_lower(&self._maps, first), j
        cdef DmaRange *e
        cdef DmaRange right
        cdef uint64_t elast, cut
        # A mapping that starts before `first`: keep its head (and its tail past `last`).
        if i < self._maps.n:
            e = rv_at(&self._maps, i)
            elast = e.iova + (e.size - 1)
            if e.iova < first and e.iova <= last:
                if elast > last:
                    right = e[0]
                    cut = last + 1 - e.iova
                    right.iova += cut
                    right.vaddr += cut
                    right.size -= cut
                    e.size = first - e.iova
                    if rv_insert(&self._maps, i + 1, 1) < 0:
                        return -ENOMEM
                    rv_at(&self._maps, i + 1)[0] = right
                    return 0
                e.size = first - e.iova
                i += 1
        j = i
        while j < self._maps.n:
            e = rv_at(&self._maps, j)
            if e.iova > last:
                break
            elast = e.iova + (e.size - 1)
            if elast > last:          # straddles the end: keep its tail
                cut = last + 1 - e.iova
                e.iova += cut
                e.vaddr += cut
                e.size -= cut
                break
            j += 1
        if j > i:
            rv_erase(&self._maps, i, j - i)
        return 0

    cdef int unmap(self, uint64_t iova, uint64_t size) noexcept nogil:
        cdef uint64_t last = iova + (size - 1), elast, unmapped, cur = iova
        cdef size_t k
        cdef DmaRange e, part
        cdef int r, err = 0
        self.unmaps_requested += 1
        r = self._flush_pending()
        if r < 0 and self._deferred_err == 0:
            self._deferred_err = r
        if size == 0:
            return 0
        if last < iova:
            last = U64_MAX
        while True:
            k = rv_lower(&self._ext, cur)
            if k >= self._ext.n:
                break
            e = rv_at(&self._ext, k)[0]
            if e.iova > last:
                break
            elast = e.iova + (e.size - 1)
            # The whole extent goes (a partial one is re-mapped below).
            self.host_unmap_calls += 1
            r = self.container.dma_unmap(e.iova, e.size, &unmapped)
            if r < 0:
                self.map_errors += 1
                self.last_error = r
                return r
            rv_erase(&self._ext, k, 1)
            self.extents -= 1
            self.bytes_mapped -= e.size
            r = self._maps_remove(iova if iova > e.iova else e.iova, last if last < elast else elast)
            if r < 0:
                return r
            if e.iova < iova:         # left part stays mapped
                part = e
                part.size = iova - e.iova
                part.count = <uint32_t>(rv_upper(&self._maps, iova - 1) - rv_lower(&self._maps, e.iova))
                self.remaps += 1
                r = self._map_extent(&part, NULL, 0)
                if r == 0:
                    rv_at(&self._ext, rv_lower(&self._ext, part.iova)).count = part.count
                else:
                    self._maps_remove(part.iova, iova - 1)
                    if err == 0:
                        err = r
            if elast > last:          # right part stays mapped
                part = e
                part.iova = last + 1
                part.vaddr = e.vaddr + (last + 1 - e.iova)
                part.size = elast - last
                part.count = <uint32_t>(rv_upper(&self._maps, elast) - rv_lower(&self._maps, part.iova))
                self.remaps += 1
                r = self._map_extent(&part, NULL, 0)
                if r == 0:
                    rv_at(&self._ext, rv_lower(&self._ext, part.iova)).count = part.count
                else:
                    self._maps_remove(part.iova, elast)
                    if err == 0:
                        err = r
                break
            if elast >= last:
                break
            cur = elast + 1
        return err

    cdef int unmap_all(self) noexcept nogil:
        cdef int r = self._flush_pending(), err = 0
        cdef uint64_t unmapped
        cdef DmaRange e
        if r < 0:
            err = r
        while self._ext.n:
            e = rv_at(&self._ext, 0)[0]
            self.host_unmap_calls += 1
            r = self.container.dma_unmap(e.iova, e.size, &unmapped)
            if r < 0:
                self.map_errors += 1
                self.last_error = r
                return r
            rv_erase(&self._ext, 0, 1)
            self.extents -= 1
            self.bytes_mapped -= e.size
        self._maps.n = 0
        self._maps.lo = self._maps.cap // 2
        return err

    # ---- Python wrappers (tests, tools) ----
    def map_py(self, uint64_t iova, uint64_t size, uint64_t gpa, uint32_t flags=DMA_READ | DMA_WRITE):
        cdef int r
        with nogil:
            r = self.map(iova, size, gpa, flags)
        return r

    def unmap_py(self, uint64_t iova, uint64_t size):
        cdef int r
        with nogil:
            r = self.unmap(iova, size)
        return r

    def flush_py(self):
        cdef int r
        with nogil:
            r = self.flush()
        return r

    def unmap_all_py(self):
        cdef int r
        with nogil:
            r = self.unmap_all()
        return r

    @property
    def pending(self):
        """Maps queued for the next flush."""
        return self._npend

    def extents_py(self):
        """Host extents: [(iova, size, vaddr, flags, guest mappings inside), ...]."""
        return rv_list(&self._ext, True)

    def mappings_py(self):
        """Guest-level mappings now on the host: [(iova, size, vaddr, flags), ...]."""
        return rv_list(&self._maps, False)

    def counters(self):
        return {"batching": bool(self.batching), "maps_requested": self.maps_requested,
                "unmaps_requested": self.unmaps_requested,
                "host_map_calls": self.host_map_calls, "host_unmap_calls": self.host_unmap_calls,
                "remaps": self.remaps, "extents": self.extents,
                "peak_extents": self.peak_extents, "bytes_mapped": self.bytes_mapped,
                "map_errors": self.map_errors, "last_error": self.last_error,
                "container": self.container.counters()}

    def __repr__(self):
        return (f"<VfioDmaMapper batching={bool(self.batching)} extents={self.extents} "
                f"host_map_calls={self.host_map_calls} container={self.container!r}>")

