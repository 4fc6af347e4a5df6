"""PCI bus without a VM: config mechanism #1, ECAM, BAR sizing and moves, capabilities, MSI-X."""

from __future__ import annotations

import os
import struct

import pytest

from hyperpy._fast import uapi as U
from hyperpy._fast.iobus import IoBus
from hyperpy.devices.pci.bus import PciBus, PciConfigIo, PciConfigMmio, PciDevice, PciHostBridge
from hyperpy.devices.pci.config import Bar, BarKind, PciConfigSpace
from hyperpy.devices.pci.msix import MsixVectors
from hyperpy.errors import DeviceError


class Dev(PciDevice):
    name = "test device"

    def __init__(self):
        cfg = PciConfigSpace(0x1234, 0x5678, 0x020000)
        cfg.add_bar(Bar(0, 0x4000, BarKind.MEM64))
        cfg.add_bar(Bar(2, 0x1000, BarKind.MEM32))
        super().__init__(cfg)
        self.moves = []
        self.regs = {}

    def bar_read(self, index, offset, size):
        return self.regs.get((index, offset), 0)

    def bar_write(self, index, offset, size, value):
        self.regs[(index, offset)] = value

    def bar_moved(self, index, old, new):
        self.moves.append((index, old, new))


@pytest.fixture
def bus():
    mmio = IoBus("mmio")
    b = PciBus(mmio, IoBus("pio"), (0xC000_0000, 0x2000_0000), (0x10_0000_0000, 1 << 30))
    b.add(PciHostBridge(), 0)
    return b


def cf8(dev, reg):
    return 0x8000_0000 | (dev << 11) | reg


def test_config_mechanism_1(bus):
    io = PciConfigIo(bus)
    io.write(0, 4, cf8(0, 0))
    assert io.read(4, 4) == (PciHostBridge.DEVICE_ID << 16) | PciHostBridge.VENDOR_INTEL
    assert io.read(4, 2) == PciHostBridge.VENDOR_INTEL
    assert io.read(6, 2) == PciHostBridge.DEVICE_ID       # byte offset within the data window
    io.write(0, 4, cf8(7, 0))
    assert io.read(4, 4) == 0xFFFFFFFF                    # empty slot
    io.write(0, 4, 0x0000_0000)
    assert io.read(4, 4) == 0xFFFFFFFF                    # enable bit clear: no config cycle
    io.write(0, 4, cf8(0, 0))
    assert io.read(0, 4) == cf8(0, 0)


def test_ecam_reaches_the_same_registers(bus):
    ecam = PciConfigMmio(bus)
    d = Dev()
    slot = bus.add(d)
    assert ecam.read((slot << 15) | 0, 2) == 0x1234
    assert ecam.read((slot << 15) | 2, 2) == 0x5678
    assert ecam.read((1 << 20) | (slot << 15), 4) == 0xFFFFFFFF   # bus 1 is empty
    ecam.write((slot << 15) | U.PCI_COMMAND, 2, U.PCI_COMMAND_MEMORY)
    assert ecam.read((slot << 15) | U.PCI_COMMAND, 2) == U.PCI_COMMAND_MEMORY


def test_bar_sizing_and_placement(bus):
    d = Dev()
    slot = bus.add(d)
    b0 = bus.config_read(0, slot, 0, U.PCI_BASE_ADDRESS_0, 4)
    assert b0 & 0xF == U.PCI_BASE_ADDRESS_MEM_TYPE_64
    addr = (bus.config_read(0, slot, 0, U.PCI_BASE_ADDRESS_0 + 4, 4) << 32) | (b0 & ~0xF)
    assert addr % 0x4000 == 0 and 0xC000_0000 <= addr < 0xE000_0000
    # sizing: write all ones, read back the size mask, restore
    bus.config_write(0, slot, 0, U.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    assert bus.config_read(0, slot, 0, U.PCI_BASE_ADDRESS_0, 4) == (~(0x4000 - 1) & 0xFFFFFFF0) | 4
    bus.config_write(0, slot, 0, U.PCI_BASE_ADDRESS_0, 4, b0)
    assert bus.mmio_bus.handler_at(addr) is not None
    bus.mmio_bus.handler_at(addr)[1].write(0x10, 4, 0xABCD)
    assert d.regs[(0, 0x10)] == 0xABCD


def test_guest_moves_a_bar(bus):
    d = Dev()
    slot = bus.add(d)
    old = d.config.bars[2].address
    bus.config_write(0, slot, 0, U.PCI_BASE_ADDRESS_0 + 8, 4, 0xD000_0000)
    assert d.config.bars[2].address == 0xD000_0000
    assert bus.mmio_bus.handler_at(old) is None
    assert bus.mmio_bus.handler_at(0xD000_0000) is not None
    assert d.moves[-2:] == [(2, old, 0), (2, 0, 0xD000_0000)]


def test_slots(bus):
    assert bus.add(Dev(), 5) == 5
    with pytest.raises(DeviceError, match="already taken"):
        bus.add(Dev(), 5)
    with pytest.raises(DeviceError, match="does not exist"):
        bus.add(Dev(), 40)


def test_capability_list():
    cfg = PciConfigSpace(1, 2, 3)
    a = cfg.add_capability(0x09, b"\x01\x02")
    b = cfg.add_capability(0x11, b"\0" * 10)
    assert cfg.read(U.PCI_STATUS, 2) & U.PCI_STATUS_CAP_LIST
    assert cfg.read(U.PCI_CAPABILITY_LIST, 1) == a
    assert cfg.read(a + 1, 1) == b and cfg.read(b + 1, 1) == 0
    assert cfg.read(b, 1) == 0x11


class FakeRouter:
    def __init__(self):
        self.routes = {}
        self.next = 24

    def allocate_msi(self):
        from hyperpy.irq import MsiVector

        v = MsiVector(self.next, os.eventfd(0, os.EFD_NONBLOCK))
        self.next += 1
        return v

    def set_msi_route(self, vec, addr, data):
        self.routes[vec.gsi] = (addr, data)

    def release_msi(self, vec):
        os.close(vec.fd)


def _fired(vec) -> bool:
    try:
        return os.eventfd_read(vec.fd) > 0
    except BlockingIOError:
        return False


def test_msix_masking_and_pending_bits():
    r = FakeRouter()
    m = MsixVectors(2, r)
    cfg = PciConfigSpace(1, 2, 3)
    cap = m.add_capability(cfg, 0, 0x4000, 0x6000)
    assert cfg.read(cap, 1) == U.PCI_CAP_ID_MSIX and cfg.read(cap + 2, 2) == 1   # table size - 1
    m.trigger(0)
    assert not _fired(m.vectors[0]) and m.pba_read(0, 8) == 1   # disabled: pending
    m.control_written(U.PCI_MSIX_FLAGS_ENABLE)
    assert not _fired(m.vectors[0])                               # entry still masked
    m.table_write(0, 4, 0xFEE0_0000)
    m.table_write(8, 4, 0x41)
    m.table_write(12, 4, 0)                                       # unmask: pending fires now
    assert _fired(m.vectors[0]) and m.pba_read(0, 8) == 0
    assert r.routes[m.vectors[0].gsi] == (0xFEE0_0000, 0x41)
    m.trigger(0)
    assert _fired(m.vectors[0])
    m.control_written(U.PCI_MSIX_FLAGS_ENABLE | U.PCI_MSIX_FLAGS_MASKALL)
    m.trigger(0)
    assert not _fired(m.vectors[0]) and m.pba_read(0, 8) == 1
    m.trigger(U.VIRTIO_MSI_NO_VECTOR)                             # no vector: nothing, no error
    m.close()
