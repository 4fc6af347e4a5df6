"""Hardware-reduced ACPI power management: the FADT's sleep-control, sleep-status and reset
registers (ACPI 6.5, 4.8.3.7 and 4.8.3.6).

A hardware-reduced platform has no PM1 blocks; OSPM powers off by writing
``SLP_TYPx << 2 | SLP_EN`` (SLP_TYP from the DSDT's ``\\_S5_`` package) to the sleep-control
register and resets by writing RESET_VALUE to the reset register.  Linux uses both: ``poweroff``
goes through ``\\_S5_`` and the default x86 reboot method tries the ACPI reset register first.

Registered at ``layout.ACPI_SLEEP_CONTROL_PORT`` with size 3 (one byte each):
offset 0 sleep control, offset 1 sleep status, offset 2 reset.
"""

from __future__ import annotations

from typing import Callable

from hyperpy import layout

SIZE = 3
SLEEP_CONTROL_OFFSET = 0
SLEEP_STATUS_OFFSET = layout.ACPI_SLEEP_STATUS_PORT - layout.ACPI_SLEEP_CONTROL_PORT
RESET_OFFSET = layout.ACPI_RESET_PORT - layout.ACPI_SLEEP_CONTROL_PORT

SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7
WAK_STS = 1 << 7


class AcpiPm:
    """The three registers; ``on_poweroff`` runs for an S5 request, ``on_reset`` for a reset.

    Only S5 exists (the DSDT declares no other sleep state).  A request for another state is
    not carried out: the platform "wakes" at once, so WAK_STS reads as set until the guest
    clears it (write 1) and an OS polling for the wake does not spin forever.
    """

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._status = 0
        self.poweroffs = 0
        self.resets = 0

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        if offset == SLEEP_STATUS_OFFSET:
            return self._status
        return 0            # the control and reset registers are write-only

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == SLEEP_CONTROL_OFFSET:
            if not value & SLP_EN:
                return
            if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == layout.ACPI_S5_SLP_TYP:
                self.poweroffs += 1
                self._on_poweroff()
            else:
                self._status |= WAK_STS
        elif offset == SLEEP_STATUS_OFFSET:
            self._status &= ~(value & WAK_STS)      # write 1 to clear
        elif offset == RESET_OFFSET and value == layout.ACPI_RESET_VALUE:
            self.resets += 1
            self._on_reset()
