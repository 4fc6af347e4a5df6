"""The BIOS reset vector's stand-in: 16 bytes at F000:FFF0 that reset the machine.

hyperpy boots kernels directly, with no firmware.  Linux on a hardware-reduced ACPI platform
without EFI runtime services still picks the EFI reboot method (``reboot_init``: hardware-reduced
implies "EFI reboot required"); that method does nothing without EFI and Linux falls back to its
BIOS method: it drops to real mode and far-jumps to F000:FFF0, the reset vector a PC's firmware
serves.  With nothing there a stock ``reboot`` spins forever in zeroed memory.  So hyperpy puts at
that address what a firmware's reset path amounts to: a write of the FADT's RESET_VALUE to its
reset register, which ends the VM as a guest reset (and so reboots it, as cloud-hypervisor does),
then ``hlt`` in a loop.  ``[EBDA_START, 1 MiB)`` is not RAM in the guest's memory map, so no guest
allocator overwrites it.
"""

from __future__ import annotations

import struct

from .. import layout
from ..errors import BootError
from .common import in_ram

# Real-mode (16-bit) encodings.
_MOV_AL_IMM8 = 0xB0
_MOV_DX_IMM16 = 0xBA
_OUT_DX_AL = 0xEE
_HLT = 0xF4
_JMP_REL8 = 0xEB
RESET_VECTOR_SIZE = 16


def reset_vector_code(port: int = layout.ACPI_RESET_PORT,
                      value: int = layout.ACPI_RESET_VALUE) -> bytes:
    """``mov al, value; mov dx, port; out dx, al; 1: hlt; jmp 1b``, padded with ``hlt``."""
    code = struct.pack("<BBBH", _MOV_AL_IMM8, value, _MOV_DX_IMM16, port) + bytes([_OUT_DX_AL])
    halt = len(code)
    code += bytes([_HLT, _JMP_REL8])
    code += struct.pack("<b", halt - (len(code) + 1))     # rel8 from the end of the jmp
    return code.ljust(RESET_VECTOR_SIZE, bytes([_HLT]))


def install_reset_vector(mem) -> None:
    """Write :func:`reset_vector_code` at ``layout.RESET_VECTOR_START`` (BootError when guest
    RAM does not cover it)."""
    start = layout.RESET_VECTOR_START
    if not in_ram(mem, start, RESET_VECTOR_SIZE):
        raise BootError(f"guest RAM does not cover the reset vector at {start:#x}",
                        "give the VM at least 2 MiB of RAM")
    mem.write(start, reset_vector_code())
