"""The transport-independent part of a virtio device.

A device says what it is (type, queues, features, config space) and handles queue
notifications.  The transport (:mod:`.pci`) owns feature negotiation, status, queue set-up and
interrupts, and calls :meth:`VirtioDevice.activate` once the driver sets DRIVER_OK.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class DeviceContext:
    """What an activated device gets from its transport."""

    queues: list                      # SplitQueue per queue (index = virtqueue number)
    signal_used: Callable[[int], None]   # raise the queue's interrupt (after should_notify)
    signal_config: Callable[[], None]    # config change / NEEDS_RESET interrupt
    fail: Callable[[str], None]          # device error: set NEEDS_RESET, tell the driver
    driver_features: int
    loop: object                          # EventLoop the device may add backend fds to
    kick: Callable[[int], None]           # run queue_notify(index) on the loop (from any thread)


class VirtioDevice:
    """Base class: subclasses set ``device_type``, ``queue_sizes`` and override the hooks."""

    device_type: int = 0
    name: str = "virtio"
    #: Queues whose kick is served on the kicking vCPU's own exit, not on the event-loop thread:
    #: for a driver that busy-polls each request's completion (Linux's virtio-iommu), the thread
    #: hop (ioeventfd, epoll wake-up, another CPU) is most of the round trip.
    kick_on_vcpu: tuple[int, ...] = ()

    def __init__(self, queue_sizes: list[int], features: int = 0, config: bytes = b"") -> None:
        self.queue_sizes = list(queue_sizes)
        self.device_features = features
        self.config = bytearray(config)
        self.ctx: DeviceContext | None = None

    # --- config space ---------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Device config is read-only unless a device says otherwise."""

    # --- lifecycle --------------------------------------------------------------------------
    def activate(self, ctx: DeviceContext) -> None:
        self.ctx = ctx

    def queue_notify(self, index: int) -> None:
        """The driver kicked queue ``index`` (runs on the event-loop thread, or for the queues in
        ``kick_on_vcpu`` on the kicking vCPU's thread)."""

    def reset(self) -> None:
        self.ctx = None

    def close(self) -> None:
        """Release host resources (files, taps) when the VM ends."""

    def counters(self) -> dict[str, int]:
        """Request and byte counts for ``vm.counters`` (names as cloud-hypervisor's where they
        exist); read without locks, so a value may lag by the request being served."""
        return {}
