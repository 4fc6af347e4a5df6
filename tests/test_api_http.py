"""The API's HTTP/1.1 server (hyperpy.api.http) without a VM: parsing, limits, timeouts,
concurrency, the socket file."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
import time

import pytest

from api_util import parse_responses, raw_exchange
from hyperpy.api import http
from hyperpy.api.http import HttpError, Response, UnixHttpServer, content_length, parse_head, wants_close
from hyperpy.errors import ConfigError


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="hpapi", dir="/tmp")   # short: Unix socket paths max 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def echo_handler(req: http.Request) -> Response:
    if req.path == "/boom":
        raise RuntimeError("handler bug")
    return Response(200, f"{req.method} {req.path} {len(req.body)}".encode(), "text/plain")


@pytest.fixture
def server(sockdir):
    srv = UnixHttpServer(os.path.join(sockdir, "api.sock"), echo_handler, max_connections=4)
    srv.start()
    yield srv
    srv.close()


# --------------------------------------------------------------------------- parser


def test_parse_head_reads_request_line_and_headers():
    method, target, version, headers = parse_head(
        b"PUT /api/v1/vm.create?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 12\r\nX-A: 1\r\nx-a: 2")
    assert (method, target, version) == ("PUT", "/api/v1/vm.create?x=1", "HTTP/1.1")
    assert headers == {"host": "localhost", "content-length": "12", "x-a": "1, 2"}
    assert content_length(headers) == 12


@pytest.mark.parametrize("head,status", [
    (b"GET /api/v1/vmm.ping", 400),                         # no version
    (b"GET  /x HTTP/1.1", 400),                              # double space
    (b"G@T /x HTTP/1.1", 400),                               # not a token
    (b"GET x HTTP/1.1", 400),                                # not an absolute path
    (b"GET /a\x01b HTTP/1.1", 400),                          # control character in the target
    (b"GET /x HTTP/2.0", 505),
    (b"GET /x HTTX/1.1", 400),
    (b"GET /x HTTP/1.1\r\n folded: no", 400),
    (b"GET /x HTTP/1.1\r\nno colon", 400),
    (b"GET /x HTTP/1.1\r\nbad name: v", 400),
    (b"GET /x HTTP/1.1\r\nX: a\x00b", 400),
    (b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", 400),
])
def test_parse_head_refuses_malformed(head, status):
    with pytest.raises(HttpError) as e:
        parse_head(head)
    assert e.value.status == status


def test_too_many_headers():
    head = b"GET /x HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(http.MAX_HEADERS + 1))
    with pytest.raises(HttpError) as e:
        parse_head(head.rstrip(b"\r\n"))
    assert e.value.status == 431


@pytest.mark.parametrize("headers,status", [
    ({"content-length": "-1"}, 400), ({"content-length": "1e3"}, 400),
    ({"content-length": str(http.MAX_BODY_BYTES + 1)}, 413), ({"transfer-encoding": "chunked"}, 501),
])
def test_content_length_limits(headers, status):
    with pytest.raises(HttpError) as e:
        content_length(headers)
    assert e.value.status == status


def test_keep_alive_rules():
    assert not wants_close("HTTP/1.1", {})
    assert wants_close("HTTP/1.1", {"connection": "Close"})
    assert wants_close("HTTP/1.0", {})
    assert not wants_close("HTTP/1.0", {"connection": "keep-alive"})


# --------------------------------------------------------------------------- socket file


def test_socket_is_0600_and_unlinked_on_close(sockdir):
    path = os.path.join(sockdir, "a.sock")
    srv = UnixHttpServer(path, echo_handler)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    srv.start()
    srv.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("kind", ["file", "socket"])
def test_existing_path_is_not_replaced(sockdir, kind):
    path = os.path.join(sockdir, "taken")
    if kind == "file":
        with open(path, "w") as f:
            f.write("keep me")
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
    with pytest.raises(ConfigError, match=r"--api-socket: .*taken already exists.*remove it or choose another path"):
        UnixHttpServer(path, echo_handler)
    assert os.path.lexists(path)
    if kind == "file":
        assert open(path).read() == "keep me"


def test_missing_directory_is_one_line_error(sockdir):
    with pytest.raises(ConfigError, match="no such directory"):
        UnixHttpServer(os.path.join(sockdir, "nope", "a.sock"), echo_handler)


# --------------------------------------------------------------------------- serving


def test_keep_alive_serves_pipelined_requests(server):
    raw = raw_exchange(server.path, b"GET /a HTTP/1.1\r\n\r\n"
                       b"PUT /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz"
                       b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n")
    replies = parse_responses(raw)
    assert [(s, b) for s, _, b in replies] == [(200, b"GET /a 0"), (200, b"PUT /b 3"), (200, b"GET /c 0")]
    assert replies[-1][1]["connection"] == "close"


def test_expect_100_continue(server):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(server.path)
    s.sendall(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"abcd")
    assert s.recv(1000).endswith(b"PUT /x 4")
    s.close()


@pytest.mark.parametrize("data,status", [
    (b"GET /" + b"a" * (http.MAX_HEADER_BYTES + 10), 414),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * (http.MAX_HEADER_BYTES + 10), 431),
    (b"PUT / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),     # a TLS hello
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
])
def test_bad_requests_get_an_error_and_the_server_stays_up(server, data, status):
    replies = parse_responses(raw_exchange(server.path, data))
    assert [r[0] for r in replies] == [status]
    assert replies[0][1]["connection"] == "close"
    assert parse_responses(raw_exchange(server.path, b"GET /ok HTTP/1.1\r\n\r\n"))[0][2] == b"GET /ok 0"


def test_handler_exception_is_500_not_a_dead_server(server):
    replies = parse_responses(raw_exchange(server.path, b"GET /boom HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\r\n\r\n"))
    assert [r[0] for r in replies] == [500, 200]
    assert b"handler bug" in replies[0][2]


def test_body_cut_short_is_400(server):
    replies = parse_responses(raw_exchange(server.path, b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"))
    assert [r[0] for r in replies] == [400]


def test_slow_client_is_timed_out(server, monkeypatch):
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.3)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(server.path)
    s.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")          # and never the rest
    t0 = time.monotonic()
    data = b""
    while chunk := s.recv(1000):
        data += chunk
    assert time.monotonic() - t0 < 3
    assert parse_responses(data)[0][0] == 408
    s.close()


def test_idle_connection_is_closed(server, monkeypatch):
    monkeypatch.setattr(http, "IDLE_TIMEOUT", 0.3)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(server.path)
    assert s.recv(10) == b""          # closed without a reply: it never asked anything
    s.close()


def test_connection_limit_answers_503_and_frees_slots(server):
    idle = []
    for _ in range(server.max_connections):
        s = socket.socket(socket.AF_UNIX)
        s.connect(server.path)
        idle.append(s)
    time.sleep(0.2)
    replies = parse_responses(raw_exchange(server.path, b"GET / HTTP/1.1\r\n\r\n"))
    assert replies[0][0] == 503
    for s in idle:
        s.close()
    time.sleep(0.2)
    assert parse_responses(raw_exchange(server.path, b"GET /x HTTP/1.1\r\n\r\n"))[0][0] == 200


def test_concurrent_clients(server):
    results = []

    def client(i):
        r = parse_responses(raw_exchange(server.path, f"PUT /c{i} HTTP/1.1\r\nContent-Length: {i}\r\n\r\n".encode()
                                         + b"x" * i))
        results.append(r[0][2])

    # More clients than connection slots: some may get 503, and each one gets an answer.
    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 12
    ok = [r for r in results if not r.startswith(b"too many")]
    assert ok and all(r == f"PUT /c{r.split(b'/c')[1].split()[0].decode()} {int(r.split()[-1])}".encode()
                      for r in ok)
