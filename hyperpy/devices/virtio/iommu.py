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

from ..._fast import iommu as IOMMU
from ..._fast import uapi as U
from ..._fast.iommu_queue import RequestQueueWorker
from ..._fast.virtqueue import QueueError
from .device import DeviceContext, VirtioDevice

log = logging.getLogger(__name__)

REQUEST, EVENT = 0, 1
# Requests served per notification, as a histogram: 0, 1, 2-3, 4-7, ... 128-255, 256 and more.
# Linux's driver kicks once per iommu_map() (type1 pinning: one MAP a kick) but once per
# iommu_map_sg() and per UNMAP batch; these buckets show which pattern a guest sends.
KICK_BUCKETS = ("0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128-255", "256+")


def kick_bucket(served: int) -> int:
    """The KICK_BUCKETS index for a notification that served ``served`` requests."""
    return min(served.bit_length(), len(KICK_BUCKETS) - 1)


# From <linux/virtio_iommu.h> through the Cython core.
S_NOMEM, S_DEVERR = IOMMU.S_NOMEM, IOMMU.S_DEVERR


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
    # Linux sends one MAP per kick and busy-polls for its completion (viommu_sync_req), so each
    # request is a round trip: served on the kicking vCPU's exit it completes before the guest
    # resumes.  The event queue stays on the event loop (faults are posted from there).
    kick_on_vcpu = (REQUEST,)

    def __init__(self, core, queue_size: int = 256) -> None:
        super().__init__([queue_size, queue_size], core.offered, core.config_bytes())
        self.core = core
        self.worker = RequestQueueWorker()
        self.host_refused_maps = 0       # MAPs answered NOMEM because the host refused them
        self._refused_deverr = 0         # ... of which DEVERR (the host failed otherwise)
        self._watched: list[list] = []   # [name, host DMA container, warned]
        self.kicks = [0] * len(KICK_BUCKETS)

    def watch_host_limit(self, name: str, container) -> None:
        """Warn once, early, when the host DMA container of the passed-through device ``name``
        has used 90% of the mappings the host allows it (past them the guest's MAPs fail)."""
        self._watched.append([name, container, False])

    def _check_host_limits(self) -> None:
        for w in self._watched:
            name, c, warned = w
            if not warned and c.dma_entry_limit and c.entries * 10 >= c.dma_entry_limit * 9:
                w[2] = True
                log.warning("VFIO device %s: %d of the %d DMA mappings the host allows are in "
                            "use; past the limit the guest's MAPs fail. Fixes: huge pages for the "
                            "guest's DMA buffers (e.g. hugepagesz=2M hugepages=N on its command "
                            "line), or a higher limit on the host (echo N > /sys/module/"
                            "vfio_iommu_type1/parameters/dma_entry_limit)",
                            name, c.entries, c.dma_entry_limit)

    def counters(self) -> dict[str, int]:
        c = self.core
        refused = self.host_refused_maps
        out = {"requests": c.requests, "maps": c.maps - refused, "unmaps": c.unmaps,
               "unanswered_requests": c.unwritten, "host_refused_maps": refused,
               "faults": c.faults}
        out.update({f"status_{k.lower()}": v for k, v in c.status_counts.items()})
        # The core counted a refused MAP as applied (OK) before the host's flush failed; the
        # guest was answered NOMEM (or DEVERR), and that is what the counters say.
        out["status_ok"] -= refused
        out["status_nomem"] += refused - self._refused_deverr
        out["status_deverr"] += self._refused_deverr
        out["kicks"] = sum(self.kicks)
        out.update({f"kicks_with_{b}": n for b, n in zip(KICK_BUCKETS, self.kicks)})
        return out

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
        served = 0
        while True:
            # Rounds of up to 256 requests, applied in C without the GIL; each round flushes the
            # host DMA listeners (VFIO maps coalesced into extents) before its statuses are
            # published, so a MAP the host refused (e.g. past dma_entry_limit) is reported, not
            # only logged: drain stops at such a round and leaves it to _host_refused.
            done, notify, broken, rc = self.worker.drain(q, self.core)
            served += done
            if rc < 0:
                self._host_refused(rc, self.worker.pending_maps())
                notify = self.worker.complete(q) or notify
            if notify:
                ctx.signal_used(REQUEST)
            if self._watched:
                self._check_host_limits()
            if rc >= 0 or broken:
                self.kicks[kick_bucket(served)] += 1
                return

    def _host_refused(self, rc: int, maps: list) -> None:
        """A host flush failed: every MAP of the round whose range did not reach the host is
        answered NOMEM (or DEVERR) and, since Linux's driver does not read the status of a MAP
        it queued, also reported as a fault on the event queue.  One ERROR line the first time,
        with the fixes; the rest are counted (``vm.counters``: host_refused_maps, faults)."""
        refused = 0
        for index, domain, start, end in maps:
            status = self._recheck_map(domain, start, end, rc)
            if status is not None:
                self.worker.set_status(index, status)
                self.core.record_refused_map_py(domain, start)
                refused += 1
                self._refused_deverr += status == S_DEVERR
        first = self.host_refused_maps == 0
        self.host_refused_maps += refused
        if first:
            log.error("virtio-iommu: host DMA mapping failed: %s; %d guest MAP(s) refused (NOMEM "
                      "and a fault event to the guest). Fixes: back the guest's DMA buffers with "
                      "huge pages, or raise the host's vfio_iommu_type1 dma_entry_limit; later "
                      "refusals are counted in vm.counters (iommu host_refused_maps)",
                      os.strerror(-rc), refused)
        else:
            log.debug("virtio-iommu: host DMA mapping failed again: %s (%d MAPs refused so far)",
                      os.strerror(-rc), self.host_refused_maps)

    def _recheck_map(self, domain: int, start: int, end: int, rc: int) -> int | None:
        """After a failed host flush: the status for a MAP whose range did not reach the host
        (NOMEM for ENOSPC/ENOMEM, else DEVERR), after taking it out of the domain again."""
        dom = self.core.domains.get(domain)
        listener = getattr(dom, "listener", None)
        if dom is None or not hasattr(listener, "mappings_py"):
            return None
        if _covered(listener.mappings_py(), start, end):
            return None
        dom.unmap_py(start, end)
        return S_NOMEM if -rc in (errno.ENOSPC, errno.ENOMEM) else S_DEVERR

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
            # Counted in vm.counters (faults); one line each only at debug level, as a guest
            # past the host's limit is sent one per refused MAP.
            log.debug("virtio-iommu fault: endpoint %#x address %#x reason %d flags %#x",
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
