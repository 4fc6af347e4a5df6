# cython: language_level=3, boundscheck=False, wraparound=False
"""Port-I/O and MMIO buses: range registration and O(log n) lookup without the GIL."""

from libc.stdlib cimport malloc, free
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t

cdef extern from *:
    """
    static inline void *hyperpy_load_acquire(void **p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void hyperpy_store_release(void **p, void *v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    void *load_acquire "hyperpy_load_acquire" (void **p) noexcept nogil
    void store_release "hyperpy_store_release" (void **p, void *v) noexcept nogil

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


cdef BusTable *_new_table(int n) noexcept:
    cdef BusTable *t = <BusTable *>malloc(sizeof(BusTable) + max(n, 1) * sizeof(BusRange))
    if t != NULL:
        t.n = n
        t.retired_next = NULL
        t.ranges = <BusRange *>(<char *>t + sizeof(BusTable))
    return t


cdef class IoBus:
    """A set of non-overlapping address ranges, each routed to one device."""

    def __cinit__(self, str name="bus"):
        self._table = _new_table(0)
        if self._table == NULL:
            raise MemoryError()
        self._retired = NULL
        self.name = name
        self._handlers = []

    def __dealloc__(self):
        cdef BusTable *t = self._retired
        cdef BusTable *nxt
        free(self._table)
        while t != NULL:
            nxt = t.retired_next
            free(t)
            t = nxt

    cdef _publish(self, BusTable *t):
        cdef BusTable *old = self._table
        store_release(<void **>&self._table, t)
        old.retired_next = self._retired
        self._retired = old

    def register(self, uint64_t base, uint64_t size, handler):
        """Route ``[base, base+size)`` to ``handler`` (a FastDevice or an object with read/write)."""
        cdef int i, pos, n = self._table.n
        cdef BusRange *old = self._table.ranges
        cdef BusTable *t
        cdef BusRange r
        if size == 0:
            raise DeviceError(f"{self.name}: empty range at {base:#x}")
        for i in range(n):
            if base < old[i].base + old[i].size and old[i].base < base + size:
                raise DeviceError(
                    f"{self.name}: range {base:#x}+{size:#x} for {type(handler).__name__} overlaps "
                    f"{type(self._handlers[old[i].slot]).__name__} at {old[i].base:#x}",
                    "give the device another address")
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
        t = _new_table(n + 1)
        if t == NULL:
            raise MemoryError()
        pos = 0
        while pos < n and old[pos].base < base:
            t.ranges[pos] = old[pos]
            pos += 1
        t.ranges[pos] = r
        for i in range(pos, n):
            t.ranges[i + 1] = old[i]
        self._handlers.append(handler)
        self._publish(t)

    def unregister(self, uint64_t base):
        """Remove the range that starts at ``base`` (e.g. a PCI BAR the guest moved)."""
        cdef int i, j = 0, n = self._table.n
        cdef BusRange *old = self._table.ranges
        cdef BusTable *t
        for i in range(n):
            if old[i].base == base:
                break
        else:
            raise DeviceError(f"{self.name}: no range at {base:#x}")
        t = _new_table(n - 1)
        if t == NULL:
            raise MemoryError()
        for i in range(n):
            if old[i].base != base:
                t.ranges[j] = old[i]
                j += 1
            else:
                self._handlers[old[i].slot] = None
        self._publish(t)

    cdef BusRange *lookup(self, uint64_t addr, uint32_t size) noexcept nogil:
        """The range holding ``[addr, addr+size)``, or NULL (binary search)."""
        cdef BusTable *t = <BusTable *>load_acquire(<void **>&self._table)
        cdef int lo = 0, hi = t.n - 1, mid
        cdef BusRange *r
        while lo <= hi:
            mid = (lo + hi) >> 1
            r = &t.ranges[mid]
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

    def ranges(self):
        return [(self._table.ranges[i].base, self._table.ranges[i].size,
                 self._handlers[self._table.ranges[i].slot]) for i in range(self._table.n)]
