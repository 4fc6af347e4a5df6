"""The ACPI system description tables of a hyperpy VM (ACPI 6.5 layouts).

Why these tables: Linux on x86 needs the RSDP -> XSDT -> {FADT, MADT, MCFG, ...} chain to find
the CPUs (MADT), the PCIe ECAM (MCFG), how to power off and reset (FADT) and the devices that
cannot be enumerated (DSDT: the PCI host bridge and its windows, COM1).  The platform is
hardware-reduced ACPI, so there is no FACS, no PM1/GPE block and no SCI; the FADT's sleep-control,
sleep-status and reset registers are I/O ports served by
:class:`hyperpy.devices.legacy.acpi_pm.AcpiPm`.

:func:`build_acpi_tables` lays every table out from ``layout.ACPI_TABLES_START`` (8-byte aligned)
and returns the bytes to copy into guest RAM; callers that own other tables (e.g. VIOT for a
virtio-iommu, an SSDT) pass them whole, built with :func:`acpi_table`, as ``extra_tables`` and
they are listed in the XSDT; AML for the DSDT itself goes in ``dsdt_aml``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from hyperpy import layout
from hyperpy.errors import HyperpyError

from . import aml

OEM_ID = b"HYPRPY"
OEM_REVISION = 1
CREATOR_ID = b"HYPY"
CREATOR_REVISION = 1
HEADER_SIZE = 36
TABLE_ALIGN = 8

RSDP_SIZE = 36
RSDP_V1_SIZE = 20
RSDP_REVISION = 2           # ACPI 2.0+: has the XSDT address and the extended checksum

DSDT_REVISION = 2           # >= 2: AML integers are 64 bits wide
XSDT_REVISION = 1
FADT_REVISION = 6
FADT_MINOR_REVISION = 5     # ACPI 6.5
FADT_SIZE = 276
MADT_REVISION = 5
MCFG_REVISION = 1

# FADT Flags (ACPI 6.5, table 5.10)
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4    # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5    # set: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags (table 5.11)
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# Generic Address Structure
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# MADT
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LOCAL_X2APIC = 9
MADT_LOCAL_X2APIC_NMI = 10
MADT_LAPIC_ENABLED = 1 << 0
# KVM's in-kernel IOAPIC resets its ID register to 0; the MADT says the same.  IOAPIC and local
# APIC IDs are separate name spaces on xAPIC systems, so this does not clash with vCPU 0.
IOAPIC_ID = 0
PIT_IRQ = 0
PIT_GSI = 2
LINT1 = 1

PCI_SEGMENT = 0
PCI_BUS_FIRST = 0
PCI_BUS_LAST = layout.PCI_ECAM_SIZE // layout.MiB - 1    # 1 MiB of ECAM per bus


class AcpiError(HyperpyError):
    """The ACPI tables cannot be built (they do not fit, or a caller's table is malformed)."""


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with this byte in place of a 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _fixed(text: str | bytes, size: int) -> bytes:
    raw = text.encode("ascii") if isinstance(text, str) else text
    if len(raw) > size:
        raise ValueError(f"{raw!r} is longer than {size} bytes")
    return raw.ljust(size, b" ")


def acpi_table(signature: str, revision: int, body: bytes, oem_table_id: str | None = None) -> bytes:
    """A complete table: the 36-byte header (hyperpy's OEM and creator IDs) + ``body``, with the
    checksum byte set so that the whole table sums to 0 mod 256."""
    sig = signature.encode("ascii")
    if len(sig) != 4:
        raise ValueError(f"ACPI signature {signature!r} must be 4 characters")
    table_id = _fixed(oem_table_id if oem_table_id is not None else "HPY" + signature, 8)
    data = bytearray(struct.pack("<4sIBB6s8sI4sI", sig, HEADER_SIZE + len(body), revision, 0,
                                 OEM_ID, table_id, OEM_REVISION, CREATOR_ID, CREATOR_REVISION))
    data += body
    data[9] = checksum(data)
    return bytes(data)


def gas(space: int, address: int, bit_width: int = 8, bit_offset: int = 0,
        access_size: int = GAS_ACCESS_BYTE) -> bytes:
    """A 12-byte Generic Address Structure."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access_size, address)


# --- The tables ------------------------------------------------------------------------------------

def build_rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (36 bytes): no RSDT, only the XSDT; both checksums set."""
    data = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0,
                                 RSDP_SIZE, xsdt_addr, 0, b"\x00" * 3))
    data[8] = checksum(data[:RSDP_V1_SIZE])
    data[32] = checksum(data)
    return bytes(data)


