"""`hyperpy run --api-socket` with a real VM: the full life cycle over the socket with every reply
validated against cloud-hypervisor's OpenAPI spec, the ACPI power button seen by the guest,
device counters, `hyperpy remote`, and generated requests against the running VMM."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_util import ApiProcess, GENERIC_ERRORS, IMPLEMENTED, checked, parse_responses, raw_exchange, \
    request, validate_response, wait_for

pytestmark = pytest.mark.kvm


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="hpapi", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def remote(sock, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyperpy", "remote", "--api-socket", str(sock), *args],
                          capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir())


def serial_has(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


def test_full_life_cycle_over_the_socket(kvm, guests, sockdir):
    sock = sockdir / "api.sock"
    serial = sockdir / "serial.log"
    with ApiProcess(sock) as vmm:          # no VM options: starts empty, waits for vm.create
        vmm.wait_ready()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        p = str(sock)
        checked(p, "GET", "/vm.info", expect=404)
        checked(p, "PUT", "/vm.boot", expect=404)
        cfg = {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 64 << 20},
               "payload": {"kernel": str(guests["power_button"]), "cmdline": "rng"},
               "rng": {"src": "/dev/urandom"}, "serial": {"mode": "File", "file": str(serial)}}
        checked(p, "PUT", "/vm.create", cfg, expect=204)
        assert checked(p, "GET", "/vm.info", expect=200)[1]["state"] == "Created"
        checked(p, "PUT", "/vm.pause", expect=405)

        checked(p, "PUT", "/vm.boot", expect=204)
        assert wait_for(lambda: serial_has(serial, "PWRBTN READY"), 60), vmm.stderr()
        info = checked(p, "GET", "/vm.info", expect=200)[1]
        assert info["state"] == "Running" and info["config"]["rng"]["src"] == "/dev/urandom"
        counters = checked(p, "GET", "/vm.counters", expect=200)[1]
        assert counters["rng0"]["requests"] >= 1 and counters["rng0"]["bytes"] == 64
        assert counters["vcpu0"]["exits"] > 0 and counters["acpi-ged"]["events"] == 0

        checked(p, "PUT", "/vm.pause", expect=204)
        exits = checked(p, "GET", "/vm.counters", expect=200)[1]["vcpu0"]["exits"]
        assert checked(p, "GET", "/vm.info", expect=200)[1]["state"] == "Paused"
        checked(p, "PUT", "/vm.power-button", expect=405)     # not while paused
        assert checked(p, "GET", "/vm.counters", expect=200)[1]["vcpu0"]["exits"] == exits
        checked(p, "PUT", "/vm.resume", expect=204)
        assert checked(p, "GET", "/vm.info", expect=200)[1]["state"] == "Running"

        # Reboot: the VM is torn down and rebuilt from the same config; the new one appends to
        # the serial file, so the guest's banner is there twice.
        checked(p, "PUT", "/vm.reboot", expect=204)
        assert wait_for(lambda: serial.read_text().count("PWRBTN READY") == 2, 60), vmm.stderr()
        assert checked(p, "GET", "/vm.info", expect=200)[1]["state"] == "Running"

        # The power button reaches the guest as a GED interrupt with the power-button bit; the
        # guest powers off through ACPI as an OS does, and the VM is Shutdown.
        checked(p, "PUT", "/vm.power-button", expect=204)
        assert wait_for(lambda: serial_has(serial, "PWRBTN PRESSED 1"), 60), serial.read_text()
        assert wait_for(lambda: checked(p, "GET", "/vm.info")[1]["state"] == "Shutdown", 30)
        checked(p, "PUT", "/vm.shutdown", expect=405)

        checked(p, "PUT", "/vm.boot", expect=204)             # Shutdown -> Running, a new file
        assert wait_for(lambda: serial_has(serial, "PWRBTN READY"), 60)
        assert "PWRBTN PRESSED" not in serial.read_text()
        checked(p, "PUT", "/vm.shutdown", expect=204)
        assert checked(p, "GET", "/vm.info", expect=200)[1]["state"] == "Shutdown"
        checked(p, "PUT", "/vm.delete", expect=204)
        checked(p, "GET", "/vm.info", expect=404)
        checked(p, "GET", "/vmm.ping", expect=200)

        checked(p, "PUT", "/vmm.shutdown", expect=204)         # ends the process
        assert vmm.proc.wait(30) == 0
        assert not sock.exists()


def test_started_with_a_vm_and_driven_by_remote(kvm, guests, sockdir):
    sock = sockdir / "api.sock"
    serial = sockdir / "serial.log"
    with ApiProcess(sock, "--kernel", str(guests["power_button"]), "--memory", "size=64M",
                    "--serial", f"file={serial}") as vmm:
        vmm.wait_ready()
        assert wait_for(lambda: serial_has(serial, "PWRBTN READY"), 60), vmm.stderr()
        r = remote(sock, "info")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        validate_response("/vm.info", "GET", 200, r.stdout.encode())
        assert info["state"] == "Running" and info["config"]["payload"]["kernel"] == str(guests["power_button"])
        assert json.loads(remote(sock, "ping").stdout)["pid"] == vmm.proc.pid
        assert remote(sock, "pause").returncode == 0
        r = remote(sock, "pause")                      # the server's message, non-zero status
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.strip() == "hyperpy: error: vm.pause: cannot pause: the VM is not running (state Paused)"
        r = remote(sock, "create", "/no/such.json")
        assert r.returncode == 2 and "cannot read /no/such.json" in r.stderr
        assert remote(sock, "resume").returncode == 0
        counters = json.loads(remote(sock, "counters").stdout)
        validate_response("/vm.counters", "GET", 200, json.dumps(counters).encode())
        assert remote(sock, "power-button").returncode == 0
        assert wait_for(lambda: json.loads(remote(sock, "info").stdout)["state"] == "Shutdown", 60)
        assert remote(sock, "delete").returncode == 0
        assert remote(sock, "info").returncode == 1
        assert remote(sock, "shutdown-vmm").returncode == 0
        assert vmm.proc.wait(30) == 0


@pytest.mark.parametrize("no_reboot", [False, True], ids=["reboot", "no-reboot"])
def test_guest_reset_over_the_api(kvm, guests, sockdir, no_reboot):
    """A guest reset reboots the VM (Running, the serial file appended); with --no-reboot the
    VM is Shutdown and the VMM keeps serving."""
    sock, serial = sockdir / "api.sock", sockdir / "serial.log"
    flags = ["--no-reboot"] if no_reboot else []
    with ApiProcess(sock, *flags, "--kernel", str(guests["cmdline"]), "--cmdline", "api",
                    "--memory", "size=64M", "--serial", f"file={serial}") as vmm:
        vmm.wait_ready()
        boots = lambda: serial.read_text().count("CMDLINE[api]") if serial.exists() else 0  # noqa: E731
        if no_reboot:
            assert wait_for(lambda: checked(str(sock), "GET", "/vm.info")[1]["state"] == "Shutdown", 60)
            assert boots() == 1
        else:
            assert wait_for(lambda: boots() >= 3, 60), vmm.stderr()
            assert checked(str(sock), "GET", "/vm.info", expect=200)[1]["state"] == "Running"
        assert remote(sock, "shutdown-vmm").returncode == 0
        assert vmm.proc.wait(30) == 0
        assert "Traceback" not in vmm.stderr()


def test_sigterm_stops_the_vm_and_removes_the_socket(kvm, guests, sockdir):
    sock = sockdir / "api.sock"
    with ApiProcess(sock, "--kernel", str(guests["power_button"]), "--memory", "size=64M",
                    "--serial", "off") as vmm:
        vmm.wait_ready()
        assert wait_for(lambda: checked(str(sock), "GET", "/vm.info")[1]["state"] == "Running", 30)
        assert vmm.stop() == 143
        assert not sock.exists()


def test_existing_socket_path_is_refused(kvm, sockdir, hyperpy_cli):
    taken = sockdir / "taken.sock"
    taken.write_text("")
    r = hyperpy_cli("run", "--api-socket", f"path={taken}")
    assert r.returncode == 2
    assert r.stderr.decode().strip() == (f"hyperpy: error: --api-socket: {taken} already exists and is not "
                                         "a socket: remove it or choose another path")
    r = hyperpy_cli("run", "--api-socket", f"path={sockdir}/x.sock", "--cpus", "2")
    assert r.returncode == 2 and "--kernel is required with --cpus" in r.stderr.decode()


@pytest.fixture(scope="module")
def running_vmm(tmp_path_factory, guests):
    from testutil import kvm_problem

    if kvm_problem():
        yield None
        return
    d = Path(tempfile.mkdtemp(prefix="hpapi", dir="/tmp"))
    with ApiProcess(d / "api.sock", "--kernel", str(guests["power_button"]), "--memory", "size=64M",
                    "--serial", "off") as vmm:
        vmm.wait_ready()
        yield vmm
    shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=int(os.environ.get("HYPERPY_API_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "PUT", "POST", "DELETE"]),
       path=st.sampled_from([p for p in IMPLEMENTED if p not in ("/vmm.shutdown", "/vm.delete")]),
       body=st.none() | st.binary(max_size=32) | st.dictionaries(
           st.sampled_from(["payload", "cpus", "memory", "disks", "x"]),
           st.none() | st.integers() | st.text(max_size=6) | st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
           max_size=3).map(lambda d: json.dumps(d).encode()))
def test_generated_requests_against_the_running_vmm(kvm, running_vmm, method, path, body):
    """Every generated request on the implemented paths gets a spec-conformant status (a body
    that matches the spec when it has one), the server stays up and the VM keeps running."""
    sock = running_vmm.sock
    head = f"{method} /api/v1{path} HTTP/1.1\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    replies = parse_responses(raw_exchange(sock, head.encode() + b"\r\n" + (body or b"")))
    assert len(replies) == 1
    status, _, reply = replies[0]
    if IMPLEMENTED[path] == method.lower():
        validate_response(path, method, status, reply)
    else:
        assert status in GENERIC_ERRORS
    assert status != 500, reply
    # Whatever it was, the VMM answers and the VM is booted (paused at worst: resume it).
    st_ = checked(sock, "GET", "/vm.info", expect=200)[1]["state"]
    if st_ == "Paused":
        checked(sock, "PUT", "/vm.resume", expect=204)
    elif st_ == "Shutdown":                         # power-button / shutdown: boot it again
        checked(sock, "PUT", "/vm.boot", expect=204)
    assert running_vmm.proc.poll() is None


def test_counters_of_iommu_and_vfio_devices(kvm, guests, sockdir):
    """vm.counters names the virtio-iommu's MAP/UNMAP counts and the VFIO container's DMA ioctls:
    a simulated VFIO device outside the vIOMMU gets all guest RAM mapped at start."""
    sock = sockdir / "api.sock"
    with ApiProcess(sock) as vmm:
        vmm.wait_ready()
        p = str(sock)
        cfg = {"memory": {"size": 64 << 20}, "payload": {"kernel": str(guests["power_button"])},
               "devices": [{"path": "sim:gpu0"}], "iommu": True, "serial": {"mode": "Off"}}
        checked(p, "PUT", "/vm.create", cfg, expect=204)
        checked(p, "PUT", "/vm.boot", expect=204)
        counters = checked(p, "GET", "/vm.counters", expect=200)[1]
        assert counters["vfio0"]["map_calls"] >= 1 and counters["vfio0"]["unmap_calls"] == 0
        assert counters["iommu0"]["maps"] == 0 and counters["iommu0"]["unmaps"] == 0
        assert counters["iommu0"]["requests"] == 0
        assert checked(p, "GET", "/vm.info", expect=200)[1]["config"]["iommu"] is True
