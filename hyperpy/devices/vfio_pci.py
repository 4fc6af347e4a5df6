"""A passed-through PCI function (VFIO): config space, BARs and MSI/MSI-X, owned by the VMM
where a VMM must own them and passed through everywhere else.

Written against :class:`~hyperpy.vfio.device.VfioDeviceFile`, so the real vfio-pci device fd
and the SIMULATED device (:mod:`hyperpy.vfio.simdevice`) go through the same code.

* **Config space.** Reads and writes go to the device's config region (``pread``/``pwrite``),
  except the bytes the VMM owns: the BARs and the expansion ROM (the VMM places BARs; the ROM is
  hidden), interrupt line/pin (no INTx: pin 0), and the MSI and MSI-X capability registers,
  which are emulated and turned into ``VFIO_DEVICE_SET_IRQS``.  The command register is passed
  through with INTx disabled.
* **BARs.** The mmappable parts of a memory BAR (its sparse-mmap areas, less the page(s) of the
  MSI-X table and PBA) are mmapped from the device once and installed as KVM memory slots
  wherever the BAR is placed, so guest accesses reach the device without an exit.  The rest
  traps to :meth:`bar_read`/:meth:`bar_write`: the MSI-X table and PBA are emulated, anything
  else is a ``pread``/``pwrite`` on the region.  I/O BARs are not passed through (logged).
* **MSI-X.** One eventfd per vector, bound to a GSI with ``KVM_IRQFD``; enabling MSI-X hands
  all of them to the device with ``VFIO_DEVICE_SET_IRQS``, so the device interrupts the guest
  with no VMM involvement.  A masked vector's eventfd is taken off KVM and watched by the
  event loop instead, which sets its PBA bit; unmasking re-binds it and delivers what is
  pending.
* **MSI.** Address/data become the routes of ``2^MME`` vectors; enabling hands their eventfds
  to the device.  Per-vector masking is not offered (the capability is shown without it).
"""

from __future__ import annotations

import logging
import os
import struct

from .._fast import uapi as U
from .._fast import vfio as _vfio
from ..errors import DeviceError
from ..vfio.device import CONFIG_REGION, MSI_IRQ, MSIX_IRQ, PAGE_SIZE, VfioDeviceFile
from .pci.bus import PciDevice
from .pci.config import CONFIG_SPACE_SIZE, Bar, BarKind, PciConfigSpace
from .pci.msix import MsixVectors

log = logging.getLogger(__name__)

_MAX_CAPS = 48          # a config space holds at most 48 capabilities: the walk stops there


