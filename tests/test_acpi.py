"""ACPI: the AML encoder, the tables (parsed back here and checked by ACPICA's iasl) and the
hardware-reduced power-management device.

The tables are followed the way a guest finds them: install them into a fake guest memory,
start at the RSDP and walk RSDP -> XSDT -> tables, FADT -> X_DSDT.  iasl (Debian's
``acpica-tools``) is the independent check: it disassembles every table, and the disassembly is
compiled back and compared byte for byte.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hyperpy import layout
from hyperpy.acpi import aml
from hyperpy.acpi import AcpiBlob, acpi_table, build_acpi_tables, install_acpi_tables
from hyperpy.acpi.tables import AcpiError
from hyperpy.devices.legacy.acpi_pm import AcpiPm

GiB = layout.GiB
HEADER = struct.Struct("<4sIBB6s8sI4sI")


# --------------------------------------------------------------------------------------------
# Helpers: a fake guest memory and table parsing

class FakeMemory:
    """Guest memory covering the BIOS area the tables live in."""

    def __init__(self, base: int = layout.ACPI_RSDP_START, end: int = layout.ACPI_TABLES_END):
        self.base = base
        self.data = bytearray(end - base)
        self.writes: list[tuple[int, int]] = []

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        assert 0 <= off and off + len(data) <= len(self.data), f"write outside at {gpa:#x}"
        self.data[off:off + len(data)] = data
        self.writes.append((gpa, len(data)))

    def read(self, gpa: int, size: int) -> bytes:
        off = gpa - self.base
        assert 0 <= off and off + size <= len(self.data), f"read outside at {gpa:#x}"
        return bytes(self.data[off:off + size])

    def table(self, gpa: int) -> bytes:
        (length,) = struct.unpack("<I", self.read(gpa + 4, 4))
        return self.read(gpa, length)


def header(table: bytes) -> dict:
    sig, length, rev, csum, oem, oem_table, oem_rev, creator, creator_rev = HEADER.unpack_from(table)
    return dict(signature=sig.decode(), length=length, revision=rev, checksum=csum, oem_id=oem,
                oem_table_id=oem_table, oem_revision=oem_rev, creator_id=creator,
                creator_revision=creator_rev)


def walk(nr_vcpus: int = 4, ram_size: int = 2 * GiB, **kw) -> tuple[FakeMemory, dict[str, bytes], AcpiBlob]:
    """Build and install the tables; return them keyed by signature, found from the RSDP."""
    blob = build_acpi_tables(nr_vcpus, ram_size, **kw)
    mem = FakeMemory()
    install_acpi_tables(mem, blob)
    rsdp = mem.read(blob.rsdp_addr, 36)
    (xsdt_addr,) = struct.unpack_from("<Q", rsdp, 24)
    xsdt = mem.table(xsdt_addr)
    found = {"XSDT": xsdt, "RSDP": rsdp}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = mem.table(addr)
        found.setdefault(t[:4].decode(), t)
    (x_dsdt,) = struct.unpack_from("<Q", found["FACP"], 140)
    found["DSDT"] = mem.table(x_dsdt)
    return mem, found, blob


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 44
    while off < len(madt):
        etype, elen = madt[off], madt[off + 1]
        assert elen >= 2 and off + elen <= len(madt)
        out.append((etype, madt[off:off + elen]))
        off += elen
    assert off == len(madt)
    return out


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, number of bytes) of the PkgLength at the start of ``data``."""
    lead = data[0]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


# --------------------------------------------------------------------------------------------
# AML encoder

@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (1, b"\x01"), (63, b"\x3f"),
    (64, b"\x40\x04"), (0x123, b"\x43\x12"), (4095, b"\x4f\xff"),
    (4096, b"\x80\x00\x01"), ((1 << 20) - 1, b"\x8f\xff\xff"),
    (1 << 20, b"\xc0\x00\x00\x01"), ((1 << 28) - 1, b"\xcf\xff\xff\xff"),
])
def test_pkg_length_encoding(value, encoded):
    assert aml.pkg_length(value) == encoded
    assert decode_pkg_length(encoded) == (value, len(encoded))


def test_pkg_length_out_of_range():
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)
    with pytest.raises(ValueError):
        aml.pkg_length(-1)


