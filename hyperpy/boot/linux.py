"""Linux x86 64-bit boot protocol (Documentation/arch/x86/boot.rst) for vmlinux ELF and bzImage.

The zero page (``struct boot_params``) is built at ``layout.ZERO_PAGE_START`` with the field
offsets and sizes the C compiler computed from ``<asm/bootparam.h>``
(:mod:`hyperpy._fast.bootparams`).  The vCPU starts in long mode at the 64-bit entry point with
RSI = zero page (:func:`hyperpy.boot.cpu.long_mode_state`).
"""

from __future__ import annotations

from pathlib import Path

from .. import layout
from .._fast import bootparams as bp
from ..errors import BootError
from . import cpu
from .common import (CMDLINE_LIMIT, FOUR_GIB, MEMMAP_RAM, BootInfo, align_up,
                     check_elf_segments, encode_cmdline, low_ram_end, memory_map,
                     place_initramfs, write_elf_segments)

BOOT_FLAG_MAGIC = 0xAA55
HDR_MAGIC = 0x53726448              # "HdrS"
LOADER_TYPE_UNDEFINED = 0xFF        # type_of_loader: "undefined/other" boot loader
VMLINUX_PROTOCOL_VERSION = 0x020C   # header version claimed for a vmlinux (it has no header)
KERNEL_MIN_ALIGNMENT = 0x100_0000   # 16 MiB, as Firecracker/cloud-hypervisor set for vmlinux
MIN_PROTOCOL = 0x0206               # cmdline_size exists from 2.06
XLOADFLAGS_PROTOCOL = 0x020C        # xloadflags exists from 2.12
DEFAULT_CMDLINE_SIZE = 255          # cmdline limit of protocols before 2.06
STARTUP_64_OFFSET = 0x200           # 64-bit entry = load address + 0x200

# Offsets into a bzImage file (the setup sectors mirror the zero page layout).
SETUP_HEADER_START = bp.BOOT_PARAMS_OFFSETS["hdr"]          # 0x1f1
JUMP_OFFSET = bp.BOOT_PARAMS_OFFSETS["hdr.jump"]            # 0x200: "jmp short" = eb xx
SECTOR = 512


class ZeroPage:
    """A ``struct boot_params`` being built: fields by name, as in ``BOOT_PARAMS_OFFSETS``."""

    def __init__(self) -> None:
        self.buf = bytearray(bp.SIZEOF_BOOT_PARAMS)

    def __getitem__(self, name: str) -> int:
        off, size = bp.BOOT_PARAMS_OFFSETS[name], bp.BOOT_PARAMS_SIZES[name]
        return int.from_bytes(self.buf[off:off + size], "little")

    def __setitem__(self, name: str, value: int) -> None:
        off, size = bp.BOOT_PARAMS_OFFSETS[name], bp.BOOT_PARAMS_SIZES[name]
        self.buf[off:off + size] = value.to_bytes(size, "little")

    def set_e820(self, entries: list[tuple[int, int, int]]) -> None:
        if len(entries) > bp.E820_MAX_ENTRIES_ZEROPAGE:
            raise BootError(f"{len(entries)} e820 entries do not fit the zero page",
                            f"at most {bp.E820_MAX_ENTRIES_ZEROPAGE}")
        base, esize = bp.BOOT_PARAMS_OFFSETS["e820_table"], bp.SIZEOF_BOOT_E820_ENTRY
        eo = bp.E820_ENTRY_OFFSETS
        for i, (addr, size, etype) in enumerate(entries):
            at = base + i * esize
            self.buf[at + eo["addr"]:at + eo["addr"] + 8] = addr.to_bytes(8, "little")
            self.buf[at + eo["size"]:at + eo["size"] + 8] = size.to_bytes(8, "little")
            self.buf[at + eo["type"]:at + eo["type"] + 4] = etype.to_bytes(4, "little")
        self["e820_entries"] = len(entries)


def e820_entries(mem) -> list[tuple[int, int, int]]:
    return [(a, s, bp.E820_RAM if kind == MEMMAP_RAM else bp.E820_RESERVED)
            for a, s, kind in memory_map(mem)]


