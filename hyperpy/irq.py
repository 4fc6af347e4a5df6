"""Interrupt routing policy: the GSI table a PC-compatible VM starts with."""

from __future__ import annotations

from ._fast import kvm

IOAPIC_PINS = 24
PIC_IRQS = 16


def default_gsi_routes() -> list[tuple]:
    """GSI n -> PIC pin n (n < 16, master 0-7 / slave 8-15) and IOAPIC pin n (n < 24).

    Identity-mapped ISA IRQs on both chips, as on PC hardware; later issues append MSI routes.
    """
    routes: list[tuple] = []
    for gsi in range(IOAPIC_PINS):
        if gsi < PIC_IRQS:
            chip = kvm.IRQCHIP_PIC_MASTER if gsi < 8 else kvm.IRQCHIP_PIC_SLAVE
            routes.append(("irqchip", gsi, chip, gsi % 8))
        routes.append(("irqchip", gsi, kvm.IRQCHIP_IOAPIC, gsi))
    return routes
