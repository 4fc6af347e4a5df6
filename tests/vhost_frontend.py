"""A vhost-user *front-end* in Python (the part QEMU plays), for the back-end's unit tests.

It owns the "guest memory" (a memfd mapped into this process, shared with the back-end through
SET_MEM_TABLE), lays rings out in it with :class:`virtio_driver.Driver`, and speaks the protocol
over the back-end's Unix socket, including messages no well-behaved front-end would send.
"""

from __future__ import annotations

import array
import os
import select
import socket

from hyperpy._fast import uapi as U
from hyperpy._fast.guestmem import GuestMemory
from hyperpy.vhost_user import protocol as P
from hyperpy.vhost_user.protocol import Request as R

from virtio_driver import Driver


class Frontend:
    def __init__(self, path, mem_size: int = 8 << 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.memfd = os.memfd_create("vhost-user-test", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size)
        self.mem_size = mem_size
        self.mem = GuestMemory()
        self.mem.add_region(0, mem_size, fd=self.memfd, shared=True)
        self.uva = self.mem.regions[0][2]       # "user address" of gpa 0 in this front-end
        self.fds: list[int] = []
        self.backend_sock: socket.socket | None = None
        self.features = 0

    def close(self) -> None:
        # Idempotent: closing an fd number twice could close whatever reused it (this process
        # also hosts the back-end under test).
        self.sock.close()
        for fd in self.fds + [self.memfd]:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = []
        self.memfd = -1
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None

    # ------------------------------------------------------------------ raw messages

    def send(self, req: int, payload: bytes = b"", fds=(), flags: int = P.VERSION,
             size: int | None = None) -> None:
        hdr = P.HEADER.pack(req, flags, len(payload) if size is None else size)
        if fds:
            self.sock.sendmsg([hdr + payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 array.array("i", fds))])
        else:
            self.sock.sendall(hdr + payload)

    def recv(self) -> tuple[int, int, bytes]:
        hdr = self._exact(P.HEADER_SIZE)
        req, flags, size = P.HEADER.unpack(hdr)
        return req, flags, self._exact(size)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise ConnectionError("back-end closed the connection")
            data += more
        return data

    def request(self, req: int, payload: bytes = b"", fds=(), ack: bool = True) -> bytes | int | None:
        """Send ``req``; return the reply payload (GET_*), the REPLY_ACK value (int, when
        ``ack``), or None."""
        flags = P.VERSION | (P.FLAG_NEED_REPLY if ack else 0)
        self.send(req, payload, fds, flags)
        if req in P.HAS_REPLY:
            rreq, rflags, body = self.recv()
            assert rreq == req and rflags & P.FLAG_REPLY
            return body
        if ack or req == R.IOTLB_MSG:
            rreq, rflags, body = self.recv()
            assert rreq == req and rflags & P.FLAG_REPLY, (rreq, rflags)
            return P.U64.unpack(body)[0]
        return None

    # ------------------------------------------------------------------ set-up steps

    def negotiate(self, features: int | None = None, protocol: int | None = None,
                  drop: int = 0) -> tuple[int, int]:
        """GET/SET_FEATURES and GET/SET_PROTOCOL_FEATURES (everything offered, minus ``drop``)."""
        offered = P.U64.unpack(self.request(R.GET_FEATURES))[0]
        pf = P.U64.unpack(self.request(R.GET_PROTOCOL_FEATURES))[0]
        proto = pf if protocol is None else protocol
        self.send(R.SET_PROTOCOL_FEATURES, P.u64(proto))
        self.request(R.SET_OWNER, ack=False)
        feats = (offered if features is None else features) & ~drop
        assert self.request(R.SET_FEATURES, P.u64(feats)) == 0
        self.features = feats
        return feats, proto

    def set_mem_table(self, regions=None, fds=None) -> int:
        """One region for the whole memfd by default; returns the ack."""
        if regions is None:
            regions = [(0, self.mem_size, self.uva, 0)]
        if fds is None:
            fds = [self.memfd] * len(regions)
        return self.request(R.SET_MEM_TABLE, P.pack_memory(regions), fds)

    def backend_channel(self) -> socket.socket:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        assert self.request(R.SET_BACKEND_REQ_FD, b"", [b.fileno()]) == 0
        b.close()
        a.settimeout(5)
        self.backend_sock = a
        return a

    def ring(self, index: int, size: int = 64, *, base: int, event_idx: bool | None = None,
             iova_offset: int | None = None, enable: bool = True) -> "Ring":
        """Lay out a ring at guest address ``base`` and hand it to the back-end.  Ring
        addresses are front-end user addresses, or (``iova_offset`` given) IOVAs =
        guest address + iova_offset.  EVENT_IDX follows the negotiated features."""
        if event_idx is None:
            event_idx = bool(self.features >> U.VIRTIO_RING_F_EVENT_IDX & 1)
        drv = Driver(self.mem, size, base=base, data=base + 0x10000, data_end=base + 0x80000,
                     event_idx=event_idx)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds += [kick, call]
        off = self.uva if iova_offset is None else iova_offset
        assert self.request(R.SET_VRING_NUM, P.pack_vring_state(index, size)) == 0
        assert self.request(R.SET_VRING_BASE, P.pack_vring_state(index, 0)) == 0
        r = self.request(R.SET_VRING_ADDR, P.pack_vring_addr(index, 0, drv.desc_addr + off,
                                                            drv.used_addr + off,
                                                            drv.avail_addr + off))
        assert r == 0, "SET_VRING_ADDR refused"
        assert self.request(R.SET_VRING_CALL, P.u64(index), [call]) == 0
        assert self.request(R.SET_VRING_KICK, P.u64(index), [kick]) == 0
        if enable:
            assert self.request(R.SET_VRING_ENABLE, P.pack_vring_state(index, 1)) == 0
        return Ring(self, index, drv, kick, call)


class Ring:
    def __init__(self, fe: Frontend, index: int, drv: Driver, kick: int, call: int) -> None:
        self.fe, self.index, self.drv, self.kick_fd, self.call_fd = fe, index, drv, kick, call

    def kick(self) -> None:
        if self.drv.event_idx:      # interrupt me for the next completion (as Linux does)
            self.drv.set_used_event(self.drv.last_used)
        os.eventfd_write(self.kick_fd, 1)

    def wait_call(self, timeout: float = 5.0) -> bool:
        r, _, _ = select.select([self.call_fd], [], [], timeout)
        if not r:
            return False
        os.eventfd_read(self.call_fd)
        return True

    def wait_used(self, n: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        while len(got) < n:
            assert self.wait_call(timeout), f"no interrupt on ring {self.index} ({len(got)}/{n} used)"
            got += self.drv.get_used()
        return got
