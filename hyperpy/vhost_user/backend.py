"""VhostUserBackend: one device, its event loop, its transport and its server."""

from __future__ import annotations

from pathlib import Path

from ..eventloop import EventLoop
from .server import VhostUserServer
from .transport import VhostUserTransport


class VhostUserBackend:
    """``device`` served on the Unix socket ``socket_path`` from its own event-loop thread."""

    def __init__(self, device, socket_path: Path | str, *, iommu: bool = True,
                 queue_num: int | None = None, loop: EventLoop | None = None) -> None:
        self.device = device
        self.loop = loop or EventLoop(f"vhost-user-{device.name}")
        self.transport = VhostUserTransport(device, self.loop, iommu=iommu, queue_num=queue_num)
        try:
            self.server = VhostUserServer(self.transport, socket_path, self.loop)
        except BaseException:
            self.transport.close()
            raise
        self._started = False

    def start(self) -> "VhostUserBackend":
        self.loop.start()
        self._started = True
        return self

    def close(self) -> None:
        """Stop serving: the loop thread first, then the connection, the socket, the device."""
        if self._started:
            self.loop.stop()
            self._started = False
        self.server.close()
        self.transport.close()

    def __enter__(self) -> "VhostUserBackend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
