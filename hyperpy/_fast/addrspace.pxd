# cython: language_level=3
"""The one translation step between a device's DMA addresses and host memory.

Devices (the virtqueue engine first of all) never touch ``GuestMemory`` directly: they ask an
``AddressSpace`` for a host pointer.  The base class maps guest-physical addresses 1:1 through
``GuestMemory.translate``; a subclass (e.g. the IOVA space behind a virtual IOMMU) overrides
:meth:`AddressSpace.translate` and everything built on it follows.
"""

from libc.stdint cimport uint8_t, uint64_t
from hyperpy._fast.guestmem cimport GuestMemory


cdef class AddressSpace:
    cdef readonly GuestMemory mem
    # Host pointer for the device-visible range [addr, addr+length), or NULL if any byte of it is
    # not backed by guest RAM (or, in a subclass, not mapped / not permitted for `write`).
    # Overridable: subclasses (cdef classes) redefine it with the same signature.
    cdef uint8_t *translate(self, uint64_t addr, uint64_t length, bint write) noexcept nogil
    # True if the *host* range [host, host+length) lies inside one mapped RAM region.  Used by the
    # Python-level helpers that are handed host addresses (e.g. chain iovecs) to re-check them.
    cdef bint host_range_ok(self, uint64_t host, uint64_t length) noexcept nogil
