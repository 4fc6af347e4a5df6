"""A small HTTP/1.1 server on a Unix domain socket (stdlib only).

It serves the control API of :mod:`hyperpy.api.server` and is built to survive its clients:

- every size is bounded (request line and headers :data:`MAX_HEADER_BYTES`, body
  :data:`MAX_BODY_BYTES`, :data:`MAX_CONNECTIONS` connections at once);
- every read has a deadline: a request must arrive whole within :data:`REQUEST_TIMEOUT` seconds
  of its first byte, and an idle keep-alive connection is closed after :data:`IDLE_TIMEOUT`;
- malformed requests get a 4xx answer and the connection is closed; nothing a client sends
  raises out of the connection's thread.

Connections are served by one thread each (at most :data:`MAX_CONNECTIONS`); the accept loop has
its own thread, so the VMM's main thread and the vCPU threads never wait for a client.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 64
MAX_BODY_BYTES = 1024 * 1024
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0
IDLE_TIMEOUT = 30.0
SEND_TIMEOUT = 5.0

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
METHODS = frozenset({"GET", "PUT", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class HttpError(Exception):
    """A request that cannot be served: answered with ``status`` and ``message``, and (unless
    ``keep``) the connection is closed afterwards."""

    def __init__(self, status: int, message: str, keep: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.keep = keep


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    after: Callable[[], None] | None = None     # called once the response is sent

    @classmethod
    def text(cls, status: int, message: str, **headers: str) -> "Response":
        return cls(status, (message.rstrip("\n") + "\n").encode(), "text/plain; charset=utf-8",
                   dict(headers))

    def encode(self, close: bool, head: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}", "Server: hyperpy"]
        body = b"" if self.status in (204, 304) or self.status < 200 else self.body
        if self.status >= 200 and self.status != 204:
            lines.append(f"Content-Length: {len(body)}")
            if body:
                lines.append(f"Content-Type: {self.content_type}")
        lines.extend(f"{k}: {v}" for k, v in self.headers.items())
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


# --------------------------------------------------------------------------- parsing


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and header block (without the final CRLF CRLF) -> method, target, version,
    headers (names lower-case).  Raises :class:`HttpError` for anything malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:          # latin-1 decodes every byte; kept for clarity
        raise HttpError(400, "request head is not latin-1") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(400, f"malformed request line {lines[0][:80]!r} (want METHOD TARGET HTTP/1.1)")
    method, target, version = parts
    if not method.isascii() or not set(method.encode()) <= _TOKEN:
        raise HttpError(400, f"malformed method {method[:20]!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/") and version[5:6].isdigit():
            raise HttpError(505, f"{version[:16]} is not supported (use HTTP/1.1)")
        raise HttpError(400, f"malformed HTTP version {version[:16]!r}")
    if not target.startswith("/") or any(ord(c) <= 0x20 or ord(c) >= 0x7f for c in target):
        raise HttpError(400, f"malformed request target {target[:80]!r} (want an absolute path)")
    headers: dict[str, str] = {}
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    for line in lines[1:]:
        if not line:
            raise HttpError(400, "empty line inside the header block")
        if line[0] in " \t":
            raise HttpError(400, "folded header lines are not accepted")
        name, colon, value = line.partition(":")
        if not colon or not name or not name.isascii() or not set(name.encode()) <= _TOKEN:
            raise HttpError(400, f"malformed header line {line[:60]!r}")
        if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7f for c in value):
            raise HttpError(400, f"control character in header {name[:30]!r}")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key in ("content-length", "host", "transfer-encoding"):
                if headers[key] != value:
                    raise HttpError(400, f"header {name!r} given twice with different values")
                continue
            headers[key] = headers[key] + ", " + value
        else:
            headers[key] = value
    if version == "HTTP/1.1" and "host" not in headers:
        # RFC 9112 wants a Host header; clients on Unix sockets send "localhost" or nothing
        # useful, so its absence is tolerated rather than refused.
        pass
    return method, target, version, headers


def content_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported (send the body with Content-Length)")
    raw = headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isdigit() or len(raw) > 12:
        raise HttpError(400, f"Content-Length {raw[:20]!r} is not a number")
    n = int(raw)
    if n > MAX_BODY_BYTES:
        raise HttpError(413, f"body of {n} bytes is too large (at most {MAX_BODY_BYTES})")
    return n


def wants_close(version: str, headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" not in tokens
    return "close" in tokens


# --------------------------------------------------------------------------- connection


class _Reader:
    """Buffered reads from a socket with an absolute deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self, first_deadline: float) -> bytes | None:
        """The bytes up to CRLF CRLF (excluded), None on a clean EOF before any byte."""
        deadline = first_deadline
        started = bool(self.buf)
        if started:
            deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            # Leading empty lines before a request line are allowed (RFC 9112 2.2).
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                if end > MAX_HEADER_BYTES:
                    raise HttpError(431, f"request head is longer than {MAX_HEADER_BYTES} bytes")
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > MAX_HEADER_BYTES:
                if b"\r\n" not in self.buf:
                    raise HttpError(414, f"request line is longer than {MAX_HEADER_BYTES} bytes")
                raise HttpError(431, f"request head is longer than {MAX_HEADER_BYTES} bytes")
            if not self._fill(deadline):
                if self.buf:
                    raise HttpError(400, "connection closed in the middle of a request head")
                return None
            if not started:
                started = True
                deadline = time.monotonic() + REQUEST_TIMEOUT

    def read_body(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise HttpError(400, f"connection closed after {len(self.buf)} of {n} body bytes")
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return body


Handler = Callable[[Request], Response]


class UnixHttpServer:
    """Serves ``handler`` on a Unix socket at ``path`` (created mode 0600; an existing path is
    refused, never replaced).  :meth:`start` returns at once; :meth:`close` stops and unlinks."""

    def __init__(self, path: str, handler: Handler, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.path = path
        self.handler = handler
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refusers = threading.BoundedSemaphore(max_connections)   # threads answering 503
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._sock = self._bind(path)
        self._ino = os.stat(path).st_ino
        self.requests = 0
        self.rejected = 0

    @staticmethod
    def _bind(path: str) -> socket.socket:
        from ..errors import ConfigError

        if not path:
            raise ConfigError("--api-socket: empty path (e.g. --api-socket path=/run/hyperpy.sock)")
        if os.path.lexists(path):
            what = "a socket (another hyperpy may be using it; remove it if stale)" \
                if stat.S_ISSOCK(os.lstat(path).st_mode) else "not a socket"
            raise ConfigError(f"--api-socket: {path} already exists and is {what}",
                              "remove it or choose another path")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ConfigError(f"--api-socket: no such directory: {parent}")
        if len(os.fsencode(path)) > 107:
            raise ConfigError(f"--api-socket: {path} is longer than 107 bytes (a Unix socket path limit)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)      # the socket file is created 0600 by bind()
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--api-socket: cannot create {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        return sock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="api-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, close open connections, unlink the socket (if it is still ours)."""
        if self._closing.is_set():
            return
        self._closing.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    # --- accepting --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._closing.is_set():
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("API socket: accept failed: %s", e.strerror)
                    time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                self.rejected += 1
                self._refuse(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()
            except RuntimeError:        # cannot start a thread: answer 503 instead
                self._slots.release()
                self._refuse(conn)

    def _refuse(self, conn: socket.socket) -> None:
        """Answer 503 and close, on a short-lived thread of its own (bounded) so that a slow
        client cannot stall the accept loop; past that bound the connection is just closed."""
        if self._refusers.acquire(blocking=False):
            try:
                threading.Thread(target=self._refuse_now, args=(conn,), name="api-503",
                                 daemon=True).start()
                return
            except RuntimeError:
                self._refusers.release()
        conn.close()

    def _refuse_now(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(0.5)
            conn.sendall(Response.text(503, "too many API connections; retry later").encode(close=True))
            # Read what the client is still sending (bounded) before closing, so that its
            # write does not fail with EPIPE before it can read the 503.
            conn.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + 1.0, MAX_BODY_BYTES
            while left > 0 and time.monotonic() < deadline:
                chunk = conn.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        finally:
            conn.close()
            self._refusers.release()

    # --- one connection ---------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            self._serve_requests(conn)
        except Exception:  # never let a client take the thread down with a traceback
            log.exception("API connection failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            finally:
                self._slots.release()

    def _send(self, conn: socket.socket, data: bytes) -> bool:
        try:
            conn.settimeout(SEND_TIMEOUT)
            conn.sendall(data)
            return True
        except OSError:
            return False

    def _serve_requests(self, conn: socket.socket) -> None:
        reader = _Reader(conn)
        while not self._closing.is_set():
            try:
                head = reader.read_head(time.monotonic() + IDLE_TIMEOUT)
                if head is None:
                    return
                method, target, version, headers = parse_head(head)
                n = content_length(headers)
                if n and headers.get("expect", "").lower() == "100-continue":
                    if not self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n"):
                        return
                body = reader.read_body(n, time.monotonic() + REQUEST_TIMEOUT)
            except HttpError as e:
                self._send(conn, Response.text(e.status, e.message).encode(close=True))
                return
            except TimeoutError:
                if reader.buf:
                    self._send(conn, Response.text(408, "request not received in time").encode(close=True))
                return
            except OSError:
                return
            close = wants_close(version, headers)
            req = Request(method, target, version, headers, body)
            self.requests += 1
            try:
                resp = self.handler(req)
            except Exception as e:   # a handler bug is a 500 for this request, not a dead server
                log.exception("API handler failed for %s %s", method, target)
                resp = Response.text(500, f"internal error: {e}")
            close = close or resp.after is not None
            sent = self._send(conn, resp.encode(close, head=method == "HEAD"))
            if resp.after is not None:
                try:
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                resp.after()
            if close or not sent:
                return
