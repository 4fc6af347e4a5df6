"""PCI functions for VFIO endpoints.

Only the **simulated** endpoint exists so far: a PCI function with no BARs whose DMA goes through
a :class:`~hyperpy._fast.vfio.SimulatedType1Container` (``--device path=sim:NAME``).  It gives a
guest an endpoint to attach to the virtio-iommu, so every MAP/UNMAP becomes a (simulated)
``VFIO_IOMMU_MAP_DMA``/``UNMAP_DMA``; tests and the 4k-vs-2M benchmark use it on hosts without
/dev/vfio.  Its config space says what it is: vendor 0x1B36 (the QEMU/virtual devices vendor),
class "unassigned".
"""

from __future__ import annotations

import logging

from .pci.bus import PciDevice
from .pci.config import PciConfigSpace

log = logging.getLogger(__name__)

SIM_VENDOR = 0x1B36
SIM_DEVICE = 0x00F0           # hyperpy's simulated VFIO endpoint
CLASS_UNASSIGNED = 0xFF0000


class SimulatedVfioPciDevice(PciDevice):
    def __init__(self, path: str, container, mapper) -> None:
        super().__init__(PciConfigSpace(SIM_VENDOR, SIM_DEVICE, CLASS_UNASSIGNED))
        self.name = f"vfio {path} (SIMULATION)"
        self.container = container
        self.mapper = mapper

    def counters(self) -> dict:
        c = dict(self.container.counters())
        c.update({f"mapper_{k}": v for k, v in self.mapper.counters().items()})
        return c

    def close(self) -> None:
        log.info("%s: %s", self.name, self.counters())
