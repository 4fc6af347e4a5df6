"""A vCPU run loop written in plain Python, for benchmarks and differential tests.

Same contract as :meth:`hyperpy._fast.kvm.Vcpu.run`: serves port-I/O and MMIO exits through the
bus's handlers and returns ``(event, details)`` for everything else.  It issues ``KVM_RUN`` with
``fcntl.ioctl`` and decodes ``kvm_run`` with ``struct`` at the offsets the Cython module read from
``<linux/kvm.h>``.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import struct

from .._fast import kvm as _kvm

_L = _kvm.KVM_RUN_LAYOUT
_KVM_RUN = _kvm.IOCTLS["KVM_RUN"]


class _PyBus:
    def __init__(self, ranges) -> None:
        ranges = sorted(ranges, key=lambda r: r[0])
        self.bases = [r[0] for r in ranges]
        self.ranges = ranges

    def find(self, addr: int):
        i = bisect.bisect_right(self.bases, addr) - 1
        if i >= 0:
            base, size, handler = self.ranges[i]
            if addr - base < size:
                return base, handler
        return None


class ReferenceVcpuLoop:
    def __init__(self, vcpu, pio_bus, mmio_bus) -> None:
        self.vcpu = vcpu
        self.fd = vcpu.fd
        self.run_area = mmap.mmap(vcpu.fd, vcpu.mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.pio = _PyBus(pio_bus.ranges())
        self.mmio = _PyBus(mmio_bus.ranges())
        self.exits = 0
        vcpu.bind_thread()

    def run(self):
        ra = self.run_area
        while True:
            try:
                fcntl.ioctl(self.fd, _KVM_RUN, 0)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    ra[_L["immediate_exit"]] = 0
                    return "kicked", None
                raise
            self.exits += 1
            (reason,) = struct.unpack_from("<I", ra, _L["exit_reason"])
            if reason == _kvm.EXIT_IO:
                self._io(ra)
            elif reason == _kvm.EXIT_MMIO:
                self._mmio(ra)
            else:
                return self.vcpu.decode_exit()

    def _io(self, ra) -> None:
        direction = ra[_L["io.direction"]]
        size = ra[_L["io.size"]]
        (port,) = struct.unpack_from("<H", ra, _L["io.port"])
        (count,) = struct.unpack_from("<I", ra, _L["io.count"])
        (off,) = struct.unpack_from("<Q", ra, _L["io.data_offset"])
        found = self.pio.find(port)
        for i in range(count):
            at = off + i * size
            if found is None:
                if direction != _kvm.EXIT_IO_OUT:
                    ra[at:at + size] = b"\xff" * size
                continue
            base, handler = found
            if direction == _kvm.EXIT_IO_OUT:
                handler.write(port - base, size, int.from_bytes(ra[at:at + size], "little"))
            else:
                ra[at:at + size] = handler.read(port - base, size).to_bytes(size, "little")

    def _mmio(self, ra) -> None:
        (addr,) = struct.unpack_from("<Q", ra, _L["mmio.phys_addr"])
        (length,) = struct.unpack_from("<I", ra, _L["mmio.len"])
        is_write = ra[_L["mmio.is_write"]]
        d = _L["mmio.data"]
        length = min(length, 8)
        found = self.mmio.find(addr)
        if found is None:
            if not is_write:
                ra[d:d + length] = b"\xff" * length
            return
        base, handler = found
        if is_write:
            handler.write(addr - base, length, int.from_bytes(ra[d:d + length], "little"))
        else:
            ra[d:d + length] = handler.read(addr - base, length).to_bytes(length, "little")
