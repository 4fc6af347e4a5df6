"""A VFIO device as the VMM sees it: regions, interrupts, reset.

:class:`VfioDeviceFile` is the interface :class:`~hyperpy.devices.vfio_pci.VfioPciDevice` is
written against.  :class:`HostVfioDevice` is the real thing, a device fd from
``VFIO_GROUP_GET_DEVICE_FD`` driven with the ioctls of ``<linux/vfio.h>`` (compiled in
:mod:`hyperpy._fast.vfio`): regions are read and written with ``pread``/``pwrite`` at the
region's offset in the fd and mmapped from it.  The SIMULATED device in :mod:`.simdevice`
implements the same interface for hosts without VFIO.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hyperpy._fast import vfio as _vfio
from hyperpy.errors import DeviceError

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
CONFIG_REGION = _vfio.VFIO_PCI_CONFIG_REGION_INDEX
ROM_REGION = _vfio.VFIO_PCI_ROM_REGION_INDEX
MSI_IRQ = _vfio.VFIO_PCI_MSI_IRQ_INDEX
MSIX_IRQ = _vfio.VFIO_PCI_MSIX_IRQ_INDEX


@dataclass(frozen=True)
class RegionInfo:
    """One region of a VFIO device (a BAR, the ROM, the config space)."""

    index: int
    size: int
    offset: int                     # where the region starts in the device fd
    flags: int                      # VFIO_REGION_INFO_FLAG_*
    sparse: tuple[tuple[int, int], ...] | None = None   # mmappable (offset, size) areas
    msix_mappable: bool = False

    @property
    def readable(self) -> bool:
        return bool(self.flags & _vfio.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & _vfio.VFIO_REGION_INFO_FLAG_WRITE)

    def mmap_areas(self) -> list[tuple[int, int]]:
        """The page-aligned parts of the region that may be mmapped ([] when none)."""
        if not self.flags & _vfio.VFIO_REGION_INFO_FLAG_MMAP:
            return []
        areas = self.sparse if self.sparse is not None else ((0, self.size),)
        out = []
        for off, size in areas:
            start = (off + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            end = min(off + size, self.size) & ~(PAGE_SIZE - 1)
            if end > start:
                out.append((start, end - start))
        return out


@dataclass(frozen=True)
class IrqInfo:
    index: int
    count: int
    flags: int


class VfioDeviceFile:
    """What a VMM does with a VFIO PCI device.  Every method may raise ``OSError``."""

    name: str = "vfio"
    simulated: bool = False
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    def region_info(self, index: int) -> RegionInfo:
        raise NotImplementedError

    def irq_info(self, index: int) -> IrqInfo:
        raise NotImplementedError

    def read(self, region: RegionInfo, offset: int, size: int) -> int:
        """A little-endian value of ``size`` bytes at ``offset`` in ``region``."""
        raise NotImplementedError

    def write(self, region: RegionInfo, offset: int, size: int, value: int) -> None:
        raise NotImplementedError

    def mmap(self, region: RegionInfo, offset: int, size: int) -> int:
        """Map part of a region shared into this process; returns the host address."""
        raise NotImplementedError

    def munmap(self, addr: int, size: int) -> None:
        _vfio.munmap_shared(addr, size)

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        """Vector ``start + i`` of interrupt ``index`` signals eventfd ``fds[i]`` (-1: none);
        an empty list disables the index (VFIO_IRQ_SET_DATA_NONE, count 0)."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HostVfioDevice(VfioDeviceFile):
    """A host PCI function bound to vfio-pci, through its device fd."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.flags, self.num_regions, self.num_irqs = _vfio.device_get_info(fd)
        if not self.flags & _vfio.VFIO_DEVICE_FLAGS_PCI:
            raise DeviceError(f"VFIO device {name} is not a PCI device",
                              "pass through a PCI function bound to vfio-pci")
        self._regions: dict[int, RegionInfo] = {}

    def region_info(self, index: int) -> RegionInfo:
        info = self._regions.get(index)
        if info is None:
            flags, size, offset, areas, msix_mappable = _vfio.device_get_region_info(self.fd, index)
            info = RegionInfo(index, size, offset, flags,
                              tuple(areas) if areas is not None else None, msix_mappable)
            self._regions[index] = info
        return info

    def irq_info(self, index: int) -> IrqInfo:
        flags, count = _vfio.device_get_irq_info(self.fd, index)
        return IrqInfo(index, count, flags)

    def read(self, region: RegionInfo, offset: int, size: int) -> int:
        data = os.pread(self.fd, size, region.offset + offset)
        if len(data) != size:
            raise OSError(5, f"short read of region {region.index} at {offset:#x}")
        return int.from_bytes(data, "little")

    def write(self, region: RegionInfo, offset: int, size: int, value: int) -> None:
        os.pwrite(self.fd, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"),
                  region.offset + offset)

    def mmap(self, region: RegionInfo, offset: int, size: int) -> int:
        return _vfio.mmap_shared(self.fd, size, region.offset + offset)

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        _vfio.device_set_irq_eventfds(self.fd, index, start, list(fds))

    def reset(self) -> None:
        _vfio.device_reset(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
