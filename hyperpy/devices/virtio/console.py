"""virtio-console with one port (hvc0): output to a file descriptor, input from the host."""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading

from ..._fast import uapi as U
from ..._fast.virtqueue import QueueError
from .device import VirtioDevice

log = logging.getLogger(__name__)

RX, TX = 0, 1
INPUT_LIMIT = 64 * 1024


class Console(VirtioDevice):
    device_type = U.VIRTIO_ID_CONSOLE
    name = "console"

    def __init__(self, out_fd: int | None, queue_size: int = 256, cols: int = 80, rows: int = 25) -> None:
        # struct virtio_console_config: cols, rows (u16), max_nr_ports (u32), emerg_wr (u32).
        config = struct.pack("<HHII", cols, rows, 1, 0)
        super().__init__([queue_size, queue_size], 1 << U.VIRTIO_CONSOLE_F_SIZE, config)
        self.out_fd = out_fd
        self._input: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()
        self.bytes_out = 0
        self.bytes_in = 0
        self.tx_requests = 0
        self.rx_requests = 0

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        try:
            if index == TX:
                self._transmit(ctx)
            else:
                self._receive(ctx)
        except QueueError:
            pass   # the transport sees needs_reset and tells the driver

    def _transmit(self, ctx) -> None:
        q = ctx.queues[TX]
        done = 0
        while (chain := q.pop_py()) is not None:
            data = q.read_chain_bytes(chain)
            self.bytes_out += len(data)
            if self.out_fd is not None and data:
                try:
                    os.write(self.out_fd, data)
                except OSError as e:
                    log.warning("virtio-console output failed (%s); output dropped", e.strerror)
                    self.out_fd = None
            q.push_used_py(chain.head, 0)
            done += 1
        self.tx_requests += done
        if done and q.should_notify_py():
            ctx.signal_used(TX)

    def _receive(self, ctx) -> None:
        q = ctx.queues[RX]
        done = 0
        with self._lock:
            while self._input:
                chain = q.pop_py()
                if chain is None:
                    break
                n = min(chain.writable_len, len(self._input))
                data = bytes(self._input.popleft() for _ in range(n))
                q.push_used_py(chain.head, q.write_chain_bytes(chain, data))
                self.bytes_in += len(data)
                done += 1
            self.rx_requests += done
        if done and q.should_notify_py():
            ctx.signal_used(RX)

    def counters(self) -> dict[str, int]:
        return {"tx_requests": self.tx_requests, "tx_bytes": self.bytes_out,
                "rx_requests": self.rx_requests, "rx_bytes": self.bytes_in}

    def enqueue_input(self, data: bytes) -> None:
        """Host input for the guest (e.g. stdin); delivered as rx buffers allow."""
        with self._lock:
            room = INPUT_LIMIT - len(self._input)
            self._input.extend(data[:max(room, 0)])
        ctx = self.ctx
        if ctx is not None:
            ctx.kick(RX)
