"""Passing a PCI function through with VFIO: config space, BARs as KVM memory slots, MSI-X and
MSI through VFIO_DEVICE_SET_IRQS, DMA through the container's mappings.

This host has no /dev/vfio, so the device is hyperpy's SIMULATED vfio-pci device (a small DMA
engine, hyperpy/vfio/simdevice.py) driven through the same VfioPciDevice code a real device
goes through; the real device fd's ioctls are compiled from <linux/vfio.h> and their error path
is checked here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
import subprocess
import sys
import tempfile

import pytest

from hyperpy._fast import uapi as U
from hyperpy._fast import vfio as _vfio
from hyperpy._fast.vfio import SimulatedType1Container
from hyperpy.devices.vfio_pci import VfioPciDevice, _subtract
from hyperpy.vfio.device import RegionInfo
from hyperpy.vfio import simdevice as S


# ---------------------------------------------------------------------------------------------
# Pieces without a VM


def test_region_mmap_areas_are_page_aligned_and_inside_the_region():
    f = _vfio.VFIO_REGION_INFO_FLAG_READ | _vfio.VFIO_REGION_INFO_FLAG_MMAP
    assert RegionInfo(0, 0x4000, 0, f).mmap_areas() == [(0, 0x4000)]
    assert RegionInfo(0, 0x4000, 0, f, sparse=((0x10, 0x2000), (0x3000, 0x8000))).mmap_areas() \
        == [(0x1000, 0x1000), (0x3000, 0x1000)]
    assert RegionInfo(0, 0x100, 0, f).mmap_areas() == []          # smaller than a page
    assert RegionInfo(0, 0x4000, 0, _vfio.VFIO_REGION_INFO_FLAG_READ).mmap_areas() == []


def test_subtract_cuts_the_msix_pages_out_of_mmap_areas():
    assert _subtract([(0, 0x4000)], [(0x3000, 0x4000)]) == [(0, 0x3000)]
    assert _subtract([(0, 0x4000)], [(0x1000, 0x2000)]) == [(0, 0x1000), (0x2000, 0x2000)]
    assert _subtract([(0, 0x4000)], [(0, 0x4000)]) == []
    assert _subtract([(0, 0x1000)], [(0x2000, 0x3000)]) == [(0, 0x1000)]


def test_container_translate_checks_every_byte_and_the_permission():
    c = SimulatedType1Container()
    assert c.dma_map_py(0x10000, 0x2000, 0x7F0000000000, _vfio.VFIO_DMA_MAP_FLAG_READ) == 0
    assert c.dma_map_py(0x12000, 0x1000, 0x7F0000100000, 3) == 0
    assert c.translate_py(0x11800, 0x1000, False) == [(0x7F0000001800, 0x800), (0x7F0000100000, 0x800)]
    assert c.translate_py(0x11800, 0x1000, True) is None           # first entry is read-only
    assert c.translate_py(0x12800, 0x1000, False) is None          # runs off the end
    assert c.translate_py(0xF000, 0x10, False) is None             # before any entry
    assert c.translate_py(0x10000, 0, False) is None
    assert c.translate_py(2**64 - 8, 16, False) is None            # wraps


def test_device_ioctls_on_a_non_vfio_fd_are_clean_errors():
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        for call, args in ((_vfio.device_get_info, ()), (_vfio.device_get_region_info, (0,)),
                           (_vfio.device_get_irq_info, (2,)), (_vfio.device_reset, ()),
                           (_vfio.device_set_irq_eventfds, (2, 0, [5, 6]))):
            with pytest.raises(OSError) as e:
                call(fd, *args)
            assert e.value.errno == errno.ENOTTY
            assert "VFIO_DEVICE" in str(e.value)
    finally:
        os.close(fd)


class FakeVm:
    def __init__(self):
        self.irqfds: dict[int, int] = {}       # fd -> gsi while assigned
        self.slots: dict[int, tuple] = {}
        self.routes = []

    def irqfd(self, fd, gsi, deassign=False):
        if deassign:
            assert self.irqfds.pop(fd) == gsi
        else:
            assert fd not in self.irqfds
            self.irqfds[fd] = gsi

    def set_gsi_routing(self, routes):
        self.routes = routes

    def set_user_memory_region(self, slot, gpa, size, host):
        if size:
            self.slots[slot] = (gpa, size, host)
        else:
            self.slots.pop(slot)


class FakeLoop:
    def __init__(self):
        self.handlers = {}

    def add(self, fd, handler):
        self.handlers[fd] = handler

    def remove(self, fd):
        self.handlers.pop(fd, None)


@pytest.fixture
def passthrough():
    from hyperpy.irq import InterruptRouter
    from hyperpy.memslots import MemorySlots

    vm, loop = FakeVm(), FakeLoop()
    container = SimulatedType1Container()
    sim = S.SimulatedVfioDevice("sim:t", container)
    dev = VfioPciDevice(sim, router=InterruptRouter(vm), loop=loop, slots=MemorySlots(vm, 1),
                        container=container)
    yield vm, loop, sim, dev
    dev.close()


def test_config_space_passthrough_and_what_the_vmm_owns(passthrough):
    vm, loop, sim, dev = passthrough
    assert dev.config_read(U.PCI_VENDOR_ID, 4) == S.SIM_VENDOR | S.SIM_DEVICE << 16
    # Not owned by the VMM: read from the device each time (its live value).
    sim._config[0x60] = 0x42
    assert dev.config_read(0x60, 1) == 0x42
    # The command register goes to the device, with INTx disabled.
    dev.config_write(U.PCI_COMMAND, 2, U.PCI_COMMAND_MEMORY | U.PCI_COMMAND_MASTER)
    assert struct.unpack_from("<H", sim._config, U.PCI_COMMAND)[0] == (
        U.PCI_COMMAND_MEMORY | U.PCI_COMMAND_MASTER | U.PCI_COMMAND_INTX_DISABLE)
    # BARs, ROM and interrupt pin are the VMM's: never written to the device.
    dev.config_write(U.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    assert dev.config_read(U.PCI_BASE_ADDRESS_0, 4) & ~0xF == 0xFFFFC000   # 16 KiB BAR
    assert struct.unpack_from("<I", sim._config, U.PCI_BASE_ADDRESS_0)[0] == (
        U.PCI_BASE_ADDRESS_MEM_TYPE_64 | U.PCI_BASE_ADDRESS_MEM_PREFETCH)
    dev.config_write(U.PCI_ROM_ADDRESS, 4, 0xFFFFF800)
    assert dev.config_read(U.PCI_ROM_ADDRESS, 4) == 0
    assert dev.config_read(U.PCI_INTERRUPT_PIN, 1) == 0
    # A write straddling owned and passed-through bytes is split between them.
    dev.config_write(U.PCI_INTERRUPT_LINE - 2, 4, 0x00_0B_1234)
    assert dev.config_read(U.PCI_INTERRUPT_LINE, 1) == 0x0B
    # Out of range: all ones, and nothing happens.
    assert dev.config_read(0x1000, 4) == 0xFFFFFFFF
    dev.config_write(0x1000, 4, 0)


def test_mmappable_bar_areas_become_memory_slots_that_follow_the_bar(passthrough):
    vm, loop, sim, dev = passthrough
    assert vm.slots == {}                       # placed by the bus, not yet
    dev.bar_moved(0, 0, 0xC0000000)
    (gpa, size, host), = vm.slots.values()
    assert (gpa, size) == (0xC0000000, S.MSIX_PAGE)     # the MSI-X page stays trapped
    ctypes.memmove(host + 0x10, b"through the slot", 16)   # what the guest writes...
    assert sim.read(sim.region_info(0), 0x10, 8) == int.from_bytes(b"through ", "little")
    dev.bar_moved(0, 0xC0000000, 0xD0000000)
    assert [v[:2] for v in vm.slots.values()] == [(0xD0000000, S.MSIX_PAGE)]
    dev.bar_moved(2, 0, 0xC0010000)             # registers: not mmappable, no slot
    assert len(vm.slots) == 1
    dev.bar_moved(0, 0xD0000000, 0)
    assert vm.slots == {}


def test_trapped_bar_accesses_reach_the_device_and_bad_ones_do_not_crash(passthrough):
    vm, loop, sim, dev = passthrough
    assert dev.bar_read(2, S.REG_MAGIC, 4) == S.MAGIC
    dev.bar_write(2, S.REG_DMA_LEN, 4, 77)
    assert dev.bar_read(2, S.REG_DMA_LEN, 4) == 77
    assert dev.bar_read(2, 0x1000, 4) == 0xFFFFFFFF         # past the region
    assert dev.bar_read(2, 0xFFE, 4) == 0xFFFFFFFF          # straddles the end
    assert dev.bar_read(2, 0, 3) == 0xFFFFFF                # the device refuses: logged
    assert dev.bar_read(4, 0, 4) == 0xFFFFFFFF              # no such BAR


def _msix_enable(dev, masked_all=False):
    ctrl = U.PCI_MSIX_FLAGS_ENABLE | (U.PCI_MSIX_FLAGS_MASKALL if masked_all else 0)
    dev.config_write(dev.msix_cap + U.PCI_MSIX_FLAGS, 2, ctrl)


def test_msix_enable_hands_every_vector_eventfd_to_the_device(passthrough):
    vm, loop, sim, dev = passthrough
    assert sim._irq_fds[_vfio.VFIO_PCI_MSIX_IRQ_INDEX] == []
    _msix_enable(dev)
    fds = sim._irq_fds[_vfio.VFIO_PCI_MSIX_IRQ_INDEX]
    assert fds == [v.fd for v in dev.msix.vectors] and len(fds) == S.MSIX_VECTORS
    # Every vector is still masked (table reset state): none is bound to KVM, all watched.
    assert not set(fds) & set(vm.irqfds) and set(fds) <= set(loop.handlers)
    dev.config_write(dev.msix_cap + U.PCI_MSIX_FLAGS, 2, 0)
    assert sim._irq_fds[_vfio.VFIO_PCI_MSIX_IRQ_INDEX] == []


def test_a_masked_vector_is_pending_and_delivered_on_unmask(passthrough):
    vm, loop, sim, dev = passthrough
    _msix_enable(dev)
    t = S.MSIX_TABLE
    dev.bar_write(0, t + 0, 4, 0xFEE00000)
    dev.bar_write(0, t + 8, 4, 0x41)
    vec = dev.msix.vectors[0]
    sim.write(sim.region_info(2), S.REG_DOORBELL, 4, 0)         # device raises vector 0, masked
    loop.handlers[vec.fd]()                                      # the event loop sees it
    assert dev.bar_read(0, S.MSIX_PBA, 8) & 1
    dev.bar_write(0, t + 12, 4, 0)                               # unmask
    assert vm.irqfds[vec.fd] == vec.gsi and vec.fd not in loop.handlers
    assert os.eventfd_read(vec.fd) == 1                          # re-signalled for KVM
    assert not dev.bar_read(0, S.MSIX_PBA, 8) & 1
    dev.bar_write(0, t + 12, 4, 1)                               # mask again
    assert vec.fd not in vm.irqfds and vec.fd in loop.handlers


def test_msi_enable_routes_vectors_and_hands_them_to_the_device(passthrough):
    vm, loop, sim, dev = passthrough
    cap = dev.msi_cap
    ctl = dev.config_read(cap + 2, 2)
    assert ctl & U.PCI_MSI_FLAGS_64BIT and not ctl & U.PCI_MSI_FLAGS_MASKBIT
    assert (ctl & U.PCI_MSI_FLAGS_QMASK) >> 1 == 2                     # 4 vectors offered
    dev.config_write(cap + 4, 4, 0xFEE01000)
    dev.config_write(cap + U.PCI_MSI_DATA_64, 2, 0x50)
    dev.config_write(cap + 2, 2, ctl | U.PCI_MSI_FLAGS_ENABLE | (1 << 4))   # MME: 2 vectors
    fds = sim._irq_fds[_vfio.VFIO_PCI_MSI_IRQ_INDEX]
    assert fds == [v.fd for v in dev.msi.vectors] and len(fds) == 2
    msi_routes = {r[1]: r[2:] for r in vm.routes if r[0] == "msi"}
    assert [msi_routes[v.gsi] for v in dev.msi.vectors] == [(0xFEE01000, 0x50), (0xFEE01000, 0x51)]
    dev.config_write(cap + 2, 2, ctl)
    assert sim._irq_fds[_vfio.VFIO_PCI_MSI_IRQ_INDEX] == [] and dev.msi.vectors == []


def test_dma_needs_bus_mastering_and_a_mapping(passthrough):
    vm, loop, sim, dev = passthrough
    buf = ctypes.create_string_buffer(8192)
    page = (ctypes.addressof(buf) + 4095) & ~4095
    ctypes.memmove(page, b"guest data", 10)
    dev.container.dma_map_py(0x100000, 4096, page, 3)
    regs = sim.region_info(2)
    for off, v in ((S.REG_DMA_ADDR_LO, 0x100000), (S.REG_DMA_LEN, 10), (S.REG_DMA_OFF, 0x40)):
        sim.write(regs, off, 4, v)
    sim.write(regs, S.REG_DMA_CMD, 4, S.CMD_TO_DEVICE)
    assert sim.read(regs, S.REG_STATUS, 4) == S.STATUS_BAD          # bus mastering is off
    dev.config_write(U.PCI_COMMAND, 2, U.PCI_COMMAND_MASTER)
    sim.write(regs, S.REG_DMA_CMD, 4, S.CMD_TO_DEVICE)
    assert sim.read(regs, S.REG_STATUS, 4) == S.STATUS_DONE
    assert sim.read(sim.region_info(0), 0x40, 8) == int.from_bytes(b"guest da", "little")
    sim.write(regs, S.REG_DMA_ADDR_LO, 4, 0x200000)
    sim.write(regs, S.REG_DMA_CMD, 4, S.CMD_FROM_DEVICE)
    assert sim.read(regs, S.REG_STATUS, 4) == S.STATUS_FAULT
    assert sim.read(regs, S.REG_FAULT_ADDR_LO, 4) == 0x200000


# ---------------------------------------------------------------------------------------------
# A guest drives the passed-through device


def _run(guest, *args):
    p = subprocess.run([sys.executable, "-m", "hyperpy", "run", "--no-reboot", "--memory", "size=256M",
                        "--kernel", str(guest), *args, "-v"],
                       capture_output=True, timeout=120, cwd=tempfile.gettempdir())
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def _missing(out: str, expected: list[str]) -> list[str]:
    lines = set(out.splitlines())
    return [e for e in expected if e not in lines]


@pytest.mark.kvm
def test_guest_drives_a_passed_through_device(kvm, guests):
    rc, out, err = _run(guests["vfio_dma"], "--device", "path=sim:dma0")
    assert rc == 0, err
    assert _missing(out, [
        "VFIO pci 00:01.0 id 1b36:00f0 class ff0000 pin 0",   # passed-through ids, no INTx
        "VFIO cap 0x5 at 0x40", "VFIO cap 0x11 at 0x50", "VFIO cap 0x9 at 0x5c",
        'VFIO vendor cap "HYPERPY-SIM"',                       # a passed-through capability
        "VFIO rom 0x0",                                         # the ROM is hidden
        f"VFIO magic {hex(S.MAGIC)}",                           # a trapped register
        "VFIO bar0 readback 0x1",                               # the BAR0 memory slot
        "VFIO msix entries 16 table bar 0 offset 0x3000",
        # DMA both ways with all of guest RAM mapped (no vIOMMU), completion by MSI-X
        "VFIO dma to_device status 1 irq 1 match 1",
        "VFIO dma from_device status 1 irq 1 match 1",
        "VFIO dma outside status 0x2",                          # not guest RAM: a fault
        "VFIO masked irq 0 pba 1", "VFIO unmasked irq 1 pba 0",
        "VFIO msi irq 1", "VFIO done"]) == [], out
    assert re.search(r"^VFIO bar 0 size 0x4000 addr 0x[0-9a-f]+$", out, re.M)
    assert re.search(r"^VFIO bar 2 size 0x1000 addr 0x[0-9a-f]+$", out, re.M)
    assert "SIMULATION" in err


@pytest.mark.kvm
def test_guest_maps_through_the_viommu_for_a_passed_through_device(kvm, guests):
    rc, out, err = _run(guests["vfio_dma"], "--cmdline", "iommu", "--device", "path=sim:dma0,iommu=on")
    assert rc == 0, err
    assert _missing(out, [
        "VFIO iommu attach 0x0",
        "VFIO iommu unmapped status 0x2",       # nothing is mapped until the guest MAPs
        "VFIO iommu map 0x0",
        "VFIO iommu dma status 1 irq 1 match 1",
        "VFIO iommu readonly_write status 0x2", # MAP without WRITE: a device write faults
        "VFIO iommu unmap 0x0",
        "VFIO iommu after_unmap status 0x2",
        "VFIO iommu faults 0x3",
        "VFIO unmasked irq 1 pba 0", "VFIO msi irq 1", "VFIO done"]) == [], out


def test_random_config_and_bar_accesses_never_crash_or_leak_into_owned_registers():
    """Hostile guest accesses (any offset, size, value) to config space and BARs: nothing
    raises, the device never sees a BAR/ROM write, the pin stays 0, MSI-X state stays sane."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hyperpy.irq import InterruptRouter
    from hyperpy.memslots import MemorySlots

    access = st.tuples(st.sampled_from(["cr", "cw", "br", "bw"]), st.integers(0, 0x1100),
                       st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 2**64 - 1),
                       st.sampled_from([0, 2, 4]))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(access, max_size=40))
    def run(ops):
        vm, loop = FakeVm(), FakeLoop()
        container = SimulatedType1Container()
        sim = S.SimulatedVfioDevice("sim:f", container)
        dev = VfioPciDevice(sim, router=InterruptRouter(vm), loop=loop,
                            slots=MemorySlots(vm, 1), container=container)
        bars = bytes(sim._config[U.PCI_BASE_ADDRESS_0:U.PCI_ROM_ADDRESS + 4])
        try:
            for kind, off, size, value, bar in ops:
                value &= (1 << (8 * size)) - 1
                if kind == "cr":
                    assert 0 <= dev.config_read(off, size) < 1 << (8 * size)
                elif kind == "cw":
                    dev.config_write(off, size, value)
                elif kind == "br":
                    dev.bar_read(bar, off, size)
                else:
                    dev.bar_write(bar, off, size, value)
            assert bytes(sim._config[U.PCI_BASE_ADDRESS_0:U.PCI_ROM_ADDRESS + 4]) == bars
            assert dev.config_read(U.PCI_INTERRUPT_PIN, 1) == 0
            fds = sim._irq_fds[_vfio.VFIO_PCI_MSIX_IRQ_INDEX]
            assert fds == ([v.fd for v in dev.msix.vectors] if dev.msix.enabled else [])
        finally:
            dev.close()

    run()


def test_device_option_takes_a_bare_bdf():
    from hyperpy.config import parse_device
    from hyperpy.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_device("path=0000:7f:1f.7")
    assert "/sys/bus/pci/devices/0000:7f:1f.7" in str(e.value)
    assert parse_device("path=sim:x,iommu=on").simulated
