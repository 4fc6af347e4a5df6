"""virtio-pci (virtio 1.x, modern only): capabilities, common config, notifications, MSI-X.

BAR0 (64-bit memory) layout::

    0x0000 common configuration     0x1000 ISR status        0x2000 device configuration
    0x3000 notifications (4 bytes per queue, one ioeventfd each)
    0x4000 MSI-X table              0x6000 MSI-X pending-bit array

Register offsets, capability layouts, status and feature bits come from the kernel's
``<linux/virtio_pci.h>``/``<linux/virtio_config.h>`` through :mod:`hyperpy._fast.uapi`.
"""

from __future__ import annotations

import logging
import os
import struct
import threading

from ..._fast import uapi as U
from ..._fast.virtqueue import QueueError, SplitQueue
from ..pci.bus import PciDevice
from ..pci.config import Bar, BarKind, PciConfigSpace
from ..pci.msix import MsixVectors
from .device import DeviceContext, VirtioDevice

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040      # modern device id = 0x1040 + virtio device type
BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
MSIX_TABLE_OFF, MSIX_PBA_OFF = 0x4000, 0x6000
COMMON_LEN = 0x40
NOTIFY_MULTIPLIER = 4
# PCI class codes per device type (virtio spec 4.1.2.1 leaves them to the device).
CLASS_BY_TYPE = {1: 0x020000, 2: 0x018000, 3: 0x078000, 4: 0x00FF00}

TRANSPORT_FEATURES = ((1 << U.VIRTIO_F_VERSION_1) | (1 << U.VIRTIO_RING_F_INDIRECT_DESC)
                      | (1 << U.VIRTIO_RING_F_EVENT_IDX) | (1 << U.VIRTIO_F_RING_RESET))


class _QueueState:
    __slots__ = ("size", "vector", "enabled", "desc", "driver", "device", "kick_fd", "queue")

    def __init__(self, max_size: int, queue: SplitQueue, kick_fd: int) -> None:
        self.queue = queue
        self.kick_fd = kick_fd
        self.reset(max_size)

    def reset(self, max_size: int) -> None:
        self.size = max_size
        self.vector = U.VIRTIO_MSI_NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0


