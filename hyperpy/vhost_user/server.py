"""The vhost-user back-end server: a listening Unix socket, one front-end connection at a time.

Messages are read on hyperpy's :class:`~hyperpy.eventloop.EventLoop` thread -- the same thread
that serves the kicks -- so a request never races the device code.  Each message is checked
(version, payload size, number of file descriptors) before :class:`VhostUserTransport` applies
it; a request that cannot be applied gets the protocol's error path and one log line:

* a request with ``NEED_REPLY`` (``VHOST_USER_PROTOCOL_F_REPLY_ACK`` negotiated) or an
  ``IOTLB_MSG`` gets a ``u64`` reply, 0 for success and 1 for a refusal;
* a request that has a reply of its own (GET_*) gets a reply with an empty payload, which the
  protocol reads as an error (``GET_CONFIG`` says so; QEMU checks every reply's size);
* file descriptors that came with a refused (or any unneeded) message are closed;
* a header announcing more than :data:`~hyperpy.vhost_user.protocol.MAX_PAYLOAD` bytes, a
  truncated message or a read error closes the connection (the stream cannot be resynchronised);
  the server keeps listening and the next front-end starts afresh (reconnection).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
import threading
from pathlib import Path

from ..errors import DeviceError
from . import protocol as P
from .protocol import Request as R
from .transport import Refused, VhostUserTransport

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0       # seconds a front-end may take to send the rest of a started message


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Disconnect(Exception):
    """The connection is unusable (EOF, truncated or oversized message)."""


def recv_message(sock: socket.socket) -> P.Message:
    """Read one message (header, fds, payload) from ``sock``; raises _Disconnect."""
    fd_bytes = P.MAX_FDS * array.array("i").itemsize
    try:
        data, anc, msg_flags, _ = sock.recvmsg(P.HEADER_SIZE, socket.CMSG_SPACE(fd_bytes),
                                               socket.MSG_CMSG_CLOEXEC)
    except (OSError, socket.timeout) as e:
        raise _Disconnect(f"read failed: {e}") from None
    fds: list[int] = []
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
            fds.extend(a)
    if not data:
        _close_fds(fds)
        raise _Disconnect("front-end closed the connection")
    try:
        while len(data) < P.HEADER_SIZE:
            more = sock.recv(P.HEADER_SIZE - len(data))
            if not more:
                raise _Disconnect("connection closed inside a message header")
            data += more
        request, flags, size = P.HEADER.unpack(data)
        if size > P.MAX_PAYLOAD:
            raise _Disconnect(f"{P.request_name(request)} announces a {size}-byte payload, more "
                              f"than the {P.MAX_PAYLOAD} bytes any request needs")
        payload = b""
        while len(payload) < size:
            more = sock.recv(size - len(payload))
            if not more:
                raise _Disconnect(f"connection closed inside the payload of {P.request_name(request)}")
            payload += more
    except (OSError, socket.timeout) as e:
        _close_fds(fds)
        raise _Disconnect(f"read failed: {e}") from None
    except _Disconnect:
        _close_fds(fds)
        raise
    m = P.Message(request, flags, payload, fds)
    if msg_flags & socket.MSG_CTRUNC:
        m.flags |= 1 << 31      # remembered: more fds were sent than accepted
    return m


def send_message(sock: socket.socket, request: int, payload: bytes = b"", flags: int = P.VERSION,
                 fds: list[int] | tuple = ()) -> None:
    data = P.encode(request, payload, flags)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


# Expected payload sizes (None: variable, checked by the handler) and fds per request.
_U64 = P.U64.size
_STATE = P.VRING_STATE_SIZE
PAYLOAD = {
    R.GET_FEATURES: 0, R.SET_FEATURES: _U64, R.SET_OWNER: 0, R.RESET_OWNER: 0,
    R.SET_MEM_TABLE: None, R.SET_VRING_NUM: _STATE, R.SET_VRING_ADDR: P.VRING_ADDR_SIZE,
    R.SET_VRING_BASE: _STATE, R.GET_VRING_BASE: _STATE, R.SET_VRING_KICK: _U64,
    R.SET_VRING_CALL: _U64, R.SET_VRING_ERR: _U64, R.GET_PROTOCOL_FEATURES: 0,
    R.SET_PROTOCOL_FEATURES: _U64, R.GET_QUEUE_NUM: 0, R.SET_VRING_ENABLE: _STATE,
    R.SET_BACKEND_REQ_FD: 0, R.IOTLB_MSG: P.IOTLB_MSG_SIZE, R.GET_CONFIG: None,
    R.SET_CONFIG: None, R.RESET_DEVICE: 0,
}


class VhostUserServer:
    """Serves ``transport``'s device on the Unix socket ``path`` (created; removed on close)."""

    def __init__(self, transport: VhostUserTransport, path: Path | str, loop) -> None:
        self.transport = transport
        self.path = Path(path)
        self.loop = loop
        self.conn: socket.socket | None = None
        self.backend: socket.socket | None = None
        self.connections = 0
        self.refused = 0               # requests answered with the error path (for tests)
        # The event-loop thread serves messages and drops dead connections; close() comes from
        # another thread: one lock makes a drop (and its fd closes) happen exactly once.
        self._lock = threading.RLock()
        transport.send_backend = self.send_backend
        self.listener = self._listen()
        loop.add(self.listener.fileno(), self._accept)

    def _listen(self) -> socket.socket:
        p = self.path
        try:
            if stat.S_ISSOCK(os.lstat(p).st_mode):
                os.unlink(p)           # a stale socket of an earlier back-end
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DeviceError(f"--socket {p}: {e.strerror}") from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(str(p))
            s.listen(1)
        except OSError as e:
            s.close()
            raise DeviceError(f"--socket {p}: cannot listen there: {e.strerror}",
                              "give a path in a writable directory that is not an existing file") from None
        return s

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        with self._lock:
            self._accept_locked()

    def _accept_locked(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        if self.conn is not None:
            log.warning("%s: a second front-end connected while one is served; refused",
                        self.transport.name)
            conn.close()
            return
        conn.settimeout(READ_TIMEOUT)
        self.conn = conn
        self.connections += 1
        log.info("%s: front-end connected on %s", self.transport.name, self.path)
        self.loop.add(conn.fileno(), self._readable)

    def _drop_connection(self, why: str) -> None:
        with self._lock:
            self._drop_locked(why)

    def _drop_locked(self, why: str) -> None:
        conn = self.conn
        if conn is None:
            return
        self.loop.remove(conn.fileno())
        log.info("%s: front-end disconnected (%s); waiting for the next one",
                 self.transport.name, why)
        self.transport.disconnect()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        conn.close()
        self.conn = None

    def close(self) -> None:
        with self._lock:
            self._drop_locked("back-end shutting down")
            if self.listener.fileno() >= 0:
                self.loop.remove(self.listener.fileno())
            self.listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass

    # ------------------------------------------------------------------ messages

    def _readable(self) -> None:
        with self._lock:
            self._readable_locked()

    def _readable_locked(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            msg = recv_message(conn)
        except _Disconnect as e:
            if "closed the connection" not in str(e):
                log.warning("%s: %s; connection closed", self.transport.name, e)
            self._drop_connection(str(e))
            return
        try:
            self.handle(msg)
        except _Disconnect as e:
            log.warning("%s: %s; connection closed", self.transport.name, e)
            self._drop_connection(str(e))
        finally:
            _close_fds(msg.fds)   # whatever the handler did not take

    def _reply(self, msg: P.Message, payload: bytes) -> None:
        try:
            send_message(self.conn, msg.request, payload, P.VERSION | P.FLAG_REPLY)
        except OSError as e:
            raise _Disconnect(f"reply to {msg.name} failed: {e.strerror}") from None

    def handle(self, msg: P.Message) -> None:
        t = self.transport
        reply: bytes | None = None
        ok = True
        try:
            reply = self._apply(msg)
        except Refused as e:
            ok = False
            self.refused += 1
            log.warning("%s: %s refused: %s", t.name, msg.name, e.what)
        except (_Disconnect, KeyboardInterrupt, SystemExit):
            raise
        except Exception:       # a back-end bug: refuse the request, keep serving
            ok = False
            self.refused += 1
            log.exception("%s: %s failed inside the back-end; refused", t.name, msg.name)
        if msg.request in P.HAS_REPLY:
            self._reply(msg, reply if ok and reply is not None else b"")
        elif msg.request == R.IOTLB_MSG or (msg.need_reply and t.protocol(P.ProtocolFeature.REPLY_ACK)):
            self._reply(msg, P.u64(0 if ok else 1))

    def _apply(self, msg: P.Message) -> bytes | None:
        t = self.transport
        if msg.flags & P.FLAG_VERSION_MASK != P.VERSION:
            raise Refused(f"protocol version {msg.flags & P.FLAG_VERSION_MASK} (flags {msg.flags:#x}); "
                          f"only version {P.VERSION} is spoken")
        if msg.flags & (1 << 31):
            raise Refused(f"more than {P.MAX_FDS} file descriptors came with it")
        try:
            req = R(msg.request)
        except ValueError:
            raise Refused(f"unknown request number {msg.request}") from None
        want = PAYLOAD.get(req, -1)
        if want == -1:
            raise Refused(f"{req.name} is not supported by this back-end (its protocol feature was "
                          f"not offered)")
        if want is not None and len(msg.payload) != want:
            raise Refused(f"payload of {len(msg.payload)} bytes, expected {want}")
        fds_wanted = {R.SET_MEM_TABLE: None, R.SET_VRING_KICK: None, R.SET_VRING_CALL: None,
                      R.SET_VRING_ERR: None, R.SET_BACKEND_REQ_FD: 1}.get(req, 0)
        if fds_wanted is not None and len(msg.fds) != fds_wanted:
            raise Refused(f"{len(msg.fds)} file descriptors came with it, expected {fds_wanted}")
        if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            value = P.U64.unpack(msg.payload)[0]
            nofd = bool(value & P.VRING_NOFD)
            if value & ~(P.VRING_INDEX_MASK | P.VRING_NOFD):
                raise Refused(f"value {value:#x} has bits other than the ring index and NOFD")
            if len(msg.fds) != (0 if nofd else 1):
                raise Refused(f"{len(msg.fds)} file descriptors with NOFD={int(nofd)}")
        if req in (R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_VRING_ENABLE,
                   R.GET_QUEUE_NUM, R.SET_BACKEND_REQ_FD, R.GET_CONFIG, R.SET_CONFIG,
                   R.RESET_DEVICE) and not t.features >> P.F_PROTOCOL_FEATURES & 1:
            raise Refused("protocol features are not offered")
        if req == R.GET_QUEUE_NUM and not t.protocol_features >> P.ProtocolFeature.MQ & 1:
            raise Refused("needs VHOST_USER_PROTOCOL_F_MQ offered")
        needs_pf = {R.SET_BACKEND_REQ_FD: P.ProtocolFeature.BACKEND_REQ,
                    R.GET_CONFIG: P.ProtocolFeature.CONFIG, R.SET_CONFIG: P.ProtocolFeature.CONFIG,
                    R.RESET_DEVICE: P.ProtocolFeature.RESET_DEVICE}.get(req)
        if needs_pf is not None and not t.protocol(needs_pf):
            raise Refused(f"needs VHOST_USER_PROTOCOL_F_{needs_pf.name} negotiated")
        u = lambda: P.U64.unpack(msg.payload)[0]      # noqa: E731
        if req == R.GET_FEATURES:
            return t.get_features()
        if req == R.SET_FEATURES:
            t.set_features(u())
        elif req == R.SET_OWNER:
            t.owner = True
        elif req == R.RESET_OWNER:
            t.reset_device()   # deprecated: disable every ring (the spec's recommendation)
        elif req == R.GET_PROTOCOL_FEATURES:
            return t.get_protocol_features()
        elif req == R.SET_PROTOCOL_FEATURES:
            t.set_protocol_features(u())
        elif req == R.SET_MEM_TABLE:
            t.set_mem_table(msg.payload, msg.fds)
        elif req == R.SET_VRING_NUM:
            t.set_vring_num(*P.unpack_vring_state(msg.payload))
        elif req == R.SET_VRING_ADDR:
            t.set_vring_addr(msg.payload)
        elif req == R.SET_VRING_BASE:
            t.set_vring_base(*P.unpack_vring_state(msg.payload))
        elif req == R.GET_VRING_BASE:
            return t.get_vring_base(P.unpack_vring_state(msg.payload)[0])
        elif req == R.SET_VRING_KICK:
            t.set_vring_kick(u(), msg.fds)
        elif req == R.SET_VRING_CALL:
            t.set_vring_call(u(), msg.fds)
        elif req == R.SET_VRING_ERR:
            t.set_vring_err(u(), msg.fds)
        elif req == R.GET_QUEUE_NUM:
            return P.u64(t.queue_num)
        elif req == R.SET_VRING_ENABLE:
            t.set_vring_enable(*P.unpack_vring_state(msg.payload))
        elif req == R.SET_BACKEND_REQ_FD:
            self._set_backend(msg.fds.pop(0))
        elif req == R.IOTLB_MSG:
            t.iotlb_msg(msg.payload)
        elif req == R.GET_CONFIG:
            return t.get_config(msg.payload)
        elif req == R.SET_CONFIG:
            t.set_config(msg.payload)
        elif req == R.RESET_DEVICE:
            t.reset_device()
        return None

    # ------------------------------------------------------------------ back-end channel

    def _set_backend(self, fd: int) -> None:
        try:
            s = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise Refused(f"back-end channel fd is not a socket: {e.strerror}") from None
        if s.family != socket.AF_UNIX:
            s.close()
            raise Refused("back-end channel fd is not a Unix socket")
        if self.backend is not None:
            self.backend.close()
        s.setblocking(True)
        s.settimeout(READ_TIMEOUT)
        self.backend = s

    def send_backend(self, request: int, payload: bytes) -> bool:
        """Send a back-end request (no reply asked for); False without a channel."""
        if self.backend is None:
            return False
        try:
            send_message(self.backend, request, payload)
        except OSError as e:
            log.warning("%s: back-end channel write failed (%s); channel dropped",
                        self.transport.name, e)
            self.backend.close()
            self.backend = None
            return False
        return True
