"""Parser and expectations for tests/guests/virtio_iommu.c (virtio-iommu + a virtio-blk
endpoint behind it, found through the ACPI VIOT), shared by the QEMU test
(tests/test_iommu_guest_qemu.py) and hyperpy's own tests, like tests/virtio_expect.py.

References: virtio 1.2 section 5.13 (IOMMU device), ACPI 6.4+ 5.2.32 (VIOT).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_iommu_virtio_expect",
                                               Path(__file__).resolve().parent / "virtio_expect.py")
virtio_expect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(virtio_expect)

IOVA = 0x4000_0000      # virtio_iommu.c IOVA: the window's IO virtual address
WIN_SIZE = 0x1_0000     # 64 KiB window (blk rings, header/status, data)
DOMAIN = 1
BLK_WRITE_SECTOR = 1

# Status codes (virtio 1.2 5.13.6)
S_OK, S_IOERR, S_UNSUPP, S_DEVERR, S_INVAL, S_RANGE, S_NOENT, S_FAULT, S_NOMEM = range(9)
# Fault reasons and flags (5.13.6.9)
FAULT_R_UNKNOWN, FAULT_R_DOMAIN, FAULT_R_MAPPING = 0, 1, 2
FAULT_F_READ, FAULT_F_WRITE, FAULT_F_EXEC, FAULT_F_ADDRESS = 1, 2, 4, 0x100
RESV_MEM_T_RESERVED, RESV_MEM_T_MSI = 0, 1

# What the spec asks for each request of the battery (None: "skipped" is also fine, when the
# device's input/domain range leaves nothing outside it).
SPEC_STATUS = {
    # DETACH: "If the endpoint isn't attached to the domain [...] the device SHOULD set the
    # request status to VIRTIO_IOMMU_S_INVAL" (NOENT is for an endpoint that does not exist;
    # the blk endpoint exists, it is only unattached).
    "detach_unattached": S_INVAL,
    "attach": S_OK,
    "probe": S_OK,
    "map": S_OK,
    # MAP over an existing mapping: INVAL, no mapping changed.
    "map_overlap": S_INVAL,
    # UNMAP that would split a mapping: RANGE, no mapping removed.
    "unmap_split": S_RANGE,
    # MAP outside input_range (INPUT_RANGE negotiated): RANGE.
    "map_outside": S_RANGE,
    # ATTACH of an endpoint id that does not exist: NOENT.
    "attach_noent": S_NOENT,
    # ATTACH to a domain outside domain_range (DOMAIN_RANGE negotiated): RANGE.
    "attach_domain_range": S_RANGE,
    # Unknown request type: UNSUPP.
    "unknown_type": S_UNSUPP,
    # A request whose device-readable part is shorter than its type's layout: INVAL.
    "truncated": S_INVAL,
    "unmap": S_OK,
}

# Where QEMU 7.2 (the peer) differs from the spec, and why (checked in the QEMU test; hyperpy
# follows SPEC_STATUS):
QEMU_DIFFERENCES = {
    # QEMU looks the endpoint up in its table of endpoints that have been attached or probed
    # before; a real but never-attached endpoint is not in it, so it answers NOENT.
    "detach_unattached": S_NOENT,
}
# QEMU 7.2 reports translation faults with flags = F_ADDRESS only: it does not say whether the
# faulting access was a read or a write (the spec's F_READ/F_WRITE bits). It also reports one
# event per failed translation (several for one request: the used ring, the avail ring, ...),
# and drops the rest ("no buffer available in event queue") once the posted buffers run out.
QEMU_FAULT_FLAGS = FAULT_F_ADDRESS

BATTERY = ["detach_unattached", "attach", "probe", "map", "map_overlap", "unmap_split",
           "map_outside", "attach_noent", "attach_domain_range", "unknown_type", "truncated"]


def parse_iommu(text: str) -> dict:
    """Facts from virtio_iommu.elf's output.

    Keys: viot (None when "VIOT missing", else {"nodes", "iommus": [(seg, bdf)],
    "ranges": [{"seg": (a, b), "bdf": (lo, hi), "id", "to_iommu"}]}), page_size_mask,
    input_range, domain_range, probe_size, bypass (None unless printed), endpoint, blk_bdf,
    status {name: int or "skipped"} (in order), resv [(start, end, subtype)], properties
    [(type, len)], capacity, reads (BLK read/readback lines, as virtio_expect), write_status,
    verify ("OK"|"MISMATCH"), unmapped_read ("pending" or a status), faults [{"reason",
    "flags", "endpoint", "address"}], iommu / blk (the virtio.c lines of each device: pci,
    ids, caps, ..., fail, done), done, unparsed.
    """
    f = {"viot": None, "page_size_mask": None, "input_range": None, "domain_range": None,
         "probe_size": None, "bypass": None, "endpoint": None, "blk_bdf": None, "status": {},
         "resv": [], "properties": [], "capacity": None, "reads": [], "write_status": None,
         "verify": None, "unmapped_read": None, "faults": [], "no_fault": False, "done": False,
         "unparsed": []}
    f["iommu"] = virtio_expect._new_facts(text)
    f["blk"] = virtio_expect._new_facts(text)
    for w in virtio_expect._lines(text, "VIOT"):
        v = f["viot"] if f["viot"] is not None else {"nodes": None, "iommus": [], "ranges": []}
        match w:
            case ["missing"]:
                continue
            case ["nodes", n]:
                v["nodes"] = int(n)
            case ["virtio-pci", "iommu", seg, bdf]:
                v["iommus"].append((int(seg), bdf))
            case ["endpoints", segs, bdfs, "id", ep, "->", *to]:
                a, b = segs.split("-")
                lo, hi = bdfs.split("-")
                v["ranges"].append({"seg": (int(a), int(b)), "bdf": (lo, hi), "id": int(ep),
                                    "to_iommu": to == ["iommu"]})
            case _:
                f["unparsed"].append("VIOT " + " ".join(w))
        f["viot"] = v
    for w in virtio_expect._lines(text, "IOMMU"):
        if virtio_expect._common(w, f["iommu"]):
            continue
        match w:
            case ["page_size_mask", m]:
                f["page_size_mask"] = int(m, 16)
            case ["input_range", r]:
                a, b = r.split("-")
                f["input_range"] = (int(a, 16), int(b, 16))
            case ["domain_range", r]:
                a, b = r.split("-")
                f["domain_range"] = (int(a), int(b))
            case [("probe_size" | "bypass") as k, n]:
                f[k] = int(n)
            case ["endpoint", ep, "blk", bdf]:
                f["endpoint"], f["blk_bdf"] = int(ep), bdf
            case [name, "status", s]:
                f["status"][name] = int(s)
            case [name, "skipped"]:
                f["status"][name] = "skipped"
            case ["probe", "resv", r, "subtype", t]:
                a, b = r.split("-")
                f["resv"].append((int(a, 16), int(b, 16), int(t)))
            case ["probe", "property", t, "len", n]:
                f["properties"].append((int(t), int(n)))
            case ["fault", "reason", r, "flags", fl, "endpoint", ep, "address", a]:
                f["faults"].append({"reason": int(r), "flags": int(fl, 16), "endpoint": int(ep),
                                    "address": int(a, 16)})
            case ["no", "fault", "event"]:
                f["no_fault"] = True
            case _:
                f["unparsed"].append("IOMMU " + " ".join(w))
    f["done"] = f["iommu"]["done"]
    for w in virtio_expect._lines(text, "BLK"):
        if virtio_expect._common(w, f["blk"]):
            continue
        match w:
            case ["capacity", n]:
                f["capacity"] = int(n)
            case [("read" | "readback") as k, _, "status", _, *_]:
                f["reads"].append({"what": k, **virtio_expect._read_fields(w[1:])})
            case ["write", _, "status", s]:
                f["write_status"] = int(s)
            case ["write", _, ("OK" | "MISMATCH") as v]:
                f["verify"] = v
            case ["unmapped", "read", "submitted"]:
                pass
            case ["unmapped", "read", "pending"]:
                f["unmapped_read"] = "pending"
            case ["unmapped", "read", "completed", "status", s]:
                f["unmapped_read"] = int(s)
            case _:
                f["unparsed"].append("BLK " + " ".join(w))
    return f


def check_iommu(f: dict, image: bytes, *, differences: dict[str, int] | None = None,
                fault_flags: int | None = None) -> None:
    """The guest's run against the spec. ``differences``: {request name: status} accepted
    instead of SPEC_STATUS (QEMU_DIFFERENCES for QEMU, {} for hyperpy); ``fault_flags``: the
    flags the first fault must carry (default: F_ADDRESS plus F_READ or F_WRITE)."""
    differences = differences or {}
    assert not f["iommu"]["fail"] and not f["blk"]["fail"], (f["iommu"]["fail"], f["blk"]["fail"])
    assert not f["iommu"]["exceptions"], f["iommu"]["exceptions"]
    # VIOT: one virtio-pci IOMMU, and a PCI range covering the blk device that leads to it.
    v = f["viot"]
    assert v is not None, "VIOT missing"
    assert v["iommus"] and v["iommus"][0][1] == f["iommu"]["pci"], (v, f["iommu"].get("pci"))
    assert any(r["to_iommu"] and r["bdf"][0] <= f["blk_bdf"] <= r["bdf"][1] for r in v["ranges"]), v
    assert f["iommu"]["ids"] == "1af4:1057"
    assert f["blk"]["ids"] == "1af4:1042"
    # Negotiated: VERSION_1 and the IOMMU features this guest asks for.
    drv = f["iommu"]["driver_features"]
    assert drv >> 32 & 1 and drv & 1 << 2, hex(drv)  # VERSION_1, MAP_UNMAP
    assert f["blk"]["driver_features"] >> 33 & 1, "blk must negotiate ACCESS_PLATFORM"
    assert f["page_size_mask"] and f["page_size_mask"] & 0x1000, "4 KiB pages"
    # The battery.
    assert list(f["status"])[:len(BATTERY)] == BATTERY, list(f["status"])
    for name in BATTERY:
        got = f["status"][name]
        want = differences.get(name, SPEC_STATUS[name])
        if got == "skipped":
            assert name in ("map_outside", "attach_domain_range"), name
            full = f["input_range"] == (0, 2**64 - 1) if name == "map_outside" else \
                f["domain_range"] == (0, 2**32 - 1)
            assert full, (name, f["input_range"], f["domain_range"])
            continue
        assert got == want, (name, got, want)
    # blk I/O through the IOVA window.
    s0 = virtio_expect.sector_digest(image[:512])
    p1 = virtio_expect.sector_digest(virtio_expect.blk_write_pattern(BLK_WRITE_SECTOR))
    assert f["capacity"] == len(image) // 512
    assert f["reads"][0] == {"what": "read", "sector": 0, "status": 0, "data": s0[0], "sum": s0[1]}
    assert f["write_status"] == 0
    assert f["reads"][1] == {"what": "readback", "sector": 1, "status": 0, "data": p1[0], "sum": p1[1]}
    assert f["verify"] == "OK"
    assert f["status"].get("unmap") == S_OK
    # The fault: the read after UNMAP cannot translate its ring/buffers.
    assert f["faults"], "no fault event"
    first = f["faults"][0]
    assert first["reason"] == FAULT_R_MAPPING, first
    assert first["endpoint"] == f["endpoint"], first
    assert IOVA <= first["address"] < IOVA + WIN_SIZE, hex(first["address"])
    if fault_flags is None:
        assert first["flags"] & FAULT_F_ADDRESS and first["flags"] & (FAULT_F_READ | FAULT_F_WRITE), first
    else:
        assert first["flags"] == fault_flags, first
    assert f["unmapped_read"] == "pending", f["unmapped_read"]
    assert f["done"]


def comparable_iommu(f: dict) -> dict:
    """The facts two VMMs must agree on (addresses, ids and counts of VMM-specific things
    dropped; faults reduced to the first one's reason)."""
    return {"status": dict(f["status"]), "reads": f["reads"], "verify": f["verify"],
            "write_status": f["write_status"], "capacity": f["capacity"],
            "first_fault_reason": f["faults"][0]["reason"] if f["faults"] else None,
            "unmapped_read": f["unmapped_read"], "done": f["done"]}
