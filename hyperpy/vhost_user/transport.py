"""The vhost-user transport: a front-end's vrings served by hyperpy's own virtio devices.

This is the vhost-user counterpart of :mod:`hyperpy.devices.virtio.pci`.  It builds the same
:class:`~hyperpy._fast.virtqueue.SplitQueue` per queue and the same
:class:`~hyperpy.devices.virtio.device.DeviceContext`, and drives the same
:class:`~hyperpy.devices.virtio.device.VirtioDevice` subclasses (Block, Net, Rng, Console): the
rings live in the front-end's shared memory (:class:`~hyperpy._fast.vhost_iotlb.VhostMemory`),
kicks arrive on the front-end's kick eventfds (watched by hyperpy's EventLoop) and
``signal_used`` writes the ring's call eventfd.

With ``VIRTIO_F_ACCESS_PLATFORM`` negotiated the queues translate through an
:class:`~hyperpy._fast.vhost_iotlb.IotlbAddressSpace` (IOVA -> front-end address -> host), fed by
``VHOST_USER_IOTLB_MSG``; a translation the IOTLB cannot make yet is sent to the front-end as a
``VHOST_IOTLB_MISS`` on the back-end channel and the queue resumes when the update arrives.

Every request handler either applies the request or raises :class:`Refused` with a one-line
reason; the server turns that into the protocol's error path (a failed REPLY_ACK, or an empty
reply to a request that has a reply) and a log line.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
from typing import Callable

from .._fast import uapi as U
from .._fast import vhost_iotlb as V
from .._fast.virtqueue import QueueError, SplitQueue, ring_sizes
from .._fast.addrspace import AddressSpace
from ..devices.virtio.device import DeviceContext, VirtioDevice
from ..errors import DeviceError, HyperpyError
from . import protocol as P
from .protocol import ProtocolFeature as PF
from .protocol import Request as R

log = logging.getLogger(__name__)

#: Transport feature bits offered besides the device's own.
TRANSPORT_FEATURES = ((1 << U.VIRTIO_F_VERSION_1) | (1 << U.VIRTIO_RING_F_INDIRECT_DESC)
                      | (1 << U.VIRTIO_RING_F_EVENT_IDX))

#: Protocol features offered.  The device IOTLB has no protocol feature bit of its own: it is on
#: when VIRTIO_F_ACCESS_PLATFORM is negotiated, and needs BACKEND_REQ (misses) and REPLY_ACK.
PROTOCOL_FEATURES = ((1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ)
                     | (1 << PF.CONFIG) | (1 << PF.RESET_DEVICE))

#: Names of the virtio feature bits the tests and logs talk about.
FEATURE_NAMES = {
    U.VIRTIO_F_VERSION_1: "VERSION_1",
    U.VIRTIO_RING_F_INDIRECT_DESC: "INDIRECT_DESC",
    U.VIRTIO_RING_F_EVENT_IDX: "EVENT_IDX",
    U.VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    U.VIRTIO_F_RING_RESET: "RING_RESET",
    U.VIRTIO_F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    U.VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    P.F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES",
}
DEVICE_FEATURE_NAMES = {
    U.VIRTIO_ID_BLOCK: {U.VIRTIO_BLK_F_FLUSH: "BLK_F_FLUSH", U.VIRTIO_BLK_F_SEG_MAX: "BLK_F_SEG_MAX",
                        U.VIRTIO_BLK_F_BLK_SIZE: "BLK_F_BLK_SIZE", U.VIRTIO_BLK_F_DISCARD: "BLK_F_DISCARD",
                        U.VIRTIO_BLK_F_WRITE_ZEROES: "BLK_F_WRITE_ZEROES", U.VIRTIO_BLK_F_RO: "BLK_F_RO",
                        U.VIRTIO_BLK_F_MQ: "BLK_F_MQ"},
    U.VIRTIO_ID_NET: {U.VIRTIO_NET_F_MAC: "NET_F_MAC", U.VIRTIO_NET_F_STATUS: "NET_F_STATUS",
                      U.VIRTIO_NET_F_MTU: "NET_F_MTU", U.VIRTIO_NET_F_MQ: "NET_F_MQ",
                      U.VIRTIO_NET_F_CTRL_VQ: "NET_F_CTRL_VQ"},
}


def feature_names(bits: int, device_type: int = 0) -> list[str]:
    names = dict(FEATURE_NAMES)
    names.update(DEVICE_FEATURE_NAMES.get(device_type, {}))
    return [names.get(b, f"bit{b}") for b in range(64) if bits >> b & 1]


class Refused(HyperpyError):
    """A front-end request this back-end will not apply (the one-line reason says why)."""


class _Vring:
    __slots__ = ("index", "max_size", "num", "addr", "base", "kick_fd", "call_fd", "err_fd",
                 "enabled", "started", "running", "waiting_iotlb", "broken_logged")

    def __init__(self, index: int, max_size: int) -> None:
        self.index = index
        self.max_size = max_size
        self.kick_fd = self.call_fd = self.err_fd = -1
        self.clear()

    def clear(self) -> None:
        self.num = self.max_size
        self.addr: tuple[int, int, int] | None = None   # desc, avail, used (front-end addresses)
        self.base = 0
        self.enabled = False
        self.started = False      # has a kick fd (SET_VRING_KICK) and was not stopped since
        self.running = False      # its SplitQueue is configured
        self.waiting_iotlb = False
        self.broken_logged = False


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class VhostUserTransport:
    """One device behind one vhost-user connection at a time (reusable across connections)."""

    def __init__(self, device: VirtioDevice, loop, *, iommu: bool = True,
                 send_backend: Callable[[int, bytes], bool] | None = None,
                 queue_num: int | None = None) -> None:
        self.device = device
        self.loop = loop
        self.name = f"vhost-user-{device.name}"
        self.send_backend = send_backend or (lambda req, payload: False)
        self.features = device.device_features | TRANSPORT_FEATURES | (1 << P.F_PROTOCOL_FEATURES)
        if iommu:
            self.features |= 1 << U.VIRTIO_F_ACCESS_PLATFORM
        self.protocol_features = PROTOCOL_FEATURES
        if device.device_type == U.VIRTIO_ID_NET:
            # The front-end owns virtio-net's config space (MAC, status): no GET_CONFIG.
            self.protocol_features &= ~(1 << PF.CONFIG)
        #: What GET_QUEUE_NUM answers (queue pairs for net, queues otherwise).
        self.queue_num = queue_num if queue_num is not None else len(device.queue_sizes)
        self.rings = [_Vring(i, sz) for i, sz in enumerate(device.queue_sizes)]
        self.memory = V.VhostMemory()
        self._miss_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.iotlb = V.IotlbAddressSpace(self.memory)
        self.loop.add(self._miss_fd, self._misses_signalled)
        self.negotiated_history: list[int] = []
        self.kicks = [0] * len(self.rings)     # kick-fd notifications served, per ring
        self._reset_state()

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self.acked_features: int | None = None
        self.acked_protocol = 0
        self.protocol_set = False
        self.owner = False
        self.ctx: DeviceContext | None = None
        self.queues: list[SplitQueue] | None = None
        self.space: AddressSpace | None = None

    @property
    def active(self) -> bool:
        return self.ctx is not None

    def _has(self, feature: int) -> bool:
        return bool(self.acked_features and self.acked_features >> feature & 1)

    def _ring(self, index: int) -> _Vring:
        if not 0 <= index < len(self.rings):
            raise Refused(f"ring index {index} does not exist (the device has {len(self.rings)} "
                          f"queues)")
        return self.rings[index]

    def disconnect(self) -> None:
        """The front-end went away: stop every ring, reset the device, drop its memory."""
        for r in self.rings:
            self._stop_ring(r)
            for attr in ("call_fd", "err_fd"):
                _close(getattr(r, attr))
                setattr(r, attr, -1)
            r.clear()
        self._deactivate()
        self.iotlb.clear()
        self.memory.close()
        self._reset_state()

    def close(self) -> None:
        self.disconnect()
        self.loop.remove(self._miss_fd)
        _close(self._miss_fd)
        self._miss_fd = -1
        self.device.close()

    # ------------------------------------------------------------------ negotiation

    def get_features(self) -> bytes:
        return P.u64(self.features)

    def set_features(self, value: int) -> None:
        extra = value & ~self.features
        if extra:
            raise Refused(f"driver features {value:#x} include bits the back-end did not offer "
                          f"({feature_names(extra)}); ack a subset of GET_FEATURES")
        if not value >> U.VIRTIO_F_VERSION_1 & 1:
            raise Refused("driver features lack VERSION_1; this back-end serves virtio 1.x drivers only")
        if self.active and self.acked_features is not None and value != self.acked_features:
            # Features change only between device starts (all rings stopped).
            raise Refused(f"features {value:#x} set while the device runs with "
                          f"{self.acked_features:#x}; stop the rings first")
        self.acked_features = value
        self.negotiated_history.append(value)
        log.info("%s: driver features %#x: %s", self.name, value,
                 " ".join(feature_names(value, self.device.device_type)))

    def get_protocol_features(self) -> bytes:
        return P.u64(self.protocol_features)

    def set_protocol_features(self, value: int) -> None:
        extra = value & ~self.protocol_features
        if extra:
            raise Refused(f"protocol features {value:#x} include bits the back-end did not offer "
                          f"({extra:#x}); ack a subset of GET_PROTOCOL_FEATURES")
        self.acked_protocol = value
        self.protocol_set = True
        log.info("%s: protocol features %#x: %s", self.name, value,
                 " ".join(P.protocol_names(value)))

    def protocol(self, feature: int) -> bool:
        return bool(self.acked_protocol >> feature & 1)

    # ------------------------------------------------------------------ memory

    def set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        try:
            regions = V.unpack_memory(payload)
        except ValueError as e:
            raise Refused(f"SET_MEM_TABLE: {e}") from None
        if not regions:
            raise Refused("SET_MEM_TABLE with no regions; send at least one")
        try:
            self.memory.set_regions(regions, fds)
        except DeviceError as e:
            raise Refused(f"SET_MEM_TABLE: {e.what}") from None
        log.info("%s: memory table: %s", self.name, ", ".join(
            f"gpa {g:#x}+{s:#x} @ user {u:#x}" for g, s, u, _ in self.memory.table))
        # Rings of a running device point into the old mappings: translate them again.
        for r in self.rings:
            if r.running:
                try:
                    self._configure(r, keep_indexes=True)
                except Refused as e:
                    self._ring_error(r, f"after the new memory table: {e.what}")

    # ------------------------------------------------------------------ vrings

    def set_vring_num(self, index: int, num: int) -> None:
        r = self._ring(index)
        if r.running:
            raise Refused(f"SET_VRING_NUM on running ring {index}; stop it first")
        if num < 1 or num > r.max_size or num & (num - 1):
            raise Refused(f"ring {index} size {num} is not a power of two between 1 and {r.max_size}")
        r.num = num

    def set_vring_addr(self, payload: bytes) -> None:
        index, flags, desc, used, avail, _log = V.unpack_vring_addr(payload)
        r = self._ring(index)
        if flags & (1 << V.VRING_F_LOG):
            raise Refused(f"ring {index}: dirty-page logging (VHOST_VRING_F_LOG) is not supported")
        if flags:
            raise Refused(f"ring {index}: unknown vring address flags {flags:#x}")
        if r.running:
            raise Refused(f"SET_VRING_ADDR on running ring {index}; stop it first")
        r.addr = (desc, avail, used)
        if not self._has(U.VIRTIO_F_ACCESS_PLATFORM):
            # Front-end user addresses: every ring area must lie inside one memory region now.
            self._ring_gpas(r)

    def _ring_gpas(self, r: _Vring) -> tuple[int, int, int]:
        desc, avail, used = r.addr
        out = []
        for what, addr, size in zip(("descriptor table", "available ring", "used ring"),
                                    (desc, avail, used), ring_sizes(r.num)):
            gpa = self.memory.uva_to_gpa(addr, size)
            if gpa is None:
                raise Refused(f"ring {r.index}: {what} at user address {addr:#x}+{size:#x} is not "
                              f"inside one memory region")
            out.append(gpa)
        return tuple(out)

    def set_vring_base(self, index: int, num: int) -> None:
        r = self._ring(index)
        if r.running:
            raise Refused(f"SET_VRING_BASE on running ring {index}; stop it first")
        if num > 0xFFFF:
            raise Refused(f"ring {index} base {num:#x} does not fit a split ring's 16-bit index")
        r.base = num

    def get_vring_base(self, index: int) -> bytes:
        r = self._ring(index)
        base = self._stop_ring(r)
        r.enabled = False
        if not any(x.started for x in self.rings):
            self._deactivate()
        return V.pack_vring_state(index, base)

    def set_vring_kick(self, value: int, fds: list[int]) -> None:
        r = self._ring(value & P.VRING_INDEX_MASK)
        if value & P.VRING_NOFD or not fds:
            raise Refused(f"ring {r.index}: SET_VRING_KICK without an fd (polling) is not supported")
        fd = fds.pop(0)
        self._stop_ring(r)
        try:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        except OSError as e:
            _close(fd)
            raise Refused(f"ring {r.index}: kick fd is unusable: {e.strerror}") from None
        r.kick_fd = fd
        r.started = True
        self.loop.add(fd, lambda r=r: self._kicked(r))
        if not self.protocol_negotiated:
            r.enabled = True     # without protocol features a ring starts enabled
        self._try_run(r)

    def set_vring_call(self, value: int, fds: list[int]) -> None:
        r = self._ring(value & P.VRING_INDEX_MASK)
        _close(r.call_fd)
        r.call_fd = -1 if value & P.VRING_NOFD or not fds else fds.pop(0)

    def set_vring_err(self, value: int, fds: list[int]) -> None:
        r = self._ring(value & P.VRING_INDEX_MASK)
        _close(r.err_fd)
        r.err_fd = -1 if value & P.VRING_NOFD or not fds else fds.pop(0)

    def set_vring_enable(self, index: int, num: int) -> None:
        r = self._ring(index)
        if not self.protocol_negotiated:
            raise Refused("SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES negotiated")
        if num not in (0, 1):
            raise Refused(f"ring {index}: SET_VRING_ENABLE value {num} is not 0 or 1")
        r.enabled = bool(num)
        log.info("%s: ring %d %s", self.name, index, "enabled" if r.enabled else "disabled")
        if r.enabled:
            self._try_run(r)
        self._pairs_changed()
        if r.enabled and r.running:
            self._kicked(r, read=False)

    @property
    def protocol_negotiated(self) -> bool:
        """VHOST_USER_F_PROTOCOL_FEATURES in use: acked in SET_FEATURES, or (front-ends enable
        rings before they send SET_FEATURES) protocol features already set."""
        return self._has(P.F_PROTOCOL_FEATURES) or self.protocol_set

    def reset_device(self) -> None:
        for r in self.rings:
            self._stop_ring(r)
            r.clear()
        self._deactivate()
        self.iotlb.clear()
        self.acked_features = None

    # ------------------------------------------------------------------ config space

    def get_config(self, payload: bytes) -> bytes:
        if len(payload) < P.CONFIG_HEADER.size:
            raise Refused(f"GET_CONFIG payload of {len(payload)} bytes has no config header")
        offset, size, flags = P.CONFIG_HEADER.unpack_from(payload)
        if size > P.MAX_CONFIG_SIZE or len(payload) != P.CONFIG_HEADER.size + size:
            raise Refused(f"GET_CONFIG of {size} bytes in a {len(payload)}-byte payload (at most "
                          f"{P.MAX_CONFIG_SIZE}, and the payload is header + size)")
        if offset + size > P.MAX_CONFIG_SIZE:
            raise Refused(f"GET_CONFIG {offset:#x}+{size:#x} is past the {P.MAX_CONFIG_SIZE}-byte config space")
        cfg = bytes(self.device.config[offset:offset + size]).ljust(size, b"\0")
        return P.CONFIG_HEADER.pack(offset, size, flags) + cfg

    def set_config(self, payload: bytes) -> None:
        if len(payload) < P.CONFIG_HEADER.size:
            raise Refused(f"SET_CONFIG payload of {len(payload)} bytes has no config header")
        offset, size, _flags = P.CONFIG_HEADER.unpack_from(payload)
        if size > P.MAX_CONFIG_SIZE or len(payload) != P.CONFIG_HEADER.size + size \
                or offset + size > P.MAX_CONFIG_SIZE:
            raise Refused(f"SET_CONFIG {offset:#x}+{size:#x} in a {len(payload)}-byte payload is malformed")
        data = payload[P.CONFIG_HEADER.size:]
        for i, b in enumerate(data):
            self.device.config_write(offset + i, 1, b)

    # ------------------------------------------------------------------ IOTLB

    def iotlb_msg(self, payload: bytes) -> None:
        if not self._has(U.VIRTIO_F_ACCESS_PLATFORM):
            raise Refused("IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM negotiated (no device IOTLB)")
        iova, size, uaddr, perm, typ = V.unpack_iotlb(payload)
        if typ == V.IOTLB_UPDATE:
            try:
                self.iotlb.update(iova, size, uaddr, perm)
            except DeviceError as e:
                raise Refused(e.what) from None
            self._iotlb_updated()
        elif typ == V.IOTLB_INVALIDATE:
            self.iotlb.invalidate(iova, size)
        else:
            raise Refused(f"IOTLB message type {typ} is not UPDATE or INVALIDATE")

    def _send_misses(self) -> bool:
        misses = self.iotlb.take_misses()
        for iova, perm in misses:
            log.debug("%s: IOTLB miss at IOVA %#x (perm %d)", self.name, iova, perm)
            if not self.send_backend(P.BackendRequest.IOTLB_MSG,
                                     V.pack_iotlb(iova, 0, 0, perm, V.IOTLB_MISS)):
                log.warning("%s: IOTLB miss at IOVA %#x cannot be sent (no back-end channel); the "
                            "queue waits", self.name, iova)
        return bool(misses)

    def _misses_signalled(self) -> None:
        try:
            os.eventfd_read(self._miss_fd)
        except BlockingIOError:
            pass
        if self._send_misses():
            for r in self.rings:
                if r.running and self.queues is not None and self.queues[r.index].needs_reset:
                    r.waiting_iotlb = True

    def _iotlb_updated(self) -> None:
        for r in self.rings:
            if not r.waiting_iotlb:
                continue
            r.waiting_iotlb = False
            try:
                if r.running:
                    self._configure(r, keep_indexes=True)   # clears the miss-induced break
                    self._signal(r)       # completions pushed before the miss were not signalled
                    self._kicked(r, read=False)
                else:
                    self._try_run(r)
            except Refused as e:
                self._ring_error(r, e.what)

    # ------------------------------------------------------------------ running rings

    def _ready_to_run(self, r: _Vring) -> bool:
        return (r.started and r.enabled and r.addr is not None and self.acked_features is not None
                and self.memory.size > 0)

    def _try_run(self, r: _Vring) -> None:
        if r.running or not self._ready_to_run(r):
            return
        if not self.active:
            self._activate()
        self._configure(r, keep_indexes=False)
        if not r.running:
            return       # waiting for IOTLB entries of the ring areas
        log.info("%s: ring %d runs (size %d, base %d)", self.name, r.index, r.num, r.base)
        self._kicked(r, read=False)

    def _configure(self, r: _Vring, keep_indexes: bool) -> None:
        q = self.queues[r.index]
        if keep_indexes:
            last_avail, next_used = q.last_avail_idx, q.next_used_idx
        event_idx = self._has(U.VIRTIO_RING_F_EVENT_IDX)
        if self._has(U.VIRTIO_F_ACCESS_PLATFORM):
            desc, avail, used = r.addr
            sizes = ring_sizes(r.num)
            for addr, size, write in ((desc, sizes[0], False), (avail, sizes[1], False),
                                      (used, sizes[2], True)):
                if self.space.translate_py(addr, size, write) is None:
                    r.running = False
                    if self._send_misses():
                        r.waiting_iotlb = True
                        return
                    raise Refused(f"ring {r.index}: ring area at IOVA {addr:#x}+{size:#x} is not "
                                  f"mapped for this access")
        else:
            desc, avail, used = self._ring_gpas(r)
        try:
            q.configure(desc, avail, used, r.num, event_idx)
        except QueueError as e:
            r.running = False
            raise Refused(f"ring {r.index}: {e.what}") from None
        if keep_indexes:
            q.last_avail_idx = last_avail
            q.next_used_idx = next_used
        else:
            q.last_avail_idx = r.base
            host = self.space.translate_py(used, ring_sizes(r.num)[2], True)
            # used->idx as the driver last saw it (it equals base unless requests were in flight)
            q.next_used_idx = ctypes.c_uint16.from_address(host + 2).value
        r.running = True
        r.broken_logged = False

    def _stop_ring(self, r: _Vring) -> int:
        """Stop ``r`` (no more kicks served); returns its next available index."""
        base = r.base
        if r.running and self.queues is not None:
            base = self.queues[r.index].last_avail_idx
            self.queues[r.index].reset()
        if r.kick_fd >= 0:
            self.loop.remove(r.kick_fd)
            _close(r.kick_fd)
            r.kick_fd = -1
        r.base = base
        r.started = r.running = r.waiting_iotlb = False
        return base

    def _activate(self) -> None:
        iommu = self._has(U.VIRTIO_F_ACCESS_PLATFORM)
        self.space = self.iotlb if iommu else AddressSpace(self.memory)
        if iommu:
            self.iotlb.set_miss_eventfd(self._miss_fd)
        self.queues = [SplitQueue(self.space, r.max_size) for r in self.rings]
        self.ctx = DeviceContext(
            queues=self.queues, signal_used=self._signal_used, signal_config=self._signal_config,
            fail=self._fail, driver_features=self.acked_features, loop=self.loop, kick=self._kick)
        self.device.activate(self.ctx)
        log.info("%s: device activated (%s)", self.name, "IOVAs through the IOTLB" if iommu
                 else "guest-physical addresses")

    def _deactivate(self) -> None:
        if self.ctx is not None:
            self.device.reset()
            log.info("%s: device stopped (kicks served per ring: %s)", self.name,
                     " ".join(map(str, self.kicks)))
            if self.space is self.iotlb:
                log.info("%s: IOTLB: %d misses, %d updates, %d invalidations", self.name,
                         self.iotlb.misses, self.iotlb.updates, self.iotlb.invalidations)
        self.ctx = None
        self.queues = None
        self.space = None

    def _pairs_changed(self) -> None:
        """virtio-net: the queue pairs the front-end enabled are the ones in use (vhost-user
        carries VQ_PAIRS_SET as SET_VRING_ENABLE of each pair's rings)."""
        set_pairs = getattr(self.device, "set_active_pairs", None)
        if set_pairs is None or not self.active:
            return
        pairs = 0
        while 2 * pairs + 1 < len(self.rings) and self.rings[2 * pairs].enabled \
                and self.rings[2 * pairs + 1].enabled:
            pairs += 1
        set_pairs(max(pairs, 1))

    # ------------------------------------------------------------------ kicks and interrupts

    def _kicked(self, r: _Vring, read: bool = True) -> None:
        if read and r.kick_fd >= 0:
            try:
                os.eventfd_read(r.kick_fd)
            except (BlockingIOError, OSError):
                pass
        if not (r.running and r.enabled) or self.ctx is None:
            return
        if read:
            self.kicks[r.index] += 1
        self.device.queue_notify(r.index)
        q = self.queues[r.index] if self.queues is not None else None
        if q is not None and q.needs_reset and not r.waiting_iotlb:
            if self._has(U.VIRTIO_F_ACCESS_PLATFORM) and self._send_misses():
                r.waiting_iotlb = True
            else:
                self._ring_error(r, q.error)

    def _ring_error(self, r: _Vring, reason: str | None) -> None:
        if r.broken_logged:
            return
        r.broken_logged = True
        log.warning("%s: ring %d: %s; the ring stops until the front-end restarts it", self.name,
                    r.index, reason)
        if r.err_fd >= 0:
            try:
                os.eventfd_write(r.err_fd, 1)
            except OSError:
                pass

    def _signal(self, r: _Vring) -> None:
        if r.call_fd >= 0:
            try:
                os.eventfd_write(r.call_fd, 1)
            except OSError as e:
                log.debug("%s: ring %d call fd: %s", self.name, r.index, e.strerror)

    def _signal_used(self, index: int) -> None:
        self._signal(self.rings[index])

    def _signal_config(self) -> None:
        if self.protocol(PF.CONFIG) and self.protocol(PF.BACKEND_REQ):
            self.send_backend(P.BackendRequest.CONFIG_CHANGE_MSG, b"")

    def _fail(self, reason: str) -> None:
        log.warning("%s: %s; device needs reset", self.name, reason)
        for r in self.rings:
            if r.err_fd >= 0:
                try:
                    os.eventfd_write(r.err_fd, 1)
                except OSError:
                    pass

    def _kick(self, index: int) -> None:
        """Run queue_notify(index) on the loop thread (device-side kick, e.g. console input)."""
        r = self.rings[index]
        if r.kick_fd >= 0:
            try:
                os.eventfd_write(r.kick_fd, 1)
            except OSError:
                pass
