"""The Python side of VFIO: find a device's group, open and set up the type1 container.

``open_container(selector)``:

* ``/sys/bus/pci/devices/DDDD:BB:DD.F`` (or just ``DDDD:BB:DD.F``): the real thing.  Opens
  ``/dev/vfio/vfio``, checks the API version and the VFIO_TYPE1v2_IOMMU extension, opens the
  device's group ``/dev/vfio/N`` (N from the device's ``iommu_group`` link), checks it is viable,
  attaches it to the container and sets the IOMMU type.  The host's ``dma_entry_limit`` is read
  from ``/sys/module/vfio_iommu_type1/parameters/dma_entry_limit`` (65535 when absent).  Every
  way this can fail (no such device, no ``/dev/vfio``, no IOMMU group, not bound to vfio-pci,
  group not viable, no permission) is a one-line ``DeviceError`` naming the device and the fix.
* ``sim:`` (optionally ``sim:NAME``): the SIMULATED type1 container, for tests and benchmarks
  on hosts without VFIO.  It is only ever chosen by this explicit selector and a WARNING says so.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from hyperpy._fast import vfio as _vfio
from hyperpy._fast.vfio import (DEFAULT_DMA_ENTRY_LIMIT, DmaContainer, SimulatedType1Container,
                                VfioType1Container)
from hyperpy.errors import DeviceError

log = logging.getLogger(__name__)

SIM_SELECTOR = "sim:"
_BDF = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
DMA_ENTRY_LIMIT_PARAM = "module/vfio_iommu_type1/parameters/dma_entry_limit"


def is_simulated_selector(selector: str) -> bool:
    return str(selector).startswith(SIM_SELECTOR)


def read_dma_entry_limit(sysfs: str | os.PathLike = "/sys") -> int:
    """The host's vfio_iommu_type1 ``dma_entry_limit`` (65535 when the parameter is absent)."""
    try:
        text = (Path(sysfs) / DMA_ENTRY_LIMIT_PARAM).read_text().strip()
        return int(text)
    except (OSError, ValueError):
        return DEFAULT_DMA_ENTRY_LIMIT


def _device_path(selector: str, sysfs: Path) -> Path:
    if _BDF.match(selector):
        return sysfs / "bus" / "pci" / "devices" / selector.lower()
    return Path(selector)


def _check_device(selector: str, sysfs: Path, dev_vfio: Path) -> tuple[str, int]:
    """(device name, IOMMU group number) of a device ready for VFIO, or a DeviceError."""
    dev = _device_path(selector, sysfs)
    if not dev.exists():
        raise DeviceError(
            f"VFIO device {selector}: no such PCI device",
            f"give /sys/bus/pci/devices/DDDD:BB:DD.F of a device listed by 'lspci -D'")
    name = dev.resolve().name
    if not (dev_vfio / "vfio").exists():
        raise DeviceError(
            f"VFIO device {name}: this host has no {dev_vfio}/vfio",
            f"load the vfio-pci module (modprobe vfio-pci) and bind the device to it: "
            f"echo vfio-pci > {dev}/driver_override; echo {name} > {sysfs}/bus/pci/drivers_probe")
    group_link = dev / "iommu_group"
    if not group_link.exists():
        raise DeviceError(
            f"VFIO device {name} has no IOMMU group",
            "enable the host IOMMU (intel_iommu=on or amd_iommu=on on the host kernel command line)")
    driver_link = dev / "driver"
    driver = os.path.basename(os.readlink(driver_link)) if driver_link.is_symlink() else None
    if driver != "vfio-pci":
        unbind = f"echo {name} > {dev}/driver/unbind; " if driver else ""
        raise DeviceError(
            f"VFIO device {name} is bound to {driver or 'no driver'}, not vfio-pci",
            f"bind it to vfio-pci: {unbind}echo vfio-pci > {dev}/driver_override; "
            f"echo {name} > {sysfs}/bus/pci/drivers/vfio-pci/bind")
    try:
        group = int(os.path.basename(os.readlink(group_link)))
    except (OSError, ValueError):
        raise DeviceError(f"VFIO device {name}: cannot read its IOMMU group from {group_link}")
    if not (dev_vfio / str(group)).exists():
        raise DeviceError(
            f"VFIO device {name}: {dev_vfio}/{group} does not exist",
            f"bind every device of /sys/kernel/iommu_groups/{group}/devices to vfio-pci")
    return name, group