@pytest.mark.parametrize("body_len,size", [
    (0, 1), (62, 1), (63, 2), (64, 2), (4093, 2), (4094, 3), (4095, 3), (4096, 3),
    ((1 << 20) - 4, 3), ((1 << 20) - 3, 4), ((1 << 20), 4),
])
def test_with_pkg_length_counts_itself(body_len, size):
    body = bytes(body_len)
    out = aml.with_pkg_length(body)
    value, n = decode_pkg_length(out)
    assert n == size
    assert value == body_len + size == len(out)


@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"), (0xFFFF, b"\x0b\xff\xff"),
    (0x10000, b"\x0c\x00\x00\x01\x00"), (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
    (0x1_0000_0000, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
    ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
])
def test_integers(value, encoded):
    assert aml.Integer(value).encode() == encoded
    assert aml.to_aml(value) == encoded


def test_integer_constants_and_range():
    assert aml.ZERO.encode() == b"\x00"
    assert aml.ONE.encode() == b"\x01"
    assert aml.ONES.encode() == b"\xff"
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            aml.Integer(bad)
    with pytest.raises(TypeError):
        aml.to_aml(True)


@pytest.mark.parametrize("ident,value", [
    ("PNP0A03", 0x030AD041), ("PNP0A08", 0x080AD041), ("PNP0501", 0x0105D041),
    ("PNP0C02", 0x020CD041),
])
def test_eisa_id(ident, value):
    assert aml.eisa_id(ident) == value
    assert aml.EisaId(ident).encode() == b"\x0c" + struct.pack("<I", value)


def test_eisa_id_rejects_malformed():
    for bad in ("PNP0A0", "pnp0A03", "PNP0G03", "1NP0A03"):
        with pytest.raises(ValueError):
            aml.eisa_id(bad)


def test_name_strings():
    assert aml.name_string("_SB_") == b"_SB_"
    assert aml.name_string("PCI") == b"PCI_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB_.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("\\_SB_.PCI0.COM1") == b"\\\x2f\x03_SB_PCI0COM1"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("", "1ABC", "ABCDE", "a", "\\_SB_..X", "A-B"):
        with pytest.raises(ValueError):
            aml.name_string(bad)


def test_strings_buffers_packages():
    assert aml.String("ACPI0007").encode() == b"\x0dACPI0007\x00"
    assert aml.to_aml("A") == b"\x0dA\x00"
    with pytest.raises(ValueError):
        aml.String("caf\u00e9")
    assert aml.Buffer(b"\x01\x02").encode() == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.Package(5, 0, 0, 0).encode() == b"\x12\x07\x04\x0a\x05\x00\x00\x00"
    assert aml.Package(aml.NamePath("\\_SB_")).encode() == b"\x12\x07\x01\\_SB_"
    with pytest.raises(ValueError):
        aml.Package(*range(256))


def test_named_objects_and_methods():
    assert aml.Name("_UID", 0).encode() == b"\x08_UID\x00"
    assert aml.Device("FOO").encode() == b"\x5b\x82\x05FOO_"
    assert aml.Scope("\\_SB_").encode() == b"\x10\x06\\_SB_"
    assert aml.Method("_STA", aml.Return(0x0F)).encode() == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    m = aml.Method("MTH1", aml.Return(aml.Arg(1)), args=2, serialized=True, sync_level=3)
    assert m.encode() == b"\x14\x08MTH1\x3a\xa4\x69"
    assert aml.Local(7).encode() == b"\x67"
    with pytest.raises(ValueError):
        aml.Method("BAD_", args=8)
    scope = aml.Scope("\\_SB_")
    scope.append(aml.Name("X___", 1))
    assert scope.encode() == b"\x10\x0c\\_SB_\x08X___\x01"


def test_nested_lengths_are_consistent():
    """A Device big enough for a 2-byte PkgLength inside a Scope: both lengths cover exactly
    their bodies."""
    dev = aml.Device("BIG_", aml.Name("BUF_", aml.Buffer(bytes(5000))))
    enc = aml.Scope("\\_SB_", dev).encode()
    value, n = decode_pkg_length(enc[1:])
    assert 1 + value == len(enc) and n == 3
    inner = enc[1 + n + 5:]
    assert inner[:2] == b"\x5b\x82"
    value, n = decode_pkg_length(inner[2:])
    assert 2 + value == len(inner)


