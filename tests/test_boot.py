"""Unit tests of the boot loaders (hyperpy.boot) against a fake, sparse guest memory.

The kernels are synthesized here: struct-packed ELF32/ELF64 files with and without a Xen PVH
note, and a bzImage made of a setup header plus a payload.  The zero page is read back with the
offsets of the compiled hyperpy._fast.bootparams module (built into a temporary directory when
it has not been built in place).
"""

from __future__ import annotations

import importlib.util
import random
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hyperpy import layout
from hyperpy.boot import BootInfo, load_kernel
from hyperpy.boot import cpu, elf as elfmod
from hyperpy.errors import BootError, GuestMemoryError

MiB = layout.MiB
GiB = layout.GiB
REPO = Path(__file__).resolve().parent.parent
BOOTPARAMS_PYX = REPO / "hyperpy" / "_fast" / "bootparams.pyx"


# --------------------------------------------------------------------------------------------
# The compiled bootparams module

def _build_bootparams(tmp: Path):
    """Compile bootparams.pyx into ``tmp`` (not the source tree) and register the module."""
    pytest.importorskip("Cython")
    c_file = tmp / "bootparams.c"
    so_file = tmp / ("bootparams" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([sys.executable, "-m", "cython", "-3", "-o", str(c_file), str(BOOTPARAMS_PYX)],
                   check=True, capture_output=True)
    cc = (sysconfig.get_config_var("CC") or "gcc").split()[0]
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-I" + sysconfig.get_paths()["include"],
                    str(c_file), "-o", str(so_file)], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("hyperpy._fast.bootparams", so_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["hyperpy._fast.bootparams"] = mod
    import hyperpy._fast as fast
    fast.bootparams = mod
    return mod


@pytest.fixture(scope="session")
def bp(tmp_path_factory):
    try:
        from hyperpy._fast import bootparams
        return bootparams
    except ImportError:
        return _build_bootparams(tmp_path_factory.mktemp("bootparams"))


# --------------------------------------------------------------------------------------------
# Fake guest memory: same API as hyperpy._fast.guestmem.GuestMemory, sparse pages

class FakeMemory:
    PAGE = 4096

    def __init__(self, size: int, junk: bool = False) -> None:
        self.size = size
        self.regions = [(gpa, length, 0) for gpa, length in layout.ram_ranges(size)]
        self.pages: dict[int, bytearray] = {}
        self.writes: list[tuple[int, int]] = []
        self.junk = junk     # unwritten pages read as 0xcc instead of 0 (to check bss zeroing)

    def _check(self, gpa: int, length: int) -> None:
        if length < 0 or not any(g <= gpa and gpa + length <= g + s for g, s, _ in self.regions):
            raise GuestMemoryError(f"access [{gpa:#x}, {gpa + length:#x}) outside guest RAM")

    def _page(self, n: int) -> bytearray:
        page = self.pages.get(n)
        if page is None:
            page = self.pages[n] = bytearray(b"\xcc" * self.PAGE if self.junk else self.PAGE)
        return page

    def write(self, gpa: int, data: bytes) -> None:
        assert isinstance(data, (bytes, bytearray, memoryview)), type(data)
        self._check(gpa, len(data))
        self.writes.append((gpa, len(data)))
        pos = 0
        while pos < len(data):
            n, off = divmod(gpa + pos, self.PAGE)
            chunk = min(self.PAGE - off, len(data) - pos)
            self._page(n)[off:off + chunk] = data[pos:pos + chunk]
            pos += chunk

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        out = bytearray()
        while length > 0:
            n, off = divmod(gpa, self.PAGE)
            chunk = min(self.PAGE - off, length)
            page = self.pages.get(n)
            if page is None:
                out += (b"\xcc" if self.junk else b"\0") * chunk
            else:
                out += page[off:off + chunk]
            gpa += chunk
            length -= chunk
        return bytes(out)

    def u(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")


# --------------------------------------------------------------------------------------------
# Synthetic kernels

def note(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    def pad(b):
        return b + b"\0" * (-len(b) % align)
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def make_elf(bits: int = 64, entry: int = 0x100000, segments=None, notes: bytes | None = None,
             machine: int | None = None, note_align: int = 4, e_type: int = 2) -> bytes:
    """ELF with PT_LOAD ``segments`` = [(vaddr, paddr, data, memsz)] and an optional PT_NOTE."""
    if segments is None:
        segments = [(0x100000, 0x100000, b"\x90" * 0x100, 0x1000)]
    if machine is None:
        machine = 62 if bits == 64 else 3
    ehsize, phsize = (64, 56) if bits == 64 else (52, 32)
    nph = len(segments) + (1 if notes is not None else 0)
    off = ehsize + nph * phsize
    body = b""
    phdrs = []
    for vaddr, paddr, data, memsz in segments:
        phdrs.append((1, off + len(body), vaddr, paddr, len(data), memsz, 7, 0x1000))
        body += data
    if notes is not None:
        phdrs.append((4, off + len(body), 0, 0, len(notes), 0, 4, note_align))
        body += notes
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    if bits == 64:
        hdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, ehsize, 0, 0,
                          ehsize, phsize, nph, 64, 0, 0)
        ph = b"".join(struct.pack("<IIQQQQQQ", t, fl, o, v, p, fs, ms, al)
                      for t, o, v, p, fs, ms, fl, al in phdrs)
    else:
        hdr = struct.pack("<16sHHIIIIIHHHHHH", ident, e_type, machine, 1, entry, ehsize, 0, 0,
                          ehsize, phsize, nph, 40, 0, 0)
        ph = b"".join(struct.pack("<IIIIIIII", t, o, v, p, fs, ms, fl, al)
                      for t, o, v, p, fs, ms, fl, al in phdrs)
    return hdr + ph + body


def pvh_note(entry: int, width: int = 4) -> bytes:
    return note(b"Xen\0", 18, entry.to_bytes(width, "little"))


def put(buf: bytearray, bp, name: str, value: int) -> None:
    off, size = bp.BOOT_PARAMS_OFFSETS[name], bp.BOOT_PARAMS_SIZES[name]
    buf[off:off + size] = value.to_bytes(size, "little")


def make_bzimage(bp, *, version=0x020F, xloadflags=None, setup_sects=4, payload=None,
                 pref=16 * MiB, init_size=4 * MiB, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF,
                 align=2 * MiB, relocatable=1, hdr_len=0x6A) -> bytes:
    if xloadflags is None:
        xloadflags = bp.XLF_KERNEL_64 | bp.XLF_CAN_BE_LOADED_ABOVE_4G
    if payload is None:
        payload = bytes(range(256)) * 64          # 16 KiB, recognisable
    setup = bytearray((setup_sects or 4) * 512 + 512)
    put(setup, bp, "hdr.setup_sects", setup_sects)
    put(setup, bp, "hdr.syssize", (len(payload) + 15) // 16)
    put(setup, bp, "hdr.boot_flag", 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = hdr_len
    setup[0x202:0x206] = b"HdrS"
    put(setup, bp, "hdr.version", version)
    put(setup, bp, "hdr.loadflags", bp.LOADED_HIGH)
    put(setup, bp, "hdr.code32_start", 0x100000)
    put(setup, bp, "hdr.initrd_addr_max", initrd_addr_max)
    put(setup, bp, "hdr.kernel_alignment", align)
    put(setup, bp, "hdr.relocatable_kernel", relocatable)
    put(setup, bp, "hdr.xloadflags", xloadflags)
    put(setup, bp, "hdr.cmdline_size", cmdline_size)
    put(setup, bp, "hdr.pref_address", pref)
    put(setup, bp, "hdr.init_size", init_size)
    setup[0x280:0x290] = b"REALMODE-SETUP!!"   # past the header: must not reach the zero page
    return bytes(setup) + payload


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def decode_gdt(mem: FakeMemory, sregs: dict) -> list[int]:
    g = sregs["gdt"]
    raw = mem.read(g["base"], g["limit"] + 1)
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw))


def check_gdt_matches_sregs(mem, sregs):
    gdt = decode_gdt(mem, sregs)
    assert sregs["gdt"] == {"base": layout.BOOT_GDT_START, "limit": 47}
    assert gdt[0] == gdt[1] == 0
    for reg in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        seg = sregs[reg]
        assert cpu.segment_from_gdt(gdt[seg["selector"] >> 3], seg["selector"]) == seg, reg
    assert sregs["idt"] == {"base": layout.BOOT_IDT_START, "limit": 0}


def check_flat(seg, selector, type_, db, l):
    assert seg["selector"] == selector
    assert seg["base"] == 0 and seg["limit"] == 0xFFFFFFFF and seg["g"] == 1
    assert seg["type"] == type_ and seg["s"] == 1 and seg["present"] == 1 and seg["dpl"] == 0
    assert seg["db"] == db and seg["l"] == l and seg["unusable"] == 0


def check_tr(seg):
    assert seg == {"base": 0, "limit": 0x67, "selector": 0x20, "type": 0xB, "present": 1, "dpl": 0,
                   "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0}


def check_regs_complete(regs):
    assert set(regs) == set(cpu.REG_NAMES)


# --------------------------------------------------------------------------------------------
# bootparams: offsets from <asm/bootparam.h> must match Documentation/arch/x86/boot.rst

def test_bootparams_layout(bp):
    assert bp.SIZEOF_BOOT_PARAMS == 4096
    assert bp.SIZEOF_BOOT_E820_ENTRY == 20
    assert bp.E820_ENTRY_OFFSETS == {"addr": 0, "size": 8, "type": 16}
    expected = {
        "acpi_rsdp_addr": 0x070, "ext_ramdisk_image": 0x0C0, "ext_ramdisk_size": 0x0C4,
        "ext_cmd_line_ptr": 0x0C8, "e820_entries": 0x1E8, "hdr": 0x1F1, "e820_table": 0x2D0,
        "hdr.setup_sects": 0x1F1, "hdr.syssize": 0x1F4, "hdr.boot_flag": 0x1FE, "hdr.jump": 0x200,
        "hdr.header": 0x202, "hdr.version": 0x206, "hdr.type_of_loader": 0x210,
        "hdr.loadflags": 0x211, "hdr.code32_start": 0x214, "hdr.ramdisk_image": 0x218,
        "hdr.ramdisk_size": 0x21C, "hdr.heap_end_ptr": 0x224, "hdr.cmd_line_ptr": 0x228,
        "hdr.initrd_addr_max": 0x22C, "hdr.kernel_alignment": 0x230,
        "hdr.relocatable_kernel": 0x234, "hdr.xloadflags": 0x236, "hdr.cmdline_size": 0x238,
        "hdr.pref_address": 0x258, "hdr.init_size": 0x260,
    }
    for name, off in expected.items():
        assert bp.BOOT_PARAMS_OFFSETS[name] == off, name
    assert bp.BOOT_PARAMS_SIZES["hdr.cmd_line_ptr"] == 4
    assert bp.BOOT_PARAMS_SIZES["hdr.pref_address"] == 8
    assert bp.BOOT_PARAMS_SIZES["e820_entries"] == 1
    assert bp.SETUP_HEADER_OFFSETS["cmd_line_ptr"] == 0x228 - 0x1F1
    assert bp.SIZEOF_SETUP_HEADER >= 0x264 - 0x1F1
    assert (bp.LOADED_HIGH, bp.KEEP_SEGMENTS, bp.CAN_USE_HEAP) == (1, 0x40, 0x80)
    assert bp.XLF_KERNEL_64 == 1
    assert (bp.E820_RAM, bp.E820_RESERVED) == (1, 2)
    assert bp.E820_MAX_ENTRIES_ZEROPAGE == 128


# --------------------------------------------------------------------------------------------
# PVH

def read_start_info(mem):
    f = struct.unpack("<IIIIQQQQII", mem.read(layout.PVH_INFO_START, 56))
    keys = ("magic", "version", "flags", "nr_modules", "modlist_paddr", "cmdline_paddr",
            "rsdp_paddr", "memmap_paddr", "memmap_entries", "reserved")
    return dict(zip(keys, f))


def read_cstring(mem, gpa, limit=0x10000):
    raw = mem.read(gpa, limit)
    return raw[:raw.index(b"\0")]


def read_memmap(mem, info):
    raw = mem.read(info["memmap_paddr"], 24 * info["memmap_entries"])
    return [struct.unpack_from("<QQII", raw, 24 * i) for i in range(info["memmap_entries"])]


@pytest.mark.parametrize("bits,width", [(64, 4), (64, 8), (32, 4), (32, 8)])
def test_pvh_elf(tmp_path, bits, width):
    code = b"\xfa\xfc" + bytes(range(1, 200))
    kernel = write(tmp_path, "pvh.elf", make_elf(
        bits, entry=0x100000,
        segments=[(0x100000, 0x100000, code, 0x3000), (0x200000, 0x200000, b"DATA", 0x2000)],
        notes=note(b"GNU\0", 3, b"build-id-bytes") + pvh_note(0x100010, width)))
    mem = FakeMemory(64 * MiB, junk=True)
    info = load_kernel(mem, kernel, "console=ttyS0 root=/dev/vda")
    assert isinstance(info, BootInfo)
    assert info.protocol == "pvh"
    assert info.entry == 0x100010
    assert info.kernel_end == 0x202000
    assert info.initramfs is None

    # Segments loaded, bss zeroed.
    assert mem.read(0x100000, len(code)) == code
    assert mem.read(0x100000 + len(code), 0x3000 - len(code)) == bytes(0x3000 - len(code))
    assert mem.read(0x200000, 4) == b"DATA"
    assert mem.read(0x200004, 0x2000 - 4) == bytes(0x2000 - 4)
    assert mem.read(0x202000, 16) == b"\xcc" * 16          # nothing past the segments

    # Registers: 32-bit protected mode, paging off.
    check_regs_complete(info.regs)
    assert info.regs["rip"] == 0x100010
    assert info.regs["rbx"] == layout.PVH_INFO_START
    assert info.regs["rflags"] == 2
    s = info.sregs
    assert s["cr0"] == cpu.X86_CR0_PE | cpu.X86_CR0_ET == 0x11
    assert s["cr4"] == 0 and s["efer"] == 0 and s["cr3"] == 0
    check_flat(s["cs"], 0x10, 0xB, db=1, l=0)
    for reg in ("ds", "es", "fs", "gs", "ss"):
        check_flat(s[reg], 0x18, 0x3, db=1, l=0)
    check_tr(s["tr"])
    check_gdt_matches_sregs(mem, s)

    # hvm_start_info v1.
    si = read_start_info(mem)
    assert si["magic"] == 0x336EC578
    assert si["version"] == 1
    assert si["flags"] == 0
    assert si["nr_modules"] == 0 and si["modlist_paddr"] == 0
    assert si["cmdline_paddr"] == layout.CMDLINE_START
    assert si["rsdp_paddr"] == 0
    assert si["memmap_paddr"] == layout.PVH_MEMMAP_START
    assert si["reserved"] == 0
    assert read_cstring(mem, layout.CMDLINE_START) == b"console=ttyS0 root=/dev/vda"
    assert read_memmap(mem, si) == [(0, layout.EBDA_START, 1, 0),
                                    (layout.HIGH_RAM_START, 63 * MiB, 1, 0),
                                    (layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, 2, 0)]


def test_pvh_initramfs_module(tmp_path):
    kernel = write(tmp_path, "pvh32.elf", make_elf(32, notes=pvh_note(0x100000)))
    initrd = write(tmp_path, "initrd.cpio", b"070701" + bytes(range(256)) * 20)
    mem = FakeMemory(64 * MiB)
    info = load_kernel(mem, kernel, "", initrd, rsdp=0xE0000)
    size = initrd.stat().st_size
    gpa, isize = info.initramfs
    assert isize == size
    assert gpa % 4096 == 0
    assert gpa + size <= 64 * MiB and 64 * MiB - (gpa + size) < 4096     # as high as possible
    assert mem.read(gpa, size) == initrd.read_bytes()
    si = read_start_info(mem)
    assert si["nr_modules"] == 1
    assert si["modlist_paddr"] == layout.PVH_MODLIST_START
    assert si["rsdp_paddr"] == 0xE0000
    assert struct.unpack("<QQQQ", mem.read(layout.PVH_MODLIST_START, 32)) == (gpa, size, 0, 0)
    assert read_cstring(mem, layout.CMDLINE_START) == b""


def test_pvh_memmap_above_4g():
    # 5 GiB: [0, 3 GiB) + [4 GiB, 6 GiB); the fake memory is sparse so this is cheap.
    mem = FakeMemory(5 * GiB)
    path = Path("/nonexistent")
    from hyperpy.boot import pvh
    elf = elfmod.parse_elf(make_elf(64, notes=pvh_note(0x100000)), "k")
    info = pvh.load_pvh(mem, make_elf(64, notes=pvh_note(0x100000)), elf, path, "x", None, None)
    assert info.protocol == "pvh"
    si = read_start_info(mem)
    assert read_memmap(mem, si) == [
        (0, layout.EBDA_START, 1, 0),
        (layout.HIGH_RAM_START, 3 * GiB - layout.HIGH_RAM_START, 1, 0),
        (layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, 2, 0),
        (4 * GiB, 2 * GiB, 1, 0),
    ]


def test_bss_zeroed_with_fill(tmp_path):
    # GuestMemory has fill(gpa, length, value); the loader uses it for bss when present.
    class FillMemory(FakeMemory):
        def fill(self, gpa, length, value=0):
            self.filled.append((gpa, length))
            self.write(gpa, bytes([value]) * length)

    mem = FillMemory(64 * MiB, junk=True)
    mem.filled = []
    kernel = write(tmp_path, "k", make_elf(64, notes=pvh_note(0x100000),
                                           segments=[(0x100000, 0x100000, b"T" * 16, 0x5000)]))
    load_kernel(mem, kernel, "")
    assert mem.filled == [(0x100010, 0x5000 - 16)]
    assert mem.read(0x100000, 0x5000) == b"T" * 16 + bytes(0x5000 - 16)


def test_pvh_note_in_8_aligned_segment(tmp_path):
    notes = note(b"Xen\0", 18, (0x100004).to_bytes(8, "little"), align=8)
    kernel = write(tmp_path, "k", make_elf(64, notes=notes, note_align=8))
    info = load_kernel(FakeMemory(32 * MiB), kernel, "")
    assert info.protocol == "pvh" and info.entry == 0x100004


def test_other_xen_notes_ignored(tmp_path):
    # XEN_ELFNOTE_ENTRY (1) is the PV entry, not PVH: the ELF64 boots as linux64.
    kernel = write(tmp_path, "k", make_elf(64, notes=note(b"Xen\0", 1, bytes(8))))
    assert elfmod.parse_elf(kernel.read_bytes(), "k").pvh_entry is None


# --------------------------------------------------------------------------------------------
# Linux 64-bit boot protocol: vmlinux

def zp(mem, bp, name):
    return mem.u(layout.ZERO_PAGE_START + bp.BOOT_PARAMS_OFFSETS[name], bp.BOOT_PARAMS_SIZES[name])


def read_e820(mem, bp):
    n = zp(mem, bp, "e820_entries")
    base = layout.ZERO_PAGE_START + bp.BOOT_PARAMS_OFFSETS["e820_table"]
    raw = mem.read(base, 20 * n)
    return [struct.unpack_from("<QQI", raw, 20 * i) for i in range(n)]


def check_long_mode(mem, info, entry):
    check_regs_complete(info.regs)
    r, s = info.regs, info.sregs
    assert r["rip"] == entry == info.entry
    assert r["rsi"] == layout.ZERO_PAGE_START
    assert r["rsp"] == r["rbp"] == layout.BOOT_STACK_POINTER
    assert r["rflags"] == 2
    assert s["cr0"] & (cpu.X86_CR0_PE | cpu.X86_CR0_PG) == cpu.X86_CR0_PE | cpu.X86_CR0_PG
    assert s["cr0"] & ((1 << 29) | (1 << 30)) == 0          # caches on (NW, CD clear)
    assert s["cr3"] == layout.PML4_START
    assert s["cr4"] & cpu.X86_CR4_PAE
    assert s["efer"] == cpu.EFER_LME | cpu.EFER_LMA == 0x500
    check_flat(s["cs"], 0x10, 0xB, db=0, l=1)
    for reg in ("ds", "es", "fs", "gs", "ss"):
        check_flat(s[reg], 0x18, 0x3, db=1, l=0)
    check_tr(s["tr"])
    check_gdt_matches_sregs(mem, s)
    # Identity map of the first 4 GiB with 2 MiB pages.
    assert mem.u(layout.PML4_START, 8) == layout.PDPTE_START | 3
    assert mem.read(layout.PML4_START + 8, 4088) == bytes(4088)
    for i in range(4):
        assert mem.u(layout.PDPTE_START + 8 * i, 8) == (layout.PDE_START + i * 4096) | 3
    assert mem.read(layout.PDPTE_START + 32, 4096 - 32) == bytes(4096 - 32)
    pd = struct.unpack("<2048Q", mem.read(layout.PDE_START, 4 * 4096))
    assert all(e == (i << 21) | 0x83 for i, e in enumerate(pd))
    assert not any(g < layout.PDE_START + 4 * 4096 + 16 and g + n > layout.PDE_START + 4 * 4096
                   for g, n in mem.writes)
    # Walk the tables for a few addresses.
    for va in (0, entry, 0xBFFF_FFFF, 0xFFFF_F000):
        pml4e = mem.u(s["cr3"] + 8 * ((va >> 39) & 511), 8)
        pdpte = mem.u((pml4e & ~0xFFF) + 8 * ((va >> 30) & 511), 8)
        pde = mem.u((pdpte & ~0xFFF) + 8 * ((va >> 21) & 511), 8)
        assert pde & 0x81 == 0x81
        assert (pde & ~0x1FFFFF & ((1 << 52) - 1)) + (va & 0x1FFFFF) == va


@pytest.mark.parametrize("virtual_entry", [True, False])
def test_vmlinux(tmp_path, bp, virtual_entry):
    kva = 0xFFFF_FFFF_8100_0000
    text = b"\x48\x31\xc0" * 100
    # Linux's vmlinux: p_vaddr in the kernel map, p_paddr at 16 MiB; e_entry is either virtual
    # or phys_startup_64 (physical).
    entry = kva + 0x40 if virtual_entry else 0x100_0040
    kernel = write(tmp_path, "vmlinux", make_elf(64, entry=entry, segments=[
        (kva, 0x100_0000, text, 0x10000),
        (kva + 0x20_0000, 0x120_0000, b"RODATA", 0x1000),
        # Like Linux's per-CPU segment (p_vaddr 0), a segment whose virtual range holds the
        # physical entry: a physical e_entry must not be translated through it.
        (0x100_0000, 0x130_0000, b"PERCPU", 0x1000)]))
    initrd = write(tmp_path, "initrd.img", b"\x1f\x8b" + bytes(5000))
    mem = FakeMemory(128 * MiB, junk=True)
    info = load_kernel(mem, kernel, "console=ttyS0 panic=-1", initrd)
    assert info.protocol == "linux64"
    assert info.entry == 0x100_0040
    assert info.kernel_end == 0x130_1000
    assert mem.read(0x130_0000, 6) == b"PERCPU"
    assert mem.read(0x100_0000, len(text)) == text
    assert mem.read(0x100_0000 + len(text), 0x10000 - len(text)) == bytes(0x10000 - len(text))
    check_long_mode(mem, info, 0x100_0040)

    # Zero page: a fresh header.
    assert zp(mem, bp, "hdr.boot_flag") == 0xAA55
    assert mem.read(layout.ZERO_PAGE_START + 0x202, 4) == b"HdrS"
    assert zp(mem, bp, "hdr.version") == 0x020C
    assert zp(mem, bp, "hdr.type_of_loader") == 0xFF
    assert zp(mem, bp, "hdr.loadflags") == bp.LOADED_HIGH | bp.CAN_USE_HEAP
    assert zp(mem, bp, "hdr.kernel_alignment") == 0x100_0000
    assert zp(mem, bp, "hdr.cmd_line_ptr") == layout.CMDLINE_START
    assert zp(mem, bp, "ext_cmd_line_ptr") == 0
    assert read_cstring(mem, layout.CMDLINE_START) == b"console=ttyS0 panic=-1"
    gpa, size = info.initramfs
    assert (zp(mem, bp, "hdr.ramdisk_image"), zp(mem, bp, "hdr.ramdisk_size")) == (gpa, size)
    assert zp(mem, bp, "ext_ramdisk_image") == 0 and zp(mem, bp, "ext_ramdisk_size") == 0
    assert gpa % 4096 == 0 and 128 * MiB - 4096 < gpa + size <= 128 * MiB
    assert mem.read(gpa, size) == initrd.read_bytes()
    assert zp(mem, bp, "sentinel") == 0
    assert zp(mem, bp, "acpi_rsdp_addr") == 0
    assert read_e820(mem, bp) == [(0, layout.EBDA_START, bp.E820_RAM),
                                  (layout.HIGH_RAM_START, 127 * MiB, bp.E820_RAM),
                                  (layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, bp.E820_RESERVED)]


def test_vmlinux_e820_above_4g(tmp_path, bp):
    kernel = write(tmp_path, "vmlinux", make_elf(64, entry=0x100000))
    mem = FakeMemory(7 * GiB)
    info = load_kernel(mem, kernel, "", rsdp=0xF0000)
    assert read_e820(mem, bp) == [
        (0, layout.EBDA_START, 1),
        (layout.HIGH_RAM_START, 3 * GiB - layout.HIGH_RAM_START, 1),
        (layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, 2),
        (4 * GiB, 4 * GiB, 1),
    ]
    assert zp(mem, bp, "acpi_rsdp_addr") == 0xF0000
    assert info.initramfs is None
    assert zp(mem, bp, "hdr.ramdisk_image") == 0 and zp(mem, bp, "hdr.ramdisk_size") == 0


def test_initramfs_below_32bit_hole(tmp_path, bp):
    # With RAM above 4 GiB the initramfs still goes at the top of the low region.
    kernel = write(tmp_path, "vmlinux", make_elf(64, entry=0x100000))
    initrd = write(tmp_path, "initrd", b"x" * 10000)
    info = load_kernel(FakeMemory(5 * GiB), kernel, "", initrd)
    gpa, size = info.initramfs
    assert gpa == (3 * GiB - 10000) & ~0xFFF


# --------------------------------------------------------------------------------------------
# bzImage

def test_bzimage(tmp_path, bp):
    image = make_bzimage(bp)
    payload = image[5 * 512:]
    kernel = write(tmp_path, "bzImage", image)
    initrd = write(tmp_path, "initrd", b"initrd!" * 1000)
    mem = FakeMemory(256 * MiB)
    info = load_kernel(mem, kernel, "console=ttyS0 quiet", initrd)
    assert info.protocol == "bzimage"
    assert info.entry == 16 * MiB + 0x200
    assert info.kernel_end == 16 * MiB + 4 * MiB
    assert mem.read(16 * MiB, len(payload)) == payload
    check_long_mode(mem, info, 16 * MiB + 0x200)

    # The file's setup header, copied, then patched.
    assert zp(mem, bp, "hdr.setup_sects") == 4
    assert zp(mem, bp, "hdr.boot_flag") == 0xAA55
    assert zp(mem, bp, "hdr.version") == 0x020F
    assert zp(mem, bp, "hdr.kernel_alignment") == 2 * MiB
    assert zp(mem, bp, "hdr.pref_address") == 16 * MiB
    assert zp(mem, bp, "hdr.init_size") == 4 * MiB
    assert zp(mem, bp, "hdr.xloadflags") & bp.XLF_KERNEL_64
    assert zp(mem, bp, "hdr.type_of_loader") == 0xFF
    assert zp(mem, bp, "hdr.loadflags") & bp.LOADED_HIGH
    assert zp(mem, bp, "hdr.cmd_line_ptr") == layout.CMDLINE_START
    assert read_cstring(mem, layout.CMDLINE_START) == b"console=ttyS0 quiet"
    gpa, size = info.initramfs
    assert (zp(mem, bp, "hdr.ramdisk_image"), zp(mem, bp, "hdr.ramdisk_size")) == (gpa, size)
    assert gpa % 4096 == 0 and 256 * MiB - 4096 < gpa + size <= 256 * MiB
    assert mem.read(gpa, size) == initrd.read_bytes()
    assert read_e820(mem, bp) == [(0, layout.EBDA_START, 1), (layout.HIGH_RAM_START, 255 * MiB, 1),
                                  (layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, 2)]
    # Nothing past the setup header came from the file.
    zero_page = mem.read(layout.ZERO_PAGE_START, 4096)
    assert b"REALMODE" not in zero_page
    assert zero_page[:0x1E8] == bytes(0x1E8)


def test_bzimage_initrd_addr_max(tmp_path, bp):
    kernel = write(tmp_path, "bzImage", make_bzimage(bp, initrd_addr_max=0x3FF_FFFF))
    initrd = write(tmp_path, "initrd", b"z" * 5000)
    info = load_kernel(FakeMemory(256 * MiB), kernel, "", initrd)
    gpa, size = info.initramfs
    assert gpa + size <= 0x400_0000 and gpa == (0x400_0000 - 5000) & ~0xFFF


def test_bzimage_without_pref_address(tmp_path, bp):
    # No usable pref_address: 1 MiB rounded up to kernel_alignment (relocatable).
    kernel = write(tmp_path, "bzImage", make_bzimage(bp, pref=0, setup_sects=0, init_size=0))
    info = load_kernel(FakeMemory(64 * MiB), kernel, "")
    assert info.entry == 2 * MiB + 0x200
    assert info.kernel_end == 2 * MiB + 16 * 1024


def test_bzimage_initramfs_stays_clear_of_init_size(tmp_path, bp):
    # RAM ends just above pref_address + init_size: the initramfs must not overlap the area the
    # decompressor uses, so it does not fit.
    kernel = write(tmp_path, "bzImage", make_bzimage(bp, init_size=14 * MiB))
    initrd = write(tmp_path, "initrd", b"x" * (3 * MiB))
    mem = FakeMemory(32 * MiB)
    with pytest.raises(BootError, match="initramfs .*initrd.* does not fit"):
        load_kernel(mem, kernel, "", initrd)
    assert mem.writes == []


# --------------------------------------------------------------------------------------------
# Errors: one line, names the file, nothing written

def expect_error(mem, kernel, cmdline="", initramfs=None, match=None, name=None):
    with pytest.raises(BootError) as ei:
        load_kernel(mem, kernel, cmdline, initramfs)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(name or kernel) in msg
    if match:
        assert __import__("re").search(match, msg), msg
    assert mem.writes == [], "nothing may be written when loading fails"
    return msg


def test_error_not_elf_or_bzimage(tmp_path):
    for data in (b"", b"hello world\n" * 100, b"\x7fEL", bytes(0x300)):
        kernel = write(tmp_path, "junk", data)
        msg = expect_error(FakeMemory(64 * MiB), kernel)
        assert msg == (f"kernel {kernel} is not an ELF or bzImage file: "
                       "give a PVH ELF, vmlinux or bzImage")


def test_error_missing_file(tmp_path):
    expect_error(FakeMemory(64 * MiB), tmp_path / "nope", match="cannot read kernel")
    kernel = write(tmp_path, "k", make_elf(64, notes=pvh_note(0x100000)))
    expect_error(FakeMemory(64 * MiB), kernel, initramfs=tmp_path / "noinitrd",
                 name=tmp_path / "noinitrd", match="cannot read initramfs")
    expect_error(FakeMemory(64 * MiB), tmp_path, match="cannot read kernel")   # a directory


def test_error_truncated_elf(tmp_path):
    full = make_elf(64, notes=pvh_note(0x100000))
    for n in (4, 10, 40, 63):
        expect_error(FakeMemory(64 * MiB), write(tmp_path, "k", full[:n]), match="truncated")
    # Header intact, program headers cut off.
    expect_error(FakeMemory(64 * MiB), write(tmp_path, "k", full[:64 + 30]),
                 match="program headers .* run past the end")
    elf32 = make_elf(32, notes=pvh_note(0x100000))
    expect_error(FakeMemory(64 * MiB), write(tmp_path, "k", elf32[:50]), match="truncated")


def test_error_segment_past_eof(tmp_path):
    data = make_elf(64, segments=[(0x100000, 0x100000, b"A" * 4096, 8192)])
    expect_error(FakeMemory(64 * MiB), write(tmp_path, "k", data[:-100]),
                 match="PT_LOAD segment 0 .* runs past the end of the file")


def test_error_segment_outside_ram(tmp_path):
    data = make_elf(64, entry=0x8000000, segments=[(0x800_0000, 0x800_0000, b"A", 0x1000)])
    expect_error(FakeMemory(64 * MiB), write(tmp_path, "k", data),
                 match=r"segment 0 \[0x8000000, 0x8001000\) lies outside guest RAM")
    # Ends past RAM.
    data = make_elf(64, entry=0x3FF_F000, segments=[(0x3FF_F000, 0x3FF_F000, b"A", 0x2000)])
    expect_error(FakeMemory(64 * MiB), write(tmp_path, "k", data), match="outside guest RAM")
    # In the 32-bit MMIO hole, with RAM on both sides.
    data = make_elf(64, notes=pvh_note(0xC000_0000), entry=0xC000_0000,
                    segments=[(0xC000_0000, 0xC000_0000, b"A", 0x1000)])
    expect_error(FakeMemory(4 * GiB), write(tmp_path, "k", data), match="outside guest RAM")


def test_error_segment_in_low_boot_area(tmp_path):
    data = make_elf(32, notes=pvh_note(0x8000), segments=[(0x8000, 0x8000, b"A", 0x100)])
    expect_error(FakeMemory(64 * MiB), write(tmp_path, "k", data),
                 match=r"overlaps the low boot area \[0, 0x100000\)")
    data = make_elf(64, entry=0xF0000, segments=[(0xF0000, 0xF0000, b"A", 0x20000)])
    expect_error(FakeMemory(64 * MiB), write(tmp_path, "k", data), match="low boot area")


def test_error_elf_kinds(tmp_path):
    mem = FakeMemory(64 * MiB)
    expect_error(mem, write(tmp_path, "k", make_elf(32)), match="32-bit ELF without a Xen PVH note")
    expect_error(mem, write(tmp_path, "k", make_elf(64, machine=183)), match="not x86")
    expect_error(mem, write(tmp_path, "k", make_elf(64, e_type=1)), match="not an executable")
    bad = bytearray(make_elf(64))
    bad[5] = 2
    expect_error(mem, write(tmp_path, "k", bytes(bad)), match="little-endian")
    bad[5], bad[4] = 1, 3
    expect_error(mem, write(tmp_path, "k", bytes(bad)), match="invalid ELF class")
    expect_error(mem, write(tmp_path, "k", make_elf(64, segments=[])), match="no program headers")
    expect_error(mem, write(tmp_path, "k", make_elf(64, segments=[], notes=b"")),
                 match="no loadable")
    expect_error(mem, write(tmp_path, "k", make_elf(64, entry=0x5000000)),
                 match="entry point 0x5000000 is not inside any loadable segment")
    expect_error(mem, write(tmp_path, "k", make_elf(64, notes=pvh_note(0x900000))),
                 match="PVH entry point 0x900000 is not inside")
    expect_error(mem, write(tmp_path, "k", make_elf(64, notes=note(b"Xen\0", 18, b"\1\2"))),
                 match="2-byte value")
    bad = make_elf(64, segments=[(0x100000, 0x100000, b"A" * 100, 10)])
    expect_error(mem, write(tmp_path, "k", bad), match="p_filesz .* larger than p_memsz")


def test_error_bzimage_protocol(tmp_path, bp):
    mem = FakeMemory(64 * MiB)
    expect_error(mem, write(tmp_path, "bz", make_bzimage(bp, version=0x0205)),
                 match="boot protocol 2.05, older than 2.06")
    expect_error(mem, write(tmp_path, "bz", make_bzimage(bp, xloadflags=0)),
                 match="XLF_KERNEL_64 not set")
    # 2.10: no xloadflags field at all, whatever the bytes there say.
    expect_error(mem, write(tmp_path, "bz", make_bzimage(bp, version=0x020A)),
                 match=r"protocol 2.10\) has no 64-bit entry")


def test_error_bzimage_truncated(tmp_path, bp):
    mem = FakeMemory(64 * MiB)
    image = make_bzimage(bp)
    expect_error(mem, write(tmp_path, "bz", image[:5 * 512 - 10]), match="truncated")
    expect_error(mem, write(tmp_path, "bz", image[:5 * 512 + 0x100]), match="truncated")
    expect_error(mem, write(tmp_path, "bz", image[:-2000]), match="truncated")
    expect_error(mem, write(tmp_path, "bz", image[:0x210]), match="truncated")


def test_error_bzimage_too_big_for_ram(tmp_path, bp):
    expect_error(FakeMemory(16 * MiB), write(tmp_path, "bz", make_bzimage(bp)),
                 match="needs guest RAM up to 0x1400000")


def test_error_cmdline_too_long(tmp_path, bp):
    mem = FakeMemory(64 * MiB)
    bz = write(tmp_path, "bz", make_bzimage(bp, cmdline_size=255))
    assert load_kernel(FakeMemory(64 * MiB), bz, "x" * 255).protocol == "bzimage"
    expect_error(mem, bz, cmdline="x" * 256, match="256 bytes, longer than the 255 bytes")
    limit = layout.CMDLINE_MAX_SIZE - 1
    for data in (make_elf(64), make_elf(32, notes=pvh_note(0x100000))):
        k = write(tmp_path, "k", data)
        assert load_kernel(FakeMemory(64 * MiB), k, "y" * limit)
        expect_error(mem, k, cmdline="y" * (limit + 1), match="command line is")
    expect_error(mem, k, cmdline="a\0b", match="NUL", name="command line")


def test_error_initramfs(tmp_path, bp):
    k = write(tmp_path, "k", make_elf(64))
    big = write(tmp_path, "big.cpio", bytes(20 * MiB))
    expect_error(FakeMemory(16 * MiB), k, initramfs=big, name=big,
                 match="initramfs .* does not fit in guest RAM")
    empty = write(tmp_path, "empty.cpio", b"")
    expect_error(FakeMemory(64 * MiB), k, initramfs=empty, name=empty, match="is empty")


def test_error_ram_too_small(tmp_path):
    class Tiny(FakeMemory):
        pass
    mem = Tiny(64 * MiB)
    mem.regions = [(0, 512 * 1024, 0)]
    expect_error(mem, write(tmp_path, "k", make_elf(64)), name="guest RAM",
                 match="does not reach above")


# --------------------------------------------------------------------------------------------
# Robustness: corrupted images only ever raise BootError, and never write outside RAM
# (FakeMemory.write raises GuestMemoryError, which would fail the test).

def _corruptions(data: bytes, rng: random.Random, n: int):
    for cut in sorted({rng.randrange(len(data)) for _ in range(n // 2)}):
        yield data[:cut]
    for _ in range(n):
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(min(len(b), 0x300) if rng.random() < 0.8 else len(b))
            b[pos] = rng.randrange(256)
        yield bytes(b)


@pytest.mark.parametrize("kind", ["pvh64", "pvh32", "vmlinux", "bzimage"])
def test_fuzz_never_crashes(tmp_path, bp, kind):
    rng = random.Random(1234)
    if kind == "bzimage":
        data = make_bzimage(bp, payload=bytes(2048), init_size=0x10000, pref=2 * MiB)
    elif kind == "vmlinux":
        data = make_elf(64, entry=0xFFFF_FFFF_8100_0000,
                        segments=[(0xFFFF_FFFF_8100_0000, 0x100000, b"A" * 64, 0x1000)])
    else:
        data = make_elf(64 if kind == "pvh64" else 32, notes=pvh_note(0x100000))
    kernel = tmp_path / "k"
    ok = 0
    for blob in _corruptions(data, rng, 300):
        kernel.write_bytes(blob)
        try:
            info = load_kernel(FakeMemory(32 * MiB), kernel, "console=ttyS0")
        except BootError as e:
            msg = str(e)
            assert "\n" not in msg
            assert str(kernel) in msg or "guest RAM" in msg, msg
        else:
            assert info.protocol in ("pvh", "linux64", "bzimage")
            ok += 1
    assert ok > 0


def test_reset_vector_writes_the_fadt_reset_register():
    """F000:FFF0 holds `mov al, RESET_VALUE; mov dx, RESET_PORT; out dx, al; hlt; jmp hlt`,
    the reset a firmware-less Linux restart lands on (the KVM test runs it)."""
    from hyperpy.boot.reset_vector import RESET_VECTOR_SIZE, install_reset_vector, reset_vector_code

    code = reset_vector_code()
    assert len(code) == RESET_VECTOR_SIZE
    assert code[:6] == bytes([0xB0, layout.ACPI_RESET_VALUE, 0xBA]) + struct.pack(
        "<H", layout.ACPI_RESET_PORT) + b"\xee"
    assert code[6:9] == b"\xf4\xeb\xfd"          # 1: hlt; jmp 1b
    assert layout.ACPI_TABLES_END <= layout.RESET_VECTOR_START
    assert layout.RESET_VECTOR_START + RESET_VECTOR_SIZE == layout.HIGH_RAM_START
    mem = FakeMemory(4 * MiB)
    install_reset_vector(mem)
    assert mem.writes == [(layout.RESET_VECTOR_START, RESET_VECTOR_SIZE)]
    with pytest.raises(BootError, match="reset vector"):
        install_reset_vector(FakeMemory(512 * 1024))
