"""What the virtio and ACPI test guests print, parsed; and what any correct VMM must make them print.

The guests (tests/guests/virtio_blk.c, virtio_net.c, virtio_console.c, virtio_rng.c, acpi.c;
formats in tests/guests/README.md) write line-oriented reports to COM1. This module is shared by
tests/test_virtio_guests_qemu.py (QEMU, the peer nobody here wrote) and hyperpy's own device
tests, so that both hold the guests to the same expectations and can compare their facts:

    facts = parse_blk(output)              # a dict; every parse_* takes the guest's COM1 text
    check_blk(facts, image=..., sector=1)  # AssertionError naming what is wrong
    comparable_blk(qemu_facts) == comparable_blk(hyperpy_facts)

``comparable_*`` drop what legitimately differs between VMMs (PCI addresses, BAR addresses,
offered features, MSI-X table size, interrupt counts, feature-dependent lines).

The inputs the tests feed the guests come from here as well: ``blk_image`` (a disk whose sectors
are recognizable), ``blk_write_pattern`` (what ``write=1`` writes), ``net_reply_frame`` (what the
host answers the guest's frame with), ``CONSOLE_TEXT``.

Import it by path (tests/ is no package):

    spec = importlib.util.spec_from_file_location("virtio_expect", TESTS / "virtio_expect.py")

Stdlib only.
"""

from __future__ import annotations

import re
import select
import time

SECTOR = 512

# What the guests send and expect (keep in step with the C sources).
BLK_PATTERN_TEXT = b"hyperpy-blk-write"  # virtio_blk.c PATTERN_TEXT
NET_ETHERTYPE = 0x88B5                   # IEEE 802 local experimental ethertype 1
NET_TX_PAYLOAD = b"hyperpy-net-test"     # the guest's frame
NET_RX_PAYLOAD = b"hello-from-host"      # what the tests answer with
NET_FRAME_LEN = 60                       # the guest pads to the Ethernet minimum (no FCS)
CONSOLE_TEXT = b"hello from virtio-console\n"
RNG_BYTES = 64

# virtio-blk request status (virtio 1.x 5.2.6)
BLK_S_OK, BLK_S_IOERR, BLK_S_UNSUPP = 0, 1, 2


# ---- Inputs ----

def fnv1a32(data: bytes) -> int:
    """The guests' checksum of a sector (FNV-1a, 32-bit)."""
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def blk_sector(k: int) -> bytes:
    """Sector k of ``blk_image``: "hyperpy-sector-%08d" and then bytes that depend on k."""
    head = b"hyperpy-sector-%08d" % k
    return head + bytes((k * 7 + i) & 0xFF for i in range(len(head), SECTOR))


def blk_image(sectors: int = 2048) -> bytes:
    """A raw disk image whose every sector is recognizable (``blk_sector``)."""
    return b"".join(blk_sector(k) for k in range(sectors))


def blk_write_pattern(sector: int) -> bytes:
    """The 512 bytes virtio_blk.elf writes to ``sector`` with ``write=1``."""
    t = len(BLK_PATTERN_TEXT)
    return BLK_PATTERN_TEXT + bytes((i * 13 + sector) & 0xFF for i in range(t, SECTOR))


def sector_digest(data: bytes) -> tuple[str, str]:
    """(first 16 bytes as hex, fnv1a32 as 8 hex digits): what a ``BLK read`` line shows."""
    assert len(data) == SECTOR
    return data[:16].hex(), f"{fnv1a32(data):08x}"


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def net_reply_frame(guest_mac: str, src_mac: str = "02:00:00:00:00:01",
                    payload: bytes = NET_RX_PAYLOAD) -> bytes:
    """The frame the host sends the guest: to its MAC, ethertype 0x88B5, padded to 60 bytes."""
    frame = mac_bytes(guest_mac) + mac_bytes(src_mac) + NET_ETHERTYPE.to_bytes(2, "big") + payload
    return frame.ljust(NET_FRAME_LEN, b"\0")