def _finish_zero_page(zp: ZeroPage, mem, initrd, rsdp: int) -> None:
    """Fields every 64-bit boot sets: loader type, command line, initramfs, e820, RSDP."""
    zp["hdr.type_of_loader"] = LOADER_TYPE_UNDEFINED
    zp["hdr.cmd_line_ptr"] = layout.CMDLINE_START & 0xFFFF_FFFF
    zp["ext_cmd_line_ptr"] = layout.CMDLINE_START >> 32
    if initrd is not None:
        gpa, size = initrd
        zp["hdr.ramdisk_image"] = gpa & 0xFFFF_FFFF
        zp["ext_ramdisk_image"] = gpa >> 32
        zp["hdr.ramdisk_size"] = size & 0xFFFF_FFFF
        zp["ext_ramdisk_size"] = size >> 32
    if rsdp:
        zp["acpi_rsdp_addr"] = rsdp
    zp.set_e820(e820_entries(mem))


def _boot(mem, protocol: str, entry: int, zp: ZeroPage, raw_cmdline: bytes, kernel_end: int,
          initrd, initramfs: bytes | None) -> BootInfo:
    if initrd is not None:
        mem.write(initrd[0], initramfs)
    mem.write(layout.CMDLINE_START, raw_cmdline)
    mem.write(layout.ZERO_PAGE_START, bytes(zp.buf))
    regs, sregs = cpu.long_mode_state(mem, entry, layout.ZERO_PAGE_START)
    return BootInfo(protocol, entry, regs, sregs, kernel_end, initrd)


def load_vmlinux(mem, data: bytes, elf, name: Path, cmdline: str, initramfs: bytes | None,
                 initramfs_name: Path | None, rsdp: int = 0) -> BootInfo:
    """Boot a 64-bit vmlinux-style ELF: PT_LOAD segments at ``p_paddr``, entry = ``e_entry``."""
    if elf.bits != 64:
        raise BootError(f"kernel {name} is a 32-bit ELF without a Xen PVH note",
                        "give a 64-bit vmlinux, a bzImage, or a kernel built with CONFIG_PVH=y")
    entry = elf.virt_to_phys(elf.entry)
    if entry is None:
        raise BootError(
            f"kernel {name}: entry point {elf.entry:#x} is not inside any loadable segment",
            "the ELF file is corrupt")
    if entry >= FOUR_GIB:
        raise BootError(f"kernel {name}: entry point {entry:#x} is above the 4 GiB identity map",
                        "give a kernel linked below 4 GiB")
    kernel_end = check_elf_segments(mem, elf, name)
    raw_cmdline = encode_cmdline(cmdline, CMDLINE_LIMIT, name)
    initrd = None
    if initramfs is not None:
        initrd = (place_initramfs(mem, len(initramfs), kernel_end, FOUR_GIB, initramfs_name),
                  len(initramfs))

    zp = ZeroPage()
    zp["hdr.boot_flag"] = BOOT_FLAG_MAGIC
    zp["hdr.header"] = HDR_MAGIC
    zp["hdr.version"] = VMLINUX_PROTOCOL_VERSION
    zp["hdr.loadflags"] = bp.LOADED_HIGH | bp.CAN_USE_HEAP
    zp["hdr.kernel_alignment"] = KERNEL_MIN_ALIGNMENT
    zp["hdr.cmdline_size"] = len(raw_cmdline) - 1
    _finish_zero_page(zp, mem, initrd, rsdp)

    write_elf_segments(mem, data, elf)
    return _boot(mem, "linux64", entry, zp, raw_cmdline, kernel_end, initrd, initramfs)


