"""The part of the i8042 keyboard controller a VMM needs: the CPU reset line.

A guest resets the machine by writing 0xfe ("pulse output line 0") to the command port 0x64;
the VMM treats that as the end of the VM (exit status 0), like Firecracker and cloud-hypervisor.
Registered at 0x60 with size 5: offset 0 is the data port, offset 4 the command/status port.
"""

from __future__ import annotations

from typing import Callable

DATA_OFFSET = 0
COMMAND_OFFSET = 4
CMD_RESET_CPU = 0xFE
STATUS_SYSTEM_FLAG = 0x04   # "system flag": POST passed


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.resets = 0

    def read(self, offset: int, size: int) -> int:
        if offset == COMMAND_OFFSET:
            return STATUS_SYSTEM_FLAG   # no data, input buffer empty
        if offset == DATA_OFFSET:
            return 0
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == COMMAND_OFFSET and value & 0xFF == CMD_RESET_CPU:
            self.resets += 1
            self._on_reset()
