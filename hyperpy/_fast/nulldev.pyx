# cython: language_level=3
"""A null device served entirely in C: writes are counted and dropped, reads return 0xff.

Used for port 0x80 (the POST/delay port guests write to) and by the exit benchmark.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset
from hyperpy._fast.iobus cimport FastDevice, IO_DONE


cdef struct NullState:
    uint64_t writes
    uint64_t reads


cdef int _null_read(void *ctx, uint64_t offset, uint8_t *data, uint32_t size) noexcept nogil:
    (<NullState *>ctx).reads += 1
    memset(data, 0xff, size)
    return IO_DONE


cdef int _null_write(void *ctx, uint64_t offset, const uint8_t *data, uint32_t size) noexcept nogil:
    (<NullState *>ctx).writes += 1
    return IO_DONE


cdef class NullDevice(FastDevice):
    cdef NullState state

    def __cinit__(self, *args, **kwargs):
        self.state.writes = 0
        self.state.reads = 0
        self.ctx = &self.state
        self.fast_read = _null_read
        self.fast_write = _null_write

    @property
    def writes(self):
        return self.state.writes

    @property
    def reads(self):
        return self.state.reads
