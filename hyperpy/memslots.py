"""KVM memory slots beyond guest RAM: device memory (passed-through BARs) mapped into the guest.

Guest RAM takes slots 0..n-1 at build time; this allocator hands out the rest, reusing freed
slots, so a BAR that moves gets its slots back.
"""

from __future__ import annotations

import threading

from .errors import HyperpyError


class MemorySlots:
    def __init__(self, vm, first: int, limit: int = 509) -> None:
        self.vm = vm
        self.limit = limit
        self._next = first
        self._free: list[int] = []
        self._lock = threading.Lock()
        self.installed: dict[int, tuple[int, int, int]] = {}   # slot -> (gpa, size, host)

    def map(self, gpa: int, size: int, host: int) -> int:
        """Install ``size`` bytes at host address ``host`` as guest-physical ``gpa``."""
        with self._lock:
            if self._free:
                slot = self._free.pop()
            elif self._next < self.limit:
                slot = self._next
                self._next += 1
            else:
                raise HyperpyError(f"out of KVM memory slots ({self.limit})",
                                   "pass through fewer devices")
        self.vm.set_user_memory_region(slot, gpa, size, host)
        self.installed[slot] = (gpa, size, host)
        return slot

    def unmap(self, slot: int) -> None:
        self.vm.set_user_memory_region(slot, 0, 0, 0)
        with self._lock:
            self.installed.pop(slot, None)
            self._free.append(slot)
