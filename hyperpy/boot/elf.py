"""A small, defensive reader for the ELF kernels hyperpy boots (ELF32 and ELF64, little-endian).

Only what a loader needs: the file header, the program headers, the ``PT_LOAD`` segments and the
``PT_NOTE`` walk that finds Xen's ``XEN_ELFNOTE_PHYS32_ENTRY`` (the PVH entry point).  Every
offset and size read from the file is checked against the file before it is used, and every
problem is a one-line :class:`~hyperpy.errors.BootError` that names the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BootError

ELF_MAGIC = b"\x7fELF"

# e_ident indices and values (ELF gABI).
EI_CLASS = 4
EI_DATA = 5
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1

# e_type
ET_EXEC = 2
ET_DYN = 3

# e_machine
EM_386 = 3
EM_X86_64 = 62

# p_type
PT_LOAD = 1
PT_NOTE = 4

PN_XNUM = 0xFFFF  # e_phnum escape: real count in section header 0 (not supported)

# Xen ELF note (xen/include/public/elfnote.h): name "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY,
# descriptor = 32-bit physical entry address of the PVH kernel (4 or 8 bytes wide in practice).
XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18

# (struct format, size) of the file header and of one program header, per class.
_EHDR = {ELFCLASS32: struct.Struct("<16sHHIIIIIHHHHHH"),
         ELFCLASS64: struct.Struct("<16sHHIQQQIHHHHHH")}
_PHDR32 = struct.Struct("<IIIIIIII")   # type offset vaddr paddr filesz memsz flags align
_PHDR64 = struct.Struct("<IIQQQQQQ")   # type flags offset vaddr paddr filesz memsz align
_NHDR = struct.Struct("<III")          # namesz descsz type (4-byte words in both classes)


@dataclass(frozen=True)
class ProgramHeader:
    index: int
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class ElfKernel:
    """What a loader needs from an ELF kernel."""

    bits: int                      # 32 or 64
    machine: int                   # e_machine
    entry: int                     # e_entry (a virtual address in most kernels)
    phdrs: tuple[ProgramHeader, ...]
    pvh_entry: int | None          # XEN_ELFNOTE_PHYS32_ENTRY, when present

    @property
    def loads(self) -> list[ProgramHeader]:
        """The ``PT_LOAD`` segments that occupy memory (``p_memsz > 0``)."""
        return [p for p in self.phdrs if p.type == PT_LOAD and p.memsz > 0]

    def virt_to_phys(self, addr: int) -> int | None:
        """The physical address of the entry point ``addr`` (``e_entry``).

        An address that already lies inside some ``PT_LOAD`` segment's physical range
        ``[p_paddr, p_paddr + p_memsz)`` is returned as is: Linux's x86-64 vmlinux has a physical
        ``e_entry`` (``phys_startup_64``), and its per-CPU segment has ``p_vaddr`` 0, so a
        virtual-first lookup could mistranslate.  Otherwise an address inside a segment's
        ``[p_vaddr, p_vaddr + p_memsz)`` is translated with that segment's ``p_vaddr -> p_paddr``
        offset (e.g. a higher-half ``0xffffffff81000000 + x``).  ``None`` when no segment
        contains it.
        """
        for p in self.loads:
            if p.paddr <= addr < p.paddr + p.memsz:
                return addr
        for p in self.loads:
            if p.vaddr <= addr < p.vaddr + p.memsz:
                return addr - p.vaddr + p.paddr
        return None


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def parse_elf(data: bytes, name: str) -> ElfKernel:
    """Parse and check the ELF image ``data``; ``name`` (the file) is used in error messages."""
    if data[:4] != ELF_MAGIC:
        raise BootError(f"kernel {name} is not an ELF file", "give a PVH ELF, vmlinux or bzImage")
    if len(data) < 16:
        raise BootError(
            f"kernel {name} is truncated: {len(data)} bytes, shorter than an ELF header",
            "give the complete kernel file")
    elfclass = data[EI_CLASS]
    if elfclass not in _EHDR:
        raise BootError(f"kernel {name} has an invalid ELF class {elfclass}",
                        "give a 32-bit or 64-bit ELF kernel")
    if data[EI_DATA] != ELFDATA2LSB:
        raise BootError(f"kernel {name} is not a little-endian ELF file",
                        "give an x86 (little-endian) kernel")
    ehdr = _EHDR[elfclass]
    if len(data) < ehdr.size:
        raise BootError(
            f"kernel {name} is truncated: {len(data)} bytes, shorter than its "
            f"{ehdr.size}-byte ELF header",
            "give the complete kernel file")
    (_ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(data, 0)
    bits = 32 if elfclass == ELFCLASS32 else 64
    if e_type not in (ET_EXEC, ET_DYN):
        raise BootError(f"kernel {name} is an ELF file of type {e_type}, not an executable",
                        "give a linked kernel image (vmlinux or a PVH ELF)")
    allowed = (EM_386, EM_X86_64) if bits == 32 else (EM_X86_64,)
    if e_machine not in allowed:
        raise BootError(f"kernel {name} is a {bits}-bit ELF for machine {e_machine}, not x86",
                        "give an x86-64 kernel")

    phdr = _PHDR32 if bits == 32 else _PHDR64
    if e_phnum == 0:
        raise BootError(f"kernel {name} has no program headers", "give a linked kernel image")
    if e_phnum == PN_XNUM:
        raise BootError(f"kernel {name} has too many program headers (PN_XNUM)",
                        "give a kernel with fewer than 65535 program headers")
    if e_phentsize < phdr.size:
        raise BootError(
            f"kernel {name} has {e_phentsize}-byte program headers, expected {phdr.size}",
            "the ELF file is corrupt")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(
            f"kernel {name} is truncated: its {e_phnum} program headers at offset {e_phoff:#x} "
            f"run past the end of the file ({len(data)} bytes)", "give the complete kernel file")

    phdrs = []
    for i in range(e_phnum):
        fields = phdr.unpack_from(data, e_phoff + i * e_phentsize)
        if bits == 32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _p_flags, p_align = fields
        else:
            p_type, _p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = fields
        ph = ProgramHeader(i, p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)
        if p_type in (PT_LOAD, PT_NOTE):
            what = "PT_LOAD" if p_type == PT_LOAD else "PT_NOTE"
            if p_offset + p_filesz > len(data):
                raise BootError(
                    f"kernel {name}: {what} segment {i} (file offset {p_offset:#x}, "
                    f"{p_filesz} bytes) runs past the end of the file ({len(data)} bytes)",
                    "the file is truncated or corrupt")
            if p_type == PT_LOAD and p_filesz > p_memsz:
                raise BootError(
                    f"kernel {name}: PT_LOAD segment {i} has p_filesz {p_filesz:#x} larger than "
                    f"p_memsz {p_memsz:#x}", "the ELF file is corrupt")
        phdrs.append(ph)

    kernel = ElfKernel(bits, e_machine, e_entry, tuple(phdrs), None)
    if not kernel.loads:
        raise BootError(f"kernel {name} has no loadable (PT_LOAD) segments",
                        "give a linked kernel image")
    pvh = find_pvh_entry(data, kernel.phdrs, name)
    if pvh is not None:
        kernel = ElfKernel(bits, e_machine, e_entry, tuple(phdrs), pvh)
    return kernel


def iter_notes(data: bytes, ph: ProgramHeader):
    """Yield ``(name, type, desc)`` for each note in the ``PT_NOTE`` segment ``ph``.

    Notes are 4-byte aligned in both ELF classes as produced by binutils; a segment aligned to 8
    (e.g. GNU property notes) uses 8-byte padding.  A malformed note ends the walk of its segment.
    """
    align = 8 if ph.align == 8 else 4
    pos, end = ph.offset, ph.offset + ph.filesz
    while pos + _NHDR.size <= end:
        namesz, descsz, ntype = _NHDR.unpack_from(data, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + _align_up(namesz, align)
        if desc_at + descsz > end:
            return
        yield bytes(data[name_at:name_at + namesz]), ntype, bytes(data[desc_at:desc_at + descsz])
        pos = desc_at + _align_up(descsz, align)


def find_pvh_entry(data: bytes, phdrs, name: str) -> int | None:
    """The PVH entry point from the ``Xen``/``XEN_ELFNOTE_PHYS32_ENTRY`` note, or ``None``."""
    for ph in phdrs:
        if ph.type != PT_NOTE:
            continue
        for nname, ntype, desc in iter_notes(data, ph):
            if nname.rstrip(b"\0") != XEN_NOTE_NAME or ntype != XEN_ELFNOTE_PHYS32_ENTRY:
                continue
            if len(desc) == 4:
                return struct.unpack("<I", desc)[0]
            if len(desc) == 8:
                return struct.unpack("<Q", desc)[0]
            raise BootError(
                f"kernel {name} has a Xen PHYS32_ENTRY note with a {len(desc)}-byte value",
                "the PVH note must hold a 4- or 8-byte physical address")
    return None