def build_xsdt(table_addrs: Sequence[int]) -> bytes:
    return acpi_table("XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in table_addrs))


def build_fadt(dsdt_addr: int) -> bytes:
    """FADT revision 6 for a hardware-reduced platform.

    Only the 64-bit X_DSDT is set (Linux warns when DSDT and X_DSDT disagree); FIRMWARE_CTRL
    stays 0 because hardware-reduced ACPI needs no FACS.  IAPC_BOOT_ARCH says there is no VGA
    and no CMOS RTC (so Linux does not probe ports 0x70/0x71), and leaves the 8042 flag clear:
    hyperpy's i8042 only implements the reset line, there is no keyboard to probe.
    """
    t = bytearray(FADT_SIZE)
    struct.pack_into("<I", t, 40, 0)                      # DSDT (32-bit): unused, see X_DSDT
    struct.pack_into("<H", t, 109, IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT)
    flags = (FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP
             | FADT_HW_REDUCED_ACPI)
    struct.pack_into("<I", t, 112, flags)
    t[116:128] = gas(GAS_SYSTEM_IO, layout.ACPI_RESET_PORT)
    t[128] = layout.ACPI_RESET_VALUE
    t[131] = FADT_MINOR_REVISION
    struct.pack_into("<Q", t, 140, dsdt_addr)             # X_DSDT
    t[244:256] = gas(GAS_SYSTEM_IO, layout.ACPI_SLEEP_CONTROL_PORT)
    t[256:268] = gas(GAS_SYSTEM_IO, layout.ACPI_SLEEP_STATUS_PORT)
    t[268:276] = OEM_ID.ljust(8, b"\x00")                 # Hypervisor Vendor Identity
    return acpi_table("FACP", FADT_REVISION, bytes(t[HEADER_SIZE:]))


def build_madt(nr_vcpus: int) -> bytes:
    """MADT: vCPU n has ACPI processor UID n and APIC ID n (as ``cpuid.py`` sets leaf 1/0xB);
    IDs >= 255 need x2APIC entries.  One IOAPIC with GSIs 0-23, the PC's IRQ0 -> GSI 2 override
    for the PIT, and LINT1 as NMI on every CPU (``vcpu_setup`` wires LINT1 to NMI)."""
    if nr_vcpus < 1:
        raise AcpiError(f"cannot describe {nr_vcpus} vCPUs", "a VM needs at least one vCPU")
    body = bytearray(struct.pack("<II", layout.LAPIC_START, MADT_PCAT_COMPAT))
    for cpu in range(nr_vcpus):
        if cpu < 0xFF:
            body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, MADT_LAPIC_ENABLED)
        else:
            body += struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, cpu, MADT_LAPIC_ENABLED, cpu)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_START, 0)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, PIT_IRQ, PIT_GSI, 0)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, LINT1)   # 0xFF: all CPUs
    if nr_vcpus > 0xFF:
        body += struct.pack("<BBHIB3s", MADT_LOCAL_X2APIC_NMI, 12, 0, 0xFFFF_FFFF, LINT1,
                            b"\x00" * 3)
    return acpi_table("APIC", MADT_REVISION, bytes(body))


def build_mcfg() -> bytes:
    """MCFG: one ECAM allocation for segment 0, buses 0-255."""
    body = b"\x00" * 8 + struct.pack("<QHBBI", layout.PCI_ECAM_START, PCI_SEGMENT,
                                      PCI_BUS_FIRST, PCI_BUS_LAST, 0)
    return acpi_table("MCFG", MCFG_REVISION, body)


