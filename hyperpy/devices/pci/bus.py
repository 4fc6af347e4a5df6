"""PCI segment 0: devices on bus 0, config access through ports 0xCF8/0xCFC and ECAM, BARs.

The VMM places every BAR itself (there is no firmware), inside the windows that the ACPI DSDT
describes; if the guest later moves a BAR, the MMIO mapping follows it.
"""

from __future__ import annotations

import logging

from ..._fast import uapi as U
from ...errors import DeviceError
from .config import Bar, BarKind, PciConfigSpace

log = logging.getLogger(__name__)

MAX_DEVICES = 32


class PciDevice:
    """Base of PCI functions: a config space plus BAR handlers.

    Subclasses implement :meth:`bar_read`/:meth:`bar_write` for their BARs and may override
    :meth:`config_read`/:meth:`config_write` for registers with side effects.
    """

    name = "pci-device"

    def __init__(self, config: PciConfigSpace) -> None:
        self.config = config

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def bar_moved(self, index: int, old: int, new: int) -> None:
        """Called after BAR ``index`` moved from ``old`` to ``new`` (0: unmapped)."""


class _BarHandler:
    """Bus adapter: routes one BAR's accesses to its device."""

    def __init__(self, device: PciDevice, index: int) -> None:
        self.device = device
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.device.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.bar_write(self.index, offset, size, value)


class _Window:
    """Bump allocator for BAR addresses in one address window."""

    def __init__(self, name: str, start: int, size: int) -> None:
        self.name, self.start, self.end, self.next = name, start, start + size, start

    def allocate(self, size: int) -> int:
        addr = (self.next + size - 1) & ~(size - 1)
        if addr + size > self.end:
            raise DeviceError(f"the PCI {self.name} window is full", "use fewer or smaller devices")
        self.next = addr + size
        return addr


class PciBus:
    def __init__(self, mmio_bus, pio_bus, mmio32: tuple[int, int], mmio64: tuple[int, int]) -> None:
        self.mmio_bus = mmio_bus
        self.pio_bus = pio_bus
        self.devices: dict[int, PciDevice] = {}
        self._win32 = _Window("32-bit MMIO", *mmio32)
        self._win64 = _Window("64-bit MMIO", *mmio64)

    # --- wiring -----------------------------------------------------------------------------
    def free_slot(self) -> int:
        """The first free slot (so a device's BDF is known before it is plugged)."""
        slot = next((s for s in range(MAX_DEVICES) if s not in self.devices), None)
        if slot is None:
            raise DeviceError("PCI bus 0 is full (32 devices)", "use fewer devices")
        return slot

    def add(self, device: PciDevice, slot: int | None = None) -> int:
        """Plug ``device`` into ``slot`` (or the first free one) and place its BARs."""
        if slot is None:
            slot = self.free_slot()
        elif not 0 <= slot < MAX_DEVICES:
            raise DeviceError(f"PCI slot {slot} does not exist", "use pci_device_id=1..31")
        elif slot in self.devices:
            raise DeviceError(f"PCI slot {slot} is already taken by {self.devices[slot].name}",
                              "choose another pci_device_id or leave it out")
        for bar in device.config.bars.values():
            if bar.kind is BarKind.IO:
                raise DeviceError("I/O BARs are not supported", "use memory BARs")
            # 64-bit BARs go below 4 GiB while the 32-bit window has room (guests that map
            # only low memory can reach them; 64-bit-capable drivers do not care), then above.
            try:
                addr = self._win32.allocate(bar.size)
            except DeviceError:
                if bar.kind is not BarKind.MEM64:
                    raise
                addr = self._win64.allocate(bar.size)
            placed = Bar(bar.index, bar.size, bar.kind, bar.prefetchable, addr)
            device.config.add_bar(placed)   # programs the BAR register with addr
            placed.address = 0              # ...but nothing is mapped there yet
            self._map_bar(device, placed, addr)
        self.devices[slot] = device
        log.info("PCI 00:%02x.0: %s", slot, device.name)
        return slot

    def _map_bar(self, device: PciDevice, bar: Bar, addr: int) -> bool:
        try:
            self.mmio_bus.register(addr, bar.size, _BarHandler(device, bar.index))
        except DeviceError as e:
            log.warning("%s BAR%d not mapped at %#x: %s", device.name, bar.index, addr, e)
            return False
        old, bar.address = bar.address, addr
        device.bar_moved(bar.index, old, addr)
        return True

    def _unmap_bar(self, device: PciDevice, bar: Bar) -> None:
        if bar.address:
            self.mmio_bus.unregister(bar.address)
            old, bar.address = bar.address, 0
            device.bar_moved(bar.index, old, 0)

    # --- configuration access ----------------------------------------------------------------
    def config_read(self, bus: int, dev: int, fn: int, offset: int, size: int) -> int:
        device = self.devices.get(dev) if bus == 0 and fn == 0 else None
        if device is None:
            return (1 << (8 * size)) - 1   # no device: all ones (vendor ID 0xFFFF)
        return device.config_read(offset, size)

    def config_write(self, bus: int, dev: int, fn: int, offset: int, size: int, value: int) -> None:
        device = self.devices.get(dev) if bus == 0 and fn == 0 else None
        if device is None:
            return
        device.config_write(offset, size, value)
        bar = device.config.bar_at(offset)
        if bar is not None and value != (1 << (8 * size)) - 1:   # all ones: BAR sizing, not a move
            new = device.config.bar_address(bar.index)
            if new != bar.address and new != 0:
                self._unmap_bar(device, bar)
                self._map_bar(device, bar, new)


class PciConfigIo:
    """Configuration mechanism #1: address register at 0xCF8, data window at 0xCFC-0xCFF.

    Registered on the port bus at 0xCF8 with size 8.
    """

    ENABLE = 1 << 31

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus
        self.address = 0

    def _target(self, byte: int):
        a = self.address
        if not a & self.ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + byte

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return (self.address >> (8 * offset)) & ((1 << (8 * size)) - 1)
        t = self._target(offset - 4)
        if t is None:
            return (1 << (8 * size)) - 1
        return self.bus.config_read(*t, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & 0x80FF_FFFC
            return
        if offset < 4:
            return   # byte/word writes to 0xCF8-0xCFB are not config cycles (e.g. 0xCF9 reset)
        t = self._target(offset - 4)
        if t is not None:
            self.bus.config_write(*t, size, value)


class PciConfigMmio:
    """ECAM (MMCONFIG): one 4 KiB config space per function, 1 MiB per bus."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    @staticmethod
    def _decode(offset: int):
        return (offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        b, d, f, reg = self._decode(offset)
        return self.bus.config_read(b, d, f, reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        b, d, f, reg = self._decode(offset)
        self.bus.config_write(b, d, f, reg, size, value)


class PciHostBridge(PciDevice):
    """00:00.0, the host bridge: config space only."""

    name = "host bridge"
    VENDOR_INTEL = 0x8086
    DEVICE_ID = 0x0D57
    CLASS_HOST_BRIDGE = 0x060000

    def __init__(self) -> None:
        super().__init__(PciConfigSpace(self.VENDOR_INTEL, self.DEVICE_ID, self.CLASS_HOST_BRIDGE))
