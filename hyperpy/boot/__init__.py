"""Kernel loaders: put a kernel, its command line and initramfs into guest RAM and say how the
boot vCPU must start.

:func:`load_kernel` picks the boot protocol from the file:

* ELF (32- or 64-bit) with a Xen ``XEN_ELFNOTE_PHYS32_ENTRY`` note -> PVH (:mod:`.pvh`): 32-bit
  protected mode, EBX = ``struct hvm_start_info``.
* ELF64 x86-64 without that note -> Linux 64-bit boot protocol, vmlinux style (:mod:`.linux`).
* "HdrS" at 0x202 -> bzImage through the 64-bit boot protocol (:mod:`.linux`).

Every problem with the files or the command line is a one-line :class:`~hyperpy.errors.BootError`
naming the file; all ranges are checked before anything is written, and nothing is ever written
outside guest RAM.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BootError
from .common import BootInfo, check_boot_ram, read_file
from .elf import ELF_MAGIC, parse_elf

__all__ = ["BootInfo", "load_kernel"]

_BZIMAGE_MAGIC_AT = 0x202


def load_kernel(mem, kernel: Path, cmdline: str, initramfs: Path | None = None, *,
                rsdp: int = 0) -> BootInfo:
    """Load ``kernel`` (PVH ELF, vmlinux or bzImage) with ``cmdline`` and an optional initramfs.

    ``rsdp`` is the guest-physical address of the ACPI RSDP (0: none); it goes into PVH's
    ``rsdp_paddr`` or the zero page's ``acpi_rsdp_addr``.
    """
    kernel = Path(kernel)
    data = read_file(kernel, "kernel")
    check_boot_ram(mem)

    if data[:4] == ELF_MAGIC:
        elf = parse_elf(data, str(kernel))
        fmt = "pvh" if elf.pvh_entry is not None else "linux64"
        if fmt == "linux64" and elf.bits != 64:
            raise BootError(f"kernel {kernel} is a 32-bit ELF without a Xen PVH note",
                            "give a 64-bit vmlinux, a bzImage, or a kernel built with CONFIG_PVH=y")
    elif data[_BZIMAGE_MAGIC_AT:_BZIMAGE_MAGIC_AT + 4] == b"HdrS":
        fmt = "bzimage"
    else:
        raise BootError(f"kernel {kernel} is not an ELF or bzImage file",
                        "give a PVH ELF, vmlinux or bzImage")

    initrd_data = None
    if initramfs is not None:
        initramfs = Path(initramfs)
        initrd_data = read_file(initramfs, "initramfs")
        if not initrd_data:
            raise BootError(f"initramfs {initramfs} is empty", "give a cpio archive")

    if fmt == "pvh":
        from . import pvh
        return pvh.load_pvh(mem, data, elf, kernel, cmdline, initrd_data, initramfs, rsdp)
    from . import linux     # needs the compiled hyperpy._fast.bootparams
    if fmt == "linux64":
        return linux.load_vmlinux(mem, data, elf, kernel, cmdline, initrd_data, initramfs, rsdp)
    return linux.load_bzimage(mem, data, kernel, cmdline, initrd_data, initramfs, rsdp)
