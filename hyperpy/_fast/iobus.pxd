# cython: language_level=3
"""C-level device dispatch: a sorted table of port-I/O or MMIO ranges.

A range is served either by a *fast* device (C function pointers, called from the vCPU loop
without the GIL) or by a Python object (``read(offset, size) -> int`` and
``write(offset, size, value)``) that the loop calls with the GIL held.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t

# Return values of fast handlers.
cdef enum:
    IO_DONE = 0        # handled completely in C
    IO_DEFER = 1       # call the range's Python handler instead (slow path)

ctypedef int (*fast_read_fn)(void *ctx, uint64_t offset, uint8_t *data, uint32_t size) noexcept nogil
ctypedef int (*fast_write_fn)(void *ctx, uint64_t offset, const uint8_t *data, uint32_t size) noexcept nogil

cdef struct BusRange:
    uint64_t base
    uint64_t size
    fast_read_fn fast_read     # NULL: no fast path
    fast_write_fn fast_write
    void *ctx
    int slot                   # index into IoBus._handlers (the Python side of the device)

cdef class FastDevice:
    """Base of devices whose register accesses are handled in C without the GIL."""
    cdef fast_read_fn fast_read
    cdef fast_write_fn fast_write
    cdef void *ctx

cdef struct BusTable:
    int n
    BusRange *ranges           # n entries sorted by base, stored right after this header
    BusTable *retired_next     # chain of replaced tables, freed with the bus

cdef class IoBus:
    # Copy-on-write: register/unregister publish a new table with one pointer store, so vCPU
    # threads searching it without the GIL never see a half-updated array.  Old tables are
    # freed when the bus dies (changes are rare: device set-up and PCI BAR moves).
    cdef BusTable *_table
    cdef BusTable *_retired    # replaced tables (a vCPU may still be reading one)
    cdef readonly str name
    cdef list _handlers        # Python handler (or FastDevice) per slot; keeps them alive
    cdef _publish(self, BusTable *t)
    cdef BusRange *lookup(self, uint64_t addr, uint32_t size) noexcept nogil