def check_guest_frame(frame: bytes, guest_mac: str) -> None:
    """The frame virtio_net.elf transmits: broadcast, from its MAC, 0x88B5, our payload, padding."""
    assert len(frame) == NET_FRAME_LEN, f"frame length {len(frame)}: {frame.hex()}"
    assert frame[:6] == b"\xff" * 6, f"destination {frame[:6].hex(':')}"
    assert frame[6:12] == mac_bytes(guest_mac), f"source {frame[6:12].hex(':')}"
    assert int.from_bytes(frame[12:14], "big") == NET_ETHERTYPE
    body = frame[14:]
    assert body.startswith(NET_TX_PAYLOAD) and not body[len(NET_TX_PAYLOAD):].strip(b"\0"), body


# ---- Parsing ----

_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][0-9A-Za-z]|[=>c])")


def _clean(text: str) -> str:
    """Newlines normalized, terminal escape sequences removed."""
    return _ANSI_ESCAPE.sub("", text.replace("\r\n", "\n"))


def _lines(text: str, prefix: str) -> list[list[str]]:
    """Words of each line whose first word is ``prefix`` (the prefix word itself removed).

    The prefix may follow other bytes on its line (a loader's banner without a newline, a
    terminal escape), as long as it starts a word."""
    pattern = re.compile(rf"(?:^|[^A-Za-z0-9_]){re.escape(prefix)}(?:\s|$)")
    out = []
    for line in _clean(text).split("\n"):
        m = pattern.search(line)
        if m:
            out.append(line[m.end():].split())
    return out


def _common(words: list[str], facts: dict) -> bool:
    """Lines that every virtio guest prints (virtio.c). True if ``words`` was one."""
    match words:
        case ["pci", addr, ids]:
            facts["pci"], facts["ids"] = addr, ids
        case ["caps", *rest]:
            names = []
            it = iter(rest)
            for w in it:
                if w == "mult":
                    facts["notify_mult"] = int(next(it))
                elif w == "at":
                    facts["common_addr"] = int(next(it), 16)
                else:
                    names.append(w)
            facts["caps"] = names
        case ["msix", "entries", n, "table", "bar", bar]:
            facts["msix_entries"], facts["msix_bar"] = int(n), int(bar)
        case ["features", "device", dev, "driver", drv]:
            facts["device_features"], facts["driver_features"] = int(dev, 16), int(drv, 16)
        case ["irq", "OK", n]:
            facts["irq_ok"], facts["irq_count"] = True, int(n)
        case ["isr", v]:
            facts["isr"] = int(v, 16)
        case ["done"]:
            facts["done"] = True
        case ["FAIL", *why]:
            facts["fail"].append(" ".join(why))
        case _:
            return False
    return True


def _new_facts(text: str) -> dict:
    return {"done": False, "fail": [], "irq_ok": False, "isr": None, "unparsed": [],
            "exceptions": [int(w[0]) for w in _lines(text, "EXCEPTION") if w and w[0].isdigit()]}


def _read_fields(words: list[str]) -> dict:
    """``<sector> status <s> [data <hex> sum <hex>]`` -> dict."""
    r = {"sector": int(words[0]), "status": int(words[2])}
    if len(words) >= 7 and words[3] == "data" and words[5] == "sum":
        r["data"], r["sum"] = words[4], words[6]
    return r


