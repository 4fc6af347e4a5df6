"""The virtio-iommu request semantics in plain Python, for differential tests and the benchmark.

Same checks in the same order, same statuses, same mappings, same listener calls and the same
bytes written to the device-writable part as :class:`hyperpy._fast.iommu.VirtioIommuCore`, with
``struct`` and Python lists.  Constants and struct sizes come from the Cython module, which reads
them from ``<linux/virtio_iommu.h>``.  Never used by a real VM.
"""

from __future__ import annotations

import bisect
import struct

from .._fast import iommu as _c

_L = _c.LAYOUT
_TAIL = _L["tail"]
_ATTACH = struct.Struct("<B3xIII4B")        # head, domain, endpoint, flags, reserved[4]
_DETACH = struct.Struct("<B3xII8x")
_MAP = struct.Struct("<B3xIQQQI")
_UNMAP = struct.Struct("<B3xIQQ4x")
_PROBE = struct.Struct("<B3xI64x")
_RESV = struct.Struct("<HHB3xQQ")
assert _ATTACH.size == _L["attach"] - _TAIL and _DETACH.size == _L["detach"] - _TAIL
assert _MAP.size == _L["map"] - _TAIL and _UNMAP.size == _L["unmap"] - _TAIL
assert _PROBE.size == _L["probe"] and _RESV.size == _L["resv_mem"]

S_OK, S_UNSUPP, S_DEVERR = _c.S_OK, _c.S_UNSUPP, _c.S_DEVERR
S_INVAL, S_RANGE, S_NOENT, S_NOMEM = _c.S_INVAL, _c.S_RANGE, _c.S_NOENT, _c.S_NOMEM
U64 = (1 << 64) - 1


class Domain:
    """Sorted list of (start, end, phys, flags); ends inclusive."""

    def __init__(self, id: int, bypass: bool = False, max_mappings: int = 1 << 18,
                 events: list | None = None) -> None:
        self.id = id
        self.bypass = bypass
        self.max_mappings = max_mappings
        self.maps: list[tuple[int, int, int, int]] = []
        self.starts: list[int] = []
        self.n_endpoints = 0
        self.events = events if events is not None else []   # listener calls, as RecordingListener
        self.dirty = False

    def map(self, start: int, end: int, phys: int, flags: int) -> int:
        i = bisect.bisect_right(self.starts, start)
        if i > 0 and self.maps[i - 1][1] >= start:
            return S_INVAL
        if i < len(self.maps) and self.maps[i][0] <= end:
            return S_INVAL
        if len(self.maps) >= self.max_mappings:
            return S_NOMEM
        self.dirty = True
        self.events.append(("map", start, end - start + 1, phys, flags))
        self.maps.insert(i, (start, end, phys, flags))
        self.starts.insert(i, start)
        return S_OK

    def unmap(self, start: int, end: int) -> int:
        lo = 0
        while lo < len(self.maps) and self.maps[lo][1] < start:
            lo += 1
        j = lo
        while j < len(self.maps) and self.maps[j][0] <= end:
            j += 1
        if j == lo:
            return S_OK
        if self.maps[lo][0] < start or self.maps[j - 1][1] > end:
            return S_RANGE
        self.dirty = True
        for m in self.maps[lo:j]:
            self.events.append(("unmap", m[0], m[1] - m[0] + 1))
        del self.maps[lo:j]
        del self.starts[lo:j]
        return S_OK

    def clear(self) -> None:
        if self.maps:
            self.dirty = True
        for m in self.maps:
            self.events.append(("unmap", m[0], m[1] - m[0] + 1))
        self.maps.clear()
        self.starts.clear()

    def flush(self) -> None:
        if self.dirty:
            self.dirty = False
            self.events.append(("flush",))

    def translate(self, iova: int, length: int, write: bool):
        """(XLATE code, gpa or None)."""
        length = max(length, 1)
        last = iova + length - 1
        if last > U64:
            return _c.X_MAPPING, None
        i = bisect.bisect_right(self.starts, iova) - 1
        if i < 0 or self.maps[i][1] < iova or last > self.maps[i][1]:
            return _c.X_MAPPING, None
        start, _end, phys, flags = self.maps[i]
        if not flags & (_c.MAP_F_WRITE if write else _c.MAP_F_READ):
            return _c.X_PERM, None
        return _c.X_OK, phys + (iova - start)


