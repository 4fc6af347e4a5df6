"""Guest-physical address layout of an x86-64 hyperpy VM.

The low addresses follow the conventions of cloud-hypervisor/Firecracker so that guests and
tools that know those VMMs find things where they expect them.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Boot-time structures in low memory (all below the EBDA).
BOOT_GDT_START = 0x500          # GDT used for the initial vCPU state
BOOT_IDT_START = 0x530          # empty IDT (after the 5-entry GDT)
PVH_INFO_START = 0x6000         # struct hvm_start_info
PVH_MODLIST_START = 0x6040      # hvm_modlist_entry[] (initramfs)
PVH_MEMMAP_START = 0x6100       # hvm_memmap_table_entry[]
ZERO_PAGE_START = 0x7000        # Linux struct boot_params ("zero page")
PML4_START = 0x9000             # identity-map page tables for the 64-bit entry
PDPTE_START = 0xA000
PDE_START = 0xB000              # 4 pages of PDEs: identity map of the first 4 GiB with 2 MiB pages
BOOT_STACK_POINTER = 0x8FF0
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000       # 64 KiB, like Linux's COMMAND_LINE_SIZE upper bound
EBDA_START = 0x9FC00
HIGH_RAM_START = 0x100000        # 1 MiB: kernels are loaded at or above this

# 32-bit MMIO hole: [MEM_32BIT_GAP_START, 4 GiB) holds device MMIO, the LAPIC/IOAPIC and the
# TSS/identity-map pages KVM needs; RAM that does not fit below it continues at 4 GiB.
MEM_32BIT_GAP_START = 0xC000_0000
MEM_32BIT_GAP_SIZE = 0x4000_0000
RAM_64BIT_START = 0x1_0000_0000
KVM_IDENTITY_MAP_START = 0xFFFB_C000  # one page, KVM_SET_IDENTITY_MAP_ADDR
KVM_TSS_START = 0xFFFB_D000           # three pages, KVM_SET_TSS_ADDR

# Legacy I/O ports.
SERIAL_COM1_PORT = 0x3F8
SERIAL_COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
BOOT_TIMER_PORT = 0x3F0          # Firecracker's historical boot-timer port
BOOT_TIMER_MAGIC = 123
POST_CODE_PORT = 0x80            # port 0x80 "POST code"/delay port: a null device


def ram_ranges(size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes of RAM around the 32-bit MMIO hole: [(gpa, length), ...]."""
    if size <= MEM_32BIT_GAP_START:
        return [(0, size)]
    return [(0, MEM_32BIT_GAP_START), (RAM_64BIT_START, size - MEM_32BIT_GAP_START)]

# --- Device model (PCI, ACPI) -----------------------------------------------------------------
# Inside the 32-bit gap: [0xC000_0000, 0xE000_0000) 32-bit PCI BAR window, then ECAM (MMCONFIG)
# for buses 0-255 (1 MiB per bus), then the IOAPIC and LAPIC at their architectural addresses.
PCI_MMIO32_START = 0xC000_0000
PCI_MMIO32_SIZE = 0x2000_0000
PCI_ECAM_START = 0xE000_0000
PCI_ECAM_SIZE = 0x1000_0000
PCI_CONFIG_ADDRESS_PORT = 0xCF8   # legacy config mechanism #1: 0xCF8 address, 0xCFC-0xCFF data
PCI_CONFIG_DATA_PORT = 0xCFC
IOAPIC_START = 0xFEC0_0000
LAPIC_START = 0xFEE0_0000
# 64-bit BAR window: starts at the first 1 GiB boundary above RAM, 64 GiB long.
PCI_MMIO64_SIZE = 64 * GiB

# ACPI: tables live in the legacy BIOS area; the RSDP at a 16-byte aligned address that the
# 0xE0000-0xFFFFF scan also finds.
ACPI_RSDP_START = 0xE0000
ACPI_TABLES_START = 0xE0100
ACPI_TABLES_END = 0xFFFF0        # the BIOS reset vector's 16 bytes follow (boot/reset_vector.py)
RESET_VECTOR_START = 0xFFFF0     # F000:FFF0, where a real-mode far jump "to the BIOS" lands
# Hardware-reduced ACPI power management registers (I/O ports), described in the FADT.
ACPI_SLEEP_CONTROL_PORT = 0x600   # write SLP_TYPx << 2 | SLP_EN (bit 5): S5 = power off
ACPI_SLEEP_STATUS_PORT = 0x601
ACPI_RESET_PORT = 0x602           # write ACPI_RESET_VALUE: reset
ACPI_RESET_VALUE = 0x1
ACPI_S5_SLP_TYP = 5
# Generic Event Device (ACPI0013): a read-to-clear event register and its interrupt (edge, active
# high).  Bit ACPI_GED_POWER_BUTTON: the power button was pressed (DSDT: Notify(PWRB, 0x80)).
ACPI_GED_PORT = 0x603
ACPI_GED_IRQ = 5
ACPI_GED_POWER_BUTTON = 1 << 0
# GSIs for PCI INTx and MSI routes start above the IOAPIC's 24 pins.
MSI_GSI_START = 24


def pci_mmio64_start(ram_size: int) -> int:
    """First 1 GiB boundary above the end of guest RAM (and at least 4 GiB)."""
    end = RAM_64BIT_START + max(0, ram_size - MEM_32BIT_GAP_START)
    return (end + GiB - 1) & ~(GiB - 1)
