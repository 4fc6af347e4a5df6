"""virtio-pci transport without a VM: negotiation, queue set-up, and NEEDS_RESET on a bad ring."""

from __future__ import annotations

import os

import pytest

from hyperpy._fast import uapi as U
from hyperpy._fast.addrspace import AddressSpace
from hyperpy._fast.guestmem import GuestMemory
from hyperpy.devices.virtio.pci import COMMON_OFF, VirtioPciDevice
from hyperpy.devices.virtio.rng import Rng

from test_pci import FakeRouter, _fired
from virtio_driver import Driver


class FakeVm:
    def __init__(self):
        self.ioeventfds = []

    def ioeventfd(self, fd, addr, length=0, datamatch=None, pio=False, deassign=False):
        self.ioeventfds.append((addr, deassign))


class FakeLoop:
    def __init__(self):
        self.fds = {}

    def add(self, fd, handler, events=None):
        self.fds[fd] = handler

    def remove(self, fd):
        self.fds.pop(fd, None)

    def run_ready(self):
        for fd, h in list(self.fds.items()):
            h()


@pytest.fixture
def setup():
    mem = GuestMemory()
    mem.add_region(0, 4 << 20)
    loop = FakeLoop()
    dev = VirtioPciDevice(Rng(), vm=FakeVm(), router=FakeRouter(), loop=loop,
                          address_space=AddressSpace(mem))
    yield mem, loop, dev
    dev.close()


def w(dev, off, size, value):
    dev.bar_write(0, COMMON_OFF + off, size, value)


def r(dev, off, size):
    return dev.bar_read(0, COMMON_OFF + off, size)


