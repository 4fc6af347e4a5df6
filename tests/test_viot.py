"""The VIOT table: header, checksum, and the nodes Linux's ACPI VIOT parser walks."""

from __future__ import annotations

import struct

from hyperpy.acpi.viot import NODE_PCI_RANGE, NODE_VIRTIO_IOMMU_PCI, bdf, build_viot


def test_viot_layout():
    t = build_viot(bdf(0, 5), [bdf(0, 3), bdf(0, 2)])
    assert t[:4] == b"VIOT" and struct.unpack_from("<I", t, 4)[0] == len(t) and sum(t) % 256 == 0
    count, offset = struct.unpack_from("<HH", t, 36)
    assert count == 3 and offset == 48
    nodes, pos = [], offset
    for _ in range(count):
        ntype, _r, length = struct.unpack_from("<BBH", t, pos)
        nodes.append((ntype, pos, t[pos:pos + length]))
        pos += length
    assert pos == len(t)
    (t0, iommu_off, iommu), *ranges = nodes
    assert t0 == NODE_VIRTIO_IOMMU_PCI
    assert struct.unpack_from("<HH", iommu, 4) == (0, bdf(0, 5))
    got = []
    for ntype, _off, node in ranges:
        assert ntype == NODE_PCI_RANGE and len(node) == 24
        ep, s0, s1, b0, b1, out = struct.unpack_from("<IHHHHH", node, 4)
        assert (s0, s1) == (0, 0) and b0 == b1 == ep and out == iommu_off
        got.append(ep)
    assert got == [bdf(0, 2), bdf(0, 3)]
