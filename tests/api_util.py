"""Helpers of the API tests: the shared OpenAPI spec, a raw HTTP client on a Unix socket, the
status-conformance rule, and a `hyperpy run --api-socket` subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

SPEC_PATH = Path(__file__).resolve().parent / "data" / "cloud-hypervisor-api.yaml"

# The endpoints hyperpy implements: path -> method.
IMPLEMENTED = {
    "/vmm.ping": "get", "/vmm.shutdown": "put", "/vm.create": "put", "/vm.boot": "put",
    "/vm.info": "get", "/vm.counters": "get", "/vm.pause": "put", "/vm.resume": "put",
    "/vm.shutdown": "put", "/vm.reboot": "put", "/vm.power-button": "put", "/vm.delete": "put",
}

# Statuses every endpoint may answer besides those the spec lists for it: the spec describes
# only successes and state errors, and a request that is malformed (400), too large (413, 431),
# for no VM (404), with the wrong method (405), in conflict with the VM's state (409: create
# over an existing VM, boot of a booted one), or in an unsupported HTTP form (501, 505) gets the
# matching 4xx/5xx.  500 (the VMM failed) and anything else is not conformant.
GENERIC_ERRORS = frozenset({400, 404, 405, 409, 413, 414, 431, 501, 505})


@lru_cache(maxsize=1)
def spec() -> dict:
    import yaml

    return yaml.safe_load(SPEC_PATH.read_text())


def documented_statuses(path: str, method: str) -> set[int]:
    op = spec()["paths"][path][method]
    return {int(s) for s in op["responses"]}


def status_conforms(path: str, method: str, status: int) -> bool:
    if path in IMPLEMENTED and IMPLEMENTED[path] == method.lower():
        return status in documented_statuses(path, method.lower()) or status in GENERIC_ERRORS
    return status in GENERIC_ERRORS


@lru_cache(maxsize=None)
def _validator(ref: str):
    from openapi_schema_validator import OAS30Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    registry = Registry().with_resource("urn:ch-api", Resource.from_contents(spec(), default_specification=DRAFT4))
    return OAS30Validator({"$ref": f"urn:ch-api{ref}"}, registry=registry)


def schema_errors(ref: str, value) -> list[str]:
    """Validation errors of ``value`` against ``#/components/schemas/NAME`` (as ``ref``)."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(ref).iter_errors(value)]


def validate_response(path: str, method: str, status: int, body: bytes) -> None:
    """Assert the status is documented or a generic error and a JSON body matches its schema."""
    assert status_conforms(path, method, status), f"{method} {path}: status {status} is not conformant"
    op = spec()["paths"][path][method.lower()]
    resp = op["responses"].get(status) or op["responses"].get(str(status))
    content = (resp or {}).get("content")
    if content and "application/json" in content:
        schema = content["application/json"]["schema"]
        errors = schema_errors(schema["$ref"], json.loads(body))
        assert not errors, f"{method} {path} {status}: body does not match the spec: {errors}"
    elif status == 204:
        assert body == b"", f"{method} {path}: 204 with a body"


# --------------------------------------------------------------------------- raw HTTP


def raw_exchange(sock_path: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection, shut the write side, read until EOF."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        s.close()


def parse_responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every response in ``raw`` (keep-alive replies come back to back)."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"truncated response head {raw[:80]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        out.append((int(status), headers, rest[:n]))
        raw = rest[n:]
    return out


def request(sock_path: str, method: str, path: str, body: bytes | None = None,
            timeout: float = 30.0) -> tuple[int, bytes]:
    head = f"{method} /api/v1{path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    data = body or b""
    if body is not None or method in ("PUT", "POST"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    replies = parse_responses(raw_exchange(sock_path, head.encode() + b"\r\n" + data, timeout))
    assert len(replies) == 1, replies
    return replies[0][0], replies[0][2]


def checked(sock_path: str, method: str, path: str, body=None, expect: int | None = None):
    """A request whose reply is validated against the spec; returns (status, decoded JSON or
    the text)."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    status, reply = request(sock_path, method, path, data)
    validate_response(path, method, status, reply)
    if expect is not None:
        assert status == expect, f"{method} {path}: {status} {reply!r}"
    if reply and status == 200:
        return status, json.loads(reply)
    return status, reply.decode()


# --------------------------------------------------------------------------- the VMM process


class ApiProcess:
    """``python -m hyperpy run --api-socket path=SOCK ARGS...`` in the background."""

    def __init__(self, sock: Path, *args: str, env: dict | None = None) -> None:
        self.sock = str(sock)
        e = dict(os.environ)
        e.update(env or {})
        self.stderr_path = Path(tempfile.mkstemp(prefix="hyperpy-api-", suffix=".log")[1])
        self._err = open(self.stderr_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "hyperpy", "run", "--api-socket",
                                      f"path={sock}", *args], stdout=subprocess.DEVNULL,
                                     stderr=self._err, stdin=subprocess.DEVNULL, env=e,
                                     cwd=tempfile.gettempdir())

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from the start until vmm.ping answered 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"hyperpy exited with {self.proc.returncode}: {self.stderr()}")
            try:
                status, _ = request(self.sock, "GET", "/vmm.ping", timeout=5)
                if status == 200:
                    return time.monotonic() - self.t0
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            time.sleep(0.002)
        raise AssertionError(f"no vmm.ping answer within {timeout} s: {self.stderr()}")

    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()
        return self.proc.returncode

    def __enter__(self) -> "ApiProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            self.stderr_path.unlink()
        except OSError:
            pass


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
