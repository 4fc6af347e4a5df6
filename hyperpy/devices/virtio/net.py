"""virtio-net over a host TAP device (``/dev/net/tun`` with a virtio-net header)."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct

from ..._fast import netio
from ..._fast import uapi as U
from ..._fast.netio import NetWorker, net_config
from ...errors import DeviceError
from .device import DeviceContext, VirtioDevice

log = logging.getLogger(__name__)

RX, TX = 0, 1
IFNAMSIZ = 16
# Interface ioctls (<linux/sockios.h>); standard socket API numbers, stable across kernels.
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK = 0x8913, 0x8914, 0x8916, 0x891C
IFF_UP = 0x1


def open_tap(name: str) -> tuple[int, str]:
    """Create (or attach to) TAP ``name`` with a 12-byte virtio-net header; non-blocking fd."""
    if len(name.encode()) >= IFNAMSIZ:
        raise DeviceError(f"--net tap={name}: interface names have at most {IFNAMSIZ - 1} bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise DeviceError(f"--net: cannot open /dev/net/tun: {e.strerror}",
                          "load the tun module and run as root (or with CAP_NET_ADMIN)") from None
    try:
        ifr = struct.pack("16sH", name.encode(), netio.IFF_TAP | netio.IFF_NO_PI | netio.IFF_VNET_HDR)
        res = fcntl.ioctl(fd, netio.TUNSETIFF, ifr)
        fcntl.ioctl(fd, netio.TUNSETVNETHDRSZ, struct.pack("i", netio.VNET_HDR_SIZE))
        fcntl.ioctl(fd, netio.TUNSETOFFLOAD, 0)   # no offloads: the guest sees plain frames
    except OSError as e:
        os.close(fd)
        raise DeviceError(f"--net tap={name}: cannot attach the TAP device: {e.strerror}",
                          "give a free name or an existing tap owned by this user") from None
    return fd, res[:16].rstrip(b"\0").decode()


def configure_host_side(ifname: str, ip: str | None, mask: str | None) -> None:
    """Give the host end of the tap an address and bring it up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        def ifreq_addr(addr: str) -> bytes:
            return struct.pack("16sH2s4s8s", ifname.encode(), socket.AF_INET, b"\0\0",
                               socket.inet_aton(addr), b"\0" * 8)
        try:
            if ip:
                fcntl.ioctl(s, SIOCSIFADDR, ifreq_addr(ip))
            if mask:
                fcntl.ioctl(s, SIOCSIFNETMASK, ifreq_addr(mask))
            flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", ifname.encode(), 0)), 16)[0]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", ifname.encode(), flags | IFF_UP))
        except OSError as e:
            raise DeviceError(f"--net tap={ifname}: cannot configure the host side: {e.strerror}",
                              "check ip= and mask=") from None


class Net(VirtioDevice):
    device_type = U.VIRTIO_ID_NET
    name = "net"

    def __init__(self, tap: str, mac: bytes, *, ip: str | None = None, mask: str | None = None,
                 queue_size: int = 256, mtu: int = 1500) -> None:
        self.tap_fd, self.ifname = open_tap(tap)
        try:
            configure_host_side(self.ifname, ip, mask)
        except DeviceError:
            os.close(self.tap_fd)
            raise
        features = ((1 << U.VIRTIO_NET_F_MAC) | (1 << U.VIRTIO_NET_F_STATUS)
                    | (1 << U.VIRTIO_NET_F_MTU))
        super().__init__([queue_size, queue_size], features,
                         net_config(mac, U.VIRTIO_NET_S_LINK_UP, 1, mtu))
        self.mac = mac
        self.worker = NetWorker(self.tap_fd)
        self._polling = False

    def activate(self, ctx: DeviceContext) -> None:
        super().activate(ctx)
        self._poll_tap(True)

    def _poll_tap(self, on: bool) -> None:
        # Level-triggered: with no rx buffers posted the tap would wake the loop forever, so it
        # is watched only while the driver has buffers (re-armed by the next rx kick).
        if on and not self._polling and self.ctx is not None:
            self.ctx.loop.add(self.tap_fd, self._tap_readable)
            self._polling = True
        elif not on and self._polling:
            self.ctx.loop.remove(self.tap_fd)
            self._polling = False

    def _tap_readable(self) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        _, notify, broken, starved = self.worker.rx(ctx.queues[RX])
        if notify:
            ctx.signal_used(RX)
        if starved or broken:
            self._poll_tap(False)

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        if index == TX:
            _, notify, _ = self.worker.tx(ctx.queues[TX])
            if notify:
                ctx.signal_used(TX)
        else:
            self._poll_tap(True)
            self._tap_readable()

    def reset(self) -> None:
        self._poll_tap(False)
        super().reset()

    def close(self) -> None:
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1