def dsdt_terms(nr_vcpus: int, ram_size: int) -> list[aml.Aml]:
    """The DSDT's definition blocks.

    ``\\_SB_.PCI0`` is the PCIe host bridge: its _CRS produces the bus numbers, the I/O ports
    except the 0xCF8-0xCFF config ports (which it consumes), and the 32-bit and 64-bit MMIO
    windows from ``layout``.  ``\\_SB_.MBRD`` (PNP0C02) reserves the ECAM: Linux only uses the
    MCFG's ECAM when a motherboard resource (or the e820 map) reserves it.  Processors are
    ACPI0007 devices whose _UID matches the MADT's processor UID.
    """
    mmio64 = layout.pci_mmio64_start(ram_size)
    pci0 = aml.Device(
        "PCI0",
        aml.Name("_HID", aml.EisaId("PNP0A08")),
        aml.Name("_CID", aml.EisaId("PNP0A03")),
        aml.Name("_SEG", PCI_SEGMENT),
        aml.Name("_UID", 0),
        aml.Name("_BBN", PCI_BUS_FIRST),
        aml.Name("_CRS", aml.ResourceTemplate(
            aml.WordBusNumber(PCI_BUS_FIRST, PCI_BUS_LAST),
            aml.IO(layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_ADDRESS_PORT, 1, 8),
            aml.WordIO(0x0000, 0x0CF7),
            aml.WordIO(0x0D00, 0xFFFF),
            aml.DWordMemory(layout.PCI_MMIO32_START,
                            layout.PCI_MMIO32_START + layout.PCI_MMIO32_SIZE - 1),
            aml.QWordMemory(mmio64, mmio64 + layout.PCI_MMIO64_SIZE - 1,
                            cacheable=aml.MEM_CACHEABLE),
        )),
    )
    mbrd = aml.Device(
        "MBRD",
        aml.Name("_HID", aml.EisaId("PNP0C02")),
        aml.Name("_UID", 0),
        aml.Name("_CRS", aml.ResourceTemplate(
            aml.Memory32Fixed(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE))),
    )
    com1 = aml.Device(
        "COM1",
        aml.Name("_HID", aml.EisaId("PNP0501")),
        aml.Name("_UID", 0),
        aml.Name("_CRS", aml.ResourceTemplate(
            aml.IO(layout.SERIAL_COM1_PORT, layout.SERIAL_COM1_PORT, 1, 8),
            aml.IRQNoFlags(layout.SERIAL_COM1_IRQ))),
    )
    cpus = [aml.Device(f"C{cpu:03X}", aml.Name("_HID", "ACPI0007"), aml.Name("_UID", cpu))
            for cpu in range(nr_vcpus)]
    # Hardware-reduced ACPI has no fixed power button: a control-method power button (PNP0C0C)
    # notified from the Generic Event Device's _EVT when the GED's event register says so.
    pwrb = aml.Device("PWRB", aml.Name("_HID", aml.EisaId("PNP0C0C")), aml.Name("_UID", 0))
    ged = aml.Device(
        "GED0",
        aml.Name("_HID", "ACPI0013"),
        aml.Name("_UID", 0),
        aml.Name("_CRS", aml.ResourceTemplate(aml.Interrupt(layout.ACPI_GED_IRQ))),
        aml.OperationRegion("GDST", layout.ACPI_GED_PORT, 1),
        aml.Field("GDST", ("GDAT", 8)),
        aml.Method("_EVT", aml.Store(aml.NamePath("GDAT"), aml.Local(0)),
                   aml.If(aml.And(aml.Local(0), layout.ACPI_GED_POWER_BUTTON),
                          aml.Notify("\\_SB_.PWRB", 0x80)),
                   args=1, serialized=True),
    )
    if nr_vcpus > 0x1000:
        raise AcpiError(f"cannot name {nr_vcpus} processor devices", "at most 4096 vCPUs")
    return [
        aml.Scope("\\_SB_", pci0, mbrd, com1, *cpus, pwrb, ged),
        aml.Name("\\_S5_", aml.Package(layout.ACPI_S5_SLP_TYP, 0, 0, 0)),
    ]


