"""VFIO: host containers for passed-through PCI devices, real or explicitly simulated.

``open_container(selector)`` gives a ``DmaContainer`` (``hyperpy._fast.vfio``): for a PCI
device path the real ``/dev/vfio`` container set to VFIO_TYPE1v2_IOMMU, for ``sim:`` the
SIMULATED type1 container (never chosen silently; a WARNING is logged).
"""

from hyperpy._fast.vfio import (DEFAULT_DMA_ENTRY_LIMIT, DmaContainer, SimulatedType1Container,
                                VfioDmaMapper, VfioType1Container)
from hyperpy.vfio.container import (SIM_SELECTOR, attach_device, close_container, is_simulated_selector,
                                    open_container, read_dma_entry_limit)

__all__ = [
    "DEFAULT_DMA_ENTRY_LIMIT", "DmaContainer", "SIM_SELECTOR", "SimulatedType1Container",
    "VfioDmaMapper", "VfioType1Container", "attach_device", "close_container", "is_simulated_selector",
    "open_container", "read_dma_entry_limit",
]
