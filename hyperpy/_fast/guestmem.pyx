# cython: language_level=3, boundscheck=False, wraparound=False
"""Guest RAM mappings and bounds-checked guest-physical -> host translation.

Every DMA a device performs goes through :meth:`GuestMemory.translate`, which returns NULL unless
the whole ``[gpa, gpa+length)`` range lies inside one RAM region.  It is a ``nogil`` C function so
the virtqueue engine and vCPU loop can call it without touching Python.
"""

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno
from posix.mman cimport (mmap, munmap, madvise, MAP_FAILED, PROT_READ, PROT_WRITE,
                         MAP_PRIVATE, MAP_SHARED, MAP_ANONYMOUS)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

import os

from hyperpy.errors import GuestMemoryError

cdef extern from "<sys/mman.h>":
    int MAP_NORESERVE
    int MAP_POPULATE
    int MADV_MERGEABLE
    int MADV_DONTDUMP


cdef class GuestMemory:
    """The set of RAM regions of one VM (at most 8, non-overlapping)."""

    def __cinit__(self):
        self._nregions = 0
        self.size = 0
        self._keep = []

    def __dealloc__(self):
        cdef int i
        for i in range(self._nregions):
            munmap(self._regions[i].host, self._regions[i].size)
        self._nregions = 0

    def close(self):
        """Unmap all RAM now (huge pages go back to the host's pool at once, not at GC time).
        Afterwards every translation fails, so a late access is refused, not a use-after-free."""
        cdef int i, n = self._nregions
        self._nregions = 0
        self.size = 0
        for i in range(n):
            munmap(self._regions[i].host, self._regions[i].size)

    def add_region(self, uint64_t gpa, uint64_t size, int fd=-1, uint64_t file_offset=0,
                   bint shared=False, bint prefault=False, uint64_t hugepage_size=0):
        """mmap ``size`` bytes (anonymous when ``fd`` is -1) as RAM at guest-physical ``gpa``."""
        cdef int i, flags
        cdef void *p
        if self._nregions >= 8:
            raise GuestMemoryError("too many guest RAM regions", "use fewer than 8")
        if size == 0 or size & 0xfff or gpa & 0xfff:
            raise GuestMemoryError(f"RAM region {gpa:#x}+{size:#x} is not page aligned")
        for i in range(self._nregions):
            if gpa < self._regions[i].gpa + self._regions[i].size and self._regions[i].gpa < gpa + size:
                raise GuestMemoryError(f"RAM region {gpa:#x}+{size:#x} overlaps another region")
        flags = MAP_SHARED if shared else MAP_PRIVATE
        if fd < 0:
            flags |= MAP_ANONYMOUS | MAP_NORESERVE
        if prefault:
            flags |= MAP_POPULATE
        with nogil:
            p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, fd, file_offset)
        if p == MAP_FAILED:
            raise OSError(errno, os.strerror(errno))
        madvise(p, size, MADV_DONTDUMP)
        self._regions[self._nregions].gpa = gpa
        self._regions[self._nregions].size = size
        self._regions[self._nregions].host = <uint8_t *>p
        self._nregions += 1
        self.size += size

    @property
    def regions(self):
        """[(gpa, size, host_address), ...] in the order they were added."""
        return [(self._regions[i].gpa, self._regions[i].size, <uint64_t>self._regions[i].host)
                for i in range(self._nregions)]

    cdef uint8_t *translate(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """Host pointer for ``[gpa, gpa+length)``, or NULL if any byte is outside one region."""
        cdef int i
        cdef uint64_t off
        for i in range(self._nregions):
            if gpa >= self._regions[i].gpa:
                off = gpa - self._regions[i].gpa
                if off < self._regions[i].size and length <= self._regions[i].size - off:
                    return self._regions[i].host + off
        return NULL

    def host_address(self, uint64_t gpa, uint64_t length=1):
        """Host virtual address of guest-physical ``gpa`` (checked for ``length`` bytes)."""
        cdef uint8_t *p = self.translate(gpa, length)
        if p == NULL:
            raise GuestMemoryError(f"guest address range {gpa:#x}+{length:#x} is outside guest RAM")
        return <uint64_t>p

    def contains(self, uint64_t gpa, uint64_t length=1):
        return self.translate(gpa, length) != NULL

    def read(self, uint64_t gpa, uint64_t length):
        """Copy ``length`` bytes out of guest RAM."""
        cdef uint8_t *p = self.translate(gpa, length)
        if p == NULL:
            raise GuestMemoryError(f"guest read {gpa:#x}+{length:#x} is outside guest RAM")
        return PyBytes_FromStringAndSize(<char *>p, length)

    def write(self, uint64_t gpa, const uint8_t[::1] data):
        """Copy ``data`` into guest RAM at ``gpa``."""
        cdef uint64_t n = data.shape[0]
        cdef uint8_t *p = self.translate(gpa, n if n else 1)
        if p == NULL:
            raise GuestMemoryError(f"guest write {gpa:#x}+{n:#x} is outside guest RAM")
        if n:
            memcpy(p, &data[0], n)

    def fill(self, uint64_t gpa, uint64_t length, int value=0):
        cdef uint8_t *p = self.translate(gpa, length)
        if p == NULL:
            raise GuestMemoryError(f"guest fill {gpa:#x}+{length:#x} is outside guest RAM")
        memset(p, value, length)

    def view(self, uint64_t gpa, uint64_t length):
        """A writable memoryview onto guest RAM (valid while this object lives)."""
        cdef uint8_t *p = self.translate(gpa, length)
        if p == NULL:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")
        return <uint8_t[:length]>p