class Core:
    """Same configuration keywords as VirtioIommuCore (``mem`` is anything with ``contains``)."""

    def __init__(self, *, page_size_mask: int = _c.DEFAULT_PAGE_SIZE_MASK,
                 input_range=(0, (1 << 48) - 1), domain_range=(0, 0xFFFFFFFF),
                 probe_size: int = 512, bypass: bool = False, max_domains: int = 64,
                 max_mappings: int = 1 << 18, mmio: bool = False,
                 msi_range=(_c.MSI_START, _c.MSI_END), mem=None,
                 unsupp_unknown_type: bool = False) -> None:
        self.page_size_mask = page_size_mask
        self.granule = page_size_mask & -page_size_mask
        self.input_start, self.input_end = input_range
        self.domain_start, self.domain_end = domain_range
        self.probe_size = probe_size
        self.bypass = 1 if bypass else 0
        self.max_domains = max_domains
        self.max_mappings = max_mappings
        self.msi_start, self.msi_end = msi_range
        self.mem = mem
        self.unsupp_unknown_type = unsupp_unknown_type
        self.offered = sum(1 << f for f in (_c.F_INPUT_RANGE, _c.F_DOMAIN_RANGE, _c.F_MAP_UNMAP,
                                            _c.F_PROBE, _c.F_BYPASS_CONFIG))
        if mmio:
            self.offered |= 1 << _c.F_MMIO
        self.negotiated = self.offered
        self.endpoints: dict[int, int | None] = {}    # endpoint -> domain id
        self.domains: dict[int, Domain] = {}
        self.events: list = []                        # listener calls of all domains, in order
        self.faults: list[tuple[int, int, int, int]] = []   # (reason, flags, endpoint, address)

    def _has(self, feature: int) -> bool:
        return bool((self.negotiated >> feature) & 1)

    def set_negotiated(self, features: int) -> None:
        self.negotiated = features & self.offered

    def add_endpoint(self, ep: int) -> None:
        if ep in self.endpoints:
            raise ValueError(ep)
        self.endpoints[ep] = None

    def mappings(self, dom: int):
        d = self.domains.get(dom)
        return None if d is None else list(d.maps)

    # --- requests ---

    def handle(self, req: bytes, resp_len: int | None = None) -> bytes:
        if resp_len is None:
            resp_len = self.probe_size + _TAIL if req[:1] == bytes([_c.T_PROBE]) else _TAIL
        if len(req) < _L["head"] or resp_len < _TAIL:
            return b""
        t = req[0]
        if t == _c.T_ATTACH:
            st = self._attach(req)
        elif t == _c.T_DETACH:
            st = self._detach(req)
        elif t == _c.T_MAP:
            st = self._map(req)
        elif t == _c.T_UNMAP:
            st = self._unmap(req)
        elif t == _c.T_PROBE:
            return self._probe(req, resp_len)
        elif self.unsupp_unknown_type:
            st = S_UNSUPP
        else:
            return b""
        return bytes([st, 0, 0, 0])

    def flush_listeners(self) -> None:
        for d in sorted(self.domains):
            self.domains[d].flush()

    def _drop_endpoint(self, ep: int) -> None:
        dom = self.endpoints[ep]
        if dom is None:
            return
        self.endpoints[ep] = None
        d = self.domains[dom]
        d.n_endpoints -= 1
        if d.n_endpoints == 0:
            d.clear()
            d.flush()
            del self.domains[dom]

    def _attach(self, req: bytes) -> int:
        if len(req) < _ATTACH.size:
            return S_INVAL
        _t, dom, ep, flags, *reserved = _ATTACH.unpack_from(req)
        if any(reserved):
            return S_INVAL
        if flags & ~_c.ATTACH_F_BYPASS:
            return S_INVAL
        bypass = bool(flags & _c.ATTACH_F_BYPASS)
        if bypass and not self._has(_c.F_BYPASS_CONFIG):
            return S_INVAL
        if ep not in self.endpoints:
            return S_NOENT
        if not self.domain_start <= dom <= self.domain_end:
            return S_RANGE
        old = self.endpoints[ep]
        d = self.domains.get(dom)
        if d is not None:
            if d.bypass != bypass:
                return S_INVAL
            if old == dom:
                return S_OK
        else:
            old_freed = old is not None and self.domains[old].n_endpoints == 1
            if len(self.domains) - old_freed >= self.max_domains:
                return S_NOMEM
            d = Domain(dom, bypass, self.max_mappings, self.events)
            self.domains[dom] = d
        if old is not None:
            self._drop_endpoint(ep)
        self.endpoints[ep] = dom
        d.n_endpoints += 1
        return S_OK

    def _detach(self, req: bytes) -> int:
        if len(req) < _DETACH.size:
            return S_INVAL
        _t, dom, ep = _DETACH.unpack_from(req)
        if ep not in self.endpoints:
            return S_NOENT
        if dom not in self.domains or self.endpoints[ep] != dom:
            return S_INVAL
        self._drop_endpoint(ep)
        return S_OK

    def _map(self, req: bytes) -> int:
        if not self._has(_c.F_MAP_UNMAP):
            return S_UNSUPP
        if len(req) < _MAP.size:
            return S_INVAL
        _t, dom, vs, ve, ps, flags = _MAP.unpack_from(req)
        if flags & ~_c.MAP_F_MASK:
            return S_INVAL
        if flags & _c.MAP_F_MMIO and not self._has(_c.F_MMIO):
            return S_INVAL
        d = self.domains.get(dom)
        if d is None:
            return S_NOENT
        if d.bypass:
            return S_INVAL
        if ve < vs:
            return S_INVAL
        g = self.granule - 1
        if vs & g or ps & g or ((ve + 1) & U64) & g:
            return S_RANGE
        if vs < self.input_start or ve > self.input_end:
            return S_RANGE
        size = (ve - vs + 1) & U64
        if size == 0:
            return S_RANGE
        if vs <= self.msi_end and self.msi_start <= ve:
            return S_RANGE
        if ps > U64 - (size - 1):
            return S_RANGE
        if self.mem is not None and not flags & _c.MAP_F_MMIO:
            if not self.mem.contains(ps, size):
                return S_RANGE
        return d.map(vs, ve, ps, flags)

    def _unmap(self, req: bytes) -> int:
        if not self._has(_c.F_MAP_UNMAP):
            return S_UNSUPP
        if len(req) < _UNMAP.size:
            return S_INVAL
        _t, dom, vs, ve = _UNMAP.unpack_from(req)
        d = self.domains.get(dom)
        if d is None:
            return S_NOENT
        if d.bypass:
            return S_INVAL
        if ve < vs:
            return S_INVAL
        return d.unmap(vs, ve)

    def _probe(self, req: bytes, resp_len: int) -> bytes:
        if not self._has(_c.F_PROBE):
            return b""
        ps = self.probe_size
        if resp_len < ps + _TAIL:
            return bytes(resp_len - _TAIL) + bytes([S_INVAL, 0, 0, 0])
        if len(req) < _PROBE.size:
            return bytes(ps) + bytes([S_INVAL, 0, 0, 0])
        _t, ep = _PROBE.unpack_from(req)
        if ep not in self.endpoints:
            return bytes(ps) + bytes([S_NOENT, 0, 0, 0])
        prop = _RESV.pack(_c.PROBE_T_RESV_MEM, _RESV.size - _L["probe_property"],
                          _c.RESV_MEM_T_MSI, self.msi_start, self.msi_end)
        return prop + bytes(ps - len(prop)) + bytes([S_OK, 0, 0, 0])

    # --- translation ---

    def translate(self, ep: int, iova: int, length: int = 1, write: bool = False):
        """(XLATE code, gpa or None); failures append a fault (reason, flags, endpoint, iova)."""
        fflags = _c.FAULT_F_ADDRESS | (_c.FAULT_F_WRITE if write else _c.FAULT_F_READ)
        if ep not in self.endpoints:
            self.faults.append((_c.FAULT_R_UNKNOWN, fflags, ep, iova))
            return _c.X_ENDPOINT, None
        dom = self.endpoints[ep]
        if dom is None:
            if self.bypass or self._has(_c.F_BYPASS):
                return _c.X_OK, iova
            self.faults.append((_c.FAULT_R_DOMAIN, fflags, ep, iova))
            return _c.X_DOMAIN, None
        d = self.domains[dom]
        if d.bypass:
            return _c.X_OK, iova
        r = d.translate(iova, length, write)
        if r[0] != _c.X_OK:
            self.faults.append((_c.FAULT_R_MAPPING, fflags, ep, iova))
        return r