def load_bzimage(mem, data: bytes, name: Path, cmdline: str, initramfs: bytes | None,
                 initramfs_name: Path | None, rsdp: int = 0) -> BootInfo:
    """Boot a bzImage through its 64-bit entry point (load address + 0x200)."""
    if len(data) <= JUMP_OFFSET + 1:
        raise BootError(f"kernel {name} is truncated: {len(data)} bytes",
                        "give the complete bzImage")
    # The setup header runs from 0x1f1 to the target of the "jmp short" at 0x200.
    hdr_end = JUMP_OFFSET + 2 + data[JUMP_OFFSET + 1]
    if hdr_end > len(data):
        raise BootError(f"kernel {name} is truncated: its setup header ends at {hdr_end:#x}, "
                        f"the file at {len(data):#x}", "give the complete bzImage")
    hdr_end = min(hdr_end, SETUP_HEADER_START + bp.SIZEOF_SETUP_HEADER)

    zp = ZeroPage()
    zp.buf[SETUP_HEADER_START:hdr_end] = data[SETUP_HEADER_START:hdr_end]

    version = zp["hdr.version"]
    vstr = f"{version >> 8}.{version & 0xFF:02d}"
    if version < MIN_PROTOCOL:
        raise BootError(f"kernel {name} uses boot protocol {vstr}, older than 2.06",
                        "give a newer kernel")
    xloadflags = zp["hdr.xloadflags"] if version >= XLOADFLAGS_PROTOCOL else 0
    if not xloadflags & bp.XLF_KERNEL_64:
        raise BootError(
            f"kernel {name} (boot protocol {vstr}) has no 64-bit entry point "
            "(XLF_KERNEL_64 not set)",
            "give a 64-bit x86 kernel (CONFIG_X86_64=y)")

    setup_sects = zp["hdr.setup_sects"] or 4
    payload_off = (setup_sects + 1) * SECTOR
    if payload_off >= len(data):
        raise BootError(f"kernel {name} is truncated: {setup_sects} setup sectors but the file has "
                        f"{len(data)} bytes", "give the complete bzImage")
    syssize = zp["hdr.syssize"]
    if syssize and payload_off + syssize * 16 > len(data) + 16:
        raise BootError(f"kernel {name} is truncated: the header says {payload_off + syssize * 16} "
                        f"bytes, the file has {len(data)}", "give the complete bzImage")
    payload = data[payload_off:]
    if len(payload) <= STARTUP_64_OFFSET:
        raise BootError(f"kernel {name} is truncated: its {len(payload)}-byte protected-mode part "
                        f"ends before the 64-bit entry at +{STARTUP_64_OFFSET:#x}",
                        "give the complete bzImage")

    align = zp["hdr.kernel_alignment"] or 1
    if align & (align - 1):
        raise BootError(f"kernel {name} has an invalid kernel_alignment {align:#x}",
                        "the bzImage is corrupt")
    pref = zp["hdr.pref_address"]
    relocatable = bool(zp["hdr.relocatable_kernel"])
    if pref >= layout.HIGH_RAM_START:
        load = pref
    else:   # no usable preferred address: the traditional bzImage load address, 1 MiB
        load = align_up(layout.HIGH_RAM_START, align) if relocatable else layout.HIGH_RAM_START
    # The decompressor runs in [target, target + init_size): a relocatable kernel uses its load
    # address rounded up to kernel_alignment, but never below LOAD_PHYSICAL_ADDR (= pref_address);
    # nothing else may be placed there.
    init_size = max(zp["hdr.init_size"], len(payload))
    target = max(align_up(load, align) if relocatable else load, pref)
    kernel_end = max(load + len(payload), target + init_size)
    top = low_ram_end(mem)
    if kernel_end > top:
        raise BootError(
            f"kernel {name} needs guest RAM up to {kernel_end:#x} (loaded at {load:#x}, init_size "
            f"{init_size:#x}) but guest RAM below the 32-bit hole ends at {top:#x}",
            "give the VM more memory")

    cmdline_size = zp["hdr.cmdline_size"] or DEFAULT_CMDLINE_SIZE
    raw_cmdline = encode_cmdline(cmdline, min(cmdline_size, CMDLINE_LIMIT), name)
    initrd = None
    if initramfs is not None:
        initrd_max = zp["hdr.initrd_addr_max"] or 0x37FF_FFFF   # boot.rst default for old headers
        initrd = (place_initramfs(mem, len(initramfs), kernel_end, initrd_max + 1, initramfs_name),
                  len(initramfs))

    zp["hdr.loadflags"] = zp["hdr.loadflags"] | bp.LOADED_HIGH
    zp["hdr.code32_start"] = load
    _finish_zero_page(zp, mem, initrd, rsdp)

    mem.write(load, payload)
    return _boot(mem, "bzimage", load + STARTUP_64_OFFSET, zp, raw_cmdline, kernel_end, initrd,
                 initramfs)
