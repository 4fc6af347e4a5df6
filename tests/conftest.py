"""Shared fixtures: KVM availability policy and the test guests.

KVM tests skip only when /dev/kvm is missing; with HYPERPY_REQUIRE_KVM=1 (set by .ci/run
whenever /dev/kvm exists) a KVM test that cannot run fails instead.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testutil import kvm_problem, load_module, run_hyperpy

TESTS = Path(__file__).resolve().parent
GUEST_SRC = TESTS / "guests"


def _load_guest_builder():
    return load_module("hyperpy_test_guest_build", GUEST_SRC / "build.py")


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
