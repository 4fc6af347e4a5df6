#!/usr/bin/env python3
"""Wrap a flat 64-bit kernel binary into a Linux bzImage (stdlib only).

Field names and offsets follow the Linux x86 boot protocol, Documentation/arch/x86/boot.rst
(formerly Documentation/x86/boot.rst). The file is::

    +-----------------------------+ 0x0000
    | boot sector (unused, zero)  |         real-mode "setup area": (setup_sects + 1) * 512
    |   0x1f1 setup header part 1 |         bytes; a 16-bit loader loads it at a segment base
    |   0x1fe boot_flag 0xAA55    |         X and jumps to (X + 0x20):0 = offset 0x200
    | 0x200 jump  (jmp short)     |
    | 0x202 "HdrS" ... 0x268      |         setup header part 2 (protocol 2.12 fields)
    | 0x280 real-mode setup code  |         bzsetup.S: A20, protected mode, jmp code32_start
    | kernel version string       |
    +-----------------------------+ (setup_sects + 1) * 512
    | protected-mode kernel       |         loaded at pref_address = code32_start = 0x100000:
    |   +0x000 startup_32         |         32-bit boot protocol entry (%esi = boot_params)
    |   +0x200 startup_64         |         64-bit boot protocol entry (XLF_KERNEL_64)
    +-----------------------------+

The kernel is not relocatable: it must run at 0x100000 (where it was linked).
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

SECTOR = 512
LOAD_ADDRESS = 0x100000  # pref_address and code32_start
ENTRY64_OFFSET = 0x200  # the 64-bit entry's offset in the protected-mode kernel (XLF_KERNEL_64)
SETUP_CODE_OFFSET = 0x200  # bzsetup.S's blob starts at the jump; its header gap ends at 0x280
HEADER_START = 0x1F1
HEADER_END = 0x268  # end of the protocol 2.12..2.14 header (2.15 adds kernel_info_offset)
BOOT_PROTOCOL = 0x020C  # 2.12: xloadflags; >= 2.10: pref_address, init_size
HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55

LOADED_HIGH = 0x01  # loadflags bit 0: protected-mode code is loaded at 0x100000
XLF_KERNEL_64 = 0x01  # xloadflags bit 0: 64-bit entry point at 0x200 ("startup_64")
NORMAL_VGA = 0xFFFF  # vid_mode: "normal"

VERSION = b"hyperpy test guest (bzImage)"

# (offset, struct format, boot.rst name); all little-endian.
SETUP_HEADER = [
    (0x1F1, "B", "setup_sects"),  # size of the setup in 512-byte sectors, boot sector excluded
    (0x1F2, "H", "root_flags"),
    (0x1F4, "I", "syssize"),  # size of the protected-mode code in 16-byte paragraphs
    (0x1F8, "H", "ram_size"),  # obsolete
    (0x1FA, "H", "vid_mode"),
    (0x1FC, "H", "root_dev"),
    (0x1FE, "H", "boot_flag"),  # 0xAA55
    (0x200, "H", "jump"),  # jmp short to the setup code (EB xx)
    (0x202, "I", "header"),  # "HdrS"
    (0x206, "H", "version"),  # boot protocol version
    (0x208, "I", "realmode_swtch"),
    (0x20C, "H", "start_sys_seg"),  # obsolete
    (0x20E, "H", "kernel_version"),  # offset of the version string - 0x200
    (0x210, "B", "type_of_loader"),  # written by the loader
    (0x211, "B", "loadflags"),
    (0x212, "H", "setup_move_size"),
    (0x214, "I", "code32_start"),  # 32-bit entry = load address of the protected-mode kernel
    (0x218, "I", "ramdisk_image"),  # written by the loader
    (0x21C, "I", "ramdisk_size"),  # written by the loader
    (0x220, "I", "bootsect_kludge"),
    (0x224, "H", "heap_end_ptr"),  # written by the loader
    (0x226, "B", "ext_loader_ver"),
    (0x227, "B", "ext_loader_type"),
    (0x228, "I", "cmd_line_ptr"),  # written by the loader
    (0x22C, "I", "initrd_addr_max"),
    (0x230, "I", "kernel_alignment"),
    (0x234, "B", "relocatable_kernel"),
    (0x235, "B", "min_alignment"),  # log2
    (0x236, "H", "xloadflags"),
    (0x238, "I", "cmdline_size"),  # longest command line, without the NUL
    (0x23C, "I", "hardware_subarch"),
    (0x240, "Q", "hardware_subarch_data"),
    (0x248, "I", "payload_offset"),
    (0x24C, "I", "payload_length"),
    (0x250, "Q", "setup_data"),
    (0x258, "Q", "pref_address"),
    (0x260, "I", "init_size"),  # memory the kernel needs from its load address, .bss included
    (0x264, "I", "handover_offset"),  # EFI handover: none
]


def make_bzimage(kernel: bytes, setup_code: bytes, init_size: int, version: bytes = VERSION) -> bytes:
    """Return a bzImage: setup area (header + ``setup_code``) followed by ``kernel``.

    ``kernel`` is the flat protected-mode image linked at LOAD_ADDRESS with the 64-bit entry at
    +0x200; ``setup_code`` is the real-mode blob that goes at setup offset 0x200 (bzsetup.S:
    a 2-byte short jump, a zero gap for the header, then code); ``init_size`` is the memory the
    kernel uses from LOAD_ADDRESS on, .bss and page tables included.
    """
    if len(kernel) <= ENTRY64_OFFSET:
        raise ValueError("kernel image is too small to hold a 64-bit entry at +0x200")
    if setup_code[:1] != b"\xeb":
        raise ValueError("setup code must start with a short jmp (EB xx)")
    gap = setup_code[2 : HEADER_END - SETUP_CODE_OFFSET]
    if len(gap) != HEADER_END - SETUP_CODE_OFFSET - 2 or any(gap):
        raise ValueError("setup code must leave offsets 0x202..0x268 zero for the header")
    jump_target = SETUP_CODE_OFFSET + 2 + setup_code[1]
    if jump_target < HEADER_END:
        raise ValueError(f"setup code's jump lands inside the header (0x{jump_target:x})")

    kernel = kernel + bytes(-len(kernel) % 16)  # whole paragraphs: syssize * 16 == its size
    setup = bytearray(SECTOR)  # boot sector: never executed by a boot-protocol loader
    setup += setup_code
    version_offset = len(setup)
    setup += version + b"\0"
    setup += bytes(-len(setup) % SECTOR)
    setup_sects = len(setup) // SECTOR - 1
    if not 1 <= setup_sects <= 255:
        raise ValueError(f"setup area of {setup_sects} sectors does not fit setup_sects")

    fields = {
        "setup_sects": setup_sects,
        "root_flags": 0,
        "syssize": (len(kernel) + 15) // 16,
        "ram_size": 0,
        "vid_mode": NORMAL_VGA,
        "root_dev": 0,
        "boot_flag": BOOT_FLAG,
        "jump": int.from_bytes(setup_code[:2], "little"),
        "header": int.from_bytes(HDRS_MAGIC, "little"),
        "version": BOOT_PROTOCOL,
        "realmode_swtch": 0,
        "start_sys_seg": 0x1000,
        "kernel_version": version_offset - 0x200,
        "type_of_loader": 0,
        "loadflags": LOADED_HIGH,
        "setup_move_size": 0,
        "code32_start": LOAD_ADDRESS,
        "ramdisk_image": 0,
        "ramdisk_size": 0,
        "bootsect_kludge": 0,
        "heap_end_ptr": 0,
        "ext_loader_ver": 0,
        "ext_loader_type": 0,
        "cmd_line_ptr": 0,
        "initrd_addr_max": 0x7FFFFFFF,
        "kernel_alignment": LOAD_ADDRESS,  # not relocatable: alignment that 0x100000 satisfies
        "relocatable_kernel": 0,
        "min_alignment": LOAD_ADDRESS.bit_length() - 1,
        "xloadflags": XLF_KERNEL_64,
        "cmdline_size": 0xFFFF,
        "hardware_subarch": 0,  # default x86/PC
        "hardware_subarch_data": 0,
        "payload_offset": 0,
        "payload_length": 0,
        "setup_data": 0,
        "pref_address": LOAD_ADDRESS,
        "init_size": (max(init_size, len(kernel)) + 0xFFF) & ~0xFFF,
        "handover_offset": 0,
    }
    for offset, fmt, name in SETUP_HEADER:
        struct.pack_into("<" + fmt, setup, offset, fields[name])
    return bytes(setup) + kernel


def parse_header(image: bytes) -> dict[str, int]:
    """The setup header fields of a bzImage, by boot.rst name (for checks and tests)."""
    return {name: struct.unpack_from("<" + fmt, image, off)[0] for off, fmt, name in SETUP_HEADER}


def elf_load_span(elf: bytes) -> tuple[int, int, int]:
    """(entry, lowest PT_LOAD physical address, end of the highest PT_LOAD in memory)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    entry, phoff = struct.unpack_from("<QQ", elf, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    low, high = None, 0
    for i in range(phnum):
        p_type, _flags, _off, _vaddr, paddr, _filesz, memsz = struct.unpack_from(
            "<IIQQQQQ", elf, phoff + i * phentsize
        )
        if p_type == 1 and memsz:  # PT_LOAD
            low = paddr if low is None else min(low, paddr)
            high = max(high, paddr + memsz)
    if low is None:
        raise ValueError("ELF file has no PT_LOAD segment")
    return entry, low, high


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", type=Path, required=True, help="flat binary (objcopy -O binary)")
    ap.add_argument("--setup", type=Path, required=True, help="real-mode blob from bzsetup.S")
    ap.add_argument("--init-size", type=lambda s: int(s, 0), required=True)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    image = make_bzimage(args.kernel.read_bytes(), args.setup.read_bytes(), args.init_size)
    args.output.write_bytes(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
