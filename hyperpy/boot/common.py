"""Pieces shared by the boot protocols: the result type, guest-RAM checks, the memory map,
command-line encoding, file reading and initramfs placement.

``mem`` is a :class:`hyperpy._fast.guestmem.GuestMemory` (or anything with the same
``read``/``write``/``size``/``regions`` API).  Loaders check every range against ``mem.regions``
*before* they write, so a bad kernel never causes a write outside RAM and errors are
:class:`~hyperpy.errors.BootError`, not ``GuestMemoryError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import layout
from ..errors import BootError

PAGE_SIZE = 0x1000
FOUR_GIB = 1 << 32
_ZERO_CHUNK = 2 * layout.MiB
CMDLINE_LIMIT = layout.CMDLINE_MAX_SIZE - 1     # bytes before the terminating NUL


@dataclass
class BootInfo:
    """Result of :func:`hyperpy.boot.load_kernel`: where the kernel is and how to start the BSP.

    ``regs`` is a full ``KVM_SET_REGS`` dict; ``sregs`` holds only the special registers the boot
    protocol sets (segments, ``gdt``/``idt``, ``cr0``/``cr3``/``cr4``, ``efer``), to be merged
    onto the vCPU's ``KVM_GET_SREGS`` state.
    """

    protocol: str                       # 'pvh' | 'linux64' | 'bzimage'
    entry: int                          # guest-physical entry point
    regs: dict = field(default_factory=dict)
    sregs: dict = field(default_factory=dict)
    kernel_end: int = 0                 # first byte above the kernel (incl. bss / init_size)
    initramfs: tuple[int, int] | None = None   # (gpa, size)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def ram_ranges(mem) -> list[tuple[int, int]]:
    """Guest RAM as sorted ``[(gpa, size), ...]`` from ``mem.regions``."""
    return sorted((int(r[0]), int(r[1])) for r in mem.regions)


def low_ram_end(mem) -> int:
    """End of the RAM region that starts at guest-physical 0 (0 when there is none)."""
    for gpa, size in ram_ranges(mem):
        if gpa == 0:
            return size
    return 0


def in_ram(mem, gpa: int, size: int) -> bool:
    """True when ``[gpa, gpa + size)`` lies inside a single RAM region."""
    if gpa < 0 or size < 0:
        return False
    for start, length in ram_ranges(mem):
        if start <= gpa and gpa + size <= start + length:
            return True
    return False


def describe_ram(mem) -> str:
    return " ".join(f"[{g:#x}, {g + s:#x})" for g, s in ram_ranges(mem)) or "none"


def check_boot_ram(mem) -> None:
    """The low boot area [0, 1 MiB) and some RAM above it must exist."""
    if low_ram_end(mem) <= layout.HIGH_RAM_START:
        raise BootError(
            f"guest RAM ({describe_ram(mem)}) does not reach above {layout.HIGH_RAM_START:#x}",
            "give the VM at least 16M of memory")


MEMMAP_RAM = "ram"
MEMMAP_RESERVED = "reserved"


def memory_map(mem) -> list[tuple[int, int, str]]:
    """The guest's e820 / PVH memory map, following cloud-hypervisor: ``[(addr, size, kind)]``.

    RAM ``[0, EBDA_START)`` and ``[HIGH_RAM_START, end of the first region)``, the PCI ECAM
    (MMCONFIG) window as reserved (Linux uses MMCONFIG only when its range is reserved), and
    every RAM region above (RAM above 4 GiB).  ``[EBDA_START, 1 MiB)`` (EBDA, VGA hole, BIOS
    area with the ACPI tables) is left out: a hole, which Linux treats as reserved.
    """
    out = []
    for gpa, size in ram_ranges(mem):
        if gpa == 0:
            out.append((0, min(size, layout.EBDA_START), MEMMAP_RAM))
            if size > layout.HIGH_RAM_START:
                out.append((layout.HIGH_RAM_START, size - layout.HIGH_RAM_START, MEMMAP_RAM))
        elif size:
            out.append((gpa, size, MEMMAP_RAM))
    out.append((layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, MEMMAP_RESERVED))
    return sorted(out)


def read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BootError(f"cannot read {what} {path}: {e.strerror or e}",
                        f"give a readable {what} file") from None


def encode_cmdline(cmdline: str, limit: int, name: str) -> bytes:
    """``cmdline`` as NUL-terminated bytes; ``limit`` is the most bytes allowed before the NUL."""
    raw = cmdline.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL character", "remove it")
    if len(raw) > limit:
        raise BootError(
            f"kernel command line is {len(raw)} bytes, longer than the {limit} bytes "
            f"kernel {name} accepts",
            "shorten the command line")
    return raw + b"\0"


def place_initramfs(mem, size: int, kernel_end: int, max_end: int, name: Path) -> int:
    """Guest address for an initramfs of ``size`` bytes: page-aligned, as high as possible below
    ``min(max_end, end of low RAM, 4 GiB)`` and above ``kernel_end``."""
    top = min(max_end, low_ram_end(mem), FOUR_GIB)
    lowest = max(align_up(kernel_end, PAGE_SIZE), layout.HIGH_RAM_START)
    gpa = align_down(top - size, PAGE_SIZE)
    if size <= 0 or gpa < lowest:
        raise BootError(
            f"initramfs {name} ({size} bytes) does not fit in guest RAM between the kernel end "
            f"{lowest:#x} and {top:#x}",
            "give the VM more memory or use a smaller initramfs")
    return gpa


def write_zeros(mem, gpa: int, size: int) -> None:
    """Zero ``[gpa, gpa + size)`` (already checked to lie in RAM)."""
    fill = getattr(mem, "fill", None)       # GuestMemory.fill: memset, no temporary buffer
    if fill is not None:
        fill(gpa, size, 0)
        return
    zeros = bytes(min(size, _ZERO_CHUNK))
    while size > 0:
        n = min(size, len(zeros))
        mem.write(gpa, zeros if n == len(zeros) else zeros[:n])
        gpa += n
        size -= n


def check_elf_segments(mem, elf, name: Path) -> int:
    """Check that every PT_LOAD segment of ``elf`` lies in guest RAM at or above 1 MiB.

    Returns the end of the highest segment (bss included).
    """
    loads = elf.loads
    for p in loads:
        end = p.paddr + p.memsz
        if p.paddr < layout.HIGH_RAM_START:
            raise BootError(
                f"kernel {name}: PT_LOAD segment {p.index} [{p.paddr:#x}, {end:#x}) overlaps the "
                f"low boot area [0, {layout.HIGH_RAM_START:#x})",
                "give a kernel linked to load at 1 MiB or above")
        if not in_ram(mem, p.paddr, p.memsz):
            raise BootError(
                f"kernel {name}: PT_LOAD segment {p.index} [{p.paddr:#x}, {end:#x}) lies outside "
                f"guest RAM ({describe_ram(mem)})",
                "give the VM more memory or a kernel linked at a lower address")
    return max(p.paddr + p.memsz for p in loads)


def write_elf_segments(mem, data: bytes, elf) -> None:
    """Copy the PT_LOAD segments to their ``p_paddr`` and zero their bss part.

    Call :func:`check_elf_segments` first.
    """
    view = memoryview(data)         # segments go straight from the file's bytes, no copy
    for p in elf.loads:
        if p.filesz:
            mem.write(p.paddr, view[p.offset:p.offset + p.filesz])
        if p.memsz > p.filesz:
            write_zeros(mem, p.paddr + p.filesz, p.memsz - p.filesz)
