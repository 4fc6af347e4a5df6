"""virtio-rng (entropy device): fills the driver's buffers from a host source."""

from __future__ import annotations

import os
from pathlib import Path

from ..._fast import uapi as U
from ..._fast.virtqueue import QueueError
from ...errors import DeviceError
from .device import VirtioDevice

MAX_PER_REQUEST = 64 * 1024   # a guest asking for more gets what fits in this much


class Rng(VirtioDevice):
    device_type = U.VIRTIO_ID_RNG
    name = "rng"

    def __init__(self, src: Path = Path("/dev/urandom"), queue_size: int = 256) -> None:
        try:
            self.fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"--rng: cannot open {src}: {e.strerror}", "give src=/dev/urandom") from None
        super().__init__([queue_size])
        self.src = Path(src)
        self.requests = 0
        self.bytes = 0

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        q = ctx.queues[index]
        done = 0
        try:
            while (chain := q.pop_py()) is not None:
                want = min(chain.writable_len, MAX_PER_REQUEST)
                data = os.read(self.fd, want) if want else b""
                q.push_used_py(chain.head, q.write_chain_bytes(chain, data) if data else 0)
                self.bytes += len(data)
                done += 1
        except QueueError:
            pass   # the transport sees q.needs_reset and tells the driver
        self.requests += done
        if done and q.should_notify_py():
            ctx.signal_used(index)

    def counters(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
