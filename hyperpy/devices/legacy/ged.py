"""The ACPI Generic Event Device (ACPI0013) behind ``vm.power-button``.

One byte at ``layout.ACPI_GED_PORT``: the pending events (bit ``layout.ACPI_GED_POWER_BUTTON``),
cleared when read.  :meth:`AcpiGed.trigger` sets event bits and pulses the GED's interrupt
(GSI ``layout.ACPI_GED_IRQ``, edge, active high); the DSDT's ``\\_SB_.GED0._EVT`` reads the
register and notifies the power button device ``\\_SB_.PWRB`` (PNP0C0C) with 0x80, which Linux's
ACPI button driver turns into a KEY_POWER press.
"""

from __future__ import annotations

import threading
from typing import Callable


class AcpiGed:
    def __init__(self, pulse_irq: Callable[[], None]) -> None:
        self._pulse = pulse_irq
        self._lock = threading.Lock()
        self._pending = 0
        self.events = 0          # events triggered
        self.reads = 0           # event-register reads by the guest

    def trigger(self, bits: int) -> None:
        with self._lock:
            self._pending |= bits & 0xFF
            self.events += 1
        self._pulse()

    def read(self, offset: int, size: int) -> int:
        if offset != 0:
            return 0
        with self._lock:
            value, self._pending = self._pending, 0
            self.reads += 1
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """The register is read-only."""