class VirtioPciDevice(PciDevice):
    def __init__(self, device: VirtioDevice, *, vm, router, loop, address_space,
                 extra_features: int = 0) -> None:
        t = device.device_type
        cfg = PciConfigSpace(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + t, CLASS_BY_TYPE.get(t, 0xFF0000),
                             revision=1, subsystem_vendor=VIRTIO_PCI_VENDOR, subsystem=t)
        super().__init__(cfg)
        self.name = f"virtio-{device.name}"
        self.device = device
        self.vm = vm
        self.loop = loop
        self.features = device.device_features | TRANSPORT_FEATURES | extra_features
        nq = len(device.queue_sizes)
        self.queues = [_QueueState(sz, SplitQueue(address_space, sz),
                                   os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
                       for sz in device.queue_sizes]
        self.msix = MsixVectors(nq + 1, router)
        self._lock = threading.RLock()
        self._reset_registers()

        cfg.add_bar(Bar(BAR_INDEX, BAR_SIZE, BarKind.MEM64))
        self._add_virtio_cap(U.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF, COMMON_LEN)
        self._add_virtio_cap(U.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF, 4)
        self._add_virtio_cap(U.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF, max(4, len(device.config)))
        self._add_virtio_cap(U.VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFF, NOTIFY_MULTIPLIER * nq,
                             struct.pack("<I", NOTIFY_MULTIPLIER))
        # VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through config space (virtio 1.x
        # 4.1.4.7: the device must offer it). bar (byte 4), offset and length (bytes 8-15) are
        # driver-writable; pci_cfg_data (bytes 16-19) reads/writes the selected BAR bytes.
        self._pci_cfg = self._add_virtio_cap(U.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, b"\0" * 4,
                                             wmask=b"\0\0\xff\0\0\0" + b"\xff" * 12)
        self.msix.add_capability(cfg, BAR_INDEX, MSIX_TABLE_OFF, MSIX_PBA_OFF)
        for i, q in enumerate(self.queues):
            loop.add(q.kick_fd, lambda i=i: self._kick_fd_ready(i))

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"",
                        wmask: bytes | None = None) -> int:
        # struct virtio_pci_cap after the id/next bytes: cap_len, cfg_type, bar, id, padding[2],
        # offset, length (+ notify_off_multiplier for the notify capability).
        cap_len = 16 + len(extra)
        body = struct.pack("<BBBBxxII", cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra
        return self.config.add_capability(U.PCI_CAP_ID_VNDR, body, wmask)

    def _pci_cfg_window(self) -> tuple[int, int, int]:
        c = self._pci_cfg
        return (self.config.get(c + U.VIRTIO_PCI_CAP_BAR, 1), self.config.get(c + U.VIRTIO_PCI_CAP_OFFSET, 4),
                self.config.get(c + U.VIRTIO_PCI_CAP_LENGTH, 4))

    def config_read(self, offset: int, size: int) -> int:
        data = self._pci_cfg + 16
        if offset == data:
            bar, off, length = self._pci_cfg_window()
            if bar == BAR_INDEX and length in (1, 2, 4) and off + length <= BAR_SIZE:
                return self.bar_read(bar, off, length)
            return 0
        return super().config_read(offset, size)

    def _reset_registers(self) -> None:
        self.status = 0
        self.dfselect = 0
        self.gfselect = 0
        self.driver_features = 0
        self.msix_config = U.VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.config_generation = 0
        self.isr = 0
        self.active = False
        for q, max_size in zip(self.queues, self.device.queue_sizes):
            q.reset(max_size)
            q.queue.reset()

    # --- PCI hooks --------------------------------------------------------------------------
    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset == self._pci_cfg + 16:
            bar, off, length = self._pci_cfg_window()
            if bar == BAR_INDEX and length in (1, 2, 4) and off + length <= BAR_SIZE:
                self.bar_write(bar, off, length, value & ((1 << (8 * length)) - 1))
            return
        super().config_write(offset, size, value)
        cap = self.msix.cap_offset
        if offset <= cap + 2 < offset + size:   # message control of the MSI-X capability
            self.msix.control_written(self.config.get(cap + 2, 2))

    def bar_moved(self, index: int, old: int, new: int) -> None:
        # Queue kicks are ioeventfds at the notify addresses: they move with the BAR.
        for i, q in enumerate(self.queues):
            if i in self.device.kick_on_vcpu:
                continue        # served in bar_write, on the vCPU's MMIO exit
            if old:
                self.vm.ioeventfd(q.kick_fd, old + NOTIFY_OFF + NOTIFY_MULTIPLIER * i, deassign=True)
            if new:
                self.vm.ioeventfd(q.kick_fd, new + NOTIFY_OFF + NOTIFY_MULTIPLIER * i)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        with self._lock:
            if offset < COMMON_LEN:
                return self._common_read(offset, size)
            if ISR_OFF <= offset < ISR_OFF + 4:
                isr, self.isr = self.isr, 0   # reading ISR acknowledges it
                return isr
            if DEVICE_OFF <= offset < NOTIFY_OFF:
                return self.device.config_read(offset - DEVICE_OFF, size)
            if MSIX_TABLE_OFF <= offset < MSIX_PBA_OFF:
                return self.msix.table_read(offset - MSIX_TABLE_OFF, size)
            if MSIX_PBA_OFF <= offset < BAR_SIZE:
                return self.msix.pba_read(offset - MSIX_PBA_OFF, size)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset < COMMON_LEN:
                self._common_write(offset, size, value)
            elif DEVICE_OFF <= offset < NOTIFY_OFF:
                self.device.config_write(offset - DEVICE_OFF, size, value)
            elif NOTIFY_OFF <= offset < MSIX_TABLE_OFF:
                i = (offset - NOTIFY_OFF) // NOTIFY_MULTIPLIER
                if i in self.device.kick_on_vcpu:
                    # Served here, on the vCPU's exit: the used ring is written before the
                    # guest runs again, so a driver polling for it finds it at once.
                    self._kicked(i)
                elif i < len(self.queues):
                    # Only reached when the ioeventfd is not in place: forward to the device thread.
                    os.eventfd_write(self.queues[i].kick_fd, 1)
            elif MSIX_TABLE_OFF <= offset < MSIX_PBA_OFF:
                self.msix.table_write(offset - MSIX_TABLE_OFF, size, value)

    # --- common configuration ----------------------------------------------------------------
    def _selected(self) -> _QueueState | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_read(self, off: int, size: int) -> int:
        q = self._selected()
        if off == U.VIRTIO_PCI_COMMON_DFSELECT:
            return self.dfselect
        if off == U.VIRTIO_PCI_COMMON_DF:
            return (self.features >> (32 * self.dfselect)) & 0xFFFFFFFF if self.dfselect < 2 else 0
        if off == U.VIRTIO_PCI_COMMON_GFSELECT:
            return self.gfselect
        if off == U.VIRTIO_PCI_COMMON_GF:
            return (self.driver_features >> (32 * self.gfselect)) & 0xFFFFFFFF if self.gfselect < 2 else 0
        if off == U.VIRTIO_PCI_COMMON_MSIX:
            return self.msix_config
        if off == U.VIRTIO_PCI_COMMON_NUMQ:
            return len(self.queues)
        if off == U.VIRTIO_PCI_COMMON_STATUS:
            return self.status
        if off == U.VIRTIO_PCI_COMMON_CFGGENERATION:
            return self.config_generation
        if off == U.VIRTIO_PCI_COMMON_Q_SELECT:
            return self.queue_select
        if q is None:
            return 0
        if off == U.VIRTIO_PCI_COMMON_Q_SIZE:
            return q.size
        if off == U.VIRTIO_PCI_COMMON_Q_MSIX:
            return q.vector
        if off == U.VIRTIO_PCI_COMMON_Q_ENABLE:
            return int(q.enabled)
        if off == U.VIRTIO_PCI_COMMON_Q_NOFF:
            return self.queue_select
        if off == U.VIRTIO_PCI_COMMON_Q_RESET:
            return 0   # a queue reset completes synchronously
        addr = {U.VIRTIO_PCI_COMMON_Q_DESCLO: q.desc, U.VIRTIO_PCI_COMMON_Q_AVAILLO: q.driver,
                U.VIRTIO_PCI_COMMON_Q_USEDLO: q.device}
        for lo, val in addr.items():
            if off == lo:
                return val & 0xFFFFFFFF if size == 4 else val
            if off == lo + 4:
                return val >> 32
        return 0

    def _common_write(self, off: int, size: int, value: int) -> None:
        q = self._selected()
        if off == U.VIRTIO_PCI_COMMON_DFSELECT:
            self.dfselect = value
        elif off == U.VIRTIO_PCI_COMMON_GFSELECT:
            self.gfselect = value
        elif off == U.VIRTIO_PCI_COMMON_GF:
            if self.status & U.VIRTIO_CONFIG_S_FEATURES_OK or self.gfselect > 1:
                return   # features are frozen once FEATURES_OK is set
            shift = 32 * self.gfselect
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif off == U.VIRTIO_PCI_COMMON_MSIX:
            self.msix_config = value if value < self.msix.count else U.VIRTIO_MSI_NO_VECTOR
        elif off == U.VIRTIO_PCI_COMMON_STATUS:
            self._set_status(value & 0xFF)
        elif off == U.VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_select = value
        elif q is None:
            return
        elif off == U.VIRTIO_PCI_COMMON_Q_SIZE:
            if not q.enabled:
                q.size = value
        elif off == U.VIRTIO_PCI_COMMON_Q_MSIX:
            q.vector = value if value < self.msix.count else U.VIRTIO_MSI_NO_VECTOR
        elif off == U.VIRTIO_PCI_COMMON_Q_ENABLE:
            if value == 1 and not q.enabled:
                self._enable_queue(self.queue_select, q)
        elif off == U.VIRTIO_PCI_COMMON_Q_RESET:
            if value == 1 and self.driver_features & (1 << U.VIRTIO_F_RING_RESET):
                q.reset(self.device.queue_sizes[self.queue_select])
                q.queue.reset()
        else:
            for lo, attr in ((U.VIRTIO_PCI_COMMON_Q_DESCLO, "desc"),
                             (U.VIRTIO_PCI_COMMON_Q_AVAILLO, "driver"),
                             (U.VIRTIO_PCI_COMMON_Q_USEDLO, "device")):
                if q.enabled:
                    return   # addresses are fixed while the queue is enabled
                cur = getattr(q, attr)
                if off == lo:
                    setattr(q, attr, value if size == 8 else (cur & ~0xFFFFFFFF) | value)
                elif off == lo + 4:
                    setattr(q, attr, (cur & 0xFFFFFFFF) | (value << 32))

    def _enable_queue(self, index: int, q: _QueueState) -> None:
        event_idx = bool(self.driver_features & (1 << U.VIRTIO_RING_F_EVENT_IDX))
        try:
            q.queue.configure(q.desc, q.driver, q.device, q.size, event_idx)
        except QueueError as e:
            self._fail(f"queue {index}: {e}")
            return
        q.enabled = True

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._device_reset()
            return
        if value & U.VIRTIO_CONFIG_S_FEATURES_OK and not self.status & U.VIRTIO_CONFIG_S_FEATURES_OK:
            ok = (self.driver_features & ~self.features == 0
                  and self.driver_features & (1 << U.VIRTIO_F_VERSION_1))
            if not ok:
                log.warning("%s: driver features %#x refused (device offers %#x, VERSION_1 required)",
                            self.name, self.driver_features, self.features)
                value &= ~U.VIRTIO_CONFIG_S_FEATURES_OK
        became_ok = value & U.VIRTIO_CONFIG_S_DRIVER_OK and not self.status & U.VIRTIO_CONFIG_S_DRIVER_OK
        self.status = value | (self.status & U.VIRTIO_CONFIG_S_NEEDS_RESET)
        if became_ok and self.status & U.VIRTIO_CONFIG_S_FEATURES_OK:
            self.active = True
            self.device.activate(DeviceContext(
                queues=[q.queue for q in self.queues], signal_used=self.signal_used,
                signal_config=self.signal_config, fail=self._fail,
                driver_features=self.driver_features, loop=self.loop,
                kick=lambda i: os.eventfd_write(self.queues[i].kick_fd, 1)))
            for i in range(len(self.queues)):   # buffers made available before DRIVER_OK
                os.eventfd_write(self.queues[i].kick_fd, 1)

    def _device_reset(self) -> None:
        if self.active:
            self.device.reset()
        self._reset_registers()

    def _fail(self, reason: str) -> None:
        """A driver error the device cannot recover from: NEEDS_RESET and a config interrupt."""
        log.warning("%s: %s; device needs reset", self.name, reason)
        self.status |= U.VIRTIO_CONFIG_S_NEEDS_RESET
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.signal_config()

    # --- interrupts and kicks ----------------------------------------------------------------
    def signal_used(self, index: int) -> None:
        self.isr |= 1
        self.msix.trigger(self.queues[index].vector)

    def signal_config(self) -> None:
        self.isr |= U.VIRTIO_PCI_ISR_CONFIG
        self.msix.trigger(self.msix_config)

    def _kick_fd_ready(self, index: int) -> None:
        """A kick through the queue's ioeventfd, on the event-loop thread."""
        try:
            os.eventfd_read(self.queues[index].kick_fd)
        except BlockingIOError:
            pass
        self._kicked(index)

    def _kicked(self, index: int) -> None:
        q = self.queues[index]
        if not (self.active and q.enabled) or self.status & U.VIRTIO_CONFIG_S_NEEDS_RESET:
            return
        self.device.queue_notify(index)
        if q.queue.needs_reset:
            self._fail(f"queue {index}: {q.queue.error}")

    def close(self) -> None:
        for q in self.queues:
            self.loop.remove(q.kick_fd)
            os.close(q.kick_fd)
        self.msix.close()
        self.device.close()
