"""MSI-X: the capability, the vector table and the pending-bit array of one PCI function.

Each vector owns an eventfd bound to a GSI with ``KVM_IRQFD``; the guest's address/data pair
becomes that GSI's MSI route.  Raising a vector is one ``eventfd_write`` from any thread.
"""

from __future__ import annotations

import struct
import threading

from ..._fast import uapi as U

ENTRY_SIZE = U.PCI_MSIX_ENTRY_SIZE


class MsixVectors:
    def __init__(self, count: int, router) -> None:
        if not 1 <= count <= 2048:
            raise ValueError("MSI-X supports 1-2048 vectors")
        self.count = count
        self.router = router
        self.table = bytearray(count * ENTRY_SIZE)
        for i in range(count):   # every vector starts masked
            struct.pack_into("<I", self.table, i * ENTRY_SIZE + U.PCI_MSIX_ENTRY_VECTOR_CTRL,
                             U.PCI_MSIX_ENTRY_CTRL_MASKBIT)
        self.pending = [False] * count
        self.enabled = False
        self.function_masked = False
        self._lock = threading.Lock()
        self.vectors = [router.allocate_msi() for _ in range(count)]

    # --- capability -------------------------------------------------------------------------
    def add_capability(self, config, bar: int, table_offset: int, pba_offset: int) -> int:
        body = struct.pack("<HII", self.count - 1, table_offset | bar, pba_offset | bar)
        wmask = struct.pack("<H", U.PCI_MSIX_FLAGS_ENABLE | U.PCI_MSIX_FLAGS_MASKALL)
        self.cap_offset = config.add_capability(U.PCI_CAP_ID_MSIX, body, wmask)
        return self.cap_offset

    def control_written(self, control: int) -> None:
        """Called after a write to the capability's message control register."""
        with self._lock:
            was_active = self.enabled and not self.function_masked
            self.enabled = bool(control & U.PCI_MSIX_FLAGS_ENABLE)
            self.function_masked = bool(control & U.PCI_MSIX_FLAGS_MASKALL)
            if self.enabled and not was_active and not self.function_masked:
                for v in range(self.count):
                    self._update_route(v)
                    self._deliver_pending(v)

    # --- table and PBA (in a BAR) -----------------------------------------------------------------
    def table_read(self, offset: int, size: int) -> int:
        if offset + size > len(self.table):
            return 0
        return int.from_bytes(self.table[offset:offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if offset + size > len(self.table) or size not in (4, 8):
            return
        with self._lock:
            v = offset // ENTRY_SIZE
            was_masked = self._masked(v)
            self.table[offset:offset + size] = value.to_bytes(size, "little")
            self._update_route(v)
            if was_masked and not self._masked(v):
                self._deliver_pending(v)

    def pba_read(self, offset: int, size: int) -> int:
        value = 0
        for bit in range(size * 8):
            v = offset * 8 + bit
            if v < self.count and self.pending[v]:
                value |= 1 << bit
        return value

    # --- delivery -----------------------------------------------------------------------------
    def _entry(self, v: int) -> tuple[int, int, int]:
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.table, v * ENTRY_SIZE)
        return (hi << 32) | lo, data, ctrl

    def _masked(self, v: int) -> bool:
        return bool(self._entry(v)[2] & U.PCI_MSIX_ENTRY_CTRL_MASKBIT) or self.function_masked \
            or not self.enabled

    def _update_route(self, v: int) -> None:
        addr, data, _ = self._entry(v)
        if self.enabled:
            self.router.set_msi_route(self.vectors[v], addr, data)

    def _deliver_pending(self, v: int) -> None:
        if self.pending[v] and not self._masked(v):
            self.pending[v] = False
            self.vectors[v].fire()

    def trigger(self, v: int) -> None:
        """Raise vector ``v``: delivered now, or remembered in the PBA while it is masked."""
        if not 0 <= v < self.count:
            return   # VIRTIO_MSI_NO_VECTOR or a bad index: nothing to raise
        with self._lock:
            if self._masked(v):
                self.pending[v] = True
                return
        self.vectors[v].fire()

    def close(self) -> None:
        for vec in self.vectors:
            self.router.release_msi(vec)