def _open(path: Path, name: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise DeviceError(f"VFIO device {name}: no permission to open {path}",
                          "run hyperpy as root or give the user access to /dev/vfio")
    except OSError as e:
        raise DeviceError(f"VFIO device {name}: cannot open {path}: {e.strerror}")


def _attach_group(container: VfioType1Container, name: str, group: int, dev_vfio: Path) -> int:
    gfd = _open(dev_vfio / str(group), name)
    try:
        flags = _vfio.group_get_status(gfd)
        if not flags & _vfio.VFIO_GROUP_FLAGS_VIABLE:
            raise DeviceError(
                f"VFIO device {name}: IOMMU group {group} is not viable",
                f"bind every device of /sys/kernel/iommu_groups/{group}/devices to vfio-pci")
        _vfio.group_set_container(gfd, container.fd)
    except OSError as e:
        os.close(gfd)
        raise DeviceError(f"VFIO device {name}: group {group}: {e.strerror}")
    except BaseException:
        os.close(gfd)
        raise
    container.groups[group] = gfd
    return gfd


def open_container(selector: str, *, entry_limit: int | None = None, pin_ns_per_page: int = 0,
                   sysfs: str | os.PathLike = "/sys",
                   dev_vfio: str | os.PathLike = "/dev/vfio") -> DmaContainer:
    """A DMA container for the device ``selector`` (see the module docstring).

    ``entry_limit`` and ``pin_ns_per_page`` apply to the simulation only; the real container's
    limit is the host's.  ``sysfs`` and ``dev_vfio`` are for tests.
    """
    selector = str(selector)
    if is_simulated_selector(selector):
        limit = DEFAULT_DMA_ENTRY_LIMIT if entry_limit is None else int(entry_limit)
        log.warning("VFIO backend %r is a SIMULATION of vfio_iommu_type1 v2: no host IOMMU, "
                    "no device DMA (dma_entry_limit=%d, pin_ns_per_page=%d)",
                    selector, limit, pin_ns_per_page)
        return SimulatedType1Container(limit, pin_ns_per_page)

    sysfs, dev_vfio = Path(sysfs), Path(dev_vfio)
    name, group = _check_device(selector, sysfs, dev_vfio)
    cfd = _open(dev_vfio / "vfio", name)
    container = None
    try:
        version = _vfio.get_api_version(cfd)
        if version != _vfio.VFIO_API_VERSION:
            raise DeviceError(f"VFIO device {name}: host VFIO API version {version}, "
                              f"hyperpy needs {_vfio.VFIO_API_VERSION}")
        if not _vfio.check_extension(cfd, _vfio.VFIO_TYPE1v2_IOMMU):
            raise DeviceError(f"VFIO device {name}: the host VFIO has no VFIO_TYPE1v2_IOMMU",
                              "load the vfio_iommu_type1 module (modprobe vfio_iommu_type1)")
        container = VfioType1Container(cfd, read_dma_entry_limit(sysfs))
        _attach_group(container, name, group, dev_vfio)
        _vfio.set_iommu(cfd, _vfio.VFIO_TYPE1v2_IOMMU)
        # The host's own count (it also knows of other users' mappings), else the module
        # parameter read above.
        source = "DMA_AVAIL" if container.use_host_dma_avail() is not None else "dma_entry_limit"
    except OSError as e:
        close_container(container) if container is not None else os.close(cfd)
        raise DeviceError(f"VFIO device {name}: {e.strerror}")
    except BaseException:
        close_container(container) if container is not None else os.close(cfd)
        raise
    log.info("VFIO container for %s (group %d): the host allows %d DMA mappings (%s)",
             name, group, container.dma_entry_limit, source)
    return container


def attach_device(container: DmaContainer, selector: str, *, sysfs: str | os.PathLike = "/sys",
                  dev_vfio: str | os.PathLike = "/dev/vfio") -> int | None:
    """Add another device's group to a real container; returns the group fd (None for sim)."""
    if isinstance(container, SimulatedType1Container):
        if not is_simulated_selector(str(selector)):
            raise DeviceError(f"VFIO device {selector}: cannot share a simulated container",
                              "use sim: for every device or real devices only")
        return None
    sysfs, dev_vfio = Path(sysfs), Path(dev_vfio)
    name, group = _check_device(str(selector), sysfs, dev_vfio)
    if group in container.groups:
        return container.groups[group]
    return _attach_group(container, name, group, dev_vfio)


def close_container(container: DmaContainer) -> None:
    """Close a real container's group fds and its fd (the kernel drops its mappings)."""
    if isinstance(container, VfioType1Container):
        for gfd in container.groups.values():
            try:
                os.close(gfd)
            except OSError:
                pass
        container.groups.clear()
        try:
            os.close(container.fd)
        except OSError:
            pass


def open_device(container: DmaContainer, selector: str, *, sysfs: str | os.PathLike = "/sys",
                dev_vfio: str | os.PathLike = "/dev/vfio"):
    """The device fd of ``selector`` (whose group is in ``container``) as a HostVfioDevice."""
    from .device import HostVfioDevice

    sysfs, dev_vfio = Path(sysfs), Path(dev_vfio)
    name, group = _check_device(str(selector), sysfs, dev_vfio)
    gfd = container.groups.get(group)
    if gfd is None:
        gfd = _attach_group(container, name, group, dev_vfio)
    try:
        fd = _vfio.group_get_device_fd(gfd, name)
    except OSError as e:
        raise DeviceError(f"VFIO device {name}: VFIO_GROUP_GET_DEVICE_FD: {e.strerror}",
                          "make sure no other process (another VMM) holds the device")
    try:
        return HostVfioDevice(fd, name)
    except OSError as e:
        os.close(fd)
        raise DeviceError(f"VFIO device {name}: {e.strerror}")
    except BaseException:
        os.close(fd)
        raise
