"""Boot-timer port: the guest writes the byte 123 when it is up (Firecracker's convention).

The VMM then logs the wall-clock and VMM CPU time since the VM started.  The figures stay on the
device (:attr:`BootTimer.boot_time`) for benchmarks and the API.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

MAGIC = 123


@dataclass(frozen=True)
class BootTime:
    wall_s: float                 # since the VM object was built
    cpu_s: float                  # VMM process CPU time (user + system) since then
    since_start_s: float          # since hyperpy was imported (the VMM's start)


def since_hyperpy_start() -> float:
    """Seconds since the hyperpy package was imported (the VMM's own start)."""
    from hyperpy import STARTED_AT

    return time.monotonic() - STARTED_AT


class BootTimer:
    def __init__(self, start_wall: float, start_cpu: float,
                 on_boot: Callable[[BootTime], None] | None = None) -> None:
        self._start_wall = start_wall
        self._start_cpu = start_cpu
        self._on_boot = on_boot
        self.boot_time: BootTime | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF != MAGIC or self.boot_time is not None:
            return
        bt = BootTime(time.monotonic() - self._start_wall, time.process_time() - self._start_cpu,
                      since_hyperpy_start())
        self.boot_time = bt
        log.info("Guest-boot-time = %8.0f us %6.1f ms, %8.0f CPU us %6.1f CPU ms "
                 "(%.1f ms since hyperpy started)",
                 bt.wall_s * 1e6, bt.wall_s * 1e3, bt.cpu_s * 1e6, bt.cpu_s * 1e3,
                 bt.since_start_s * 1e3)
        if self._on_boot is not None:
            self._on_boot(bt)