def parse_blk(text: str) -> dict:
    """Facts from virtio_blk.elf's output.

    Keys: capacity, size_max/seg_max/blk_size (None unless printed), ro, offered (feature
    names), reads (list of {sector, status[, data, sum]} in order: sector 0, sector N, then the
    read one past the end), write ({sector, status} or None), flush (status, "unsupported" or
    None), readback ({sector, status[, data, sum]} or None), verify ((sector, "OK"|"MISMATCH")
    or None), id ({status[, string]} or None); and the common keys: pci, ids, caps, notify_mult,
    common_addr, msix_entries, msix_bar, device_features, driver_features, irq_ok, irq_count,
    isr (the ISR status read at the end without irq), done, fail, exceptions, unparsed.
    """
    f = _new_facts(text)
    f.update(capacity=None, size_max=None, seg_max=None, blk_size=None, ro=False, offered=[],
             reads=[], write=None, flush=None, readback=None, verify=None, id=None)
    for w in _lines(text, "BLK"):
        if _common(w, f):
            continue
        match w:
            case ["offered", *names]:
                f["offered"] = names
            case ["capacity", n]:
                f["capacity"] = int(n)
            case [("size_max" | "seg_max" | "blk_size") as k, n]:
                f[k] = int(n)
            case ["ro"]:
                f["ro"] = True
            case ["read", _, "status", _, *_]:
                f["reads"].append(_read_fields(w[1:]))
            case ["write", n, "status", s]:
                f["write"] = {"sector": int(n), "status": int(s)}
            case ["write", n, ("OK" | "MISMATCH") as v]:
                f["verify"] = (int(n), v)
            case ["flush", "status", s]:
                f["flush"] = int(s)
            case ["flush", "unsupported"]:
                f["flush"] = "unsupported"
            case ["readback", _, "status", _, *_]:
                f["readback"] = _read_fields(w[1:])
            case ["id", "status", s, *rest]:
                f["id"] = {"status": int(s), **({"string": rest[0]} if rest else {})}
            case _:
                f["unparsed"].append(" ".join(w))
    return f


def parse_net(text: str) -> dict:
    """Facts from virtio_net.elf's output.

    Keys: mac (str or None when "none"), link ("up"/"down"/None), tx ("OK" or None),
    rx ({len, ethertype, payload}, "timeout", "skipped" or None); and the common keys.
    """
    f = _new_facts(text)
    f.update(mac=None, link=None, tx=None, rx=None)
    for w in _lines(text, "NET"):
        if _common(w, f):
            continue
        match w:
            case ["mac", m]:
                f["mac"] = None if m == "none" else m
            case ["link", state]:
                f["link"] = state
            case ["tx", "OK"]:
                f["tx"] = "OK"
            case ["rx", ("timeout" | "skipped") as v]:
                f["rx"] = v
            case ["rx", n, etype, *payload]:
                f["rx"] = {"len": int(n), "ethertype": int(etype, 16), "payload": " ".join(payload)}
            case _:
                f["unparsed"].append(" ".join(w))
    return f


def parse_console(text: str) -> dict:
    """Facts from virtio_console.elf's output.

    Keys: tx ("OK" or None), rx ({len, text}, "timeout" or None); and the common keys.
    """
    f = _new_facts(text)
    f.update(tx=None, rx=None)
    for line in _clean(text).split("\n"):
        # rx text may hold spaces: split only the head of the line.
        m = re.search(r"(?:^|[^A-Za-z0-9_])CONSOLE rx (\d+) (.*)$", line)
        if m:
            f["rx"] = {"len": int(m.group(1)), "text": m.group(2)}
    for w in _lines(text, "CONSOLE"):
        if _common(w, f):
            continue
        match w:
            case ["tx", "OK"]:
                f["tx"] = "OK"
            case ["rx", "timeout"]:
                f["rx"] = "timeout"
            case ["rx", n, *_] if n.isdigit():
                pass  # parsed above
            case _:
                f["unparsed"].append(" ".join(w))
    return f


def parse_rng(text: str) -> dict:
    """Facts from virtio_rng.elf's output.

    Keys: chunks (list of (n, bytes) per request, in order), blocks (the two 64-byte blocks
    reassembled, if complete), nonzero (True/False/None), distinct (True/False/None); and the
    common keys.
    """
    f = _new_facts(text)
    f.update(chunks=[], blocks=[], nonzero=None, distinct=None)
    for w in _lines(text, "RNG"):
        if _common(w, f):
            continue
        match w:
            case [n, "bytes", *hexdata] if n.isdigit():
                f["chunks"].append((int(n), bytes.fromhex("".join(hexdata))))
            case ["nonzero", "OK"]:
                f["nonzero"] = True
            case ["all", "zero"]:
                f["nonzero"] = False
            case ["distinct", "OK"]:
                f["distinct"] = True
            case ["repeated"]:
                f["distinct"] = False
            case _:
                f["unparsed"].append(" ".join(w))
    block = b""
    for _n, data in f["chunks"]:
        block += data
        if len(block) >= RNG_BYTES:
            f["blocks"].append(block)
            block = b""
    return f


