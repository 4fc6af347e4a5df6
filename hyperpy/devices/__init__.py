"""Devices.

A device is any object with ``read(offset, size) -> int`` and ``write(offset, size, value)``
that the VMM registers on the port-I/O or MMIO bus (``hyperpy._fast.iobus.IoBus``); ``offset`` is
relative to the registered base.  Devices whose accesses are hot implement the same interface in C
(``hyperpy._fast.iobus.FastDevice``) and are served by the vCPU loop without the GIL.  Devices
know nothing of the CLI: the VMM constructs them with plain arguments and callbacks.
"""

from __future__ import annotations

from typing import Protocol


class Device(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...
