"""Shared fixtures: KVM availability policy and the test guests.

KVM tests skip only when /dev/kvm is missing; with HYPERPY_REQUIRE_KVM=1 (set by .ci/run
whenever /dev/kvm exists) a KVM test that cannot run fails instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testutil import load_module

TESTS = Path(__file__).resolve().parent
GUEST_SRC = TESTS / "guests"


def _load_guest_builder():
    return load_module("hyperpy_test_guest_build", GUEST_SRC / "build.py")


def kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (run as root or join the kvm group)"
    return None


@pytest.fixture
def kvm():
    """Use in every test that needs /dev/kvm."""
    problem = kvm_problem()
    if problem:
        if os.environ.get("HYPERPY_REQUIRE_KVM") == "1":
            pytest.fail(f"HYPERPY_REQUIRE_KVM=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def guest_builder():
    return _load_guest_builder()


@pytest.fixture(scope="session")
def guests(tmp_path_factory, guest_builder):
    """Build every test guest once per session: {name: Path}."""
    out = tmp_path_factory.mktemp("guests")
    return guest_builder.build_all(out)


def hyperpy_command(*args: str, no_reboot: bool = True) -> list[str]:
    """``python -m hyperpy ARGS...``; a ``run`` gets ``--no-reboot`` unless ``no_reboot`` is
    false: the test guests say "done" with a reset, which would reboot them otherwise."""
    if no_reboot and args and args[0] == "run":
        args = ("run", "--no-reboot", *args[1:])
    return [sys.executable, "-m", "hyperpy", *args]


def run_hyperpy(*args: str, timeout: float = 120, input: bytes | None = None,
                env: dict | None = None, no_reboot: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `hyperpy` CLI (as `python -m hyperpy`) and capture its output
    (``no_reboot``: see :func:`hyperpy_command`)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    # cwd outside the repository, so `-m hyperpy` imports the installed package.
    return subprocess.run(hyperpy_command(*args, no_reboot=no_reboot), capture_output=True,
                          timeout=timeout, input=input, env=e, cwd=tempfile.gettempdir())


@pytest.fixture
def hyperpy_cli():
    return run_hyperpy


@pytest.fixture(scope="session")
def kit():
    """The Linux guest kit (Debian's 6.12 kernel, its modules, busybox) for the ``linux`` tier,
    built by scripts/build-guest-kit.sh when missing.  Skips without QEMU unless CI is set."""
    import linuxkit
    from vhost_linux import require_qemu

    require_qemu()
    try:
        return linuxkit.ensure_kit()
    except (linuxkit.KitError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"Linux guest kit: {e}")


@pytest.fixture
def netns():
    """A private network namespace (tests/netns.py) for a test that creates a tap: the process
    owning the tap runs in it (``netns.cmd(argv)``), the test's sockets are opened in it
    (``netns.entered()``, ``netns.packet_socket``); deleted afterwards, also on failure."""
    import netns as netns_module

    why = netns_module.problem()
    if why:
        pytest.skip(why)
    with netns_module.netns() as ns:
        yield ns