def parse_acpi(text: str) -> dict:
    """Facts from acpi.elf's output.

    Keys: rsdp ({addr, from, rev, ok}), tables (list of (signature, length, ok) in the order
    printed: root table, entries, DSDT right after FACP), unmapped (table addresses it could not
    read), fadt ({rev, hw_reduced}), s5 ((SLP_TYPa, SLP_TYPb), "missing" or None), madt
    ({lapics, ioapics}), mcfg (list of {base, seg, bus}), acpi_enable ((SMI_CMD port, value)
    when the guest had to switch to ACPI mode, else None), sci_en (int or None), poweroff,
    poweroff_failed, fail, exceptions, unparsed.
    """
    f = {"rsdp": None, "tables": [], "unmapped": [], "fadt": None, "s5": None, "madt": None,
         "mcfg": [], "acpi_enable": None, "sci_en": None, "poweroff": False, "poweroff_failed": False, "fail": [],
         "unparsed": [],
         "exceptions": [int(w[0]) for w in _lines(text, "EXCEPTION") if w and w[0].isdigit()]}
    for w in _lines(text, "ACPI"):
        match w:
            case ["rsdp", addr, "from", src, "rev", rev, ok]:
                f["rsdp"] = {"addr": int(addr, 16), "from": src, "rev": int(rev), "ok": ok == "ok"}
            case ["table", "at", addr, "unmapped"]:
                f["unmapped"].append(int(addr, 16))
            case ["table", sig, "len", n, ok]:
                f["tables"].append((sig, int(n), ok == "ok"))
            case ["fadt", "rev", rev, "hw_reduced", hw]:
                f["fadt"] = {"rev": int(rev), "hw_reduced": hw == "1"}
            case ["_S5_", "missing"]:
                f["s5"] = "missing"
            case ["_S5_", a, b]:
                f["s5"] = (int(a), int(b))
            case ["madt", "lapics", n, "ioapics", m]:
                f["madt"] = {"lapics": int(n), "ioapics": int(m)}
            case ["mcfg", "base", base, "seg", seg, "bus", buses]:
                lo, hi = buses.split("-")
                f["mcfg"].append({"base": int(base, 16), "seg": int(seg), "bus": (int(lo), int(hi))})
            case ["smi_cmd", port, "acpi_enable", value]:
                f["acpi_enable"] = (int(port, 16), int(value, 16))
            case ["sci_en", v]:
                f["sci_en"] = int(v)
            case ["poweroff"]:
                f["poweroff"] = True
            case ["poweroff", "failed"]:
                f["poweroff_failed"] = True
            case ["FAIL", *why]:
                f["fail"].append(" ".join(why))
            case _:
                f["unparsed"].append(" ".join(w))
    return f


# ---- Expectations any correct VMM must meet ----

def _check_common(f: dict, *, irq: bool) -> None:
    assert not f["fail"], f"guest failed: {f['fail']}"
    assert not f["exceptions"], f"guest took exceptions {f['exceptions']}"
    assert "common" in f.get("caps", []) and "notify" in f.get("caps", []), f.get("caps")
    assert f.get("driver_features", 0) >> 32 & 1, "VIRTIO_F_VERSION_1 not negotiated"
    if irq:
        assert f["irq_ok"] and f["irq_count"] >= 1, "no completion arrived by MSI-X"
        assert f.get("msix_entries", 0) >= 1
    else:
        # Without MSI-X the device sets ISR bit 0 with each used-buffer notification.
        assert f.get("isr") is not None and f["isr"] & 1, f"ISR status {f.get('isr')}"
    assert f["done"], "the guest did not finish"


