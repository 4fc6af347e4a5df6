"""A small ACPI Machine Language (AML) encoder, enough for a VMM's DSDT/SSDTs.

AML is the bytecode OSPM interprets from the DSDT (ACPI 6.x, chapter 20).  The VMM only emits
declarations (names, scopes, devices, constant methods, resource templates), so this module
encodes objects and never evaluates them.  Every object is a small class with
``encode() -> bytes``; objects compose by nesting, and :func:`to_aml` also accepts plain ``int``
(an Integer), ``str`` (a String) and ``bytes`` (already-encoded AML, for callers that build
their own).
"""

from __future__ import annotations

import struct
from typing import Protocol, Union, runtime_checkable

# --- Opcodes (ACPI 6.x, 20.3 "AML Byte Stream Byte Values") --------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
ALIAS_OP = 0x06
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82            # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C            # '\'
PARENT_PREFIX_CHAR = 0x5E   # '^'
LOCAL0_OP = 0x60
ARG0_OP = 0x68
RETURN_OP = 0xA4
ONES_OP = 0xFF

PKG_LENGTH_MAX = (1 << 28) - 1


@runtime_checkable
class Aml(Protocol):
    def encode(self) -> bytes: ...


AmlLike = Union[Aml, int, str, bytes]


def to_aml(obj: AmlLike) -> bytes:
    """Encode ``obj``: an Aml object, an int (Integer), a str (String) or raw AML bytes."""
    if isinstance(obj, bool):
        raise TypeError("use Integer(0/1) instead of a bool")
    if isinstance(obj, int):
        return Integer(obj).encode()
    if isinstance(obj, str):
        return String(obj).encode()
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    if isinstance(obj, Aml):
        return obj.encode()
    raise TypeError(f"cannot encode {type(obj).__name__} as AML")


def _join(objs: tuple[AmlLike, ...] | list[AmlLike]) -> bytes:
    return b"".join(to_aml(o) for o in objs)


# --- PkgLength -------------------------------------------------------------------------------------

def pkg_length(value: int) -> bytes:
    """Encode the PkgLength *value* (which must already include the PkgLength bytes themselves).

    One byte holds 0-63 in bits 5:0.  Otherwise bits 7:6 of the lead byte count the 1-3 bytes that
    follow, bits 3:0 hold the low nibble and each following byte the next 8 bits (so at most
    2**28 - 1).
    """
    if value < 0 or value > PKG_LENGTH_MAX:
        raise ValueError(f"PkgLength {value} out of range (0..{PKG_LENGTH_MAX})")
    if value < 0x40:
        return bytes([value])
    extra = 1 if value < (1 << 12) else 2 if value < (1 << 20) else 3
    out = [(extra << 6) | (value & 0x0F)]
    rest = value >> 4
    for _ in range(extra):
        out.append(rest & 0xFF)
        rest >>= 8
    return bytes(out)


def with_pkg_length(body: bytes) -> bytes:
    """Prefix ``body`` with the PkgLength that covers the PkgLength bytes and ``body``."""
    n = len(body)
    for size in (1, 2, 3, 4):
        total = n + size
        if total > PKG_LENGTH_MAX:
            break
        encoded = pkg_length(total)
        if len(encoded) == size:
            return encoded + body
    raise ValueError(f"AML package body of {n} bytes is too large for a PkgLength")


# --- Names -------------------------------------------------------------------------------------------

