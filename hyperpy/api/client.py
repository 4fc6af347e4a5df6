"""``hyperpy remote``: a client of the API socket (like cloud-hypervisor's ``ch-remote``).

    hyperpy remote --api-socket PATH ping|info|counters|pause|resume|shutdown|reboot|
                   power-button|create CONFIG.json|boot|delete|shutdown-vmm

Prints the reply's JSON (nothing for a 204) and exits 0; on an error prints
``hyperpy: error: <the server's message>`` and exits 1 (2 for a usage error).
"""

from __future__ import annotations

import json
import socket
import sys

from ..errors import HyperpyError

TIMEOUT = 60.0
MAX_REPLY = 16 * 1024 * 1024

# command -> (method, endpoint)
COMMANDS = {
    "ping": ("GET", "vmm.ping"),
    "shutdown-vmm": ("PUT", "vmm.shutdown"),
    "info": ("GET", "vm.info"),
    "counters": ("GET", "vm.counters"),
    "create": ("PUT", "vm.create"),
    "boot": ("PUT", "vm.boot"),
    "pause": ("PUT", "vm.pause"),
    "resume": ("PUT", "vm.resume"),
    "shutdown": ("PUT", "vm.shutdown"),
    "reboot": ("PUT", "vm.reboot"),
    "power-button": ("PUT", "vm.power-button"),
    "delete": ("PUT", "vm.delete"),
}


class ApiClientError(HyperpyError):
    """The request failed: no server, or the server answered an error (``status``)."""

    def __init__(self, what: str, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(what, hint)
        self.status = status


def request(socket_path: str, method: str, endpoint: str, body: bytes | None = None,
            timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection -> (status, body)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(socket_path)
        except OSError as e:
            raise ApiClientError(f"cannot connect to {socket_path}: {e.strerror or e}",
                                 "is hyperpy running with --api-socket there?") from None
        head = [f"{method} /api/v1/{endpoint} HTTP/1.1", "Host: localhost", "Connection: close",
                "Accept: application/json"]
        data = body or b""
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        elif method == "PUT":
            head.append("Content-Length: 0")
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        chunks = []
        total = 0
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_REPLY:
                raise ApiClientError(f"{endpoint}: reply larger than {MAX_REPLY} bytes")
    except socket.timeout:
        raise ApiClientError(f"{endpoint}: no reply within {timeout:.0f} s") from None
    except OSError as e:
        raise ApiClientError(f"{endpoint}: {e.strerror or e}") from None
    finally:
        s.close()
    return parse_response(b"".join(chunks), endpoint)


def parse_response(raw: bytes, endpoint: str = "") -> tuple[int, bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ApiClientError(f"{endpoint}: malformed reply from the server ({lines[0][:60]!r})")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    return int(parts[1]), rest if length is None else rest[:length]


def call(socket_path: str, command: str, arg: str | None = None):
    """Run ``command``; returns the decoded JSON reply or None for an empty one."""
    if command not in COMMANDS:
        raise ApiClientError(f"unknown command {command!r}", f"use one of: {', '.join(COMMANDS)}", status=2)
    method, endpoint = COMMANDS[command]
    body = None
    if command == "create":
        if arg is None:
            raise ApiClientError("create needs a CONFIG.json argument", "e.g. hyperpy remote "
                                 "--api-socket /run/hp.sock create vm.json", status=2)
        try:
            with open(arg, "rb") as f:
                body = f.read(MAX_REPLY)
        except OSError as e:
            raise ApiClientError(f"create: cannot read {arg}: {e.strerror}", status=2) from None
    elif arg is not None:
        raise ApiClientError(f"{command} takes no argument (got {arg!r})", status=2)
    status, reply = request(socket_path, method, endpoint, body)
    if status >= 300:
        message = " ".join(reply.decode("utf-8", "replace").split()) or f"HTTP {status}"
        raise ApiClientError(f"{endpoint}: {message}", status=status)
    if not reply.strip():
        return None
    try:
        return json.loads(reply)
    except ValueError:
        raise ApiClientError(f"{endpoint}: the reply is not JSON") from None


def main(socket_path: str, command: str, arg: str | None = None) -> int:
    try:
        result = call(socket_path, command, arg)
    except ApiClientError as e:
        print(f"hyperpy: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if e.status == 2 else 1
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0