def build_dsdt(nr_vcpus: int, ram_size: int, extra_aml: Iterable[aml.AmlLike] = ()) -> bytes:
    """The DSDT; ``extra_aml`` terms are appended at the root (use ``Scope("\\_SB_.PCI0", ...)``
    to add to the host bridge, e.g. a _PRT or _OSC)."""
    body = b"".join(aml.to_aml(t) for t in [*dsdt_terms(nr_vcpus, ram_size), *extra_aml])
    return acpi_table("DSDT", DSDT_REVISION, body)


# --- Layout in guest memory ------------------------------------------------------------------------

@dataclass(frozen=True)
class AcpiBlob:
    """What to copy into guest RAM: ``writes`` is [(gpa, bytes)], ``rsdp_addr`` goes to the boot
    protocol, ``tables`` lists (signature, gpa, length) of every table in the XSDT order, with
    the DSDT (reached through the FADT) first and the XSDT last."""

    rsdp_addr: int
    writes: list[tuple[int, bytes]]
    tables: list[tuple[str, int, int]] = field(default_factory=list)


def _check_table(table: bytes) -> None:
    if len(table) < HEADER_SIZE:
        raise AcpiError(f"extra ACPI table of {len(table)} bytes is shorter than a header")
    sig = table[:4].decode("ascii", "replace")
    (length,) = struct.unpack_from("<I", table, 4)
    if length != len(table):
        raise AcpiError(f"extra ACPI table {sig}: header length {length} != {len(table)} bytes")
    if sum(table) & 0xFF:
        raise AcpiError(f"extra ACPI table {sig}: checksum does not sum to 0",
                        "build it with hyperpy.acpi.acpi_table()")


def build_acpi_tables(nr_vcpus: int, ram_size: int, extra_tables: Sequence[bytes] = (),
                      dsdt_aml: Iterable[aml.AmlLike] = ()) -> AcpiBlob:
    """Build the RSDP, DSDT, FADT, MADT, MCFG, ``extra_tables`` and the XSDT that lists all of
    them but the DSDT, laid out 8-byte aligned from ``layout.ACPI_TABLES_START``.

    Raises :class:`AcpiError` when an extra table is malformed or the tables do not end before
    ``layout.ACPI_TABLES_END``.
    """
    for t in extra_tables:
        _check_table(t)
    writes: list[tuple[int, bytes]] = []
    tables: list[tuple[str, int, int]] = []
    cursor = layout.ACPI_TABLES_START

    def place(table: bytes) -> int:
        nonlocal cursor
        addr = (cursor + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)
        end = addr + len(table)
        if end > layout.ACPI_TABLES_END:
            raise AcpiError(
                f"ACPI tables need {end - layout.ACPI_TABLES_START} bytes but only "
                f"{layout.ACPI_TABLES_END - layout.ACPI_TABLES_START} fit at "
                f"{layout.ACPI_TABLES_START:#x}-{layout.ACPI_TABLES_END:#x}",
                "use fewer vCPUs or smaller extra tables")
        writes.append((addr, table))
        tables.append((table[:4].decode("ascii", "replace"), addr, len(table)))
        cursor = end
        return addr

    dsdt = place(build_dsdt(nr_vcpus, ram_size, list(dsdt_aml)))
    listed = [place(build_fadt(dsdt)), place(build_madt(nr_vcpus)), place(build_mcfg())]
    listed += [place(t) for t in extra_tables]
    xsdt = place(build_xsdt(listed))
    writes.append((layout.ACPI_RSDP_START, build_rsdp(xsdt)))
    return AcpiBlob(rsdp_addr=layout.ACPI_RSDP_START, writes=writes, tables=tables)


class _Writable(Protocol):
    def write(self, gpa: int, data: bytes) -> object: ...


def install_acpi_tables(mem: _Writable, blob: AcpiBlob) -> None:
    """Copy the tables and the RSDP into guest memory (anything with ``write(gpa, bytes)``)."""
    for gpa, data in blob.writes:
        mem.write(gpa, data)