def negotiate(dev, features):
    w(dev, U.VIRTIO_PCI_COMMON_STATUS, 1, 0)
    w(dev, U.VIRTIO_PCI_COMMON_STATUS, 1, U.VIRTIO_CONFIG_S_ACKNOWLEDGE | U.VIRTIO_CONFIG_S_DRIVER)
    for sel in (0, 1):
        w(dev, U.VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
        w(dev, U.VIRTIO_PCI_COMMON_GF, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    w(dev, U.VIRTIO_PCI_COMMON_STATUS, 1, U.VIRTIO_CONFIG_S_ACKNOWLEDGE | U.VIRTIO_CONFIG_S_DRIVER
      | U.VIRTIO_CONFIG_S_FEATURES_OK)
    return r(dev, U.VIRTIO_PCI_COMMON_STATUS, 1)


def offered(dev):
    feats = 0
    for sel in (0, 1):
        w(dev, U.VIRTIO_PCI_COMMON_DFSELECT, 4, sel)
        feats |= r(dev, U.VIRTIO_PCI_COMMON_DF, 4) << (32 * sel)
    return feats


def setup_queue(dev, drv):
    w(dev, U.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    w(dev, U.VIRTIO_PCI_COMMON_Q_SIZE, 2, drv.size)
    w(dev, U.VIRTIO_PCI_COMMON_Q_DESCLO, 4, drv.desc_addr)
    w(dev, U.VIRTIO_PCI_COMMON_Q_AVAILLO, 4, drv.avail_addr)
    w(dev, U.VIRTIO_PCI_COMMON_Q_USEDLO, 4, drv.used_addr)
    w(dev, U.VIRTIO_PCI_COMMON_Q_MSIX, 2, 1)
    w(dev, U.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)


def test_feature_negotiation(setup):
    _, _, dev = setup
    feats = offered(dev)
    assert feats & (1 << U.VIRTIO_F_VERSION_1) and feats & (1 << U.VIRTIO_RING_F_EVENT_IDX)
    assert r(dev, U.VIRTIO_PCI_COMMON_NUMQ, 2) == 1
    # Without VERSION_1 (a legacy driver) FEATURES_OK does not stick.
    assert not negotiate(dev, 0) & U.VIRTIO_CONFIG_S_FEATURES_OK
    # Asking for something not offered does not stick either.
    assert not negotiate(dev, (1 << U.VIRTIO_F_VERSION_1) | (1 << 50)) & U.VIRTIO_CONFIG_S_FEATURES_OK
    assert negotiate(dev, 1 << U.VIRTIO_F_VERSION_1) & U.VIRTIO_CONFIG_S_FEATURES_OK


def test_requests_flow_and_interrupt(setup):
    mem, loop, dev = setup
    negotiate(dev, 1 << U.VIRTIO_F_VERSION_1)
    drv = Driver(mem, 16, base=0x10000)
    setup_queue(dev, drv)
    dev.msix.control_written(U.PCI_MSIX_FLAGS_ENABLE)
    dev.msix.table_write(16 + 12, 4, 0)   # unmask vector 1
    w(dev, U.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)   # ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK
    head = drv.add([], [32])
    dev.bar_write(0, 0x3000, 2, 0)        # the notify write (no ioeventfd in this test)
    loop.run_ready()
    assert drv.get_used() == [(head, 32)]
    assert _fired(dev.msix.vectors[1])


def test_malformed_ring_sets_needs_reset(setup):
    mem, loop, dev = setup
    negotiate(dev, 1 << U.VIRTIO_F_VERSION_1)
    drv = Driver(mem, 16, base=0x10000)
    setup_queue(dev, drv)
    dev.msix.control_written(U.PCI_MSIX_FLAGS_ENABLE)
    w(dev, U.VIRTIO_PCI_COMMON_MSIX, 2, 0)
    dev.msix.table_write(12, 4, 0)        # unmask the config vector
    w(dev, U.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
    drv.add_raw([(0xFFFF_FFFF_0000, 64, 2)])   # a buffer far outside guest RAM
    dev.bar_write(0, 0x3000, 2, 0)
    loop.run_ready()
    assert r(dev, U.VIRTIO_PCI_COMMON_STATUS, 1) & U.VIRTIO_CONFIG_S_NEEDS_RESET
    assert _fired(dev.msix.vectors[0])    # config-change interrupt told the driver
    assert drv.get_used() == []
    # A reset brings the device back.
    w(dev, U.VIRTIO_PCI_COMMON_STATUS, 1, 0)
    assert r(dev, U.VIRTIO_PCI_COMMON_STATUS, 1) == 0


def test_ioeventfds_follow_the_bar(setup):
    _, _, dev = setup
    dev.bar_moved(0, 0, 0xC000_0000)
    dev.bar_moved(0, 0xC000_0000, 0xD000_0000)
    assert (0xC000_3000, False) in dev.vm.ioeventfds
    assert (0xC000_3000, True) in dev.vm.ioeventfds
    assert (0xD000_3000, False) in dev.vm.ioeventfds


def test_pci_cfg_window_reaches_common_config(setup):
    """VIRTIO_PCI_CAP_PCI_CFG: config-space access to BAR0, here the num_queues register."""
    _, _, dev = setup
    cfg = dev.config
    cap = cfg.read(U.PCI_CAPABILITY_LIST, 1)
    while cap and not (cfg.read(cap, 1) == U.PCI_CAP_ID_VNDR
                       and cfg.read(cap + U.VIRTIO_PCI_CAP_CFG_TYPE, 1) == U.VIRTIO_PCI_CAP_PCI_CFG):
        cap = cfg.read(cap + 1, 1)
    assert cap, "no VIRTIO_PCI_CAP_PCI_CFG capability"
    dev.config_write(cap + U.VIRTIO_PCI_CAP_BAR, 1, 0)
    dev.config_write(cap + U.VIRTIO_PCI_CAP_OFFSET, 4, U.VIRTIO_PCI_COMMON_NUMQ)
    dev.config_write(cap + U.VIRTIO_PCI_CAP_LENGTH, 4, 2)
    assert dev.config_read(cap + 16, 4) == 1
    dev.config_write(cap + U.VIRTIO_PCI_CAP_OFFSET, 4, U.VIRTIO_PCI_COMMON_Q_SELECT)
    dev.config_write(cap + 16, 4, 0)
    dev.config_write(cap + U.VIRTIO_PCI_CAP_OFFSET, 4, U.VIRTIO_PCI_COMMON_Q_SIZE)
    assert dev.config_read(cap + 16, 4) == 256


class InlineRng(Rng):
    kick_on_vcpu = (0,)


def test_kick_on_vcpu_queue_is_served_inside_the_notify_write():
    """A queue in ``kick_on_vcpu`` has no ioeventfd: the vCPU's MMIO write reaches bar_write,
    which serves the queue before returning (no event-loop turn), as the virtio-iommu's request
    queue is served."""
    mem = GuestMemory()
    mem.add_region(0, 4 << 20)
    loop = FakeLoop()
    dev = VirtioPciDevice(InlineRng(), vm=FakeVm(), router=FakeRouter(), loop=loop,
                          address_space=AddressSpace(mem))
    try:
        dev.bar_moved(0, 0, 0xC000_0000)
        assert not any(addr == 0xC000_3000 for addr, _ in dev.vm.ioeventfds)
        negotiate(dev, 1 << U.VIRTIO_F_VERSION_1)
        drv = Driver(mem, 16, base=0x10000)
        setup_queue(dev, drv)
        w(dev, U.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
        head = drv.add([], [32])
        dev.bar_write(0, 0x3000, 2, 0)        # the notify write; no loop.run_ready()
        assert drv.get_used() == [(head, 32)]
    finally:
        dev.close()
