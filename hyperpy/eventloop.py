"""Device I/O threads: epoll over ioeventfds and backend fds, off the vCPU threads.

A guest's queue kick lands on an ioeventfd inside KVM (no exit to the VMM); the event loop wakes
up on it and runs the device's handler.  Handlers run one at a time on the loop's thread.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable

log = logging.getLogger(__name__)


class EventLoop:
    def __init__(self, name: str = "devices") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, fd: int, handler: Callable[[], None], events: int = select.EPOLLIN) -> None:
        """Call ``handler()`` on this loop's thread whenever ``fd`` is readable."""
        with self._lock:
            self._handlers[fd] = handler
            self._epoll.register(fd, events)

    def remove(self, fd: int) -> None:
        with self._lock:
            if self._handlers.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._epoll.close()
        os.close(self._wake)

    def _run(self) -> None:
        while not self._stop:
            try:
                events = self._epoll.poll(1.0)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            for fd, _ in events:
                if fd == self._wake:
                    continue
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler()
                except Exception:   # a device bug must not take the loop (and other devices) down
                    log.exception("event handler for fd %d failed", fd)