def check_blk(f: dict, image: bytes, *, sector: int = 1, wrote: bool = False,
              serial: str | None = None, irq: bool = False) -> None:
    """``image``: the disk as it was before the guest ran; ``wrote``: ``write=1`` was given;
    ``serial``: the GET_ID string the VMM was configured with (None: not checked)."""
    _check_common(f, irq=irq)
    capacity = len(image) // SECTOR
    assert f["capacity"] == capacity, (f["capacity"], capacity)
    want = [(0, image[:SECTOR]), (sector, image[sector * SECTOR:(sector + 1) * SECTOR])]
    reads = f["reads"]
    assert len(reads) == 3, reads
    for got, (n, data) in zip(reads, want):
        hex16, fnv = sector_digest(data)
        assert got == {"sector": n, "status": BLK_S_OK, "data": hex16, "sum": fnv}, (got, n)
    assert reads[2] == {"sector": capacity, "status": BLK_S_IOERR}, reads[2]
    flush_offered = "FLUSH" in f["offered"]
    assert f["flush"] == (BLK_S_OK if flush_offered else "unsupported"), f["flush"]
    if wrote:
        assert f["write"] == {"sector": sector, "status": BLK_S_OK}, f["write"]
        hex16, fnv = sector_digest(blk_write_pattern(sector))
        assert f["readback"] == {"sector": sector, "status": BLK_S_OK, "data": hex16, "sum": fnv}
        assert f["verify"] == (sector, "OK")
    else:
        assert f["write"] is None and f["readback"] is None and f["verify"] is None
    assert f["id"] is not None and f["id"]["status"] in (BLK_S_OK, BLK_S_UNSUPP), f["id"]
    if serial is not None:
        assert f["id"] == {"status": BLK_S_OK, **({"string": serial} if serial else {})}, f["id"]


def check_blk_image_after(before: bytes, after: bytes, *, sector: int) -> None:
    """The host's image after ``write=1 sector=N``: sector N is the pattern, nothing else moved."""
    assert len(after) == len(before)
    lo, hi = sector * SECTOR, (sector + 1) * SECTOR
    assert after[lo:hi] == blk_write_pattern(sector)
    assert after[:lo] == before[:lo] and after[hi:] == before[hi:]


def check_net(f: dict, *, mac: str | None = None, rx: bool = True, irq: bool = False) -> None:
    """``mac``: the MAC the VMM gave the device; ``rx``: the host answered with
    ``net_reply_frame``."""
    _check_common(f, irq=irq)
    if mac is not None:
        assert f["mac"] == mac, f["mac"]
    assert f["tx"] == "OK"
    if rx:
        assert f["rx"] == {"len": NET_FRAME_LEN, "ethertype": NET_ETHERTYPE,
                           "payload": NET_RX_PAYLOAD.decode()}, f["rx"]


def check_console(f: dict, *, rx_text: str | None = None, irq: bool = False) -> None:
    """``rx_text``: what the host sent to port 0 (with ``rxwait=``), None if nothing."""
    _check_common(f, irq=irq)
    assert f["tx"] == "OK"
    if rx_text is not None:
        assert f["rx"] == {"len": len(rx_text), "text": rx_text}, f["rx"]


def check_rng(f: dict, *, irq: bool = False) -> None:
    _check_common(f, irq=irq)
    assert f["chunks"] and all(1 <= n == len(d) for n, d in f["chunks"]), f["chunks"]
    assert len(f["blocks"]) == 2 and all(len(b) == RNG_BYTES for b in f["blocks"])
    assert f["nonzero"] is True and f["distinct"] is True
    assert any(f["blocks"][0]) and f["blocks"][0] != f["blocks"][1]


