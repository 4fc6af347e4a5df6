"""Initial vCPU state for the boot protocols: GDT, identity page tables, register dicts.

Segment registers are derived from the very GDT entries written to guest memory (as Firecracker
and cloud-hypervisor do), so the hidden segment state KVM loads and the in-memory descriptors can
never disagree.

GDT at ``layout.BOOT_GDT_START`` (selectors follow Linux's boot protocol, ``__BOOT_CS = 0x10``,
``__BOOT_DS = 0x18``)::

    0x00 null   0x08 null   0x10 code   0x18 data   0x20 TSS (16-byte system descriptor in
    long mode; its upper half at 0x28 is zero, i.e. a null descriptor for 32-bit PVH)

The table is 48 bytes (0x500-0x52f); the empty boot IDT (limit 0) follows at
``layout.BOOT_IDT_START`` (0x530).
"""

from __future__ import annotations

import struct

from .. import layout

# Control-register and EFER bits (x86 architectural values, Intel SDM vol. 3 ch. 2; there is no
# UAPI header for them).
X86_CR0_PE = 1 << 0     # protected mode enable
X86_CR0_ET = 1 << 4     # extension type (hard-wired to 1 on every CPU since the 486)
X86_CR0_WP = 1 << 16    # write protect (supervisor writes honour read-only pages)
X86_CR0_PG = 1 << 31    # paging
X86_CR4_PAE = 1 << 5    # physical address extension (required for long mode)
EFER_LME = 1 << 8       # long mode enable
EFER_LMA = 1 << 10      # long mode active

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7         # in a PDE: this entry maps a 2 MiB page

# Selectors of the boot GDT.
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

RFLAGS_RESERVED = 1 << 1    # bit 1 of RFLAGS always reads as 1; IF (bit 9) stays clear

# Descriptor "flags" in Firecracker's 16-bit notation: bits 15..12 = G, D/B, L, AVL;
# bits 7..0 = access byte (P, DPL, S, type).
GDT_CODE64 = 0xA09B     # G=1 L=1, P=1 S=1 type 0xb (execute/read, accessed)
GDT_CODE32 = 0xC09B     # G=1 D=1, P=1 S=1 type 0xb
GDT_DATA = 0xC093       # G=1 B=1, P=1 S=1 type 0x3 (read/write, accessed)
GDT_TSS = 0x008B        # G=0, P=1 S=0 type 0xb (busy 32-bit/64-bit TSS)
TSS_LIMIT = 0x67        # 104-byte TSS, as the PVH ABI and KVM's entry checks want

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode one 8-byte segment descriptor (``limit`` is the 20-bit descriptor limit)."""
    return (((base & 0xFF00_0000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF_0000) << 32)
            | ((base & 0x00FF_FFFF) << 16) | (limit & 0xFFFF))


def segment_from_gdt(entry: int, selector: int) -> dict:
    """The KVM segment dict (``struct kvm_segment`` fields) that loading ``entry`` produces."""
    base = ((entry >> 32) & 0xFF00_0000) | ((entry >> 16) & 0x00FF_FFFF)
    limit = ((entry >> 32) & 0xF_0000) | (entry & 0xFFFF)
    g = (entry >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    present = (entry >> 47) & 1
    return {
        "base": base,
        "limit": limit,
        "selector": selector,
        "type": (entry >> 40) & 0xF,
        "present": present,
        "dpl": (entry >> 45) & 3,
        "db": (entry >> 54) & 1,
        "s": (entry >> 44) & 1,
        "l": (entry >> 53) & 1,
        "g": g,
        "avl": (entry >> 52) & 1,
        "unusable": 0 if present else 1,
    }


def boot_gdt(long_mode: bool) -> list[int]:
    code = GDT_CODE64 if long_mode else GDT_CODE32
    return [0, 0, gdt_entry(code, 0, 0xFFFFF), gdt_entry(GDT_DATA, 0, 0xFFFFF),
            gdt_entry(GDT_TSS, 0, TSS_LIMIT), 0]


def write_gdt(mem, gdt: list[int]) -> None:
    mem.write(layout.BOOT_GDT_START, struct.pack(f"<{len(gdt)}Q", *gdt))


def segment_sregs(gdt: list[int], cr0: int, cr3: int, cr4: int, efer: int) -> dict:
    code = segment_from_gdt(gdt[BOOT_CS >> 3], BOOT_CS)
    sregs = {"cs": code}
    for name in ("ds", "es", "fs", "gs", "ss"):
        sregs[name] = segment_from_gdt(gdt[BOOT_DS >> 3], BOOT_DS)
    sregs["tr"] = segment_from_gdt(gdt[BOOT_TSS >> 3], BOOT_TSS)
    sregs["gdt"] = {"base": layout.BOOT_GDT_START, "limit": len(gdt) * 8 - 1}
    sregs["idt"] = {"base": layout.BOOT_IDT_START, "limit": 0}
    sregs.update(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer)
    return sregs


def make_regs(**values: int) -> dict:
    regs = dict.fromkeys(REG_NAMES, 0)
    regs["rflags"] = RFLAGS_RESERVED
    for k, v in values.items():
        if k not in regs:
            raise KeyError(k)
        regs[k] = v
    return regs


def write_identity_page_tables(mem) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; return the CR3 value (the PML4 address).

    PML4[0] -> PDPT at PDPTE_START; PDPT[0..3] -> four PD pages at PDE_START; each PD maps 1 GiB.
    """
    pml4 = struct.pack("<Q", layout.PDPTE_START | PTE_PRESENT | PTE_RW).ljust(0x1000, b"\0")
    pdpt = struct.pack("<4Q", *((layout.PDE_START + i * 0x1000) | PTE_PRESENT | PTE_RW
                                for i in range(4))).ljust(0x1000, b"\0")
    pd = struct.pack("<2048Q", *((i << 21) | PTE_PRESENT | PTE_RW | PTE_PS for i in range(2048)))
    mem.write(layout.PML4_START, pml4)
    mem.write(layout.PDPTE_START, pdpt)
    mem.write(layout.PDE_START, pd)
    return layout.PML4_START


def long_mode_state(mem, entry: int, zero_page: int) -> tuple[dict, dict]:
    """64-bit boot protocol state: long mode, paging on, flat __BOOT_CS/__BOOT_DS, RSI = zero page.

    Writes the page tables and the GDT; returns ``(regs, sregs)``.
    """
    cr3 = write_identity_page_tables(mem)
    gdt = boot_gdt(long_mode=True)
    write_gdt(mem, gdt)
    sregs = segment_sregs(gdt, cr0=X86_CR0_PE | X86_CR0_ET | X86_CR0_PG, cr3=cr3,
                          cr4=X86_CR4_PAE, efer=EFER_LME | EFER_LMA)
    regs = make_regs(rip=entry, rsi=zero_page, rsp=layout.BOOT_STACK_POINTER,
                     rbp=layout.BOOT_STACK_POINTER)
    return regs, sregs


def protected_mode_state(mem, entry: int, start_info: int) -> tuple[dict, dict]:
    """PVH state: 32-bit protected mode, paging off, flat segments, EBX = start_info address."""
    gdt = boot_gdt(long_mode=False)
    write_gdt(mem, gdt)
    sregs = segment_sregs(gdt, cr0=X86_CR0_PE | X86_CR0_ET, cr3=0, cr4=0, efer=0)
    regs = make_regs(rip=entry, rbx=start_info)
    return regs, sregs
