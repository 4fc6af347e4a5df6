"""Interrupt routing policy: the GSI table a PC-compatible VM starts with."""

from __future__ import annotations

import os
import threading

from . import layout
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


class MsiVector:
    """One MSI(-X) vector: a GSI and the eventfd KVM injects it from (KVM_IRQFD)."""

    __slots__ = ("gsi", "fd", "route", "bound")

    def __init__(self, gsi: int, fd: int) -> None:
        self.gsi = gsi
        self.fd = fd
        self.route: tuple[int, int] | None = None   # (address, data) once the guest set it
        self.bound = False                          # fd bound to the GSI with KVM_IRQFD

    def fire(self) -> None:
        os.eventfd_write(self.fd, 1)


class InterruptRouter:
    """Owns the VM's GSI routing table: the legacy pins plus one MSI route per vector.

    ``KVM_SET_GSI_ROUTING`` replaces the whole table, so every change re-sends it.
    """

    def __init__(self, vm) -> None:
        self.vm = vm
        self._lock = threading.Lock()
        self._next_gsi = layout.MSI_GSI_START
        self._free: list[int] = []
        self._vectors: dict[int, MsiVector] = {}
        self.commit()

    def allocate_msi(self) -> MsiVector:
        with self._lock:
            gsi = self._free.pop() if self._free else self._next_gsi
            if gsi == self._next_gsi:
                self._next_gsi += 1
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            vec = MsiVector(gsi, fd)
            self._vectors[gsi] = vec
        self.set_irqfd(vec, True)
        return vec

    def set_irqfd(self, vec: MsiVector, bound: bool) -> None:
        """Bind (or unbind) the vector's eventfd to its GSI in KVM.  Unbound, a signal stays in
        the eventfd for the VMM to read (a masked vector of a passed-through device)."""
        if vec.bound != bound:
            self.vm.irqfd(vec.fd, vec.gsi, deassign=not bound)
            vec.bound = bound

    def release_msi(self, vec: MsiVector) -> None:
        self.set_irqfd(vec, False)
        os.close(vec.fd)
        with self._lock:
            self._vectors.pop(vec.gsi, None)
            self._free.append(vec.gsi)
        self.commit()

    def set_msi_route(self, vec: MsiVector, address: int, data: int) -> None:
        if vec.route == (address, data):
            return
        vec.route = (address, data)
        self.commit()

    def commit(self) -> None:
        with self._lock:
            routes = default_gsi_routes()
            routes += [("msi", v.gsi, v.route[0], v.route[1])
                       for v in self._vectors.values() if v.route is not None]
            self.vm.set_gsi_routing(routes)