def check_acpi(f: dict, *, cpus: int = 1, hw_reduced: bool | None = None,
               ecam_base: int | None = None, powered_off: bool = True) -> None:
    """``powered_off``: the VMM ended when the guest wrote the sleep register."""
    assert not f["fail"] and not f["exceptions"], (f["fail"], f["exceptions"])
    assert f["rsdp"] and f["rsdp"]["ok"], f["rsdp"]
    assert f["tables"] and all(ok for _s, _n, ok in f["tables"]), f["tables"]
    assert not f["unmapped"], f["unmapped"]
    sigs = [s for s, _n, _ok in f["tables"]]
    assert sigs[0] in ("RSDT", "XSDT"), sigs
    assert (sigs[0] == "XSDT") == (f["rsdp"]["rev"] >= 2)
    for sig in ("FACP", "DSDT", "APIC"):
        assert sig in sigs, f"no {sig} table: {sigs}"
    assert sigs[sigs.index("FACP") + 1] == "DSDT"
    assert f["madt"] == {"lapics": cpus, "ioapics": f["madt"]["ioapics"]} and f["madt"]["ioapics"] >= 1
    if ecam_base is not None:
        assert "MCFG" in sigs and f["mcfg"] and f["mcfg"][0]["base"] == ecam_base, f["mcfg"]
    assert f["fadt"] is not None
    if hw_reduced is not None:
        assert f["fadt"]["hw_reduced"] == hw_reduced
    assert isinstance(f["s5"], tuple), f["s5"]
    if not f["fadt"]["hw_reduced"]:
        assert f["sci_en"] == 1, "ACPI mode is not on after SMI_CMD <- ACPI_ENABLE"
    assert f["poweroff"]
    if powered_off:
        assert not f["poweroff_failed"], "still running 2 s after the sleep-register write"


# ---- Comparison across VMMs ----

_VMM_SPECIFIC = {"pci", "ids", "caps", "notify_mult", "common_addr", "msix_entries", "msix_bar",
                 "device_features", "driver_features", "irq_count", "isr", "unparsed"}


def _comparable(f: dict, drop: set[str]) -> dict:
    return {k: v for k, v in f.items() if k not in _VMM_SPECIFIC | drop}


def comparable_blk(f: dict) -> dict:
    """What two VMMs with the same image must agree on (not: features, limits, flush, GET_ID)."""
    return _comparable(f, {"offered", "size_max", "seg_max", "blk_size", "flush", "id"})


def comparable_net(f: dict) -> dict:
    return _comparable(f, {"link"})


def comparable_console(f: dict) -> dict:
    return _comparable(f, set())


def comparable_rng(f: dict) -> dict:
    """Random bytes differ; their count and the checks do not."""
    return {"blocks": len(f["blocks"]), **_comparable(f, {"chunks", "blocks"})}


def comparable_acpi(f: dict) -> dict:
    """Table sets differ between VMMs; checksums, counts and the power-off outcome must not."""
    return {"rsdp_ok": bool(f["rsdp"] and f["rsdp"]["ok"]),
            "tables_ok": all(ok for _s, _n, ok in f["tables"]),
            "has": sorted({s for s, _n, _ok in f["tables"]} & {"FACP", "DSDT", "APIC"}),
            "madt": f["madt"], "s5_found": isinstance(f["s5"], tuple),
            "poweroff": f["poweroff"], "poweroff_failed": f["poweroff_failed"],
            "fail": f["fail"], "exceptions": f["exceptions"]}


def exchange_frame(sock, proc, guest_mac: str | None, deadline: float) -> bytes:
    """Wait (until ``deadline``, time.monotonic) for the guest's frame on ``sock`` (an AF_PACKET
    socket on the tap, in the test's network namespace), check it, answer with
    ``net_reply_frame``; returns the guest's frame.  ``guest_mac`` None: the VMM chose the MAC,
    the first frame of ours (``NET_TX_PAYLOAD``) says which.  Gives up early when ``proc`` (the
    VMM) exits."""
    frame = None
    while frame is None and time.monotonic() < deadline:
        if select.select([sock], [], [], 1.0)[0]:
            got = sock.recv(4096)
            ours = got[6:12] == mac_bytes(guest_mac) if guest_mac else got[14:].startswith(NET_TX_PAYLOAD)
            if ours:
                frame = got
        elif proc.poll() is not None:
            break
    assert frame is not None, "no frame from the guest"
    guest_mac = guest_mac or frame[6:12].hex(":")
    check_guest_frame(frame, guest_mac)
    sock.send(net_reply_frame(guest_mac))
    return frame
