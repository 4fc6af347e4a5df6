"""The package under test is the installed wheel, with its extensions and built-in guest."""

from __future__ import annotations

import os
from pathlib import Path

import hyperpy


def test_tests_run_against_the_installed_package():
    where = Path(hyperpy.__file__).resolve()
    if os.environ.get("CI"):
        assert "site-packages" in where.parts, f"tests imported hyperpy from {where}"


def test_cython_extensions_are_compiled():
    from hyperpy._fast import guestmem, iobus, kvm, nulldev

    for mod in (guestmem, iobus, kvm, nulldev):
        assert mod.__file__.endswith(".so"), mod.__file__


def test_builtin_guest_is_shipped():
    from hyperpy.guests import available, builtin_kernel

    assert "hello" in available()
    data = builtin_kernel("hello").read_bytes()
    assert data[:4] == b"\x7fELF"
