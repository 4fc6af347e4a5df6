"""VIOT (Virtual I/O Translation table, ACPI 6.4+): where the virtio-iommu is and which PCI
endpoints sit behind it.  Linux's ``CONFIG_ACPI_VIOT`` reads it to attach endpoints to the
virtio-iommu driver.

Layout (ACPI 6.4, 5.2.32)::

    header (36) | node_count u16 | node_offset u16 | reserved[8] | nodes...
    virtio-pci IOMMU node:  type 3, reserved, length 16, segment u16, bdf u16, reserved[8]
    PCI range node:         type 1, reserved, length 24, endpoint_start u32, segment_start u16,
                            segment_end u16, bdf_start u16, bdf_end u16, output_node u16,
                            reserved[6]

The endpoint ID a range node assigns is ``endpoint_start + (bdf - bdf_start)``: hyperpy uses the
BDF itself as the endpoint ID, which is what the virtio-iommu device expects in ATTACH.
"""

from __future__ import annotations

import struct

from .tables import acpi_table

NODE_PCI_RANGE = 1
NODE_VIRTIO_IOMMU_PCI = 3
HEADER_SIZE = 36
NODES_OFFSET = HEADER_SIZE + 12


def bdf(bus: int, dev: int, fn: int = 0) -> int:
    return (bus << 8) | (dev << 3) | fn


def build_viot(iommu_bdf: int, endpoint_bdfs: list[int], segment: int = 0) -> bytes:
    """A VIOT with one virtio-pci IOMMU and one PCI range node per endpoint (BDF = endpoint ID)."""
    iommu_node = struct.pack("<BBHHH8x", NODE_VIRTIO_IOMMU_PCI, 0, 16, segment, iommu_bdf)
    nodes = [iommu_node]
    for ep in sorted(endpoint_bdfs):
        nodes.append(struct.pack("<BBHIHHHHH6x", NODE_PCI_RANGE, 0, 24, ep, segment, segment,
                                 ep, ep, NODES_OFFSET))   # output node: the IOMMU node, first
    body = struct.pack("<HH8x", len(nodes), NODES_OFFSET) + b"".join(nodes)
    return acpi_table("VIOT", 0, body)
