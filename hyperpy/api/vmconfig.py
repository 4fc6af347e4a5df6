"""cloud-hypervisor ``VmConfig`` JSON <-> hyperpy's :class:`hyperpy.config.VmConfig`.

:func:`from_json` accepts the subset of cloud-hypervisor's ``VmConfig`` that hyperpy implements.
Three kinds of field exist:

- fields hyperpy implements (cpus.boot_vcpus, memory.size, payload.kernel, disks[].path, ...);
- cloud-hypervisor fields hyperpy does not implement: accepted when absent, null or equal to
  cloud-hypervisor's default (tools such as Kata send them filled in with defaults), refused
  otherwise ("not supported by hyperpy");
- anything else: refused as an unknown field.

Every refusal is an :class:`ApiConfigError` whose message names the field as a JSON path
(``disks[1].readonly``) and says what to do; the API answers it with 400.
:func:`to_json` is the reverse direction, for ``vm.info``.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_ABSENT = object()


class ApiConfigError(ConfigError):
    """A VmConfig body that hyperpy cannot accept (answered with 400)."""


def _err(path: str, what: str, hint: str | None = None) -> ApiConfigError:
    return ApiConfigError(f"{path or 'VmConfig'}: {what}", hint)


class _Obj:
    """One JSON object being converted: reads known fields, then refuses whatever is left."""

    def __init__(self, value: Any, path: str, known: tuple[str, ...], defaults: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise _err(path, f"must be an object, not {_json_type(value)}")
        self.v = value
        self.path = path
        self.known = known
        self.defaults = defaults
        for key in value:
            if key in known:
                continue
            if key in defaults:
                if not _is_default(value[key], defaults[key]):
                    raise _err(self.at(key), f"{_short(value[key])} is not supported by hyperpy",
                               f"leave it out{_default_hint(defaults[key])}")
                continue
            close = difflib.get_close_matches(key, [*known, *defaults], n=1)
            maybe = f"did you mean {close[0]!r}? " if close else ""
            raise _err(self.at(key), "unknown field",
                       f"{maybe}fields hyperpy accepts here: {', '.join(known)}")

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _ABSENT) -> Any:
        value = self.v.get(key)
        if value is None:
            if default is _ABSENT:
                raise _err(self.at(key), "is required")
            return default
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise _err(self.at(key), f"must be an integer, not {_json_type(value)}")
        if kind is bool and not isinstance(value, bool):
            raise _err(self.at(key), f"must be true or false, not {_json_type(value)}")
        if kind is str and not isinstance(value, str):
            raise _err(self.at(key), f"must be a string, not {_json_type(value)}")
        if kind is list and not isinstance(value, list):
            raise _err(self.at(key), f"must be an array, not {_json_type(value)}")
        return value

    def int_in(self, key: str, lo: int, hi: int, default: Any = _ABSENT) -> Any:
        n = self.get(key, int, default)
        if n is not default and not lo <= n <= hi:
            raise _err(self.at(key), f"{n} is out of range", f"give {lo} to {hi}")
        return n

    def string(self, key: str, default: Any = _ABSENT) -> Any:
        s = self.get(key, str, default)
        if isinstance(s, str) and "\0" in s:
            raise _err(self.at(key), "contains a NUL character")
        return s


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _short(v: Any) -> str:
    import json

    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_default(value: Any, default: Any) -> bool:
    if value is None:
        return True
    if default is _EMPTY:
        return value in ([], {})
    if isinstance(default, tuple):          # one of several accepted values
        return any(_is_default(value, d) for d in default)
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default) and value == default
    return value == default


def _default_hint(default: Any) -> str:
    if default is _EMPTY:
        return " or empty"
    if isinstance(default, tuple):
        return " or give " + " or ".join(_short(d) for d in default)
    return f" or give {_short(default)}"


_EMPTY = object()     # "absent, null, [] or {}"

# cloud-hypervisor fields hyperpy does not implement, with the value(s) it accepts for them.
_VM_DEFAULTS = {
    "rate_limit_groups": _EMPTY, "balloon": _EMPTY, "fs": _EMPTY, "generic_vhost_user": _EMPTY,
    "pmem": _EMPTY, "user_devices": _EMPTY, "vdpa": _EMPTY, "vsock": _EMPTY, "numa": _EMPTY,
    "watchdog": False, "pvpanic": False, "landlock_enable": False, "landlock_rules": _EMPTY,
    "pci_segments": _EMPTY, "platform": _EMPTY, "tpm": _EMPTY, "rtc": _EMPTY,
    "debug_console": ({"mode": "Off"}, {}),
}
_CPUS_DEFAULTS = {"topology": _EMPTY, "kvm_hyperv": False, "max_phys_bits": _EMPTY, "nested": True,
                  "affinity": _EMPTY, "features": ({"amx": False}, {}), "core_scheduling": "Vm"}
_MEMORY_DEFAULTS = {"hotplug_size": (0,), "hotplugged_size": (0,), "mergeable": False,
                    "hotplug_method": "Acpi", "reserve": False, "thp": True, "zones": _EMPTY}
_PAYLOAD_DEFAULTS = {"firmware": _EMPTY, "igvm": _EMPTY, "host_data": _EMPTY}
_PCI_DEFAULTS = {"pci_segment": 0}
_DISK_DEFAULTS = {**_PCI_DEFAULTS, "vhost_user": False, "vhost_socket": _EMPTY,
                  "rate_limiter_config": _EMPTY, "rate_limit_group": _EMPTY, "queue_affinity": _EMPTY,
                  "backing_files": False, "sparse": True, "image_type": ("Raw",),
                  "lock_granularity": ("ByteRange", "Full")}
_NET_DEFAULTS = {**_PCI_DEFAULTS, "host_mac": _EMPTY, "mtu": _EMPTY, "vhost_user": False,
                 "vhost_socket": _EMPTY, "vhost_mode": "Client", "rate_limiter_config": _EMPTY,
                 "offload_tso": True, "offload_ufo": True, "offload_csum": True}
_RNG_DEFAULTS = {**_PCI_DEFAULTS, "id": _EMPTY}
_SERIAL_DEFAULTS = {"socket": _EMPTY}
_CONSOLE_DEFAULTS = {**_PCI_DEFAULTS, "socket": _EMPTY, "id": _EMPTY, "pci_device_id": _EMPTY}
_DEVICE_DEFAULTS = {**_PCI_DEFAULTS, "x_nv_gpudirect_clique": _EMPTY, "x_exclude_mmap_bars": _EMPTY}

_MODES = {"Off": "off", "Tty": "tty", "File": "file", "Null": "null"}


def _pci_slot(o: _Obj, key: str = "pci_device_id") -> int | None:
    return o.int_in(key, 1, 31, None)


def _readable_file(o: _Obj, key: str, hint: str) -> Path:
    value = o.string(key)
    path = Path(value).expanduser()
    if not value or not path.is_file():
        raise _err(o.at(key), f"no such file: {value}" if value else "empty path", hint)
    return path


def _cpus(v: Any):
    from ..config import MAX_VCPUS, CpusConfig

    o = _Obj(v, "cpus", ("boot_vcpus", "max_vcpus"), _CPUS_DEFAULTS)
    boot = o.int_in("boot_vcpus", 1, MAX_VCPUS)
    top = o.int_in("max_vcpus", 1, MAX_VCPUS, boot)
    if top != boot:
        raise _err("cpus.max_vcpus", f"{top} differs from boot_vcpus {boot}: vCPU hotplug is not "
                   "supported by hyperpy", "give max_vcpus equal to boot_vcpus")
    return CpusConfig(boot=boot)


def _memory(v: Any):
    from .. import layout
    from ..memory import HUGEPAGE_SIZES, MemoryBacking

    o = _Obj(v, "memory", ("size", "shared", "hugepages", "hugepage_size", "prefault"), _MEMORY_DEFAULTS)
    size = o.int_in("size", 1, 1 << 46)
    hugepages = o.get("hugepages", bool, False)
    psize = o.get("hugepage_size", int, None)
    if psize is not None:
        if psize not in HUGEPAGE_SIZES:
            raise _err("memory.hugepage_size", f"{psize} is not a huge page size",
                       f"give {2 * layout.MiB} (2M) or {layout.GiB} (1G)")
        if not hugepages:
            raise _err("memory.hugepage_size", "needs hugepages: true")
    psize = psize or 2 * layout.MiB
    if hugepages and size % psize:
        raise _err("memory.size", f"{size} is not a multiple of the huge page size {psize}")
    return MemoryBacking(size=size, shared=o.get("shared", bool, False), hugepages=hugepages,
                         hugepage_size=psize, prefault=o.get("prefault", bool, False))


def _payload(v: Any):
    from ..config import BUILTIN_PREFIX, PayloadConfig, parse_cmdline, resolve_kernel

    o = _Obj(v, "payload", ("kernel", "cmdline", "initramfs"), _PAYLOAD_DEFAULTS)
    kernel = o.string("kernel")
    hint = "give the path of a PVH ELF, vmlinux or bzImage, or builtin:hello"
    if kernel.startswith(BUILTIN_PREFIX):
        try:
            kpath = resolve_kernel(kernel)
        except ConfigError as e:
            raise _err("payload.kernel", e.what.removeprefix("--kernel: "), e.hint) from None
    else:
        kpath = _readable_file(o, "kernel", hint)
    initrd = _readable_file(o, "initramfs", "give the path of a cpio archive") \
        if o.v.get("initramfs") is not None else None
    cmdline = o.string("cmdline", "")
    try:
        cmdline = parse_cmdline(cmdline)
    except ConfigError as e:
        raise _err("payload.cmdline", e.what.removeprefix("--cmdline: ")) from None
    return PayloadConfig(kernel=kpath, initramfs=initrd, cmdline=cmdline)


def _output(v: Any, path: str, console: bool):
    from ..config import ConsoleConfig, SerialConfig

    keys = ("mode", "file", "iommu") if console else ("mode", "file")
    o = _Obj(v, path, keys, _CONSOLE_DEFAULTS if console else _SERIAL_DEFAULTS)
    raw = o.string("mode")
    mode = _MODES.get(raw)
    if mode is None:
        raise _err(f"{path}.mode", f"{raw!r} is not supported by hyperpy", "give Off, Tty, File or Null")
    file = None
    if mode == "file":
        name = o.string("file", "")
        if not name:
            raise _err(f"{path}.file", "mode File needs a file path")
        file = Path(name).expanduser()
        if file.is_dir() or not file.parent.is_dir():
            raise _err(f"{path}.file", f"{name} is a directory or its directory does not exist",
                       "give a file path in an existing directory")
    elif o.v.get("file") is not None:
        raise _err(f"{path}.file", f"only used with mode File, not {raw}")
    if console:
        iommu = o.get("iommu", bool, False)
        if iommu and mode == "off":
            raise _err(f"{path}.iommu", "needs a console (mode Tty, Null or File)")
        return ConsoleConfig(mode, file, iommu)
    return SerialConfig(mode, file)


def _queue_size(o: _Obj, default: int) -> int:
    from ..config import MAX_QUEUE_SIZE

    n = o.int_in("queue_size", 1, MAX_QUEUE_SIZE, default)
    if n & (n - 1):
        raise _err(o.at("queue_size"), f"{n} is not a power of two", "e.g. 256")
    return n


def _disk(v: Any, path: str):
    from ..config import DiskConfig

    o = _Obj(v, path, ("path", "readonly", "direct", "iommu", "num_queues", "queue_size", "id",
                       "serial", "pci_device_id"), _DISK_DEFAULTS)
    name = o.string("path")
    p = Path(name).expanduser()
    if not name or not p.exists() or p.is_dir():
        raise _err(o.at("path"), f"no such file: {name}" if not p.exists() or not name else f"{name} is a directory",
                   "give a raw disk image")
    ident, serial = o.string("id", ""), o.string("serial", "")
    if ident and serial and ident != serial:
        raise _err(o.at("serial"), f"{serial!r} differs from id {ident!r}: hyperpy uses one name "
                   "for both", "give only one of them")
    return DiskConfig(path=p, readonly=o.get("readonly", bool, False), direct=o.get("direct", bool, False),
                      num_queues=o.int_in("num_queues", 1, 64, 1), queue_size=_queue_size(o, 256),
                      id=serial or ident, pci_device_id=_pci_slot(o), iommu=o.get("iommu", bool, False))


def _net(v: Any, path: str):
    from ..config import NetConfig, _ipv4, parse_mac, parse_tap, random_mac

    o = _Obj(v, path, ("tap", "ip", "mask", "mac", "iommu", "num_queues", "queue_size", "id",
                       "pci_device_id"), _NET_DEFAULTS)
    try:
        # Absent, null or "" tap: the kernel names a new one (vmtapN); mac likewise: a random
        # locally administered one -- cloud-hypervisor's rules.
        tap = parse_tap(o.string("tap", ""), o.at("tap"))
        mac = parse_mac(o.string("mac"), o.at("mac")) if o.string("mac", "") else random_mac()
        ip = _ipv4(o.string("ip"), o.at("ip")) if o.v.get("ip") is not None else None
        mask = _ipv4(o.string("mask"), o.at("mask")) if o.v.get("mask") is not None else None
    except ConfigError as e:
        raise ApiConfigError(e.what, e.hint) from None
    nq = o.int_in("num_queues", 2, 16, 2)
    if nq % 2:
        raise _err(o.at("num_queues"), f"{nq} is odd", "give an even number: one rx and one tx queue per pair")
    return NetConfig(tap=tap, mac=mac, ip=ip, mask=mask, num_queues=nq, queue_size=_queue_size(o, 256),
                     id=o.string("id", ""), pci_device_id=_pci_slot(o), iommu=o.get("iommu", bool, False))


def _rng(v: Any):
    from ..config import RngConfig

    o = _Obj(v, "rng", ("src", "iommu", "pci_device_id"), _RNG_DEFAULTS)
    src = o.string("src")
    if not src or not Path(src).exists():
        raise _err("rng.src", f"no such file: {src}", "e.g. /dev/urandom")
    return RngConfig(src=Path(src), iommu=o.get("iommu", bool, False), pci_device_id=_pci_slot(o))


def _device(v: Any, path: str):
    from ..config import SIM_PREFIX, DeviceConfig

    o = _Obj(v, path, ("path", "iommu", "id", "pci_device_id"), _DEVICE_DEFAULTS)
    name = o.string("path")
    if not name.startswith(SIM_PREFIX) and not Path(name).exists():
        raise _err(o.at("path"), f"no such device: {name}",
                   "give /sys/bus/pci/devices/DDDD:BB:DD.F, or sim:NAME for the simulated VFIO container")
    return DeviceConfig(path=name, iommu=o.get("iommu", bool, False), id=o.string("id", ""),
                        pci_device_id=_pci_slot(o))


def _list(o: _Obj, key: str) -> list:
    return o.get(key, list, [])


def from_json(body: Any):
    """A cloud-hypervisor VmConfig (parsed JSON) -> :class:`hyperpy.config.VmConfig`."""
    from ..config import (CpusConfig, DEFAULT_MEMORY_SIZE, IommuConfig, SerialConfig, ConsoleConfig, VmConfig,
                          named_taps)
    from ..memory import MemoryBacking

    o = _Obj(body, "", ("cpus", "memory", "payload", "disks", "net", "rng", "serial", "console",
                        "devices", "iommu"), _VM_DEFAULTS)
    if o.v.get("payload") is None:
        raise _err("payload", "is required", 'give {"kernel": PATH}')
    cfg = VmConfig(
        cpus=_cpus(o.v["cpus"]) if o.v.get("cpus") is not None else CpusConfig(),
        memory=_memory(o.v["memory"]) if o.v.get("memory") is not None else MemoryBacking(size=DEFAULT_MEMORY_SIZE),
        payload=_payload(o.v["payload"]),
        # cloud-hypervisor's defaults: serial to nowhere... unless asked; console off.
        serial=_output(o.v["serial"], "serial", False) if o.v.get("serial") is not None else SerialConfig("null"),
        console=_output(o.v["console"], "console", True) if o.v.get("console") is not None else ConsoleConfig("off"),
        disks=tuple(_disk(d, f"disks[{i}]") for i, d in enumerate(_list(o, "disks"))),
        nets=tuple(_net(n, f"net[{i}]") for i, n in enumerate(_list(o, "net"))),
        rng=_rng(o.v["rng"]) if o.v.get("rng") is not None else None,
        iommu=IommuConfig() if o.get("iommu", bool, False) else None,
        devices=tuple(_device(d, f"devices[{i}]") for i, d in enumerate(_list(o, "devices"))),
    )
    if cfg.iommu is None and cfg.iommu_endpoints():
        cfg = dataclasses.replace(cfg, iommu=IommuConfig())
    taps = named_taps(cfg.nets)
    if len(set(taps)) != len(taps):
        raise _err("net", "two devices use the same tap", "give each its own tap, or leave tap out for a generated one")
    slots = [d.pci_device_id for d in (*cfg.disks, *cfg.nets, cfg.rng, *cfg.devices)
             if d is not None and d.pci_device_id]
    if len(set(slots)) != len(slots):
        raise _err("pci_device_id", "two devices ask for the same PCI slot", "give each its own")
    if cfg.serial.mode == "tty" and cfg.console.mode == "tty":
        raise _err("console.mode", "serial and console cannot both be Tty", "send one to a File or Off")
    return cfg


# --------------------------------------------------------------------------- hyperpy -> JSON

_MODE_NAMES = {v: k for k, v in _MODES.items()}


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def to_json(cfg) -> dict:
    """:class:`hyperpy.config.VmConfig` -> a cloud-hypervisor VmConfig (for ``vm.info``)."""
    from ..config import TAP_TEMPLATE

    mem = cfg.memory
    out: dict[str, Any] = {
        "cpus": {"boot_vcpus": cfg.cpus.boot, "max_vcpus": cfg.cpus.boot},
        "memory": {"size": mem.size, "shared": mem.shared, "hugepages": mem.hugepages,
                   "hugepage_size": mem.hugepage_size if mem.hugepages else None,
                   "prefault": mem.prefault},
        "payload": _drop_none({"kernel": str(cfg.payload.kernel), "cmdline": cfg.payload.cmdline,
                               "initramfs": str(cfg.payload.initramfs) if cfg.payload.initramfs else None}),
        "serial": _drop_none({"mode": _MODE_NAMES[cfg.serial.mode],
                              "file": str(cfg.serial.path) if cfg.serial.path else None}),
        "console": _drop_none({"mode": _MODE_NAMES[cfg.console.mode],
                               "file": str(cfg.console.path) if cfg.console.path else None,
                               "iommu": cfg.console.iommu}),
        "iommu": cfg.iommu is not None,
    }
    out["memory"] = _drop_none(out["memory"])
    if cfg.disks:
        out["disks"] = [_drop_none({"path": str(d.path), "readonly": d.readonly, "direct": d.direct,
                                    "iommu": d.iommu, "num_queues": d.num_queues, "queue_size": d.queue_size,
                                    "id": d.id or None, "pci_device_id": d.pci_device_id}) for d in cfg.disks]
    if cfg.nets:
        # The default template is what "no tap given" became: reported as absent, as given.
        out["net"] = [_drop_none({"tap": None if n.tap == TAP_TEMPLATE else n.tap,
                                  "mac": n.mac.hex(":"), "ip": n.ip, "mask": n.mask,
                                  "iommu": n.iommu, "num_queues": n.num_queues, "queue_size": n.queue_size,
                                  "id": n.id or None, "pci_device_id": n.pci_device_id}) for n in cfg.nets]
    if cfg.rng is not None:
        out["rng"] = _drop_none({"src": str(cfg.rng.src), "iommu": cfg.rng.iommu,
                                 "pci_device_id": cfg.rng.pci_device_id})
    if cfg.devices:
        out["devices"] = [_drop_none({"path": d.path, "iommu": d.iommu, "id": d.id or None,
                                      "pci_device_id": d.pci_device_id}) for d in cfg.devices]
    return out