def test_resource_descriptors():
    assert aml.IO(0x3F8, 0x3F8, 1, 8).encode() == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.FixedIO(0x60, 1).encode() == b"\x4b\x60\x00\x01"
    assert aml.IRQNoFlags(4).encode() == b"\x22\x10\x00"
    assert aml.Interrupt(5).encode() == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    assert aml.Interrupt(32, 33, edge=False, active_low=True, shared=True).encode() == \
        b"\x89\x0a\x00\x0d\x02" + struct.pack("<II", 32, 33)
    assert aml.Memory32Fixed(0xE000_0000, 0x1000_0000).encode() == \
        b"\x86\x09\x00\x01" + struct.pack("<II", 0xE000_0000, 0x1000_0000)
    bus = aml.WordBusNumber(0, 0xFF).encode()
    assert bus == b"\x88\x0d\x00\x02\x0c\x00" + struct.pack("<5H", 0, 0, 0xFF, 0, 0x100)
    wio = aml.WordIO(0xD00, 0xFFFF).encode()
    assert wio == b"\x88\x0d\x00\x01\x0c\x03" + struct.pack("<5H", 0, 0xD00, 0xFFFF, 0, 0xF300)
    dmem = aml.DWordMemory(0xC000_0000, 0xDFFF_FFFF).encode()
    assert dmem == b"\x87\x17\x00\x00\x0c\x01" + struct.pack(
        "<5I", 0, 0xC000_0000, 0xDFFF_FFFF, 0, 0x2000_0000)
    qmem = aml.QWordMemory(1 << 36, (1 << 37) - 1, cacheable=aml.MEM_PREFETCHABLE).encode()
    assert qmem == b"\x8a\x2b\x00\x00\x0c\x07" + struct.pack("<5Q", 0, 1 << 36, (1 << 37) - 1, 0,
                                                            1 << 36)
    with pytest.raises(ValueError):
        aml.WordIO(0x100, 0xFF)
    with pytest.raises(ValueError):
        aml.IRQNoFlags(16)


def test_resource_template_end_tag_checksum():
    rt = aml.ResourceTemplate(aml.IO(0x3F8, 0x3F8, 1, 8), aml.IRQNoFlags(4))
    data = rt.data()
    assert data[-2] == 0x79
    assert sum(data) & 0xFF == 0
    assert rt.encode() == aml.Buffer(data).encode()
    assert aml.ResourceTemplate().data() == b"\x79\x87"


# --------------------------------------------------------------------------------------------
# Tables

EXPECTED_REVISION = {"DSDT": 2, "FACP": 6, "APIC": 5, "MCFG": 1, "XSDT": 1}


@pytest.mark.parametrize("nr_vcpus", [1, 4])
def test_every_table_header_and_checksum(nr_vcpus):
    _, found, blob = walk(nr_vcpus)
    assert {s for s, _, _ in blob.tables} == {"DSDT", "FACP", "APIC", "MCFG", "XSDT"}
    for sig, addr, length in blob.tables:
        data = dict(blob.writes)[addr]
        assert data == found[sig]
        h = header(data)
        assert h["signature"] == sig
        assert h["length"] == length == len(data)
        assert h["revision"] == EXPECTED_REVISION[sig]
        assert sum(data) & 0xFF == 0, f"{sig} checksum"
        assert h["oem_id"] == b"HYPRPY"
        assert h["oem_table_id"] == ("HPY" + sig).ljust(8).encode()
        assert h["creator_id"] == b"HYPY"
        assert h["oem_revision"] == 1 and h["creator_revision"] == 1


def test_tables_layout_in_guest_memory():
    _, _, blob = walk(4)
    assert blob.rsdp_addr == layout.ACPI_RSDP_START and blob.rsdp_addr % 16 == 0
    spans = sorted((gpa, gpa + len(d)) for gpa, d in blob.writes)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "tables overlap"
    for sig, addr, length in blob.tables:
        assert addr % 8 == 0, sig
        assert layout.ACPI_TABLES_START <= addr and addr + length <= layout.ACPI_TABLES_END
    assert blob.rsdp_addr + 36 <= layout.ACPI_TABLES_START


def test_install_writes_every_piece():
    blob = build_acpi_tables(2, GiB)
    mem = FakeMemory()
    install_acpi_tables(mem, blob)
    assert mem.writes == [(gpa, len(d)) for gpa, d in blob.writes]


