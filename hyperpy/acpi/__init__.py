"""ACPI for hyperpy guests: an AML encoder (:mod:`.aml`) and the system description tables
(:mod:`.tables`: RSDP, XSDT, FADT, MADT, MCFG, DSDT).

The VMM builds the tables once, before the vCPUs start, and copies them into guest RAM in the
legacy BIOS area (``layout.ACPI_RSDP_START`` ...); the guest finds the RSDP through the boot
protocol (``hvm_start_info.rsdp_paddr`` / ``boot_params.acpi_rsdp_addr``) or by scanning
0xE0000-0xFFFFF.  The platform is *hardware-reduced* ACPI: no PM1/GPE blocks, no SCI; power-off
and reset go through the FADT's sleep-control and reset registers, served by
:class:`hyperpy.devices.legacy.acpi_pm.AcpiPm`.
"""

from __future__ import annotations

from .tables import AcpiBlob, acpi_table, build_acpi_tables, install_acpi_tables

__all__ = ["AcpiBlob", "acpi_table", "build_acpi_tables", "install_acpi_tables"]
