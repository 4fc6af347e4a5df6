"""The API's routes and VM state machine (hyperpy.api.server + controller) in-process, with a
stand-in VM (no KVM), every reply checked against cloud-hypervisor's OpenAPI spec; a
property-based test sends generated and malformed requests."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_util import (GENERIC_ERRORS, IMPLEMENTED, checked, parse_responses, raw_exchange, request,
                      status_conforms, validate_response)
from hyperpy.api.client import ApiClientError, call
from hyperpy.api.controller import VmController
from hyperpy.api.http import UnixHttpServer
from hyperpy.api.server import ApiServer
from hyperpy.vmm import ExitReason, VmExit


class FakeVm:
    """Stands in for VirtualMachine: run() blocks until finish(); the power button powers off."""

    def __init__(self, config, log: list, append_output: bool = False) -> None:
        self.config = config
        self.append_output = append_output
        self.done = threading.Event()
        self.result = None
        self.paused = False
        self.closed = False
        self.presses = 0
        log.append(self)

    def run(self):
        self.done.wait()
        return self.result

    def finish(self, result):
        if self.result is None:
            self.result = result
        self.done.set()

    def close(self):
        self.closed = True

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def power_button(self):
        self.presses += 1
        self.finish(VmExit(ExitReason.POWEROFF))

    def counters(self):
        return {"rng0": {"requests": 3, "bytes": 192}, "vcpu0": {"exits": 10}}


class Api:
    def __init__(self, reboot: bool = True, gate: threading.Event | None = None) -> None:
        """``gate``: building a VM for a reboot waits for it (a slow rebuild)."""
        self.dir = tempfile.mkdtemp(prefix="hpapi", dir="/tmp")
        self.path = os.path.join(self.dir, "api.sock")
        self.vms: list[FakeVm] = []

        def factory(cfg, **kw) -> FakeVm:
            if gate is not None and self.vms:
                gate.wait(5)
            return FakeVm(cfg, self.vms, **kw)

        self.controller = VmController(factory, reboot=reboot)
        self.vmm_shutdowns = threading.Event()
        self.http = UnixHttpServer(self.path, ApiServer(self.controller, self.vmm_shutdowns.set))
        self.http.start()

    def close(self) -> None:
        self.controller.stop_all()
        self.http.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def api():
    a = Api()
    yield a
    a.close()


@pytest.fixture
def api_no_reboot():
    a = Api(reboot=False)
    yield a
    a.close()


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF")
    return str(k)


def state(api) -> str:
    return checked(api.path, "GET", "/vm.info", expect=200)[1]["state"]


def test_ping(api):
    _, body = checked(api.path, "GET", "/vmm.ping", expect=200)
    assert body["pid"] == os.getpid() and body["version"]


def test_life_cycle_with_spec_checked_replies(api, kernel):
    p = api.path
    # Nothing created yet: the actions that need a VM are 404, as the spec says.
    for path in ("/vm.boot", "/vm.pause", "/vm.resume", "/vm.shutdown", "/vm.reboot", "/vm.power-button"):
        assert "no VM is created" in checked(p, "PUT", path, expect=404)[1]
    checked(p, "GET", "/vm.info", expect=404)
    checked(p, "PUT", "/vm.delete", expect=204)           # deleting nothing is fine (as in CH)

    cfg = {"cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "memory": {"size": 64 << 20},
           "payload": {"kernel": kernel, "cmdline": "x"}}
    checked(p, "PUT", "/vm.create", cfg, expect=204)
    assert "already exists" in checked(p, "PUT", "/vm.create", cfg, expect=409)[1]
    info = checked(p, "GET", "/vm.info", expect=200)[1]
    assert info["state"] == "Created" and info["config"]["cpus"]["boot_vcpus"] == 2
    assert info["memory_actual_size"] == 64 << 20
    # Not booted: 405 for the actions that need a running VM.
    for path in ("/vm.pause", "/vm.resume", "/vm.shutdown", "/vm.reboot", "/vm.power-button"):
        checked(p, "PUT", path, expect=405)

    checked(p, "PUT", "/vm.boot", expect=204)
    assert state(api) == "Running" and len(api.vms) == 1
    checked(p, "PUT", "/vm.boot", expect=409)
    checked(p, "PUT", "/vm.resume", expect=405)
    counters = checked(p, "GET", "/vm.counters", expect=200)[1]
    assert counters["rng0"] == {"requests": 3, "bytes": 192}

    checked(p, "PUT", "/vm.pause", expect=204)
    assert state(api) == "Paused" and api.vms[0].paused
    checked(p, "PUT", "/vm.pause", expect=405)
    checked(p, "PUT", "/vm.power-button", expect=405)
    checked(p, "PUT", "/vm.resume", expect=204)
    assert state(api) == "Running" and not api.vms[0].paused

    checked(p, "PUT", "/vm.reboot", expect=204)          # torn down and rebuilt from the config
    assert len(api.vms) == 2 and api.vms[0].closed and api.vms[0].result.reason is ExitReason.STOPPED
    assert state(api) == "Running"
    assert not api.vms[0].append_output and api.vms[1].append_output    # the reboot appends

    checked(p, "PUT", "/vm.power-button", expect=204)    # the stand-in powers off when pressed
    assert api.controller.wait_state("Shutdown", 5)
    assert api.vms[1].presses == 1 and api.vms[1].closed
    checked(p, "PUT", "/vm.shutdown", expect=405)
    checked(p, "PUT", "/vm.boot", expect=204)             # Shutdown -> Running again
    assert len(api.vms) == 3 and state(api) == "Running"
    assert not api.vms[2].append_output                   # a boot starts the output afresh
    checked(p, "PUT", "/vm.shutdown", expect=204)
    assert state(api) == "Shutdown" and api.vms[2].closed
    checked(p, "PUT", "/vm.delete", expect=204)
    checked(p, "GET", "/vm.info", expect=404)


def test_guest_reset_reboots_and_delete_stops(api, kernel):
    checked(api.path, "PUT", "/vm.create", {"payload": {"kernel": kernel}}, expect=204)
    checked(api.path, "PUT", "/vm.boot", expect=204)
    api.vms[0].finish(VmExit(ExitReason.RESET))           # the guest resets: a fresh VM, same config
    assert _wait(lambda: len(api.vms) == 2)
    assert state(api) == "Running" and api.vms[0].closed
    assert api.vms[1].config is api.vms[0].config and api.vms[1].append_output
    assert api.controller.vm is api.vms[1]
    checked(api.path, "PUT", "/vm.pause", expect=204)       # the API drives the rebooted VM
    assert api.vms[1].paused and not api.vms[0].paused
    checked(api.path, "PUT", "/vm.resume", expect=204)
    checked(api.path, "PUT", "/vm.delete", expect=204)      # delete stops a running VM
    assert api.vms[1].closed and api.controller.state is None
    assert len(api.vms) == 2


def test_guest_reset_with_no_reboot_shuts_down(api_no_reboot, kernel):
    api = api_no_reboot
    checked(api.path, "PUT", "/vm.create", {"payload": {"kernel": kernel}}, expect=204)
    checked(api.path, "PUT", "/vm.boot", expect=204)
    api.vms[0].finish(VmExit(ExitReason.RESET))
    assert api.controller.wait_state("Shutdown", 5)
    assert len(api.vms) == 1 and api.vms[0].closed
    assert api.controller.last_exit.reason is ExitReason.RESET
    checked(api.path, "PUT", "/vm.boot", expect=204)             # and boots again on request
    assert len(api.vms) == 2 and state(api) == "Running"


def test_pause_during_a_guest_reboot_is_refused(kernel):
    """While a guest reset rebuilds the VM there is none to pause: 405, then it runs again."""
    gate = threading.Event()
    api = Api(gate=gate)
    try:
        checked(api.path, "PUT", "/vm.create", {"payload": {"kernel": kernel}}, expect=204)
        checked(api.path, "PUT", "/vm.boot", expect=204)
        api.vms[0].finish(VmExit(ExitReason.RESET))
        assert _wait(lambda: api.controller.vm is None)
        _, reply = checked(api.path, "PUT", "/vm.pause", expect=405)
        assert "rebooting" in reply
        assert checked(api.path, "GET", "/vm.counters", expect=200)[1] == {}
        gate.set()
        assert _wait(lambda: api.controller.vm is not None)
        assert state(api) == "Running" and len(api.vms) == 2
        checked(api.path, "PUT", "/vm.pause", expect=204)
        assert api.vms[1].paused
    finally:
        gate.set()
        api.close()


def test_bad_bodies_are_400_with_the_reason(api, kernel):
    cases = [(b"", "the body must be a VmConfig"), (b"{", "not valid JSON"),
             (b"[" * 100000 + b"]" * 100000, "nested too deeply|not valid JSON"),
             (json.dumps({"payload": {"kernel": kernel}, "foo": 1}).encode(), "foo: unknown field"),
             (json.dumps({"payload": {"kernel": "/none"}}).encode(), "payload.kernel: no such file")]
    import re

    for body, message in cases:
        status, reply = request(api.path, "PUT", "/vm.create", body)
        validate_response("/vm.create", "PUT", status, reply)
        assert status == 400 and re.search(message, reply.decode()), (body[:40], reply)
    status, reply = request(api.path, "PUT", "/vm.boot", b"{}")
    assert status == 400 and b"takes no body" in reply
    checked(api.path, "GET", "/vmm.ping", expect=200)


def test_unknown_path_and_wrong_method(api):
    assert request(api.path, "GET", "/vm.resize")[0] == 404      # not implemented by hyperpy
    status, reply = request(api.path, "PUT", "/vm.info")
    assert status == 405 and b"/api/v1/vm.info takes GET" in reply
    raw = raw_exchange(api.path, b"GET /other HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert parse_responses(raw)[0][0] == 404


def test_vmm_shutdown_replies_then_signals(api):
    checked(api.path, "PUT", "/vmm.shutdown", expect=204)
    assert api.vmm_shutdowns.wait(5)


def test_remote_client_functions(api, kernel, tmp_path):
    assert call(api.path, "ping")["pid"] == os.getpid()
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"payload": {"kernel": kernel}}))
    assert call(api.path, "create", str(cfg)) is None
    with pytest.raises(ApiClientError, match=r"^vm.create: cannot create: a VM already exists") as e:
        call(api.path, "create", str(cfg))
    assert e.value.status == 409
    assert call(api.path, "info")["state"] == "Created"
    with pytest.raises(ApiClientError, match=r"^unknown command 'explode'"):
        call(api.path, "explode")
    with pytest.raises(ApiClientError, match=r"cannot connect to /nonexistent.sock"):
        call("/nonexistent.sock", "ping")


def _wait(pred, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# --------------------------------------------------------------------------- property-based

PATHS = [*IMPLEMENTED, "/vm.resize", "/vm.add-disk", "/vmm.pingx", "/", "/vm.info/x"]
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=12)
                           | st.floats(allow_nan=False), lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
config_like = st.fixed_dictionaries({}, optional={
    "payload": st.fixed_dictionaries({}, optional={"kernel": st.sampled_from(["builtin:hello", "/nope", "", 3]),
                                                   "cmdline": st.text(max_size=10), "firmware": st.text(max_size=4)}),
    "cpus": st.fixed_dictionaries({}, optional={"boot_vcpus": st.integers(-1, 300), "max_vcpus": st.integers(-1, 300),
                                                "nested": st.booleans(), "topology": json_values}),
    "memory": st.fixed_dictionaries({}, optional={"size": st.integers(-1, 1 << 50) | st.text(max_size=4),
                                                  "hugepages": st.booleans(), "hugepage_size": st.integers(0, 1 << 31)}),
    "disks": st.lists(st.dictionaries(st.sampled_from(["path", "readonly", "queue_size", "vhost_user", "x"]),
                                      json_values, max_size=3), max_size=2),
    "net": st.lists(st.dictionaries(st.sampled_from(["tap", "mac", "ip", "num_queues"]), json_values, max_size=3),
                    max_size=2),
    "serial": st.dictionaries(st.sampled_from(["mode", "file", "socket"]), json_values, max_size=2),
    "iommu": json_values, "bogus": json_values,
})
bodies = st.none() | st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()) \
    | config_like.map(lambda v: json.dumps(v).encode())
methods = st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"])


@settings(max_examples=int(os.environ.get("HYPERPY_API_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(method=methods, path=st.sampled_from(PATHS) | st.text(max_size=16).map(lambda s: "/" + s), body=bodies)
def test_generated_requests_get_conformant_statuses(api, method, path, body):
    if path == "/vmm.shutdown":
        path = "/vmm.ping"       # keep the server (it only sets an event here, but stay on topic)
    target = "/api/v1" + "".join(c if 0x20 < ord(c) < 0x7f else "%%%02X" % (ord(c) & 0xff) for c in path)
    data = body or b""
    head = f"{method} {target} HTTP/1.1\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Length: {len(data)}\r\n"
    replies = parse_responses(raw_exchange(api.path, head.encode() + b"\r\n" + data))
    assert len(replies) == 1
    status, _, reply = replies[0]
    spec_path = path if path in IMPLEMENTED else None
    if spec_path and method == "HEAD" and IMPLEMENTED[spec_path] == "get":
        # HEAD is GET without the body (RFC 9110 9.3.2): the GET operation's statuses apply.
        assert reply == b"" and status_conforms(spec_path, "GET", status), (path, status)
    elif spec_path and IMPLEMENTED[spec_path] == method.lower():
        validate_response(spec_path, method, status, reply)
    else:
        assert status in GENERIC_ERRORS, (method, path, status, reply)
    assert status != 500, reply
    assert request(api.path, "GET", "/vmm.ping")[0] == 200


@settings(max_examples=int(os.environ.get("HYPERPY_API_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | st.lists(st.sampled_from(
    [b"GET ", b"PUT ", b"/api/v1/vm.info", b"/api/v1/vm.create", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/9",
     b"\r\n", b"\n", b"\r\n\r\n", b"Content-Length: ", b"5", b"-1", b"99999999999999", b"Transfer-Encoding: chunked",
     b"Connection: close", b"Expect: 100-continue", b":", b" ", b"\x00", b"\xff", b"{}", b"abc"]),
    max_size=20).map(b"".join))
def test_malformed_bytes_never_take_the_server_down(api, data):
    raw = raw_exchange(api.path, data, timeout=20)
    if raw:
        replies = parse_responses(raw.split(b"HTTP/1.1 100 Continue\r\n\r\n", 1)[-1])
        for status, _, _ in replies:
            assert 200 <= status < 600 and status != 500, (data, raw[:200])
    assert request(api.path, "GET", "/vmm.ping")[0] == 200


# --------------------------------------------------------------------------- the command line


def test_api_start_imports_neither_typer_nor_the_vmm(tmp_path):
    """`run --api-socket` without a VM takes the argparse fast path: no typer/rich, no KVM code,
    so the socket answers soon after the interpreter starts (bench/test_bench_api.py)."""
    import subprocess
    import sys
    import time

    d = tempfile.mkdtemp(prefix="hpapi", dir="/tmp")
    sock = os.path.join(d, "api.sock")
    try:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "hyperpy", "run", "--api-socket",
                                 f"path={sock}"], stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        assert call(sock, "ping")["pid"] == proc.pid
        assert call(sock, "shutdown-vmm") is None
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    imported = {line.split("|")[-1].strip() for line in err.decode().splitlines() if "|" in line}
    assert "hyperpy.api.server" in imported
    for heavy in ("typer", "rich", "click", "hyperpy.vmm", "hyperpy.config", "hyperpy._fast.kvm"):
        assert heavy not in imported, heavy


def test_help_and_typos_fall_back_to_the_full_command_line(hyperpy_cli):
    r = hyperpy_cli("run", "--help")
    assert r.returncode == 0 and "--api-socket" in r.stdout.decode()
    r = hyperpy_cli("remote", "--help")
    assert r.returncode == 0 and "power-button" in r.stdout.decode()
    r = hyperpy_cli("run", "--api-socket", "path=/tmp/x.sock", "--kernal", "k")    # a typo
    assert r.returncode == 2 and r.stderr.decode().startswith("hyperpy: error: No such option: --kernal")
    r = hyperpy_cli("remote", "--api-socket", "/nonexistent/api.sock", "ping")
    assert r.returncode == 1
    assert r.stderr.decode().startswith("hyperpy: error: cannot connect to /nonexistent/api.sock")
    r = hyperpy_cli("remote", "--api-socket", "/nonexistent/api.sock", "explode")
    assert r.returncode == 2 and "unknown command 'explode'" in r.stderr.decode()


def test_typer_command_line_takes_api_socket_too(tmp_path):
    """Without the fast path (the typer app itself, e.g. the old entry point), --api-socket goes
    to the same code: an existing path is refused with the one-line error."""
    import logging

    from typer.testing import CliRunner

    from hyperpy import cli

    taken = tmp_path / "taken"
    taken.write_text("")
    logger = logging.getLogger("hyperpy")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        result = CliRunner().invoke(cli.app, ["run", "--api-socket", f"path={taken}"])
    finally:            # run's log set-up must not outlive the test (its stderr is gone)
        for h in cli._handlers:
            h.close()
        cli._handlers.clear()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
    assert result.exit_code == 2
    assert f"hyperpy: error: --api-socket: {taken} already exists and is not a socket" in result.output
