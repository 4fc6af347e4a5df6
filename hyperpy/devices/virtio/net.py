"""virtio-net over a host TAP device (``/dev/net/tun`` with a virtio-net header)."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import threading

from ..._fast import netio
from ..._fast import uapi as U
from ..._fast.netio import NetWorker, net_config
from ..._fast.virtqueue import QueueError
from ...errors import DeviceError
from .device import DeviceContext, VirtioDevice

log = logging.getLogger(__name__)

RX, TX = 0, 1
IFNAMSIZ = netio.IFNAMSIZ
# Interface ioctls and flags (<linux/sockios.h>, <linux/if.h>).
SIOCGIFFLAGS, SIOCSIFFLAGS = netio.SIOCGIFFLAGS, netio.SIOCSIFFLAGS
SIOCSIFADDR, SIOCSIFNETMASK = netio.SIOCSIFADDR, netio.SIOCSIFNETMASK
IFF_UP = netio.IFF_UP
CTRL_QUEUE_SIZE = 64        # the control queue (multi-queue only); commands are rare and small
MAX_CTRL_COMMAND = 4096     # readable bytes of one control command we are willing to copy


def _interface_exists(name: str) -> bool:
    """Whether this network namespace has an interface ``name`` (never for a template)."""
    if "%" in name:
        return False
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def open_tap(name: str, queues: int = 1) -> tuple[list[int], str]:
    """Create (or attach to) TAP ``name`` with a 12-byte virtio-net header; non-blocking fds.

    ``name`` may be a template such as ``vmtap%d``: the kernel creates the tap under the first
    free name of that form, so it never takes over an existing interface.  With ``queues`` > 1
    the tap is multi-queue (``IFF_MULTI_QUEUE``) and one fd is opened per queue, all on the same
    interface.  Returns the fds and the interface's name (read back from the kernel).
    """
    if len(name.encode()) >= IFNAMSIZ:
        raise DeviceError(f"--net tap={name}: interface names have at most {IFNAMSIZ - 1} bytes")
    existed = _interface_exists(name)
    flags = netio.IFF_TAP | netio.IFF_NO_PI | netio.IFF_VNET_HDR
    if queues > 1:
        flags |= netio.IFF_MULTI_QUEUE
    fds: list[int] = []
    ifname = name
    try:
        for _ in range(queues):
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise DeviceError(f"--net: cannot open /dev/net/tun: {e.strerror}",
                                  "load the tun module and run as root (or with CAP_NET_ADMIN)") from None
            fds.append(fd)
            try:
                res = fcntl.ioctl(fd, netio.TUNSETIFF, struct.pack("16sH", ifname.encode(), flags))
                fcntl.ioctl(fd, netio.TUNSETVNETHDRSZ, struct.pack("i", netio.VNET_HDR_SIZE))
                fcntl.ioctl(fd, netio.TUNSETOFFLOAD, 0)   # no offloads: the guest sees plain frames
            except OSError as e:
                hint = ("run as root (or with CAP_NET_ADMIN)" if "%" in name
                        else "give a free name or an existing tap owned by this user")
                if queues > 1:
                    hint += " (an existing tap must be multi-queue for num_queues > 2)"
                raise DeviceError(f"--net tap={name}: cannot attach the TAP device: {e.strerror}",
                                  hint) from None
            ifname = res[:16].rstrip(b"\0").decode()   # the other queues attach to this name
    except DeviceError:
        for fd in fds:
            os.close(fd)
        raise
    if existed:
        log.info("virtio-net: attached to the existing tap %s", ifname)
    else:
        log.info("virtio-net: created tap %s%s", ifname, f" (from {name})" if ifname != name else "")
    return fds, ifname


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
    """virtio-net with ``num_queues`` / 2 rx/tx pairs on one TAP (one tap fd per pair).

    Queues are rx0, tx0, rx1, tx1, ...; with more than one pair the device offers
    ``VIRTIO_NET_F_MQ`` and ``VIRTIO_NET_F_CTRL_VQ`` and the control queue comes last (virtio
    5.1.2).  Only the first pair is used until the driver sends ``VQ_PAIRS_SET``; the tap
    queues of unused pairs are detached (``TUNSETQUEUE``) so the kernel steers no frame there.
    """

    device_type = U.VIRTIO_ID_NET
    name = "net"

    def __init__(self, tap: str, mac: bytes, *, ip: str | None = None, mask: str | None = None,
                 queue_size: int = 256, mtu: int = 1500, num_queues: int = 2) -> None:
        if num_queues < 2 or num_queues % 2:
            raise DeviceError(f"--net num_queues: {num_queues} is not an even number of at least 2")
        pairs = num_queues // 2
        self.tap_fds, self.ifname = open_tap(tap, pairs)
        try:
            configure_host_side(self.ifname, ip, mask)
        except DeviceError:
            for fd in self.tap_fds:
                os.close(fd)
            raise
        features = ((1 << U.VIRTIO_NET_F_MAC) | (1 << U.VIRTIO_NET_F_STATUS)
                    | (1 << U.VIRTIO_NET_F_MTU))
        sizes = [queue_size] * num_queues
        if pairs > 1:
            features |= (1 << U.VIRTIO_NET_F_MQ) | (1 << U.VIRTIO_NET_F_CTRL_VQ)
            sizes.append(CTRL_QUEUE_SIZE)
        super().__init__(sizes, features, net_config(mac, U.VIRTIO_NET_S_LINK_UP, pairs, mtu))
        self.mac = mac
        self.max_pairs = pairs
        self.workers = [NetWorker(fd) for fd in self.tap_fds]
        self.active_pairs = 1
        self._ctrl: int | None = None      # control queue index once the driver negotiated it
        self._polling = [False] * pairs
        self._attached = [True] * pairs
        # Pair switches run on the loop thread (control queue) and on a vCPU thread (reset).
        self._pairs_lock = threading.RLock()
        for p in range(1, pairs):
            self._attach(p, False)

    @property
    def tap_fd(self) -> int:
        return self.tap_fds[0]

    @property
    def worker(self) -> NetWorker:
        return self.workers[0]

    def activate(self, ctx: DeviceContext) -> None:
        with self._pairs_lock:
            super().activate(ctx)
            feats = ctx.driver_features
            self._ctrl = None
            if self.max_pairs > 1 and feats & (1 << U.VIRTIO_NET_F_CTRL_VQ):
                # virtio 5.1.2: the control queue follows the last pair when MQ is negotiated,
                # otherwise it is queue 2 (right after the only pair).
                self._ctrl = 2 * self.max_pairs if feats & (1 << U.VIRTIO_NET_F_MQ) else 2
            self._set_pairs(1)
            self._poll_tap(0, True)

    # --- rx / tx ----------------------------------------------------------------------------
    def _attach(self, pair: int, on: bool) -> None:
        """Attach/detach the tap queue of ``pair`` (the first one always stays attached)."""
        if pair == 0 or self._attached[pair] == on:
            return
        flags = netio.IFF_ATTACH_QUEUE if on else netio.IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.tap_fds[pair], netio.TUNSETQUEUE, struct.pack("16sH", b"", flags))
        except OSError as e:
            log.warning("virtio-net %s: cannot %s tap queue %d: %s", self.ifname,
                        "attach" if on else "detach", pair, e.strerror)
            return
        self._attached[pair] = on

    def _poll_tap(self, pair: int, on: bool) -> None:
        # Level-triggered: with no rx buffers posted the tap would wake the loop forever, so it
        # is watched only while the driver has buffers (re-armed by the next rx kick).
        fd = self.tap_fds[pair]
        if on and not self._polling[pair] and self.ctx is not None and pair < self.active_pairs:
            self.ctx.loop.add(fd, lambda: self._tap_readable(pair))
            self._polling[pair] = True
        elif not on and self._polling[pair]:
            if self.ctx is not None:
                self.ctx.loop.remove(fd)
            self._polling[pair] = False

    def _tap_readable(self, pair: int) -> None:
        ctx = self.ctx
        if ctx is None or pair >= self.active_pairs:
            self._poll_tap(pair, False)
            return
        _, notify, broken, starved = self.workers[pair].rx(ctx.queues[2 * pair + RX])
        if notify:
            ctx.signal_used(2 * pair + RX)
        if starved or broken:
            self._poll_tap(pair, False)

    def _tx(self, pair: int) -> None:
        ctx = self.ctx
        _, notify, _ = self.workers[pair].tx(ctx.queues[2 * pair + TX])
        if notify:
            ctx.signal_used(2 * pair + TX)

    def set_active_pairs(self, n: int) -> None:
        """Use pairs 0..n-1 (a transport without the control queue -- vhost-user, where the
        front-end turns VQ_PAIRS_SET into SET_VRING_ENABLE -- calls this)."""
        with self._pairs_lock:
            if self.ctx is not None and 1 <= n <= self.max_pairs and n != self.active_pairs:
                self._set_pairs(n)

    def _set_pairs(self, n: int) -> None:
        """Use the first ``n`` pairs from now on (the rest get no frames and send none)."""
        old = self.active_pairs
        for p in range(n, old):
            self._poll_tap(p, False)
            if self.ctx is not None:
                self._tx(p)          # what the driver queued there before the switch still goes
            self._attach(p, False)
        self.active_pairs = n
        for p in range(old, n):
            self._attach(p, True)
            if self.ctx is not None:
                self._poll_tap(p, True)    # its rx buffers may be posted already
                self._tx(p)

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        if index == self._ctrl:
            self._control(index)
            return
        pair, kind = divmod(index, 2)
        if pair >= self.active_pairs:
            return   # a pair the driver has not enabled with VQ_PAIRS_SET
        if kind == TX:
            self._tx(pair)
        else:
            self._poll_tap(pair, True)
            self._tap_readable(pair)

    # --- control queue ----------------------------------------------------------------------
    def _control(self, index: int) -> None:
        with self._pairs_lock:
            if self.ctx is not None:
                self._control_locked(index)

    def _control_locked(self, index: int) -> None:
        ctx = self.ctx
        q = ctx.queues[index]
        done = 0
        try:
            while (chain := q.pop_py()) is not None:
                ack = self._ctrl_command(q, chain)
                written = 0
                if chain.writable_len:
                    try:
                        written = q.write_chain_bytes(chain, bytes([ack]))
                    except ValueError:
                        written = 0
                q.push_used_py(chain.head, written)
                done += 1
        except QueueError:
            pass   # the transport sees q.needs_reset and tells the driver
        if done and q.should_notify_py():
            ctx.signal_used(index)

    def _ctrl_command(self, q, chain) -> int:
        """Run one control command; returns the ack byte (VIRTIO_NET_OK or VIRTIO_NET_ERR)."""
        if chain.writable_len < 1:
            log.debug("virtio-net control command without room for the ack")
            return U.VIRTIO_NET_ERR
        if not netio.CTRL_HDR_SIZE <= chain.readable_len <= MAX_CTRL_COMMAND:
            log.debug("virtio-net control command of %d bytes refused", chain.readable_len)
            return U.VIRTIO_NET_ERR
        try:
            raw = q.read_chain_bytes(chain)
        except ValueError:
            return U.VIRTIO_NET_ERR
        cls, cmd, data = raw[0], raw[1], raw[netio.CTRL_HDR_SIZE:]
        mq = self.ctx.driver_features & (1 << U.VIRTIO_NET_F_MQ)
        if cls == U.VIRTIO_NET_CTRL_MQ and cmd == U.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and mq:
            if len(data) != netio.CTRL_MQ_SIZE:
                return U.VIRTIO_NET_ERR
            n = int.from_bytes(data, "little")
            hi = min(U.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX, self.max_pairs)
            if not U.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= n <= hi:
                log.debug("virtio-net VQ_PAIRS_SET %d refused (1..%d)", n, hi)
                return U.VIRTIO_NET_ERR
            self._set_pairs(n)
            return U.VIRTIO_NET_OK
        log.debug("virtio-net control command class %d cmd %d not supported", cls, cmd)
        return U.VIRTIO_NET_ERR

    # --- lifecycle --------------------------------------------------------------------------
    def reset(self) -> None:
        with self._pairs_lock:
            for p in range(self.max_pairs):
                self._poll_tap(p, False)
                self._attach(p, p == 0)
            self.active_pairs = 1
            self._ctrl = None
            super().reset()

    def counters(self) -> dict[str, int]:
        ws = self.workers
        return {"rx_frames": sum(w.rx_frames for w in ws), "rx_bytes": sum(w.rx_bytes for w in ws),
                "tx_frames": sum(w.tx_frames for w in ws), "tx_bytes": sum(w.tx_bytes for w in ws),
                "tx_errors": sum(w.tx_errors for w in ws)}

    def close(self) -> None:
        for p in range(len(self.tap_fds)):
            self._poll_tap(p, False)
        for fd in self.tap_fds:
            if fd >= 0:
                os.close(fd)
        self.tap_fds = [-1] * len(self.tap_fds)