_LEAD = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME = _LEAD | set("0123456789")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does ("PCI" -> "PCI_")."""
    if not 1 <= len(seg) <= 4 or seg[0] not in _LEAD or any(c not in _NAME for c in seg):
        raise ValueError(f"invalid ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""Encode an ASL name path (``"\_SB_.PCI0"``, ``"^FOO"``, ``"_HID"``) as an AML NameString."""
    i = 0
    prefix = b""
    if path.startswith("\\"):
        prefix, i = b"\\", 1
    else:
        while i < len(path) and path[i] == "^":
            i += 1
        prefix = b"^" * i
    rest = path[i:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        if not prefix:
            raise ValueError("empty ACPI name")
        return prefix + b"\x00"              # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError(f"ACPI name path {path!r} has too many segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


class NamePath:
    """A reference to a named object used as a term (e.g. a Package element or Return value)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def encode(self) -> bytes:
        return name_string(self.path)


# --- Data objects ----------------------------------------------------------------------------------

class Integer:
    """An integer constant in the shortest encoding (ZeroOp, OneOp or a Byte/Word/DWord/QWord
    prefix).  ``Ones`` is a separate object because its width depends on the DSDT revision."""

    def __init__(self, value: int) -> None:
        if not 0 <= value < (1 << 64):
            raise ValueError(f"AML integer {value} out of range")
        self.value = value

    def encode(self) -> bytes:
        v = self.value
        if v == 0:
            return bytes([ZERO_OP])
        if v == 1:
            return bytes([ONE_OP])
        if v <= 0xFF:
            return bytes([BYTE_PREFIX, v])
        if v <= 0xFFFF:
            return bytes([WORD_PREFIX]) + struct.pack("<H", v)
        if v <= 0xFFFF_FFFF:
            return bytes([DWORD_PREFIX]) + struct.pack("<I", v)
        return bytes([QWORD_PREFIX]) + struct.pack("<Q", v)


class _Const:
    def __init__(self, op: int, label: str) -> None:
        self._op = op
        self._label = label

    def encode(self) -> bytes:
        return bytes([self._op])

    def __repr__(self) -> str:
        return self._label


ZERO = _Const(ZERO_OP, "Zero")
ONE = _Const(ONE_OP, "One")
ONES = _Const(ONES_OP, "Ones")


class String:
    """A null-terminated ASCII string constant."""

    def __init__(self, value: str) -> None:
        data = value.encode("ascii")
        if b"\x00" in data or any(b > 0x7F for b in data):
            raise ValueError("AML strings are 7-bit ASCII without NUL")
        self.value = value

    def encode(self) -> bytes:
        return bytes([STRING_PREFIX]) + self.value.encode("ascii") + b"\x00"


class Buffer:
    """A byte buffer: BufferOp PkgLength BufferSize ByteList."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def encode(self) -> bytes:
        return bytes([BUFFER_OP]) + with_pkg_length(Integer(len(self.data)).encode() + self.data)


class Package:
    """A fixed-size package (at most 255 elements: VarPackage is not needed here)."""

    def __init__(self, *elements: AmlLike) -> None:
        if len(elements) > 255:
            raise ValueError("Package has more than 255 elements")
        self.elements = elements

    def encode(self) -> bytes:
        return bytes([PACKAGE_OP]) + with_pkg_length(bytes([len(self.elements)]) + _join(self.elements))


def eisa_id(ident: str) -> int:
    """The 32-bit compressed EISA ID of ``"PNP0A03"`` (three letters, four hex digits), as
    ASL's EISAID() computes it: 5-bit letters packed big-endian into 2 bytes, then the product
    number bytes; the result is stored little-endian."""
    if len(ident) != 7 or not all("A" <= c <= "Z" for c in ident[:3]):
        raise ValueError(f"invalid EISA id {ident!r}")
    try:
        product = int(ident[3:], 16)
    except ValueError:
        raise ValueError(f"invalid EISA id {ident!r}") from None
    a, b, c = (ord(ch) - 0x40 for ch in ident[:3])
    vendor = (a << 10) | (b << 5) | c
    raw = bytes([vendor >> 8, vendor & 0xFF, product >> 8, product & 0xFF])
    return int.from_bytes(raw, "little")


def EisaId(ident: str) -> Integer:  # noqa: N802 (ASL spelling)
    return Integer(eisa_id(ident))


# --- Named objects and control --------------------------------------------------------------------

class Name:
    """Name(path, value): declares a named data object."""

    def __init__(self, path: str, value: AmlLike) -> None:
        self.path = path
        self.value = value

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + name_string(self.path) + to_aml(self.value)


class Scope:
    """Scope(path) { terms }: opens an existing namespace node."""

    def __init__(self, path: str, *terms: AmlLike) -> None:
        self.path = path
        self.terms = list(terms)

    def append(self, *terms: AmlLike) -> None:
        self.terms.extend(terms)

    def encode(self) -> bytes:
        return bytes([SCOPE_OP]) + with_pkg_length(name_string(self.path) + _join(self.terms))


class Device(Scope):
    """Device(path) { terms }: declares a device node."""

    def encode(self) -> bytes:
        return bytes([EXT_OP_PREFIX, DEVICE_OP]) + with_pkg_length(
            name_string(self.path) + _join(self.terms))


class Method:
    """Method(path, args, Serialized/NotSerialized, sync_level) { terms }."""

    def __init__(self, path: str, *terms: AmlLike, args: int = 0, serialized: bool = False,
                 sync_level: int = 0) -> None:
        if not 0 <= args <= 7 or not 0 <= sync_level <= 15:
            raise ValueError("Method takes 0-7 arguments and a sync level of 0-15")
        self.path = path
        self.terms = list(terms)
        self.flags = args | (0x08 if serialized else 0) | (sync_level << 4)

    def encode(self) -> bytes:
        return bytes([METHOD_OP]) + with_pkg_length(
            name_string(self.path) + bytes([self.flags]) + _join(self.terms))


class Return:
    def __init__(self, value: AmlLike) -> None:
        self.value = value

    def encode(self) -> bytes:
        return bytes([RETURN_OP]) + to_aml(self.value)


# --- Operation regions, fields and the few statements an event method needs -----------------------

OP_REGION_OP = 0x80          # after EXT_OP_PREFIX
FIELD_OP = 0x81              # after EXT_OP_PREFIX
STORE_OP = 0x70
AND_OP = 0x7B
IF_OP = 0xA0
NOTIFY_OP = 0x86
REGION_SYSTEM_IO = 0x01
FIELD_BYTE_ACC = 0x01
FIELD_WRITE_AS_ZEROS = 0x40


class OperationRegion:
    """OperationRegion(name, SystemIO, offset, length)."""

    def __init__(self, name: str, offset: int, length: int, space: int = REGION_SYSTEM_IO) -> None:
        self.name, self.space, self.offset, self.length = name, space, offset, length

    def encode(self) -> bytes:
        return (bytes([EXT_OP_PREFIX, OP_REGION_OP]) + name_string(self.name) + bytes([self.space])
                + to_aml(self.offset) + to_aml(self.length))


class Field:
    """Field(region, ByteAcc, NoLock, WriteAsZeros) { NAME, bits, ... } with ``fields`` given as
    (name, bits) pairs."""

    def __init__(self, region: str, *fields: tuple[str, int],
                 flags: int = FIELD_BYTE_ACC | FIELD_WRITE_AS_ZEROS) -> None:
        self.region, self.fields, self.flags = region, fields, flags

    def encode(self) -> bytes:
        body = b"".join(name_seg(n) + pkg_length(bits) for n, bits in self.fields)
        return bytes([EXT_OP_PREFIX, FIELD_OP]) + with_pkg_length(
            name_string(self.region) + bytes([self.flags]) + body)


class Store:
    """Store(value, target)."""

    def __init__(self, value: AmlLike, target: AmlLike) -> None:
        self.value, self.target = value, target

    def encode(self) -> bytes:
        return bytes([STORE_OP]) + to_aml(self.value) + to_aml(self.target)


class And:
    """And(a, b) with no target (a value for a predicate or a Store)."""

    def __init__(self, a: AmlLike, b: AmlLike) -> None:
        self.a, self.b = a, b

    def encode(self) -> bytes:
        return bytes([AND_OP]) + to_aml(self.a) + to_aml(self.b) + bytes([ZERO_OP])


class If:
    """If (predicate) { terms }."""

    def __init__(self, predicate: AmlLike, *terms: AmlLike) -> None:
        self.predicate, self.terms = predicate, list(terms)

    def encode(self) -> bytes:
        return bytes([IF_OP]) + with_pkg_length(to_aml(self.predicate) + _join(self.terms))


class Notify:
    """Notify(object, value)."""

    def __init__(self, obj: str, value: int) -> None:
        self.obj, self.value = obj, value

    def encode(self) -> bytes:
        return bytes([NOTIFY_OP]) + name_string(self.obj) + to_aml(self.value)


class Arg(_Const):
    def __init__(self, n: int) -> None:
        if not 0 <= n <= 6:
            raise ValueError("Arg0-Arg6")
        super().__init__(ARG0_OP + n, f"Arg{n}")


class Local(_Const):
    def __init__(self, n: int) -> None:
        if not 0 <= n <= 7:
            raise ValueError("Local0-Local7")
        super().__init__(LOCAL0_OP + n, f"Local{n}")


# --- Resource descriptors (ACPI 6.x, 6.4 "Resource Data Types") -----------------------------------

def _small(item: int, data: bytes) -> bytes:
    """Small resource item: tag byte 0 tttt lll (type, 0-7 data bytes)."""
    assert len(data) <= 7
    return bytes([(item << 3) | len(data)]) + data


def _large(item: int, data: bytes) -> bytes:
    """Large resource item: tag byte 1 ttttttt, then a 16-bit data length."""
    return bytes([0x80 | item]) + struct.pack("<H", len(data)) + data


SMALL_IRQ = 0x04
SMALL_IO = 0x08
SMALL_FIXED_IO = 0x09
SMALL_END_TAG = 0x0F
LARGE_MEMORY32_FIXED = 0x06
LARGE_DWORD_ADDRESS = 0x07
LARGE_WORD_ADDRESS = 0x08
LARGE_EXTENDED_IRQ = 0x09
LARGE_QWORD_ADDRESS = 0x0A

ADDRESS_SPACE_MEMORY = 0
ADDRESS_SPACE_IO = 1
ADDRESS_SPACE_BUS_NUMBER = 2

# General flags of address space descriptors.
_ADDR_CONSUMER = 0x01       # 0: the device produces (and consumes) this resource (a bridge window)
_ADDR_MIN_FIXED = 0x04
_ADDR_MAX_FIXED = 0x08

MEM_NON_CACHEABLE = 0
MEM_CACHEABLE = 1
MEM_WRITE_COMBINING = 2
MEM_PREFETCHABLE = 3


class IO:
    """IO(Decode16/Decode10, min, max, alignment, length): the 8-byte I/O port descriptor."""

    def __init__(self, minimum: int, maximum: int, alignment: int, length: int,
                 decode16: bool = True) -> None:
        self.fields = (1 if decode16 else 0, minimum, maximum, alignment, length)

    def encode(self) -> bytes:
        return _small(SMALL_IO, struct.pack("<BHHBB", *self.fields))


class FixedIO:
    """FixedIO(base, length): a 10-bit decoded fixed-location I/O range."""

    def __init__(self, base: int, length: int) -> None:
        if base > 0x3FF:
            raise ValueError("FixedIO decodes 10 address bits")
        self.base, self.length = base, length

    def encode(self) -> bytes:
        return _small(SMALL_FIXED_IO, struct.pack("<HB", self.base, self.length))


class IRQNoFlags:
    """IRQNoFlags() {irqs}: ISA IRQs 0-15, edge-triggered and active high."""

    def __init__(self, *irqs: int) -> None:
        if not irqs or any(not 0 <= i <= 15 for i in irqs):
            raise ValueError("IRQNoFlags takes ISA IRQs 0-15")
        self.mask = sum(1 << i for i in set(irqs))

    def encode(self) -> bytes:
        return _small(SMALL_IRQ, struct.pack("<H", self.mask))


class Interrupt:
    """Interrupt(ResourceConsumer, Edge/Level, ActiveHigh/Low, Exclusive/Shared) {gsis}:
    the extended interrupt descriptor, which names GSIs rather than ISA IRQs."""

    def __init__(self, *gsis: int, consumer: bool = True, edge: bool = True,
                 active_low: bool = False, shared: bool = False, wake: bool = False) -> None:
        if not 1 <= len(gsis) <= 255:
            raise ValueError("Interrupt takes 1-255 interrupt numbers")
        self.gsis = gsis
        self.flags = ((1 if consumer else 0) | (2 if edge else 0) | (4 if active_low else 0)
                      | (8 if shared else 0) | (16 if wake else 0))

    def encode(self) -> bytes:
        return _large(LARGE_EXTENDED_IRQ, bytes([self.flags, len(self.gsis)])
                      + b"".join(struct.pack("<I", g) for g in self.gsis))


class Memory32Fixed:
    """Memory32Fixed(ReadWrite/ReadOnly, base, length)."""

    def __init__(self, base: int, length: int, read_write: bool = True) -> None:
        self.base, self.length, self.rw = base, length, read_write

    def encode(self) -> bytes:
        return _large(LARGE_MEMORY32_FIXED,
                      struct.pack("<BII", 1 if self.rw else 0, self.base, self.length))


class _AddressSpace:
    """Word/DWord/QWord address space descriptor with fixed min and max (MinFixed, MaxFixed,
    PosDecode, granularity 0, no translation), which is what a host bridge's windows are."""

    _item = 0
    _fmt = ""

    def __init__(self, space: int, minimum: int, maximum: int, type_flags: int,
                 producer: bool) -> None:
        if maximum < minimum:
            raise ValueError(f"address range {minimum:#x}-{maximum:#x} is empty")
        self.space, self.minimum, self.maximum = space, minimum, maximum
        self.type_flags = type_flags
        self.general_flags = _ADDR_MIN_FIXED | _ADDR_MAX_FIXED | (0 if producer else _ADDR_CONSUMER)

    def encode(self) -> bytes:
        length = self.maximum - self.minimum + 1
        return _large(self._item, struct.pack("<BBB", self.space, self.general_flags,
                                              self.type_flags)
                      + struct.pack("<" + self._fmt * 5, 0, self.minimum, self.maximum, 0, length))


class WordBusNumber(_AddressSpace):
    _item, _fmt = LARGE_WORD_ADDRESS, "H"

    def __init__(self, minimum: int, maximum: int, producer: bool = True) -> None:
        super().__init__(ADDRESS_SPACE_BUS_NUMBER, minimum, maximum, 0, producer)


class WordIO(_AddressSpace):
    """WordIO(..., EntireRange): an I/O window (ISA and non-ISA ranges)."""

    _item, _fmt = LARGE_WORD_ADDRESS, "H"

    def __init__(self, minimum: int, maximum: int, producer: bool = True) -> None:
        super().__init__(ADDRESS_SPACE_IO, minimum, maximum, 0x03, producer)


def _mem_flags(cacheable: int, read_write: bool) -> int:
    return (1 if read_write else 0) | (cacheable << 1)


class DWordMemory(_AddressSpace):
    _item, _fmt = LARGE_DWORD_ADDRESS, "I"

    def __init__(self, minimum: int, maximum: int, cacheable: int = MEM_NON_CACHEABLE,
                 read_write: bool = True, producer: bool = True) -> None:
        super().__init__(ADDRESS_SPACE_MEMORY, minimum, maximum,
                         _mem_flags(cacheable, read_write), producer)


class QWordMemory(_AddressSpace):
    _item, _fmt = LARGE_QWORD_ADDRESS, "Q"

    def __init__(self, minimum: int, maximum: int, cacheable: int = MEM_NON_CACHEABLE,
                 read_write: bool = True, producer: bool = True) -> None:
        super().__init__(ADDRESS_SPACE_MEMORY, minimum, maximum,
                         _mem_flags(cacheable, read_write), producer)


class ResourceTemplate:
    """ResourceTemplate() {descriptors}: a Buffer of resource descriptors closed by an End Tag
    whose checksum byte makes the descriptor bytes sum to zero (mod 256)."""

    def __init__(self, *descriptors: Aml) -> None:
        self.descriptors = descriptors

    def data(self) -> bytes:
        body = b"".join(d.encode() for d in self.descriptors) + bytes([(SMALL_END_TAG << 3) | 1])
        return body + bytes([(-sum(body)) & 0xFF])

    def encode(self) -> bytes:
        return Buffer(self.data()).encode()
