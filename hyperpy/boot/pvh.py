"""Xen PVH direct boot: ``struct hvm_start_info`` and the 32-bit protected-mode entry state.

These are Xen public ABI structures (``xen/include/public/arch-x86/hvm/start_info.h``), not Linux
UAPI, so they are packed here with :mod:`struct`.  All fields little-endian, naturally aligned::

    struct hvm_start_info {             /* version 1, 56 bytes */
        uint32_t magic;                 /* 0x00  HVM_START_MAGIC_VALUE 0x336ec578 ("xEn3") */
        uint32_t version;               /* 0x04  1 (memmap fields present) */
        uint32_t flags;                 /* 0x08  SIF_xxx, 0 */
        uint32_t nr_modules;            /* 0x0c  entries at modlist_paddr */
        uint64_t modlist_paddr;         /* 0x10  hvm_modlist_entry[] */
        uint64_t cmdline_paddr;         /* 0x18  NUL-terminated command line */
        uint64_t rsdp_paddr;            /* 0x20  ACPI RSDP, 0 = none */
        uint64_t memmap_paddr;          /* 0x28  hvm_memmap_table_entry[] (version >= 1) */
        uint32_t memmap_entries;        /* 0x30 */
        uint32_t reserved;              /* 0x34  must be 0 */
    };
    struct hvm_modlist_entry {          /* 32 bytes */
        uint64_t paddr, size, cmdline_paddr, reserved;
    };
    struct hvm_memmap_table_entry {     /* 24 bytes */
        uint64_t addr, size;
        uint32_t type;                  /* XEN_HVM_MEMMAP_TYPE_*, same numbers as e820 */
        uint32_t reserved;
    };

Entry state (xen/include/public/arch-x86/hvm/start_info.h, "PVH boot ABI"): EBX = start_info
address, CR0.PE set and every other writable CR0 bit clear, CR4 = 0, paging off, flat 32-bit CS,
flat DS/ES/SS, TR a 32-bit TSS with base 0 and limit 0x67, EFLAGS.IF/TF/VM clear.
"""

from __future__ import annotations

import struct
from pathlib import Path

from .. import layout
from ..errors import BootError
from . import cpu
from .common import (CMDLINE_LIMIT, MEMMAP_RAM, MEMMAP_RESERVED, BootInfo, check_elf_segments,
                     encode_cmdline, memory_map, place_initramfs, write_elf_segments)

HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1

XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2
_MEMMAP_TYPES = {MEMMAP_RAM: XEN_HVM_MEMMAP_TYPE_RAM, MEMMAP_RESERVED: XEN_HVM_MEMMAP_TYPE_RESERVED}

HVM_START_INFO = struct.Struct("<IIIIQQQQII")
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")

MAX_MODULES = (layout.PVH_MEMMAP_START - layout.PVH_MODLIST_START) // HVM_MODLIST_ENTRY.size
MAX_MEMMAP_ENTRIES = (layout.ZERO_PAGE_START - layout.PVH_MEMMAP_START) // HVM_MEMMAP_ENTRY.size
assert layout.PVH_INFO_START + HVM_START_INFO.size <= layout.PVH_MODLIST_START


def write_start_info(mem, *, cmdline_paddr: int, modules: list[tuple[int, int]],
                     memmap: list[tuple[int, int, int]], rsdp: int = 0) -> int:
    """Write ``hvm_start_info`` v1, its module list and memory map; return its address.

    ``modules`` is ``[(paddr, size), ...]``; ``memmap`` is ``[(addr, size, type), ...]``.
    """
    if len(modules) > MAX_MODULES:
        raise BootError(f"{len(modules)} PVH modules do not fit the module list",
                        f"at most {MAX_MODULES}")
    if len(memmap) > MAX_MEMMAP_ENTRIES:
        raise BootError(f"{len(memmap)} memory map entries do not fit the PVH memory map",
                        f"at most {MAX_MEMMAP_ENTRIES}")
    if modules:
        mem.write(layout.PVH_MODLIST_START,
                  b"".join(HVM_MODLIST_ENTRY.pack(gpa, size, 0, 0) for gpa, size in modules))
    mem.write(layout.PVH_MEMMAP_START,
              b"".join(HVM_MEMMAP_ENTRY.pack(a, s, t, 0) for a, s, t in memmap))
    info = HVM_START_INFO.pack(
        HVM_START_MAGIC_VALUE, HVM_START_INFO_VERSION, 0, len(modules),
        layout.PVH_MODLIST_START if modules else 0, cmdline_paddr, rsdp,
        layout.PVH_MEMMAP_START, len(memmap), 0)
    mem.write(layout.PVH_INFO_START, info)
    return layout.PVH_INFO_START


def load_pvh(mem, data: bytes, elf, name: Path, cmdline: str, initramfs: bytes | None,
             initramfs_name: Path | None, rsdp: int = 0) -> BootInfo:
    """Boot ``elf`` (parsed from ``data``) through its XEN_ELFNOTE_PHYS32_ENTRY."""
    entry = elf.pvh_entry
    kernel_end = check_elf_segments(mem, elf, name)
    if entry >= 1 << 32:
        raise BootError(f"kernel {name}: PVH entry point {entry:#x} is above 4 GiB",
                        "the PVH entry must be a 32-bit physical address")
    if not any(p.paddr <= entry < p.paddr + p.memsz for p in elf.loads):
        raise BootError(
            f"kernel {name}: PVH entry point {entry:#x} is not inside any loadable segment",
            "the ELF file is corrupt")
    raw_cmdline = encode_cmdline(cmdline, CMDLINE_LIMIT, name)

    initrd = None
    if initramfs is not None:
        initrd = (place_initramfs(mem, len(initramfs), kernel_end, 1 << 32, initramfs_name),
                  len(initramfs))

    # Everything is checked; now write.
    write_elf_segments(mem, data, elf)
    if initrd is not None:
        mem.write(initrd[0], initramfs)
    mem.write(layout.CMDLINE_START, raw_cmdline)
    memmap = [(a, s, _MEMMAP_TYPES[kind]) for a, s, kind in memory_map(mem)]
    start_info = write_start_info(mem, cmdline_paddr=layout.CMDLINE_START,
                                  modules=[initrd] if initrd else [], memmap=memmap, rsdp=rsdp)
    regs, sregs = cpu.protected_mode_state(mem, entry, start_info)
    return BootInfo("pvh", entry, regs, sregs, kernel_end, initrd)