def test_rsdp():
    mem, found, blob = walk(2)
    rsdp = found["RSDP"]
    sig, csum, oem, rev, rsdt, length, xsdt, xcsum = struct.unpack_from("<8sB6sBIIQB", rsdp)
    assert sig == b"RSD PTR "
    assert oem == b"HYPRPY" and rev == 2 and length == 36 and rsdt == 0
    assert sum(rsdp[:20]) & 0xFF == 0
    assert sum(rsdp) & 0xFF == 0
    assert rsdp[33:36] == b"\x00\x00\x00"
    assert xsdt == dict((s, a) for s, a, _ in blob.tables)["XSDT"]


def test_xsdt_points_at_the_tables():
    _, found, blob = walk(2)
    addrs = dict((s, a) for s, a, _ in blob.tables)
    entries = [a for (a,) in struct.iter_unpack("<Q", found["XSDT"][36:])]
    assert entries == [addrs["FACP"], addrs["APIC"], addrs["MCFG"]]
    assert addrs["DSDT"] not in entries


def test_fadt():
    _, found, blob = walk(2)
    f = found["FACP"]
    assert len(f) == 276 and f[8] == 6
    facs, dsdt32 = struct.unpack_from("<II", f, 36)
    assert facs == 0 and dsdt32 == 0
    (x_facs, x_dsdt) = struct.unpack_from("<QQ", f, 132)
    assert x_facs == 0 and x_dsdt == dict((s, a) for s, a, _ in blob.tables)["DSDT"]
    (sci,) = struct.unpack_from("<H", f, 46)
    assert sci == 0
    (iapc,) = struct.unpack_from("<H", f, 109)
    assert iapc & (1 << 2), "VGA not present"
    assert iapc & (1 << 5), "CMOS RTC not present"
    assert not iapc & (1 << 1), "no 8042 keyboard"
    assert not iapc & (1 << 3), "MSI must not be disabled"
    (flags,) = struct.unpack_from("<I", f, 112)
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 10), "RESET_REG_SUP"
    assert struct.unpack_from("<BBBBQ", f, 116) == (1, 8, 0, 1, layout.ACPI_RESET_PORT)
    assert f[128] == layout.ACPI_RESET_VALUE
    assert f[131] == 5                              # minor revision: ACPI 6.5
    assert struct.unpack_from("<BBBBQ", f, 244) == (1, 8, 0, 1, layout.ACPI_SLEEP_CONTROL_PORT)
    assert struct.unpack_from("<BBBBQ", f, 256) == (1, 8, 0, 1, layout.ACPI_SLEEP_STATUS_PORT)
    assert f[268:276] == b"HYPRPY\x00\x00"
    assert f[148:244] == bytes(96), "no PM1/PM2/PM timer/GPE blocks on hardware-reduced ACPI"


@pytest.mark.parametrize("nr_vcpus", [1, 4])
def test_madt(nr_vcpus):
    _, found, _ = walk(nr_vcpus)
    m = found["APIC"]
    lapic, flags = struct.unpack_from("<II", m, 36)
    assert lapic == layout.LAPIC_START and flags == 1     # PCAT_COMPAT
    entries = madt_entries(m)
    cpus = [struct.unpack("<BBBBI", e) for t, e in entries if t == 0]
    assert cpus == [(0, 8, i, i, 1) for i in range(nr_vcpus)]
    ioapics = [struct.unpack("<BBBBII", e) for t, e in entries if t == 1]
    assert ioapics == [(1, 12, 0, 0, layout.IOAPIC_START, 0)]
    overrides = [struct.unpack("<BBBBIH", e) for t, e in entries if t == 2]
    assert overrides == [(2, 10, 0, 0, 2, 0)]          # ISA IRQ0 (PIT) -> GSI 2
    nmis = [struct.unpack("<BBBHB", e) for t, e in entries if t == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]                # LINT1 on every CPU
    assert {t for t, _ in entries} == {0, 1, 2, 4}


def test_madt_x2apic_above_254():
    _, found, _ = walk(300)
    entries = madt_entries(found["APIC"])
    xapic = [e[2:4] for t, e in entries if t == 0]
    x2apic = [struct.unpack("<BBHIII", e) for t, e in entries if t == 9]
    assert [(u, a) for u, a in xapic] == [(i, i) for i in range(255)]
    assert x2apic == [(9, 16, 0, i, 1, i) for i in range(255, 300)]
    assert [t for t, _ in entries].count(10) == 1


def test_madt_needs_a_vcpu():
    with pytest.raises(AcpiError):
        build_acpi_tables(0, GiB)


