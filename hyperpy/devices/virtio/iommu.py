"""virtio-iommu (device ID 23): the request queue in front of the Cython core, and the event queue
that reports translation faults.

Request parsing, the per-domain mapping tables, translation and the host DMA listeners live in
:mod:`hyperpy._fast.iommu`; this file moves requests and faults between the queues and the core.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import struct

from ..._fast import iommu as IOMMU
from ..._fast import uapi as U
from ..._fast.virtqueue import QueueError
from .device import DeviceContext, VirtioDevice

log = logging.getLogger(__name__)

REQUEST, EVENT = 0, 1
# From <linux/virtio_iommu.h> through the Cython core.
T_MAP, S_OK, S_NOMEM, S_DEVERR = IOMMU.T_MAP, IOMMU.S_OK, IOMMU.S_NOMEM, IOMMU.S_DEVERR
MAP_REQ_LEN = IOMMU.MAP_REQ_LEN


def _covered(mappings: list, start: int, end: int) -> bool:
    """Whether [start, end] lies inside the union of sorted (iova, size, ...) host mappings."""
    starts = [m[0] for m in mappings]
    i = bisect.bisect_right(starts, start) - 1
    pos = start
    while 0 <= i < len(mappings) and mappings[i][0] <= pos:
        pos = max(pos, mappings[i][0] + mappings[i][1])
        if pos > end:
            return True
        i += 1
    return False


class Iommu(VirtioDevice):
    device_type = U.VIRTIO_ID_IOMMU
    name = "iommu"

    def __init__(self, core, queue_size: int = 256) -> None:
        super().__init__([queue_size, queue_size], core.offered, core.config_bytes())
        self.core = core

    def activate(self, ctx: DeviceContext) -> None:
        super().activate(ctx)
        self.core.set_negotiated(ctx.driver_features)
        ctx.loop.add(self.core.fault_eventfd, self._faults_pending)

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        try:
            if index == REQUEST:
                self._requests(ctx)
            else:
                self._deliver_faults(ctx)
        except QueueError:
            pass   # the transport sees needs_reset and tells the driver

    def _requests(self, ctx: DeviceContext) -> None:
        q = ctx.queues[REQUEST]
        batch = []
        while (chain := q.pop_py()) is not None:
            req = q.read_chain_bytes(chain)
            batch.append((chain, req, self.core.handle_py(req, chain.writable_len)))
        if not batch:
            return
        # The requests of one notification are one batch: host DMA listeners (VFIO) apply their
        # queued mappings now, coalesced into extents.  Statuses are held back until then, so a
        # MAP the host refuses (e.g. past dma_entry_limit) is reported to the guest, not only
        # logged.
        rc = self.core.flush_listeners_py()
        if rc < 0:
            log.error("virtio-iommu: host DMA mapping failed: %s", os.strerror(-rc))
            batch = [(c, req, self._recheck_map(req, resp, rc)) for c, req, resp in batch]
        for chain, _req, resp in batch:
            q.push_used_py(chain.head, q.write_chain_bytes(chain, resp) if resp else 0)
        if q.should_notify_py():
            ctx.signal_used(REQUEST)

    def _recheck_map(self, req: bytes, resp: bytes, rc: int) -> bytes:
        """After a failed host flush: a MAP answered OK whose range did not reach the host
        becomes NOMEM (ENOSPC/ENOMEM) or DEVERR, and is taken out of the domain again."""
        if len(req) < MAP_REQ_LEN or req[0] != T_MAP or len(resp) < 4 or resp[-4] != S_OK:
            return resp
        domain, start, end = struct.unpack_from("<IQQ", req, 4)
        dom = self.core.domains.get(domain)
        listener = getattr(dom, "listener", None)
        if dom is None or not hasattr(listener, "mappings_py"):
            return resp
        if _covered(listener.mappings_py(), start, end):
            return resp
        dom.unmap_py(start, end)
        status = S_NOMEM if -rc in (errno.ENOSPC, errno.ENOMEM) else S_DEVERR
        return resp[:-4] + bytes([status]) + resp[-3:]

    def _faults_pending(self) -> None:
        try:
            os.eventfd_read(self.core.fault_eventfd)
        except BlockingIOError:
            pass
        if self.ctx is not None:
            self._deliver_faults(self.ctx)

    def _deliver_faults(self, ctx: DeviceContext) -> None:
        q = ctx.queues[EVENT]
        done = 0
        while self.core.pending_faults:
            chain = q.pop_py()
            if chain is None:
                break   # no event buffer posted: the fault waits for the next one
            fault = self.core.pop_fault_py()
            if fault is None:
                q.push_used_py(chain.head, 0)
                break
            log.info("virtio-iommu fault: endpoint %#x address %#x reason %d flags %#x",
                     fault["endpoint"], fault["address"], fault["reason"], fault["flags"])
            q.push_used_py(chain.head, q.write_chain_bytes(chain, fault["bytes"]))
            done += 1
        if done and q.should_notify_py():
            ctx.signal_used(EVENT)

    def reset(self) -> None:
        if self.ctx is not None:
            self.ctx.loop.remove(self.core.fault_eventfd)
        self.core.reset()
        super().reset()