def _pages(start: int, end: int) -> tuple[int, int]:
    return start & ~(PAGE_SIZE - 1), (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _subtract(areas: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``areas`` ((offset, size) lists) minus the [start, end) ``holes``."""
    out = areas
    for hs, he in holes:
        nxt = []
        for off, size in out:
            end = off + size
            if he <= off or hs >= end:
                nxt.append((off, size))
                continue
            if hs > off:
                nxt.append((off, hs - off))
            if he < end:
                nxt.append((he, end - he))
        out = nxt
    return out


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class VfioMsix(MsixVectors):
    """MSI-X of a passed-through function: the table is emulated, the device signals the
    vectors' eventfds itself (VFIO_DEVICE_SET_IRQS)."""

    def __init__(self, count: int, router, loop, device: VfioDeviceFile, table_bar: int,
                 table_offset: int, pba_bar: int, pba_offset: int) -> None:
        super().__init__(count, router)
        self.loop = loop
        self.device = device
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.handed_to_device = False
        for v in range(count):        # every vector starts masked: off KVM, watched
            self._sync_mask(v)

    def control_written(self, control: int) -> None:
        was = self.enabled
        super().control_written(control)
        if self.enabled != was:
            fds = [vec.fd for vec in self.vectors] if self.enabled else []
            try:
                self.device.set_irq_eventfds(MSIX_IRQ, 0, fds)
                self.handed_to_device = self.enabled
            except OSError as e:
                log.error("%s: VFIO_DEVICE_SET_IRQS (MSI-X %s) failed: %s", self.device.name,
                          "enable" if self.enabled else "disable", e)
        for v in range(self.count):
            self._sync_mask(v)

    def table_write(self, offset: int, size: int, value: int) -> None:
        super().table_write(offset, size, value)
        v = offset // U.PCI_MSIX_ENTRY_SIZE
        if v < self.count:
            self._sync_mask(v)

    def _sync_mask(self, v: int) -> None:
        """Bind vector ``v``'s eventfd to KVM while it is unmasked; watch it while masked."""
        vec = self.vectors[v]
        with self._lock:
            masked = self._masked(v)
            if masked != vec.bound:
                return
            self.router.set_irqfd(vec, not masked)
            if masked:
                self.loop.add(vec.fd, lambda v=v: self._masked_signal(v))
                return
            self.loop.remove(vec.fd)
            if _drain(vec.fd):
                self.pending[v] = True
            if self.pending[v]:
                self.pending[v] = False
                vec.fire()

    def _masked_signal(self, v: int) -> None:
        """The device signalled a masked vector (event-loop thread): remember it in the PBA."""
        vec = self.vectors[v]
        with self._lock:
            if not _drain(vec.fd):
                return
            if vec.bound:
                vec.fire()     # unmasked meanwhile: KVM has the eventfd again
            else:
                self.pending[v] = True

    def close(self) -> None:
        for vec in self.vectors:
            if not vec.bound:
                self.loop.remove(vec.fd)
        if self.handed_to_device:
            try:
                self.device.set_irq_eventfds(MSIX_IRQ, 0, [])
            except OSError:
                pass
        super().close()


class VfioMsi:
    """MSI of a passed-through function: the capability is emulated; enabling it gives the
    device one eventfd per vector (``2^MME``), each routed with the guest's address/data."""

    def __init__(self, config: PciConfigSpace, cap: int, router, device: VfioDeviceFile,
                 max_vectors: int) -> None:
        self.config, self.cap, self.router, self.device = config, cap, router, device
        control = config.get(cap + U.PCI_MSI_FLAGS, 2)
        self.is64 = bool(control & U.PCI_MSI_FLAGS_64BIT)
        mmc = (control & U.PCI_MSI_FLAGS_QMASK) >> 1
        self.max_vectors = max(1, min(1 << mmc, max_vectors))
        mmc = self.max_vectors.bit_length() - 1
        # Shown without per-vector masking, disabled, MME 0.
        config.set16(cap + U.PCI_MSI_FLAGS, (self.is64 and U.PCI_MSI_FLAGS_64BIT) | (mmc << 1))
        self.data_off = cap + (U.PCI_MSI_DATA_64 if self.is64 else U.PCI_MSI_DATA_32)
        self.length = self.data_off + 2 - cap
        w = config.wmask
        w[cap + U.PCI_MSI_FLAGS] = U.PCI_MSI_FLAGS_ENABLE | U.PCI_MSI_FLAGS_QSIZE
        w[cap + U.PCI_MSI_ADDRESS_LO:cap + U.PCI_MSI_ADDRESS_LO + 4] = b"\xfc\xff\xff\xff"
        if self.is64:
            w[cap + U.PCI_MSI_ADDRESS_HI:cap + U.PCI_MSI_ADDRESS_HI + 4] = b"\xff" * 4
        w[self.data_off:self.data_off + 2] = b"\xff\xff"
        self.vectors: list = []

    def written(self) -> None:
        """After a guest write to the capability: (re)program routes, enable or disable."""
        cfg, cap = self.config, self.cap
        control = cfg.get(cap + U.PCI_MSI_FLAGS, 2)
        enable = bool(control & U.PCI_MSI_FLAGS_ENABLE)
        n = min(1 << ((control & U.PCI_MSI_FLAGS_QSIZE) >> 4), self.max_vectors)
        addr = cfg.get(cap + U.PCI_MSI_ADDRESS_LO, 4)
        if self.is64:
            addr |= cfg.get(cap + U.PCI_MSI_ADDRESS_HI, 4) << 32
        data = cfg.get(self.data_off, 2)
        if self.vectors and (not enable or len(self.vectors) != n):
            self._disable()
        if not enable:
            return
        fresh = not self.vectors
        if fresh:
            self.vectors = [self.router.allocate_msi() for _ in range(n)]
        for i, vec in enumerate(self.vectors):
            # Multiple messages: the device puts the vector number in data's low bits.
            self.router.set_msi_route(vec, addr, (data & ~(n - 1)) | i)
        if fresh:
            try:
                self.device.set_irq_eventfds(MSI_IRQ, 0, [v.fd for v in self.vectors])
            except OSError as e:
                log.error("%s: VFIO_DEVICE_SET_IRQS (MSI enable) failed: %s", self.device.name, e)

    def _disable(self) -> None:
        try:
            self.device.set_irq_eventfds(MSI_IRQ, 0, [])
        except OSError as e:
            log.error("%s: VFIO_DEVICE_SET_IRQS (MSI disable) failed: %s", self.device.name, e)
        for vec in self.vectors:
            self.router.release_msi(vec)
        self.vectors = []

    def close(self) -> None:
        if self.vectors:
            self._disable()


class VfioPciDevice(PciDevice):
    """A PCI function passed through with VFIO (see the module docstring)."""

    def __init__(self, device: VfioDeviceFile, *, router, loop, slots, container=None,
                 mapper=None) -> None:
        self.device = device
        self.name = f"vfio {device.name}"
        self.container, self.mapper = container, mapper
        self.slots = slots
        self.msix: VfioMsix | None = None
        self.msi: VfioMsi | None = None
        self._maps: dict[int, list[tuple[int, int, int]]] = {}    # bar -> [(offset, size, host)]
        self._slots: dict[int, list[int]] = {}                    # bar -> KVM slots installed
        self.regions = {}
        try:
            self._setup(router, loop)
        except OSError as e:
            self.close()
            raise DeviceError(f"VFIO device {device.name}: {e.strerror or e}",
                              "check that the device is bound to vfio-pci and not in use") from None
        except BaseException:
            self.close()
            raise

    # --- set-up -----------------------------------------------------------------------------
    def _setup(self, router, loop) -> None:
        dev = self.device
        if dev.flags & _vfio.VFIO_DEVICE_FLAGS_RESET:
            try:     # start from a known state, as firmware would have left it
                dev.reset()
            except OSError as e:
                log.warning("%s: VFIO_DEVICE_RESET failed: %s", dev.name, e)
        self.cfg_region = dev.region_info(CONFIG_REGION)
        if self.cfg_region.size < U.PCI_CFG_SPACE_SIZE:
            raise DeviceError(f"VFIO device {dev.name}: config region of {self.cfg_region.size} "
                              "bytes", "pass through a PCI function")
        self.cfg_size = min(self.cfg_region.size, CONFIG_SPACE_SIZE)
        raw = bytearray()
        for off in range(0, U.PCI_CFG_SPACE_SIZE, 4):
            raw += dev.read(self.cfg_region, off, 4).to_bytes(4, "little")
        vendor, device_id = struct.unpack_from("<HH", raw, 0)
        if vendor == 0xFFFF:
            raise DeviceError(f"VFIO device {dev.name}: config space reads all ones",
                              "the device may be powered off or in reset")
        cls = struct.unpack_from("<I", raw, U.PCI_REVISION_ID)[0]
        svid, sid = struct.unpack_from("<HH", raw, U.PCI_SUBSYSTEM_VENDOR_ID)
        self.config = PciConfigSpace(vendor, device_id, cls >> 8, cls & 0xFF, svid, sid)
        self.config.data[U.PCI_INTERRUPT_PIN] = 0          # no INTx
        # Bytes the VMM owns: BARs, ROM, interrupt line/pin (+ MSI/MSI-X below).
        self._emu = bytearray(CONFIG_SPACE_SIZE)
        for lo, hi in ((U.PCI_BASE_ADDRESS_0, U.PCI_BASE_ADDRESS_0 + 24),
                       (U.PCI_ROM_ADDRESS, U.PCI_ROM_ADDRESS + 4),
                       (U.PCI_INTERRUPT_LINE, U.PCI_INTERRUPT_PIN + 1)):
            self._emu[lo:hi] = b"\x01" * (hi - lo)
        self._add_bars(raw)
        self._add_capabilities(raw, router, loop)
        self._map_bars()

    def _add_bars(self, raw: bytes) -> None:
        i = 0
        while i < 6:
            info = self.device.region_info(i)
            reg = struct.unpack_from("<I", raw, U.PCI_BASE_ADDRESS_0 + 4 * i)[0]
            is64 = not reg & U.PCI_BASE_ADDRESS_SPACE_IO and reg & 0x6 == U.PCI_BASE_ADDRESS_MEM_TYPE_64
            if info.size:
                if reg & U.PCI_BASE_ADDRESS_SPACE_IO:
                    log.warning("%s: BAR%d is an I/O BAR; it is not passed through",
                                self.device.name, i)
                else:
                    size = max(16, 1 << (info.size - 1).bit_length())
                    self.config.add_bar(Bar(i, size, BarKind.MEM64 if is64 else BarKind.MEM32,
                                            bool(reg & U.PCI_BASE_ADDRESS_MEM_PREFETCH)))
                    self.regions[i] = info
            i += 2 if is64 else 1

    def _add_capabilities(self, raw: bytes, router, loop) -> None:
        cfg = self.config
        seen = set()
        off = raw[U.PCI_CAPABILITY_LIST] & ~3 if raw[U.PCI_STATUS] & U.PCI_STATUS_CAP_LIST else 0
        while off >= 0x40 and off not in seen and len(seen) < _MAX_CAPS:
            seen.add(off)
            cap_id, nxt = raw[off], raw[off + 1]
            if cap_id == U.PCI_CAP_ID_MSIX and self.msix is None and off + 12 <= 0x100:
                control, table, pba = struct.unpack_from("<HII", raw, off + 2)
                count = (control & U.PCI_MSIX_FLAGS_QSIZE) + 1
                count = min(count, self.device.irq_info(MSIX_IRQ).count or count)
                cfg.data[off:off + 12] = raw[off:off + 12]
                cfg.set16(off + U.PCI_MSIX_FLAGS, control & U.PCI_MSIX_FLAGS_QSIZE)
                cfg.wmask[off + U.PCI_MSIX_FLAGS + 1] = (U.PCI_MSIX_FLAGS_ENABLE
                                                         | U.PCI_MSIX_FLAGS_MASKALL) >> 8
                self._emu[off + 2:off + 12] = b"\x01" * 10
                self.msix_cap = off
                self.msix = VfioMsix(count, router, loop, self.device, table & 7, table & ~7,
                                     pba & 7, pba & ~7)
            elif cap_id == U.PCI_CAP_ID_MSI and self.msi is None and off + 24 <= 0x100:
                cfg.data[off:off + 24] = raw[off:off + 24]
                msi_irqs = self.device.irq_info(MSI_IRQ).count
                if msi_irqs:
                    self.msi = VfioMsi(cfg, off, router, self.device, msi_irqs)
                    self._emu[off + 2:off + self.msi.length] = b"\x01" * (self.msi.length - 2)
                    self.msi_cap = off
            off = nxt & ~3

    def _map_bars(self) -> None:
        """mmap the mmappable parts of each BAR (KVM slots follow the BAR's placement)."""
        holes: dict[int, list[tuple[int, int]]] = {}
        if self.msix is not None:
            m = self.msix
            tsize = m.count * U.PCI_MSIX_ENTRY_SIZE
            holes.setdefault(m.table_bar, []).append(_pages(m.table_offset, m.table_offset + tsize))
            holes.setdefault(m.pba_bar, []).append(_pages(m.pba_offset, m.pba_offset + (m.count + 63) // 64 * 8))
        for i, info in self.regions.items():
            for off, size in _subtract(info.mmap_areas(), holes.get(i, [])):
                host = self.device.mmap(info, off, size)
                self._maps.setdefault(i, []).append((off, size, host))
        # The BARs are placed later by the bus; bar_moved() installs the slots.

    # --- config space -------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.cfg_size:
            return (1 << (8 * size)) - 1
        emu = self._emu[offset:offset + size]
        if all(emu):
            return self.config.get(offset, size)
        try:
            value = self.device.read(self.cfg_region, offset, size)
        except OSError as e:
            log.warning("%s: config read at %#x failed: %s", self.device.name, offset, e)
            return (1 << (8 * size)) - 1
        for i, owned in enumerate(emu):
            if owned:
                value = (value & ~(0xFF << (8 * i))) | (self.config.data[offset + i] << (8 * i))
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.cfg_size:
            return
        emu = self._emu[offset:offset + size]
        if any(emu):
            self.config.write(offset, size, value)
        if not all(emu):
            if offset <= U.PCI_COMMAND + 1 and offset + size > U.PCI_COMMAND + 1:
                # INTx is never routed: keep it disabled on the device.
                value |= (U.PCI_COMMAND_INTX_DISABLE >> 8) << (8 * (U.PCI_COMMAND + 1 - offset))
            try:
                if not any(emu):
                    self.device.write(self.cfg_region, offset, size, value)
                else:
                    for i, owned in enumerate(emu):
                        if not owned:
                            self.device.write(self.cfg_region, offset + i, 1, (value >> (8 * i)) & 0xFF)
            except OSError as e:
                log.warning("%s: config write at %#x failed: %s", self.device.name, offset, e)
        end = offset + size
        if self.msix is not None and offset < self.msix_cap + 4 and end > self.msix_cap + 2:
            self.msix.control_written(self.config.get(self.msix_cap + U.PCI_MSIX_FLAGS, 2))
        if self.msi is not None and offset < self.msi_cap + self.msi.length and end > self.msi_cap + 2:
            self.msi.written()

    # --- BARs ----------------------------------------------------------------------------------
    def bar_moved(self, index: int, old: int, new: int) -> None:
        for slot in self._slots.pop(index, []):
            self.slots.unmap(slot)
        if new:
            self._slots[index] = [self.slots.map(new + off, size, host)
                                  for off, size, host in self._maps.get(index, [])]

    def _msix_part(self, index: int, offset: int):
        m = self.msix
        if m is None:
            return None
        if index == m.table_bar and 0 <= offset - m.table_offset < m.count * U.PCI_MSIX_ENTRY_SIZE:
            return "table", offset - m.table_offset
        if index == m.pba_bar and 0 <= offset - m.pba_offset < (m.count + 63) // 64 * 8:
            return "pba", offset - m.pba_offset
        return None

    def bar_read(self, index: int, offset: int, size: int) -> int:
        part = self._msix_part(index, offset)
        if part is not None:
            kind, off = part
            return self.msix.table_read(off, size) if kind == "table" else self.msix.pba_read(off, size)
        info = self.regions.get(index)
        if info is None or not info.readable or offset + size > info.size:
            return (1 << (8 * size)) - 1
        try:
            return self.device.read(info, offset, size)
        except OSError as e:
            log.warning("%s: BAR%d read at %#x failed: %s", self.device.name, index, offset, e)
            return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        part = self._msix_part(index, offset)
        if part is not None:
            kind, off = part
            if kind == "table":
                self.msix.table_write(off, size, value)
            return          # the PBA is read-only
        info = self.regions.get(index)
        if info is None or not info.writable or offset + size > info.size:
            return
        try:
            self.device.write(info, offset, size, value)
        except OSError as e:
            log.warning("%s: BAR%d write at %#x failed: %s", self.device.name, index, offset, e)

    # --- accounting and teardown ---------------------------------------------------------------
    def counters(self) -> dict:
        c: dict = {}
        if self.container is not None:
            c.update(self.container.counters())
        if self.mapper is not None:    # its "container" entry is the container's, above
            c.update({f"mapper_{k}": v for k, v in self.mapper.counters().items() if k != "container"})
        c.update({f"device_{k}": v for k, v in getattr(self.device, "counters", {}).items()})
        return c

    def close(self) -> None:
        for index in list(self._slots):
            self.bar_moved(index, 0, 0)
        for maps in self._maps.values():
            for _off, size, host in maps:
                self.device.munmap(host, size)
        self._maps.clear()
        for irq in (self.msix, self.msi):
            if irq is not None:
                try:
                    irq.close()
                except Exception:
                    log.exception("%s: releasing interrupts failed", self.name)
        self.msix = self.msi = None
        if self.container is not None:
            log.info("%s: %s", self.name, self.counters())
        self.device.close()