def test_mcfg():
    _, found, _ = walk(1)
    m = found["MCFG"]
    assert len(m) == 60
    assert m[36:44] == bytes(8)
    assert struct.unpack_from("<QHBBI", m, 44) == (layout.PCI_ECAM_START, 0, 0, 255, 0)


def _qword_windows(dsdt: bytes) -> list[tuple[int, int]]:
    out = []
    for m in re.finditer(re.escape(b"\x8a\x2b\x00"), dsdt):
        _, _, _, gran, lo, hi, tra, ln = struct.unpack_from("<BBBQQQQQ", dsdt, m.end())
        out.append((lo, hi))
        assert lo + ln - 1 == hi
    return out


@pytest.mark.parametrize("ram", [512 * layout.MiB, 3 * GiB, 5 * GiB])
def test_dsdt_64bit_window_follows_ram(ram):
    _, found, _ = walk(1, ram)
    start = layout.pci_mmio64_start(ram)
    assert _qword_windows(found["DSDT"]) == [(start, start + layout.PCI_MMIO64_SIZE - 1)]


def test_extra_tables_are_listed():
    viot = acpi_table("VIOT", 0, b"\x00" * 12)
    ssdt = acpi_table("SSDT", 2, aml.Name("\\FOO_", 7).encode())
    _, found, blob = walk(2, extra_tables=[viot, ssdt])
    assert found["VIOT"] == viot and found["SSDT"] == ssdt
    assert [s for s, _, _ in blob.tables] == ["DSDT", "FACP", "APIC", "MCFG", "VIOT", "SSDT", "XSDT"]


def test_malformed_extra_table_is_refused():
    good = acpi_table("VIOT", 0, b"\x00" * 12)
    bad_sum = bytearray(good)
    bad_sum[40] ^= 1
    with pytest.raises(AcpiError, match="checksum"):
        build_acpi_tables(1, GiB, extra_tables=[bytes(bad_sum)])
    with pytest.raises(AcpiError, match="length"):
        build_acpi_tables(1, GiB, extra_tables=[good + b"\x00"])
    with pytest.raises(AcpiError, match="shorter"):
        build_acpi_tables(1, GiB, extra_tables=[b"VIOT"])


def test_tables_that_do_not_fit_are_refused():
    room = layout.ACPI_TABLES_END - layout.ACPI_TABLES_START
    huge = acpi_table("OEMX", 1, bytes(room))
    with pytest.raises(AcpiError, match=r"ACPI tables need \d+ bytes but only \d+ fit"):
        build_acpi_tables(1, GiB, extra_tables=[huge])


def test_acpi_table_helper():
    t = acpi_table("TEST", 3, b"abc", oem_table_id="MINE")
    h = header(t)
    assert h["length"] == 39 and h["revision"] == 3 and h["oem_table_id"] == b"MINE    "
    assert sum(t) & 0xFF == 0
    with pytest.raises(ValueError):
        acpi_table("TOOLONG", 1, b"")


# --------------------------------------------------------------------------------------------
# iasl: disassemble every table, compile the disassembly back, compare

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(
    IASL is None, reason="iasl not found: install Debian's acpica-tools (apt-get install acpica-tools)")
_SUMMARY = re.compile(r"(\d+) Errors?, (\d+) Warnings?")


