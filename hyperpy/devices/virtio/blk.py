"""virtio-blk: a raw disk image behind a virtqueue; requests are served in Cython."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..._fast import uapi as U
from ..._fast.blk import BlkWorker, blk_config
from ...errors import DeviceError
from .device import DeviceContext, VirtioDevice

log = logging.getLogger(__name__)
SECTOR = 512
PROCESS_BROKEN, PROCESS_NOTIFY = 1, 2   # bits of BlkWorker.process()'s result


class Block(VirtioDevice):
    device_type = U.VIRTIO_ID_BLOCK
    name = "blk"

    def __init__(self, path: Path, *, readonly: bool = False, direct: bool = False,
                 num_queues: int = 1, queue_size: int = 256, serial: str = "") -> None:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise DeviceError(f"--disk: cannot open {path}: {e.strerror}",
                              "give an existing raw image the VMM may read (and write unless readonly=on)") from None
        size = os.fstat(self.fd).st_size
        if size < SECTOR:
            size = os.lseek(self.fd, 0, os.SEEK_END)   # block devices report their size this way
        capacity = size // SECTOR
        if capacity == 0:
            os.close(self.fd)
            raise DeviceError(f"--disk: {path} is smaller than one 512-byte sector", "give a larger image")
        features = ((1 << U.VIRTIO_BLK_F_FLUSH) | (1 << U.VIRTIO_BLK_F_SEG_MAX)
                    | (1 << U.VIRTIO_BLK_F_BLK_SIZE) | (1 << U.VIRTIO_BLK_F_DISCARD)
                    | (1 << U.VIRTIO_BLK_F_WRITE_ZEROES))
        if readonly:
            features |= 1 << U.VIRTIO_BLK_F_RO
        if num_queues > 1:
            features |= 1 << U.VIRTIO_BLK_F_MQ
        super().__init__([queue_size] * num_queues, features, blk_config(capacity, num_queues))
        self.path = Path(path)
        self.capacity = capacity
        ident = (serial or self.path.name).encode()[:U.VIRTIO_BLK_ID_BYTES]
        self.worker = BlkWorker(self.fd, capacity, readonly, ident)
        if size % SECTOR:
            log.warning("--disk %s: the last %d bytes (less than a sector) are not visible", path, size % SECTOR)

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        if self.worker.process(ctx.queues[index]) & PROCESS_NOTIFY:
            ctx.signal_used(index)

    def counters(self) -> dict[str, int]:
        w = self.worker
        return {"requests": w.requests, "errors": w.errors, "read_ops": w.reads,
                "read_bytes": w.read_bytes, "write_ops": w.writes, "write_bytes": w.write_bytes}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
