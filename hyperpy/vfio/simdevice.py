"""A SIMULATED VFIO PCI device, for hosts without /dev/vfio (``--device path=sim:NAME``).

It implements :class:`~hyperpy.vfio.device.VfioDeviceFile`, the interface the VMM's
:class:`~hyperpy.devices.vfio_pci.VfioPciDevice` drives a real vfio-pci device through, so the
whole passthrough path (config space passthrough and emulation, BARs mmapped as KVM memory
slots, trapped registers, MSI/MSI-X through ``VFIO_DEVICE_SET_IRQS`` eventfds, DMA through the
container's mappings) runs on this machine.  What it models is a small DMA engine, "hyperpy
sim DMA":

* config space: vendor 0x1B36, device 0x00F0, an MSI capability (64-bit, 4 vectors), an MSI-X
  capability (16 vectors, table and PBA in BAR0's last page) and a vendor capability.
* BAR0 (64-bit, prefetchable, 16 KiB): device memory, mmappable except the MSI-X page (a
  sparse-mmap capability, as vfio-pci reports for BARs holding the MSI-X table).
* BAR2 (32-bit, 4 KiB): registers, not mmappable (every access is a trapped pread/pwrite),
  see ``REG_*``.  A DMA command copies between BAR0 memory and a *bus address* (IOVA) that
  is translated through the container's mappings exactly where a host IOMMU would translate
  it: an unmapped IOVA is a DMA fault, never an access outside what the guest mapped.
* interrupts: MSI (4) and MSI-X (16), each vector an eventfd given by SET_IRQS; no INTx.

It is clearly a simulation: its name says SIMULATION and a WARNING is logged when it opens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading

from hyperpy._fast import uapi as U
from hyperpy._fast import vfio as _vfio

from .device import CONFIG_REGION, MSI_IRQ, MSIX_IRQ, IrqInfo, RegionInfo, VfioDeviceFile

log = logging.getLogger(__name__)

SIM_VENDOR = 0x1B36
SIM_DEVICE = 0x00F0
SIM_CLASS = 0xFF0000            # "unassigned class": no guest driver claims it by class

BAR0_SIZE = 0x4000
MSIX_PAGE = 0x3000              # BAR0 offset of the page holding the MSI-X table and PBA
MSIX_TABLE = 0x3000
MSIX_PBA = 0x3800
MSIX_VECTORS = 16
MSI_VECTORS = 4
BAR2_SIZE = 0x1000
CONFIG_SIZE = 0x1000
DMA_MEMORY = MSIX_PAGE          # bytes of BAR0 a DMA may use

# BAR2 registers (32-bit)
REG_MAGIC = 0x00                # "HPDM"
REG_VERSION = 0x04
REG_DMA_ADDR_LO = 0x08          # bus address (IOVA) of the DMA
REG_DMA_ADDR_HI = 0x0C
REG_DMA_LEN = 0x10
REG_DMA_OFF = 0x14              # offset in BAR0 memory
REG_DMA_CMD = 0x18              # write CMD_*: runs the DMA at once
REG_STATUS = 0x1C               # STATUS_* of the last command
REG_IRQ_VECTOR = 0x20           # vector raised when a command completes (NO_VECTOR: none)
REG_DOORBELL = 0x24             # write n: raise vector n
REG_DONE_COUNT = 0x28
REG_FAULT_COUNT = 0x2C
REG_FAULT_ADDR_LO = 0x30
REG_FAULT_ADDR_HI = 0x34
MAGIC = 0x4D445048
CMD_TO_DEVICE = 1               # bus address -> BAR0 memory (a device read: needs READ)
CMD_FROM_DEVICE = 2             # BAR0 memory -> bus address (a device write: needs WRITE)
STATUS_IDLE, STATUS_DONE, STATUS_FAULT, STATUS_BAD = 0, 1, 2, 3
NO_VECTOR = 0xFFFFFFFF

_R, _W, _M, _C = (_vfio.VFIO_REGION_INFO_FLAG_READ, _vfio.VFIO_REGION_INFO_FLAG_WRITE,
                  _vfio.VFIO_REGION_INFO_FLAG_MMAP, _vfio.VFIO_REGION_INFO_FLAG_CAPS)
_IRQ_FLAGS = _vfio.VFIO_IRQ_INFO_EVENTFD | _vfio.VFIO_IRQ_INFO_NORESIZE


def _config_space() -> bytearray:
    c = bytearray(CONFIG_SIZE)
    struct.pack_into("<HHHH", c, 0, SIM_VENDOR, SIM_DEVICE, 0, U.PCI_STATUS_CAP_LIST)
    struct.pack_into("<I", c, U.PCI_REVISION_ID, 1 | (SIM_CLASS << 8))   # revision 1, class
    struct.pack_into("<HH", c, U.PCI_SUBSYSTEM_VENDOR_ID, SIM_VENDOR, 0x0001)
    # BAR registers as the device reports them (a VMM emulates BARs; it reads only the type).
    struct.pack_into("<I", c, U.PCI_BASE_ADDRESS_0,
                     U.PCI_BASE_ADDRESS_MEM_TYPE_64 | U.PCI_BASE_ADDRESS_MEM_PREFETCH)
    c[U.PCI_CAPABILITY_LIST] = 0x40
    c[U.PCI_INTERRUPT_PIN] = 0
    # 0x40 MSI: 64-bit, 4 vectors (multiple message capable = 2)
    struct.pack_into("<BBH", c, 0x40, U.PCI_CAP_ID_MSI, 0x50, U.PCI_MSI_FLAGS_64BIT | (2 << 1))
    # 0x50 MSI-X: 16 vectors, table and PBA in BAR0
    struct.pack_into("<BBHII", c, 0x50, U.PCI_CAP_ID_MSIX, 0x5C, MSIX_VECTORS - 1,
                     MSIX_TABLE | 0, MSIX_PBA | 0)
    # 0x5C vendor-specific: passed through untouched
    body = b"HYPERPY-SIM\0"
    struct.pack_into("<BBB", c, 0x5C, U.PCI_CAP_ID_VNDR, 0, 3 + len(body))
    c[0x5F:0x5F + len(body)] = body
    return c


class SimulatedVfioDevice(VfioDeviceFile):
    """SIMULATION of a vfio-pci device fd (see the module docstring)."""

    simulated = True

    def __init__(self, name: str, container) -> None:
        self.name = f"{name} (SIMULATION)"
        self.container = container           # its mappings are the simulated host IOMMU
        self.flags = _vfio.VFIO_DEVICE_FLAGS_PCI | _vfio.VFIO_DEVICE_FLAGS_RESET
        self.num_regions = _vfio.VFIO_PCI_NUM_REGIONS
        self.num_irqs = 5
        self._lock = threading.Lock()
        self._config = _config_space()
        self._regions = {i: RegionInfo(i, 0, i << 40, 0) for i in range(self.num_regions)}
        self._regions[0] = RegionInfo(0, BAR0_SIZE, 0, _R | _W | _M | _C,
                                      sparse=((0, MSIX_PAGE),))
        self._regions[2] = RegionInfo(2, BAR2_SIZE, 2 << 40, _R | _W)
        self._regions[CONFIG_REGION] = RegionInfo(CONFIG_REGION, CONFIG_SIZE,
                                                  CONFIG_REGION << 40, _R | _W)
        self._memfd = os.memfd_create("hyperpy-sim-vfio-bar0", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, BAR0_SIZE)
        self._bar0 = _vfio.mmap_shared(self._memfd, BAR0_SIZE, 0)   # the device's own view
        self._irq_fds: dict[int, list[int]] = {MSI_IRQ: [], MSIX_IRQ: []}
        self.counters = {"dma_commands": 0, "dma_bytes": 0, "dma_faults": 0,
                         "interrupts_raised": 0, "interrupts_dropped": 0, "resets": 0}
        self._reset_registers()
        log.warning("VFIO device %r is a SIMULATION (a DMA engine model): no host device", name)

    def _reset_registers(self) -> None:
        self._regs = {REG_DMA_ADDR_LO: 0, REG_DMA_ADDR_HI: 0, REG_DMA_LEN: 0, REG_DMA_OFF: 0,
                      REG_STATUS: STATUS_IDLE, REG_IRQ_VECTOR: NO_VECTOR, REG_DONE_COUNT: 0,
                      REG_FAULT_COUNT: 0, REG_FAULT_ADDR_LO: 0, REG_FAULT_ADDR_HI: 0}

    # --- VfioDeviceFile -------------------------------------------------------------------
    def region_info(self, index: int) -> RegionInfo:
        if index not in self._regions:
            raise OSError(22, f"VFIO_DEVICE_GET_REGION_INFO: no region {index}")
        return self._regions[index]

    def irq_info(self, index: int) -> IrqInfo:
        counts = {MSI_IRQ: MSI_VECTORS, MSIX_IRQ: MSIX_VECTORS}
        if not 0 <= index < self.num_irqs:
            raise OSError(22, f"VFIO_DEVICE_GET_IRQ_INFO: no interrupt index {index}")
        n = counts.get(index, 0)
        return IrqInfo(index, n, _IRQ_FLAGS if n else 0)

    def _check(self, region: RegionInfo, offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > region.size:
            raise OSError(22, f"region {region.index}: bad access of {size} bytes at {offset:#x}")

    def read(self, region: RegionInfo, offset: int, size: int) -> int:
        self._check(region, offset, size)
        if region.index == CONFIG_REGION:
            return int.from_bytes(self._config[offset:offset + size], "little")
        if region.index == 0:
            return int.from_bytes(ctypes.string_at(self._bar0 + offset, size), "little")
        with self._lock:
            if offset == REG_MAGIC:
                return MAGIC
            if offset == REG_VERSION:
                return 1
            return self._regs.get(offset & ~3, 0) >> (8 * (offset & 3)) & ((1 << (8 * size)) - 1)

    def write(self, region: RegionInfo, offset: int, size: int, value: int) -> None:
        self._check(region, offset, size)
        if region.index == CONFIG_REGION:
            # Only the command register is live here (vfio-pci virtualizes the rest itself).
            if offset == U.PCI_COMMAND and size >= 2:
                struct.pack_into("<H", self._config, offset, value & 0xFFFF)
            return
        if region.index == 0:
            ctypes.memmove(self._bar0 + offset, (value & ((1 << (8 * size)) - 1))
                           .to_bytes(size, "little"), size)
            return
        if size != 4:
            return
        with self._lock:
            if offset == REG_DMA_CMD:
                vector = self._dma(value)
            elif offset == REG_DOORBELL:
                vector = value
            else:
                if offset in (REG_DMA_ADDR_LO, REG_DMA_ADDR_HI, REG_DMA_LEN, REG_DMA_OFF,
                              REG_IRQ_VECTOR):
                    self._regs[offset] = value
                return
        self._raise(vector)

    def mmap(self, region: RegionInfo, offset: int, size: int) -> int:
        if region.index != 0 or not any(o <= offset and offset + size <= o + s
                                        for o, s in region.mmap_areas()):
            raise OSError(22, f"region {region.index}: [{offset:#x}, +{size:#x}) is not mmappable")
        return _vfio.mmap_shared(self._memfd, size, offset)

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        if index not in self._irq_fds:
            raise OSError(22, f"VFIO_DEVICE_SET_IRQS: interrupt index {index} has no vectors")
        count = MSI_VECTORS if index == MSI_IRQ else MSIX_VECTORS
        if not fds:
            self._irq_fds[index] = []
            return
        if start + len(fds) > count:
            raise OSError(22, f"VFIO_DEVICE_SET_IRQS: vectors {start}..{start + len(fds) - 1} "
                              f"past the {count} of index {index}")
        cur = self._irq_fds[index]
        cur.extend([-1] * (start + len(fds) - len(cur)))
        cur[start:start + len(fds)] = list(fds)

    def reset(self) -> None:
        with self._lock:
            self._reset_registers()
            self._irq_fds = {MSI_IRQ: [], MSIX_IRQ: []}
            struct.pack_into("<H", self._config, U.PCI_COMMAND, 0)
            self.counters["resets"] += 1

    def close(self) -> None:
        if self._memfd >= 0:
            _vfio.munmap_shared(self._bar0, BAR0_SIZE)
            os.close(self._memfd)
            self._memfd = -1

    # --- the DMA engine ---------------------------------------------------------------------
    def _dma(self, cmd: int) -> int:
        """Run one DMA command (lock held); returns the vector to raise."""
        r = self._regs
        addr = r[REG_DMA_ADDR_LO] | (r[REG_DMA_ADDR_HI] << 32)
        length, off = r[REG_DMA_LEN], r[REG_DMA_OFF]
        bus_master = struct.unpack_from("<H", self._config, U.PCI_COMMAND)[0] & U.PCI_COMMAND_MASTER
        self.counters["dma_commands"] += 1
        if (cmd not in (CMD_TO_DEVICE, CMD_FROM_DEVICE) or not bus_master or length == 0
                or off + length > DMA_MEMORY):
            r[REG_STATUS] = STATUS_BAD
            return r[REG_IRQ_VECTOR]
        # The simulated host IOMMU: the container's mappings for this bus address.
        pieces = self.container.translate_py(addr, length, cmd == CMD_FROM_DEVICE)
        if pieces is None:
            r[REG_STATUS] = STATUS_FAULT
            r[REG_FAULT_COUNT] += 1
            r[REG_FAULT_ADDR_LO], r[REG_FAULT_ADDR_HI] = addr & 0xFFFFFFFF, addr >> 32
            self.counters["dma_faults"] += 1
            log.info("%s: DMA fault at bus address %#x (+%#x)", self.name, addr, length)
            return r[REG_IRQ_VECTOR]
        at = self._bar0 + off
        for vaddr, n in pieces:
            if cmd == CMD_TO_DEVICE:
                ctypes.memmove(at, vaddr, n)
            else:
                ctypes.memmove(vaddr, at, n)
            at += n
        r[REG_STATUS] = STATUS_DONE
        r[REG_DONE_COUNT] += 1
        self.counters["dma_bytes"] += length
        return r[REG_IRQ_VECTOR]

    def _raise(self, vector: int) -> None:
        """Signal ``vector`` of whichever of MSI-X / MSI the VMM enabled (MSI-X first)."""
        if vector == NO_VECTOR:
            return
        fds = self._irq_fds[MSIX_IRQ] or self._irq_fds[MSI_IRQ]
        if 0 <= vector < len(fds) and fds[vector] >= 0:
            os.eventfd_write(fds[vector], 1)
            self.counters["interrupts_raised"] += 1
        else:
            self.counters["interrupts_dropped"] += 1
