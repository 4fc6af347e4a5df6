"""A PCI function's configuration space: registers, writable-bit masks, BARs, capabilities.

Register offsets and bits come from ``<linux/pci_regs.h>`` through :mod:`hyperpy._fast.uapi`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..._fast import uapi as U

CONFIG_SPACE_SIZE = U.PCI_CFG_SPACE_EXP_SIZE      # 4 KiB: ECAM reaches the extended space
CAPABILITIES_START = 0x40


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass
class Bar:
    index: int
    size: int               # power of two
    kind: BarKind
    prefetchable: bool = False
    address: int = 0        # where it is mapped now (0: not placed)

    def flags(self) -> int:
        if self.kind is BarKind.IO:
            return U.PCI_BASE_ADDRESS_SPACE_IO
        f = U.PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return f | (U.PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)


class PciConfigSpace:
    """Bytes plus a mask of the bits software may write (everything else is read-only)."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.bars: dict[int, Bar] = {}
        self._cap_next = CAPABILITIES_START
        self._last_cap = 0
        self.set16(U.PCI_VENDOR_ID, vendor)
        self.set16(U.PCI_DEVICE_ID, device)
        self.data[U.PCI_REVISION_ID] = revision
        self.data[U.PCI_CLASS_PROG] = class_code & 0xFF
        self.set16(U.PCI_CLASS_DEVICE, class_code >> 8)
        self.data[U.PCI_HEADER_TYPE] = U.PCI_HEADER_TYPE_NORMAL
        self.set16(U.PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor)
        self.set16(U.PCI_SUBSYSTEM_ID, subsystem)
        cmd_bits = U.PCI_COMMAND_IO | U.PCI_COMMAND_MEMORY | U.PCI_COMMAND_MASTER | U.PCI_COMMAND_INTX_DISABLE
        self.wmask[U.PCI_COMMAND] = cmd_bits & 0xFF
        self.wmask[U.PCI_COMMAND + 1] = cmd_bits >> 8
        self.wmask[U.PCI_INTERRUPT_LINE] = 0xFF

    # --- raw access -------------------------------------------------------------------------
    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set16(self, offset: int, value: int) -> None:
        self.data[offset:offset + 2] = value.to_bytes(2, "little")

    def set32(self, offset: int, value: int) -> None:
        self.data[offset:offset + 4] = value.to_bytes(4, "little")

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return (1 << (8 * size)) - 1
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Apply a guest write through the writable-bit mask."""
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return
        for i in range(size):
            m = self.wmask[offset + i]
            if m:
                b = (value >> (8 * i)) & 0xFF
                self.data[offset + i] = (self.data[offset + i] & ~m) | (b & m)

    # --- BARs --------------------------------------------------------------------------------
    def add_bar(self, bar: Bar) -> None:
        if bar.size & (bar.size - 1) or bar.size < 16:
            raise ValueError(f"BAR size {bar.size:#x} is not a power of two >= 16")
        off = U.PCI_BASE_ADDRESS_0 + 4 * bar.index
        self.bars[bar.index] = bar
        mask = ~(bar.size - 1)
        self.set32(off, (bar.address & 0xFFFFFFF0) | bar.flags())
        self.wmask[off:off + 4] = (mask & 0xFFFFFFF0 & 0xFFFFFFFF).to_bytes(4, "little")
        if bar.kind is BarKind.MEM64:
            self.set32(off + 4, bar.address >> 32)
            self.wmask[off + 4:off + 8] = ((mask >> 32) & 0xFFFFFFFF).to_bytes(4, "little")

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        off = U.PCI_BASE_ADDRESS_0 + 4 * index
        addr = self.get(off, 4) & ~0xF
        if bar.kind is BarKind.MEM64:
            addr |= self.get(off + 4, 4) << 32
        return addr

    def bar_at(self, offset: int) -> Bar | None:
        """The BAR whose register (either half of a 64-bit one) is at ``offset``."""
        if not U.PCI_BASE_ADDRESS_0 <= offset < U.PCI_BASE_ADDRESS_0 + 24:
            return None
        idx = (offset - U.PCI_BASE_ADDRESS_0) // 4
        if idx in self.bars:
            return self.bars[idx]
        if idx - 1 in self.bars and self.bars[idx - 1].kind is BarKind.MEM64:
            return self.bars[idx - 1]
        return None

    # --- capabilities -------------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (``body`` excludes the 2-byte id/next header); return its offset."""
        off = self._cap_next
        length = (2 + len(body) + 3) & ~3
        if off + length > 0x100:
            raise ValueError("PCI capability list is full")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[off + 2:off + 2 + len(body)] = body
        if wmask:
            self.wmask[off + 2:off + 2 + len(wmask)] = wmask
        if self._last_cap:
            self.data[self._last_cap + U.PCI_CAP_LIST_NEXT] = off
        else:
            self.data[U.PCI_CAPABILITY_LIST] = off
            self.set16(U.PCI_STATUS, self.get(U.PCI_STATUS, 2) | U.PCI_STATUS_CAP_LIST)
        self._last_cap = off
        self._cap_next = off + length
        return off
