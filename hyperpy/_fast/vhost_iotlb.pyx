# cython: language_level=3, boundscheck=False, wraparound=False
"""vhost-user back-end memory: the front-end's regions, and IOVA translation through its IOTLB.

Three pieces, all on the translation path the virtqueue engine already uses
(``AddressSpace.translate``):

* the layouts of the vhost structures that vhost-user messages carry
  (``struct vhost_vring_state``, ``vhost_vring_addr``, ``vhost_iotlb_msg``, ``vhost_memory``) and
  their constants come from ``<linux/vhost_types.h>``; the ``pack_*``/``unpack_*`` helpers copy
  bytes in and out of the C structs, so no offset is written down here;
* :class:`VhostMemory` is a :class:`GuestMemory` whose regions are the front-end's shared memory
  (``VHOST_USER_SET_MEM_TABLE``: one fd per region, mmapped here), keyed by guest-physical address
  like any guest RAM, plus the translation of the front-end's *user* addresses (ring addresses
  without an IOMMU; IOTLB targets with one) -- every pointer it hands out lies inside a region;
* :class:`IotlbAddressSpace` translates IOVAs (``VIRTIO_F_ACCESS_PLATFORM``): the IOTLB entries the
  front-end sent (``VHOST_IOTLB_UPDATE``) live in an :class:`~hyperpy._fast.iommu.IommuDomain` --
  the same sorted mapping table and IOTLB cache as the in-VMM virtio-iommu -- whose "physical"
  side is a front-end user address; a range may span adjacent entries when their user addresses
  are contiguous.  A miss is recorded (``take_misses``) for the transport to send as
  ``VHOST_IOTLB_MISS`` and the translation fails (NULL) until the update arrives.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, UINT64_MAX
from libc.string cimport memcpy, memset
from libc.errno cimport errno
from posix.unistd cimport write as c_write
from posix.mman cimport mmap, munmap, MAP_FAILED, PROT_READ, PROT_WRITE, MAP_SHARED
from cpython.bytes cimport PyBytes_FromStringAndSize

import os
import stat

from hyperpy._fast.addrspace cimport AddressSpace
from hyperpy._fast.guestmem cimport GuestMemory, MemRegion
from hyperpy._fast.iommu cimport IommuDomain, IommuMapping
from hyperpy._fast.iommu cimport VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE, VIRTIO_IOMMU_S_OK
from hyperpy.errors import DeviceError


cdef extern from "<linux/vhost_types.h>" nogil:
    enum:
        VHOST_ACCESS_RO
        VHOST_ACCESS_WO
        VHOST_ACCESS_RW
        VHOST_IOTLB_MISS
        VHOST_IOTLB_UPDATE
        VHOST_IOTLB_INVALIDATE
        VHOST_IOTLB_ACCESS_FAIL
        VHOST_VRING_F_LOG
        VHOST_F_LOG_ALL
        VHOST_PAGE_SIZE

    struct vhost_vring_state:
        unsigned int index
        unsigned int num

    struct vhost_vring_addr:
        unsigned int index
        unsigned int flags
        uint64_t desc_user_addr
        uint64_t used_user_addr
        uint64_t avail_user_addr
        uint64_t log_guest_addr

    struct vhost_iotlb_msg:
        uint64_t iova
        uint64_t size
        uint64_t uaddr
        uint8_t perm
        uint8_t type

    struct vhost_memory:
        uint32_t nregions
        uint32_t padding

    struct vhost_memory_region:
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr
        uint64_t flags_padding


ACCESS_RO = VHOST_ACCESS_RO
ACCESS_WO = VHOST_ACCESS_WO
ACCESS_RW = VHOST_ACCESS_RW
IOTLB_MISS = VHOST_IOTLB_MISS
IOTLB_UPDATE = VHOST_IOTLB_UPDATE
IOTLB_INVALIDATE = VHOST_IOTLB_INVALIDATE
IOTLB_ACCESS_FAIL = VHOST_IOTLB_ACCESS_FAIL
VRING_F_LOG = VHOST_VRING_F_LOG
F_LOG_ALL = VHOST_F_LOG_ALL

#: Payload sizes of the messages that carry these structs.  A vhost-user memory region is a
#: ``struct vhost_memory_region`` whose last field is the mmap offset of the region's fd.
VRING_STATE_SIZE = sizeof(vhost_vring_state)
VRING_ADDR_SIZE = sizeof(vhost_vring_addr)
IOTLB_MSG_SIZE = sizeof(vhost_iotlb_msg)
MEMORY_HEADER_SIZE = sizeof(vhost_memory)
MEMORY_REGION_SIZE = sizeof(vhost_memory_region)

cdef enum:
    MAX_REGIONS = 8          # GuestMemory's table; also vhost-user's limit without mem slots
    MAX_MISSES = 32          # pending IOTLB misses remembered between two take_misses()


def _need(bytes data, size_t n, str what):
    if len(data) != n:
        raise ValueError(f"{what} payload is {len(data)} bytes, expected {n}")


def unpack_vring_state(bytes data):
    """(index, num) from a ``struct vhost_vring_state`` payload."""
    cdef vhost_vring_state s
    _need(data, sizeof(s), "vring state")
    memcpy(&s, <const char *>data, sizeof(s))
    return s.index, s.num


def pack_vring_state(unsigned int index, unsigned int num):
    cdef vhost_vring_state s
    s.index = index
    s.num = num
    return PyBytes_FromStringAndSize(<char *>&s, sizeof(s))


def unpack_vring_addr(bytes data):
    """(index, flags, desc, used, avail, log) from a ``struct vhost_vring_addr`` payload."""
    cdef vhost_vring_addr a
    _need(data, sizeof(a), "vring address")
    memcpy(&a, <const char *>data, sizeof(a))
    return a.index, a.flags, a.desc_user_addr, a.used_user_addr, a.avail_user_addr, a.log_guest_addr


def pack_vring_addr(unsigned int index, unsigned int flags, uint64_t desc, uint64_t used,
                    uint64_t avail, uint64_t log=0):
    cdef vhost_vring_addr a
    memset(&a, 0, sizeof(a))
    a.index = index
    a.flags = flags
    a.desc_user_addr = desc
    a.used_user_addr = used
    a.avail_user_addr = avail
    a.log_guest_addr = log
    return PyBytes_FromStringAndSize(<char *>&a, sizeof(a))


def unpack_iotlb(bytes data):
    """(iova, size, uaddr, perm, type) from a ``struct vhost_iotlb_msg`` payload."""
    cdef vhost_iotlb_msg m
    _need(data, sizeof(m), "IOTLB message")
    memcpy(&m, <const char *>data, sizeof(m))
    return m.iova, m.size, m.uaddr, m.perm, m.type


def pack_iotlb(uint64_t iova, uint64_t size, uint64_t uaddr, uint8_t perm, uint8_t type):
    cdef vhost_iotlb_msg m
    memset(&m, 0, sizeof(m))
    m.iova = iova
    m.size = size
    m.uaddr = uaddr
    m.perm = perm
    m.type = type
    return PyBytes_FromStringAndSize(<char *>&m, sizeof(m))


def unpack_memory(bytes data):
    """[(guest_phys_addr, memory_size, userspace_addr, mmap_offset), ...] of a memory table."""
    cdef vhost_memory h
    cdef vhost_memory_region r
    cdef size_t i, n
    if len(data) < sizeof(h):
        raise ValueError(f"memory table payload is {len(data)} bytes, shorter than its "
                         f"{sizeof(h)}-byte header")
    memcpy(&h, <const char *>data, sizeof(h))
    n = h.nregions
    if len(data) != sizeof(h) + n * sizeof(r):
        raise ValueError(f"memory table of {n} regions should be {sizeof(h) + n * sizeof(r)} "
                         f"bytes, got {len(data)}")
    out = []
    for i in range(n):
        memcpy(&r, <const char *>data + sizeof(h) + i * sizeof(r), sizeof(r))
        out.append((r.guest_phys_addr, r.memory_size, r.userspace_addr, r.flags_padding))
    return out


def pack_memory(regions):
    """The payload of a memory table: ``regions`` as (gpa, size, user_addr, mmap_offset)."""
    cdef vhost_memory h
    cdef vhost_memory_region r
    memset(&h, 0, sizeof(h))
    h.nregions = len(regions)
    out = [PyBytes_FromStringAndSize(<char *>&h, sizeof(h))]
    for gpa, size, uva, off in regions:
        r.guest_phys_addr = gpa
        r.memory_size = size
        r.userspace_addr = uva
        r.flags_padding = off
        out.append(PyBytes_FromStringAndSize(<char *>&r, sizeof(r)))
    return b"".join(out)


cdef inline bint _overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) noexcept nogil:
    return a < b + blen and b < a + alen


cdef class VhostMemory(GuestMemory):
    """The front-end's memory regions, mmapped from the fds it sent.

    Guest-physical lookups (``translate``, inherited) and user-address lookups (``uva_translate``)
    both return NULL unless the whole range lies in one region.  ``set_regions`` replaces the
    table as a whole (all regions mapped and checked before the old ones are unmapped); callers
    re-translate their rings afterwards.
    """

    cdef uint64_t _uva[MAX_REGIONS]
    cdef uint8_t *_map_base[MAX_REGIONS]
    cdef uint64_t _map_len[MAX_REGIONS]

    def __dealloc__(self):
        self._unmap_all()

    cdef void _unmap_all(self) noexcept nogil:
        cdef int i, n = self._nregions
        self._nregions = 0
        self.size = 0
        for i in range(n):
            munmap(self._map_base[i], self._map_len[i])

    def close(self):
        """Unmap every region (later translations fail)."""
        self._unmap_all()

    @property
    def table(self):
        """[(gpa, size, user_addr, host_address), ...]."""
        return [(self._regions[i].gpa, self._regions[i].size, self._uva[i],
                 <uint64_t>self._regions[i].host) for i in range(self._nregions)]

    def set_regions(self, regions, fds):
        """Map ``regions`` [(gpa, size, user_addr, mmap_offset), ...], one fd each (not closed
        here).  Raises DeviceError, leaving the current table as it was, when the table is bad:
        too many regions, a zero or wrapping size, regions overlapping in guest-physical or user
        address, an fd that is not a regular file (memfd, shm, hugetlbfs) or is shorter than
        the region it backs."""
        cdef int i, j, n = len(regions)
        cdef uint64_t gpa, size, uva, off, align, base_off, length
        cdef void *p
        cdef int cfd
        cdef MemRegion new_regions[MAX_REGIONS]
        cdef uint64_t new_uva[MAX_REGIONS]
        cdef uint8_t *new_base[MAX_REGIONS]
        cdef uint64_t new_len[MAX_REGIONS]
        if n > MAX_REGIONS:
            raise DeviceError(f"memory table has {n} regions; at most {MAX_REGIONS} are supported")
        if len(fds) != n:
            raise DeviceError(f"memory table has {n} regions but {len(fds)} file descriptors came "
                              f"with it; send one fd per region")
        for i in range(n):
            gpa, size, uva, off = regions[i]
            if size == 0:
                raise DeviceError(f"memory region {i} has size 0")
            if gpa + size < gpa or uva + size < uva or off + size < off:
                raise DeviceError(f"memory region {i} (gpa {gpa:#x}, size {size:#x}) wraps around "
                                  f"the address space")
            for j in range(i):
                if _overlap(gpa, size, new_regions[j].gpa, new_regions[j].size):
                    raise DeviceError(f"memory region {i} (gpa {gpa:#x}+{size:#x}) overlaps "
                                      f"region {j} (gpa {new_regions[j].gpa:#x}+"
                                      f"{new_regions[j].size:#x})")
                if _overlap(uva, size, new_uva[j], new_regions[j].size):
                    raise DeviceError(f"memory region {i} (user address {uva:#x}+{size:#x}) "
                                      f"overlaps region {j}")
            new_regions[i].gpa = gpa
            new_regions[i].size = size
            new_uva[i] = uva
        # All checks passed: map them (undoing the maps made so far if one fails).
        mapped = 0
        try:
            for i in range(n):
                gpa, size, uva, off = regions[i]
                fd = fds[i]
                cfd = fd
                try:
                    st = os.fstat(fd)
                except OSError as e:
                    raise DeviceError(f"memory region {i}: fd {fd} is unusable: {e.strerror}") from None
                if not stat.S_ISREG(st.st_mode):
                    raise DeviceError(f"memory region {i}: its fd is not a regular file (memfd, "
                                      f"/dev/shm or hugetlbfs); refused")
                if <uint64_t>st.st_size < off + size:
                    raise DeviceError(f"memory region {i}: its file has {st.st_size:#x} bytes, fewer "
                                      f"than mmap offset {off:#x} + size {size:#x}")
                align = st.st_blksize if st.st_blksize >= 4096 else 4096
                if align & (align - 1):
                    align = 4096
                base_off = off & ~(align - 1)
                length = size + (off - base_off)
                with nogil:
                    p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, base_off)
                if p == MAP_FAILED:
                    raise DeviceError(f"memory region {i}: mmap of {length:#x} bytes at offset "
                                      f"{base_off:#x} failed: {os.strerror(errno)}")
                new_base[i] = <uint8_t *>p
                new_len[i] = length
                new_regions[i].host = <uint8_t *>p + (off - base_off)
                mapped += 1
        except BaseException:
            for i in range(mapped):
                munmap(new_base[i], new_len[i])
            raise
        self._unmap_all()
        total = 0
        for i in range(n):
            self._regions[i] = new_regions[i]
            self._uva[i] = new_uva[i]
            self._map_base[i] = new_base[i]
            self._map_len[i] = new_len[i]
            total += new_regions[i].size
        self._nregions = n
        self.size = total

    cdef uint8_t *uva_translate(self, uint64_t uva, uint64_t length) noexcept nogil:
        """Host pointer for the front-end user range ``[uva, uva+length)``, or NULL unless it
        lies inside one region."""
        cdef int i
        cdef uint64_t off
        for i in range(self._nregions):
            if uva >= self._uva[i]:
                off = uva - self._uva[i]
                if off < self._regions[i].size and length <= self._regions[i].size - off:
                    return self._regions[i].host + off
        return NULL

    def uva_to_gpa(self, uint64_t uva, uint64_t length=1):
        """Guest-physical address of user range ``[uva, uva+length)`` (inside one region), or
        None."""
        cdef int i
        cdef uint64_t off
        for i in range(self._nregions):
            if uva >= self._uva[i]:
                off = uva - self._uva[i]
                if off < self._regions[i].size and length <= self._regions[i].size - off:
                    return self._regions[i].gpa + off
        return None

    def uva_translate_py(self, uint64_t uva, uint64_t length=1):
        cdef uint8_t *p = self.uva_translate(uva, length)
        return None if p == NULL else <uint64_t>p


cdef class IotlbAddressSpace(AddressSpace):
    """IOVA -> front-end user address (IOTLB entries in an IommuDomain) -> host pointer.

    ``translate`` succeeds only when every byte of the range is covered by entries with the
    needed permission whose user addresses are contiguous and lie inside one memory region.
    An IOVA with no entry is remembered as a miss (one per 4 KiB page, at most 32 pending).
    """

    cdef readonly IommuDomain domain
    cdef VhostMemory vmem
    cdef uint64_t _miss_iova[MAX_MISSES]
    cdef uint8_t _miss_perm[MAX_MISSES]
    cdef int _nmiss
    cdef int _miss_fd
    cdef readonly uint64_t misses
    cdef readonly uint64_t updates
    cdef readonly uint64_t invalidations

    def __init__(self, VhostMemory mem not None, uint32_t max_entries=1 << 16):
        self.mem = mem
        self.vmem = mem
        self.domain = IommuDomain(0, max_mappings=max_entries)
        self._nmiss = 0
        self._miss_fd = -1

    def set_miss_eventfd(self, int fd):
        """An eventfd to signal (write 1) whenever a new miss is recorded (-1: none)."""
        self._miss_fd = fd

    @property
    def pending_misses(self):
        return self._nmiss

    cdef void _note_miss(self, uint64_t iova, bint write) noexcept nogil:
        cdef int i
        cdef uint64_t page = iova & ~(<uint64_t>VHOST_PAGE_SIZE - 1)
        cdef uint8_t perm = VHOST_ACCESS_WO if write else VHOST_ACCESS_RO
        cdef uint64_t one = 1
        for i in range(self._nmiss):
            if self._miss_iova[i] == page:
                self._miss_perm[i] |= perm
                return
        self.misses += 1
        if self._nmiss < MAX_MISSES:
            self._miss_iova[self._nmiss] = page
            self._miss_perm[self._nmiss] = perm
            self._nmiss += 1
        if self._miss_fd >= 0:
            c_write(self._miss_fd, &one, sizeof(one))

    cdef uint8_t *translate(self, uint64_t addr, uint64_t length, bint write) noexcept nogil:
        cdef uint64_t gpa_unused, uva, expect, pos, last, chunk
        cdef long k
        cdef IommuMapping *m
        cdef uint32_t need = VIRTIO_IOMMU_MAP_F_WRITE if write else VIRTIO_IOMMU_MAP_F_READ
        if length == 0:
            length = 1
        last = addr + (length - 1)
        if last < addr:
            return NULL
        # Fast path: one entry covers it (the domain's IOTLB cache answers most lookups).
        if self.domain.translate(addr, length, write, &uva) == 0:
            return self.vmem.uva_translate(uva, length)
        # Walk adjacent entries whose user addresses continue each other.
        pos = addr
        expect = 0
        uva = 0
        while True:
            k = self.domain.find(pos)
            if k < 0:
                self._note_miss(pos, write)
                return NULL
            m = &self.domain._maps[k]
            if not (m.flags & need):
                return NULL
            if pos == addr:
                uva = m.phys + (pos - m.start)
            elif m.phys + (pos - m.start) != expect:
                return NULL     # the IOVA range is not contiguous in the front-end's memory
            if m.end >= last:
                break
            expect = m.phys + (m.end - m.start) + 1
            pos = m.end + 1
        return self.vmem.uva_translate(uva, length)

    cdef void _drop(self, uint64_t start, uint64_t end) noexcept nogil:
        """Remove every entry that overlaps [start, end] (whole entries: it is a cache)."""
        cdef long k
        cdef size_t lo, hi, mid
        cdef uint64_t s, e
        while True:
            # First entry that ends at or after start.
            lo = 0
            hi = self.domain._n
            while lo < hi:
                mid = (lo + hi) >> 1
                if self.domain._maps[mid].end < start:
                    lo = mid + 1
                else:
                    hi = mid
            if lo >= self.domain._n or self.domain._maps[lo].start > end:
                break
            s = self.domain._maps[lo].start
            e = self.domain._maps[lo].end
            self.domain.unmap(s, e)

    def update(self, uint64_t iova, uint64_t size, uint64_t uaddr, int perm):
        """VHOST_IOTLB_UPDATE: [iova, iova+size) -> uaddr with perm (RO/WO/RW).  Replaces what
        it overlaps.  Raises DeviceError for a zero size, a wrap, a bad perm, or a target that
        is not inside one memory region."""
        cdef uint32_t flags = 0
        cdef int r, i
        if size == 0 or iova + size - 1 < iova or uaddr + size - 1 < uaddr:
            raise DeviceError(f"IOTLB update {iova:#x}+{size:#x} is empty or wraps around")
        if perm & ~VHOST_ACCESS_RW or not perm:
            raise DeviceError(f"IOTLB update {iova:#x}+{size:#x}: permission {perm} is not "
                              f"RO, WO or RW")
        if self.vmem.uva_translate(uaddr, size) == NULL:
            raise DeviceError(f"IOTLB update {iova:#x}+{size:#x} -> user address {uaddr:#x} is "
                              f"not inside one memory region")
        if perm & VHOST_ACCESS_RO:
            flags |= VIRTIO_IOMMU_MAP_F_READ
        if perm & VHOST_ACCESS_WO:
            flags |= VIRTIO_IOMMU_MAP_F_WRITE
        with nogil:
            self._drop(iova, iova + size - 1)
            r = self.domain.map(iova, iova + size - 1, uaddr, flags)
        if r != VIRTIO_IOMMU_S_OK:
            raise DeviceError(f"IOTLB update {iova:#x}+{size:#x} refused (table full: "
                              f"{len(self.domain)} entries)")
        self.updates += 1
        # A miss this entry answers is no longer pending.
        i = 0
        while i < self._nmiss:
            if iova <= self._miss_iova[i] <= iova + size - 1:
                self._nmiss -= 1
                self._miss_iova[i] = self._miss_iova[self._nmiss]
                self._miss_perm[i] = self._miss_perm[self._nmiss]
            else:
                i += 1

    def invalidate(self, uint64_t iova, uint64_t size):
        """VHOST_IOTLB_INVALIDATE: forget every entry overlapping [iova, iova+size)."""
        cdef uint64_t end
        if size == 0:
            return
        end = iova + size - 1
        if end < iova:
            end = UINT64_MAX
        with nogil:
            self._drop(iova, end)
        self.invalidations += 1

    def clear(self):
        self.domain.clear()
        self._nmiss = 0

    def take_misses(self):
        """[(iova_page, perm), ...] recorded since the last call (then forgotten)."""
        out = [(self._miss_iova[i], self._miss_perm[i]) for i in range(self._nmiss)]
        self._nmiss = 0
        return out

    @property
    def entries(self):
        """[(iova_start, iova_end_inclusive, user_addr, flags), ...]."""
        return self.domain.mappings
