# cython: language_level=3, boundscheck=False, wraparound=False
"""Device address spaces: DMA address -> host pointer, bounds-checked, without the GIL.

:class:`AddressSpace` is the single pluggable translation step used by the virtqueue engine
(``_fast/virtqueue.pyx``) for the rings and for every buffer a descriptor names.  The base class
is the identity mapping onto guest-physical RAM (``GuestMemory.translate``).  A later IOMMU model
subclasses it (``cdef class IommuSpace(AddressSpace)``) and overrides the ``cdef`` method
``translate(addr, length, write)``; Cython dispatches ``cdef`` methods through the class's vtable,
so the engine picks the override up with no change.  An override must return NULL unless the
*whole* range is backed by one contiguous host mapping inside guest RAM, and must never block.
"""

from libc.stdint cimport uint8_t, uint64_t

from hyperpy._fast.guestmem cimport GuestMemory


cdef class AddressSpace:
    """Guest-physical addresses, 1:1 onto the RAM regions of a :class:`GuestMemory`."""

    def __init__(self, GuestMemory mem not None):
        self.mem = mem

    cdef uint8_t *translate(self, uint64_t addr, uint64_t length, bint write) noexcept nogil:
        # Plain guest RAM is readable and writable everywhere; `write` matters to subclasses.
        return self.mem.translate(addr, length)

    cdef bint host_range_ok(self, uint64_t host, uint64_t length) noexcept nogil:
        cdef int i
        cdef uint64_t start, off
        for i in range(self.mem._nregions):
            start = <uint64_t>self.mem._regions[i].host
            if host >= start:
                off = host - start
                if off < self.mem._regions[i].size and length <= self.mem._regions[i].size - off:
                    return True
        return False

    def translate_py(self, uint64_t addr, uint64_t length, bint write=False):
        """Host address of ``[addr, addr+length)`` as an int, or None when it is not all RAM.

        Goes through the (possibly overridden) ``cdef translate``, so tests exercise the same path
        the engine uses.
        """
        cdef uint8_t *p = self.translate(addr, length, write)
        if p == NULL:
            return None
        return <uint64_t>p

    def host_range_ok_py(self, uint64_t host, uint64_t length):
        return self.host_range_ok(host, length)