def _iasl(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([IASL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for line in out.splitlines():
        if _SUMMARY.search(line):
            errors, warnings = map(int, _SUMMARY.search(line).groups())
            assert errors == 0 and warnings == 0, out
        else:
            assert not re.search(r"(?i)\b(error|warning)", line), out
    return out


def _disassemble(tmp: Path, sig: str, data: bytes) -> str:
    (tmp / sig).write_bytes(data)
    _iasl(["-d", sig], tmp)
    return (tmp / f"{sig}.dsl").read_text()


def _recompile(tmp: Path, sig: str, extra: tuple[str, ...] = ()) -> bytes:
    out = _iasl([*extra, "-p", f"rt_{sig}", f"{sig}.dsl"], tmp)
    assert "Compilation successful" in out, out
    return (tmp / f"rt_{sig}.aml").read_bytes()


def _same_but_creator(ours: bytes, theirs: bytes) -> list[int]:
    """Byte offsets where the tables differ, leaving out the checksum and the compiler ID and
    revision iasl writes into the header."""
    assert len(ours) == len(theirs)
    return [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b and i != 9 and not 28 <= i < 36]


@needs_iasl
@pytest.mark.parametrize("nr_vcpus", [1, 4])
def test_iasl_dsdt(tmp_path, nr_vcpus):
    _, found, _ = walk(nr_vcpus, 5 * GiB)
    dsl = _disassemble(tmp_path, "DSDT", found["DSDT"])
    for needle in ("Scope (\\_SB)", "Device (PCI0)", 'EisaId ("PNP0A08")', 'EisaId ("PNP0A03")',
                   "Name (_SEG, Zero)", "Name (_UID, Zero)", "Name (_BBN, Zero)",
                   "WordBusNumber (ResourceProducer", "0x00FF,", "0x0CF7,", "0x0D00,",
                   "DWordMemory (ResourceProducer", "0xC0000000,", "0xDFFFFFFF,",
                   "QWordMemory (ResourceProducer", "Device (MBRD)", 'EisaId ("PNP0C02")',
                   "Memory32Fixed (ReadWrite", "0xE0000000,", "Device (COM1)",
                   'EisaId ("PNP0501")', "0x03F8,", "IRQNoFlags ()", "{4}", "_S5_",
                   '"ACPI0007"'):
        assert needle in dsl, needle
    assert re.search(r"Name \(\\_S5_?, Package \(0x04\)\s*(//.*)?\s*\{\s*0x05,\s*Zero,\s*Zero,"
                     r"\s*Zero\s*\}", dsl), dsl
    assert len(re.findall(r"Device \(C[0-9A-F]{3}\)", dsl)) == nr_vcpus
    assert "ResourceTemplate" in dsl and "Buffer (" not in dsl, "every _CRS is a resource template"
    # Compiled back without optimizations, the AML is ours except for the end tags' checksum
    # bytes (iasl writes 0, "checksum not used").
    ours = found["DSDT"]
    theirs = _recompile(tmp_path, "DSDT", ("-oa",))
    for i in _same_but_creator(ours, theirs):
        assert ours[i - 1] == 0x79 and theirs[i] == 0, f"DSDT differs at {i:#x}"


@needs_iasl
def test_iasl_dsdt_with_every_aml_construct(tmp_path):
    """Extra DSDT AML through the hook: every encoder object, and packages large enough for 2-
    and 3-byte PkgLengths, disassemble and compile back to the same bytes."""
    extra = [
        aml.Scope("\\_SB_.PCI0", aml.Name("XTRA", aml.Package(1, 2, aml.NamePath("\\_SB_.COM1")))),
        aml.Scope("\\_SB_", aml.Device(
            "VDEV",
            aml.Name("_HID", "HYPY0001"),
            aml.Name("_UID", 0x1234_5678_9ABC),
            aml.Name("STR_", "hello"),
            aml.Name("ALL1", aml.ONES),
            aml.Name("BIG_", aml.Buffer(bytes(range(256)) * 20)),
            aml.Name("MEDM", aml.Buffer(b"\x5a" * 100)),
            aml.Name("PKG_", aml.Package(aml.Package(0xFFFF, 0x10000), "x", aml.Buffer(b"\x01"))),
            aml.Name("_CRS", aml.ResourceTemplate(
                aml.FixedIO(0x60, 1),
                aml.Interrupt(5),
                aml.Interrupt(32, 33, edge=False, active_low=True, shared=True),
                aml.Memory32Fixed(0xD000_0000, 0x1000, read_write=False),
                aml.QWordMemory(1 << 40, (1 << 40) + 0xFFFF, cacheable=aml.MEM_PREFETCHABLE),
            )),
            aml.Method("_STA", aml.Return(0x0F)),
            aml.Method("MTH1", aml.Return(aml.Arg(0)), args=1, serialized=True, sync_level=2),
        )),
    ]
    _, found, _ = walk(2, GiB, dsdt_aml=extra)
    ours = found["DSDT"]
    assert len(ours) > 5000
    dsl = _disassemble(tmp_path, "DSDT", ours)
    for needle in ("XTRA", "\\_SB.COM1", "Device (VDEV)", '"HYPY0001"', "0x0000123456789ABC",
                   '"hello"', "Ones", "FixedIO (", "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                   "Interrupt (ResourceConsumer, Level, ActiveLow, Shared, ,, )", "0x00000020,",
                   "Memory32Fixed (ReadOnly", "Prefetchable", "Method (_STA, 0, NotSerialized)",
                   "Method (MTH1, 1, Serialized, 2)", "Return (Arg0)"):
        assert needle in dsl, needle
    theirs = _recompile(tmp_path, "DSDT", ("-oa",))
    for i in _same_but_creator(ours, theirs):
        assert ours[i - 1] == 0x79 and theirs[i] == 0, f"DSDT differs at {i:#x}"


@needs_iasl
@pytest.mark.parametrize("sig,needles", [
    ("FACP", ["Revision : 06", "Hardware Reduced (V5) : 1", "Reset Register Supported (V2) : 1",
              "VGA Not Present (V4) : 1", "CMOS RTC Not Present (V5) : 1",
              "8042 Present on ports 60/64 (V2) : 0", "Value to cause reset : 01",
              "Address : 0000000000000602", "Address : 0000000000000600",
              "Address : 0000000000000601", "FADT Minor Revision : 05"]),
    ("APIC", ["Local Apic Address : FEE00000", "PC-AT Compatibility : 1",
              "Subtable Type : 00 [Processor Local APIC]", "Local Apic ID : 03",
              "Subtable Type : 01 [I/O APIC]", "Address : FEC00000",
              "Subtable Type : 02 [Interrupt Source Override]", "Interrupt : 00000002",
              "Subtable Type : 04 [Local APIC NMI]", "Interrupt Input LINT : 01"]),
    ("MCFG", ["Base Address : 00000000E0000000", "Segment Group Number : 0000",
              "Start Bus Number : 00", "End Bus Number : FF"]),
    ("XSDT", ["ACPI Table Address   0", "ACPI Table Address   2"]),
])
def test_iasl_data_tables(tmp_path, sig, needles):
    _, found, _ = walk(4, 2 * GiB)
    dsl = _disassemble(tmp_path, sig, found[sig])
    flat = re.sub(r"[ \t]+", " ", dsl)
    for needle in needles:
        assert re.sub(r"[ \t]+", " ", needle) in flat, needle
    assert f"Table Length : {len(found[sig]):08X}" in flat
    if sig == "APIC":
        assert flat.count("[Processor Local APIC]") == 4
    # The data-table compiler rebuilds the binary from the disassembly: same bytes.
    assert _same_but_creator(found[sig], _recompile(tmp_path, sig)) == []


ACPIEXEC = shutil.which("acpiexec")


@pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec not found: install Debian's acpica-tools")
def test_acpiexec_loads_and_evaluates(tmp_path):
    """ACPICA's interpreter (the one Linux runs) loads the tables, evaluates \\_S5_ and turns
    every _CRS into resources the way an OS does."""
    _, found, _ = walk(2, 5 * GiB)
    names = []
    for sig in ("DSDT", "FACP", "APIC", "MCFG"):
        (tmp_path / sig).write_bytes(found[sig])
        names.append(sig)
    cmds = "evaluate \\_S5_; resources \\_SB.PCI0; resources \\_SB.COM1; resources \\_SB.MBRD; namespace"
    proc = subprocess.run([ACPIEXEC, "-b", cmds, *names], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 ACPI AML tables successfully acquired and loaded" in out, out
    assert re.search(r"\[Package\] Contains 4 Elements:\s*\[Integer\] = 0000000000000005\s*"
                     r"(\[Integer\] = 0000000000000000\s*){3}", out), out
    flat = re.sub(r"[ \t]+", " ", out)
    start = layout.pci_mmio64_start(5 * GiB)
    for needle in ("Address Minimum : 0000", "Address Maximum : 00FF",
                   "Address Minimum : 0D00", "Address Maximum : FFFF",
                   "Address Minimum : C0000000", "Address Maximum : DFFFFFFF",
                   f"Address Minimum : {start:016X}",
                   f"Address Maximum : {start + layout.PCI_MMIO64_SIZE - 1:016X}",
                   "Address : E0000000", "Address Length : 10000000",
                   "Address Minimum : 03F8", "Interrupt List : 4",
                   "_HID Integer", "= 00000000080AD041", '"ACPI0007"'):
        assert needle in flat, needle
    for line in out.splitlines():
        # acpiexec converts each resource list back to AML and compares: ACPICA always writes 0
        # as the end tag's checksum ("not used"), ours is a real checksum; and there is no _SRS.
        if ("Data mismatch in descriptor" in line and "type 78" in line) or \
                line.startswith("Mismatch at byte offset 01: is 00") or \
                "AcpiSetCurrentResources failed: AE_NOT_FOUND" in line:
            continue
        assert not re.search(r"(?i)\berror\b|\bwarning\b|mismatch|AE_(?!OK)", line), line


# --------------------------------------------------------------------------------------------
# The power-management device

class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pm(self) -> AcpiPm:
        return AcpiPm(lambda: self.events.append("poweroff"), lambda: self.events.append("reset"))


CTRL = 0
STATUS = layout.ACPI_SLEEP_STATUS_PORT - layout.ACPI_SLEEP_CONTROL_PORT
RESET = layout.ACPI_RESET_PORT - layout.ACPI_SLEEP_CONTROL_PORT


def test_pm_ports_match_layout():
    assert (CTRL, STATUS, RESET) == (0, 1, 2)


def test_pm_s5_powers_off():
    r = Recorder()
    pm = r.pm()
    pm.write(CTRL, 1, (layout.ACPI_S5_SLP_TYP << 2) | (1 << 5))
    assert r.events == ["poweroff"] and pm.poweroffs == 1


def test_pm_sleep_type_without_slp_en_does_nothing():
    r = Recorder()
    pm = r.pm()
    pm.write(CTRL, 1, layout.ACPI_S5_SLP_TYP << 2)
    assert r.events == [] and pm.read(STATUS, 1) == 0


def test_pm_other_sleep_state_wakes_at_once():
    r = Recorder()
    pm = r.pm()
    assert pm.read(STATUS, 1) == 0
    pm.write(CTRL, 1, (3 << 2) | (1 << 5))       # S3: not supported, "wake" immediately
    assert r.events == []
    assert pm.read(STATUS, 1) == 0x80            # WAK_STS
    pm.write(STATUS, 1, 0x01)                    # writing 0 to WAK_STS keeps it
    assert pm.read(STATUS, 1) == 0x80
    pm.write(STATUS, 1, 0x80)                    # write 1 to clear
    assert pm.read(STATUS, 1) == 0


def test_pm_reset():
    r = Recorder()
    pm = r.pm()
    pm.write(RESET, 1, layout.ACPI_RESET_VALUE ^ 0xFF)
    assert r.events == []
    pm.write(RESET, 1, layout.ACPI_RESET_VALUE)
    assert r.events == ["reset"] and pm.resets == 1


def test_pm_wide_access_covers_each_register():
    r = Recorder()
    pm = r.pm()
    pm.write(CTRL, 4, (layout.ACPI_RESET_VALUE << 16) | (layout.ACPI_S5_SLP_TYP << 2) | 0x20)
    assert r.events == ["poweroff", "reset"]
    assert pm.read(CTRL, 3) == 0
    pm.write(CTRL, 1, 0x20)                      # SLP_TYP 0 with SLP_EN: S0 request, wakes
    assert pm.read(CTRL, 2) == 0x8000


def test_pm_unknown_accesses_are_ignored():
    r = Recorder()
    pm = r.pm()
    pm.write(5, 1, 0xFF)
    assert pm.read(5, 1) == 0 and pm.read(RESET, 1) == 0 and r.events == []


@needs_iasl
def test_iasl_dsdt_power_button_ged(tmp_path):
    """The power button: a PNP0C0C device notified (0x80) from the GED's _EVT when the GED
    event register (one byte of SystemIO at ACPI_GED_PORT) has the power-button bit, and the
    GED's interrupt as an extended descriptor (edge, active high)."""
    _, found, _ = walk(1, 512 * layout.MiB)
    dsl = _disassemble(tmp_path, "DSDT", found["DSDT"])
    for needle in ("Device (PWRB)", 'EisaId ("PNP0C0C")', "Device (GED0)", '"ACPI0013"',
                   f"OperationRegion (GDST, SystemIO, 0x{layout.ACPI_GED_PORT:04X}, One)",
                   "Field (GDST, ByteAcc, NoLock, WriteAsZeros)", "GDAT,   8",
                   "Method (_EVT, 1, Serialized)", "Local0 = GDAT", "Notify (\\_SB.PWRB, 0x80)",
                   "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                   f"{layout.ACPI_GED_IRQ:#010x},"):
        assert needle in dsl, (needle, dsl[dsl.find("PWRB") - 200:])
    assert re.search(r"If \(\(Local0 & One\)\)|If \(And \(Local0, One\)\)", dsl), dsl
