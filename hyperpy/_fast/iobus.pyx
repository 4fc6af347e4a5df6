# cython: language_level=3, boundscheck=False, wraparound=False
"""Port-I/O and MMIO buses: range registration and O(log n) lookup without the GIL."""

from libc.stdlib cimport realloc, free
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from hyperpy.errors import DeviceError


cdef class FastDevice:
    """Subclasses set ``fast_read``/``fast_write``/``ctx`` in ``__cinit__``.

    The Python-visible ``read``/``write`` methods (slow path, also used by tests) call the same C
    functions, so both paths share one implementation.
    """

    def __cinit__(self, *args, **kwargs):
        self.fast_read = NULL
        self.fast_write = NULL
        self.ctx = NULL

    def read(self, uint64_t offset, uint32_t size):
        cdef uint8_t buf[8]
        cdef uint64_t value = 0
        cdef int i
        if self.fast_read == NULL or size > 8:
            return 0
        for i in range(8):
            buf[i] = 0
        self.fast_read(self.ctx, offset, buf, size)
        for i in range(size):
            value |= (<uint64_t>buf[i]) << (8 * i)
        return value

    def write(self, uint64_t offset, uint32_t size, uint64_t value):
        cdef uint8_t buf[8]
        cdef int i
        if self.fast_write == NULL or size > 8:
            return
        for i in range(size):
            buf[i] = (value >> (8 * i)) & 0xff
        self.fast_write(self.ctx, offset, buf, size)


cdef class IoBus:
    """A set of non-overlapping address ranges, each routed to one device."""

    def __cinit__(self, str name="bus"):
        self._ranges = NULL
        self._n = 0
        self._cap = 0
        self.name = name
        self._handlers = []

    def __dealloc__(self):
        free(self._ranges)

    def register(self, uint64_t base, uint64_t size, handler):
        """Route ``[base, base+size)`` to ``handler`` (a FastDevice or an object with read/write)."""
        cdef int i, pos
        cdef BusRange *r
        if size == 0:
            raise DeviceError(f"{self.name}: empty range at {base:#x}")
        for i in range(self._n):
            if base < self._ranges[i].base + self._ranges[i].size and self._ranges[i].base < base + size:
                raise DeviceError(
                    f"{self.name}: range {base:#x}+{size:#x} for {type(handler).__name__} overlaps "
                    f"{type(self._handlers[self._ranges[i].slot]).__name__} at {self._ranges[i].base:#x}",
                    "give the device another address")
        if self._n == self._cap:
            self._cap = self._cap * 2 if self._cap else 16
            r = <BusRange *>realloc(self._ranges, self._cap * sizeof(BusRange))
            if r == NULL:
                raise MemoryError()
            self._ranges = r
        pos = self._n
        while pos > 0 and self._ranges[pos - 1].base > base:
            self._ranges[pos] = self._ranges[pos - 1]
            pos -= 1
        r = &self._ranges[pos]
        r.base = base
        r.size = size
        r.slot = len(self._handlers)
        if isinstance(handler, FastDevice):
            r.fast_read = (<FastDevice>handler).fast_read
            r.fast_write = (<FastDevice>handler).fast_write
            r.ctx = (<FastDevice>handler).ctx
        else:
            if not (hasattr(handler, "read") and hasattr(handler, "write")):
                raise DeviceError(f"{self.name}: handler {handler!r} has no read/write methods")
            r.fast_read = NULL
            r.fast_write = NULL
            r.ctx = NULL
        self._handlers.append(handler)
        self._n += 1

    cdef BusRange *lookup(self, uint64_t addr, uint32_t size) noexcept nogil:
        """The range holding ``[addr, addr+size)``, or NULL (binary search)."""
        cdef int lo = 0, hi = self._n - 1, mid
        cdef BusRange *r
        while lo <= hi:
            mid = (lo + hi) >> 1
            r = &self._ranges[mid]
            if addr < r.base:
                hi = mid - 1
            elif addr - r.base >= r.size:
                lo = mid + 1
            else:
                return r if size <= r.size - (addr - r.base) else NULL
        return NULL

    def handler_at(self, uint64_t addr):
        """(base, handler) for the device at ``addr``, or None."""
        cdef BusRange *r = self.lookup(addr, 1)
        if r == NULL:
            return None
        return r.base, self._handlers[r.slot]

    def handler_of(self, int slot):
        return self._handlers[slot]

    def ranges(self):
        return [(self._ranges[i].base, self._ranges[i].size, self._handlers[self._ranges[i].slot])
                for i in range(self._n)]
