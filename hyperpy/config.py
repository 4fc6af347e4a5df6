"""Command-line option strings -> validated, frozen configuration dataclasses.

The syntax follows cloud-hypervisor: ``--cpus boot=2,features=[-avx2]``,
``--memory size=1G,shared=on``, ``--serial tty|off|null|file=PATH``.  Every problem is a
:class:`~hyperpy.errors.ConfigError` whose message is one line naming the option, the key and
the offending value.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import layout
from .errors import ConfigError
from .memory import HUGEPAGE_SIZES, MemoryBacking, warn_unless_hugetlbfs

log = logging.getLogger(__name__)

DEFAULT_MEMORY_SIZE = 512 * layout.MiB
MAX_VCPUS = 255
BUILTIN_PREFIX = "builtin:"
KERNEL_HINT = "give the path of a PVH ELF, vmlinux or bzImage, or builtin:hello"

_SIZE_RE = re.compile(r"(\d+)\s*([a-z]*)")
_SIZE_SHIFTS = {
    "": 0, "b": 0,
    "k": 10, "kb": 10, "kib": 10,
    "m": 20, "mb": 20, "mib": 20,
    "g": 30, "gb": 30, "gib": 30,
    "t": 40, "tb": 40, "tib": 40,
}
_TRUE = ("on", "true")
_FALSE = ("off", "false")


# --------------------------------------------------------------------------- value parsers


def parse_size(value: str, option: str = "--memory size") -> int:
    """``"512M"`` -> 536870912.  Plain bytes or a K/M/G/T suffix (binary, any case, ``MiB``/``MB``
    spellings too)."""
    m = _SIZE_RE.fullmatch(value.strip().lower())
    if m is None or m.group(2) not in _SIZE_SHIFTS:
        raise ConfigError(f"{option}: {value!r} is not a size (use e.g. 512M, 2G)")
    return int(m.group(1)) << _SIZE_SHIFTS[m.group(2)]


def parse_bool(value: str, option: str) -> bool:
    """``on``/``off`` (also ``true``/``false``), any case."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{option}: {value!r} is not on or off")


def parse_int(value: str, option: str, lo: int, hi: int) -> int:
    """A decimal integer in ``[lo, hi]``."""
    try:
        n = int(value.strip(), 10)
    except ValueError:
        raise ConfigError(f"{option}: {value!r} is not a number") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{option}: {n} is out of range (give {lo} to {hi})")
    return n


def parse_list(value: str, option: str) -> list[str]:
    """``[a,b]`` or ``a`` -> items, blanks dropped."""
    v = value.strip()
    if v.startswith("[") and v.endswith("]"):
        v = v[1:-1]
    return [item.strip() for item in split_items(v, option) if item.strip()]


def unquote(value: str) -> str:
    """Strip one pair of matching surrounding quotes."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


# --------------------------------------------------------------------------- option splitter


def split_items(text: str, option: str) -> list[str]:
    """Split on commas that are outside ``[...]`` and quotes."""
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"{option}: unbalanced ']' in {text!r}")
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote:
        raise ConfigError(f"{option}: unterminated quote in {text!r}")
    if depth:
        raise ConfigError(f"{option}: unbalanced '[' in {text!r}")
    items.append("".join(cur))
    return items


def _unknown_key(option: str, key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    maybe = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{option}: unknown key {key!r} ({maybe}known: {', '.join(known)})")


def split_options(option: str, value: str, known: Sequence[str],
                  bare_key: str | None = None, keep_empty: Sequence[str] = ()) -> dict[str, str]:
    """``"key=value,key=[a,b]"`` -> ``{key: value}`` with every key in ``known``.

    Values may hold commas inside ``[...]`` or quotes (quotes are removed).  When ``bare_key``
    is given, a first item without ``=`` is its value (``--cpus 2`` means ``boot=2``).

    As in cloud-hypervisor, an empty value (``mac=``, ``tap=``, ``iommu=``) is the same as
    leaving the key out: the default, or a generated value, applies.  Keys in ``keep_empty``
    are returned with their empty value instead, for the parser to refuse (a path, say).
    """
    if not value.strip():
        raise ConfigError(f"{option}: empty value (known keys: {', '.join(known)})")
    out: dict[str, str] = {}
    seen: set[str] = set()
    for i, item in enumerate(split_items(value, option)):
        item = item.strip()
        if not item:
            raise ConfigError(f"{option}: empty item in {value!r}")
        key, eq, val = item.partition("=")
        key = key.strip().lower()
        if not eq:
            if i == 0 and bare_key is not None:
                key, val = bare_key, item
            else:
                raise ConfigError(f"{option}: {item!r} is not key=value "
                                  f"(known keys: {', '.join(known)})")
        if key not in known:
            raise _unknown_key(option, key, known)
        if key in seen:
            raise ConfigError(f"{option}: key {key!r} given twice")
        seen.add(key)
        val = unquote(val.strip())
        if val or key in keep_empty:
            out[key] = val
    return out


# --------------------------------------------------------------------------- --cpus


@dataclass(frozen=True)
class CpusConfig:
    """vCPU count and the CPUID features hidden from the guest (names without the ``-``)."""

    boot: int = 1
    features: tuple[str, ...] = ()


CPUS_KEYS = ("boot", "features")


def parse_feature_mask(value: str, option: str = "--cpus features") -> tuple[str, ...]:
    """``[-avx2,-popcnt]`` or ``-avx2`` -> ``("avx2", "popcnt")``, names checked."""
    from .cpuid import FEATURES

    names: list[str] = []
    for item in parse_list(value, option):
        if not item.startswith("-"):
            raise ConfigError(f"{option}: {item!r} must be written -{item.lstrip('+')} "
                              "(features can only be hidden)")
        name = item[1:].strip().lower()
        if name not in FEATURES:
            raise ConfigError(f"{option}: unknown CPU feature {name!r} (see hyperpy run --help)")
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_cpus(value: str | None) -> CpusConfig:
    """``--cpus boot=N[,features=[-NAME,...]]``."""
    if value is None:
        return CpusConfig()
    opts = split_options("--cpus", value, CPUS_KEYS, bare_key="boot")
    boot = parse_int(opts["boot"], "--cpus boot", 1, MAX_VCPUS) if "boot" in opts else 1
    features = parse_feature_mask(opts["features"]) if "features" in opts else ()
    _warn_dependents(features)
    return CpusConfig(boot=boot, features=features)


def _warn_dependents(features: tuple[str, ...]) -> None:
    from .cpuid import unmasked_dependents

    left = unmasked_dependents(features)
    if left:
        log.warning("--cpus features: features that need a hidden one stay visible: %s "
                    "(hide them too)", ", ".join(left))


# --------------------------------------------------------------------------- --memory

MemoryConfig = MemoryBacking
"""``--memory`` parses straight into :class:`hyperpy.memory.MemoryBacking`."""

MEMORY_KEYS = ("size", "shared", "file", "hugepages", "hugepage_size", "prefault")


def parse_hugepage_size(value: str) -> int:
    size = parse_size(value, "--memory hugepage_size")
    if size not in HUGEPAGE_SIZES:
        raise ConfigError(f"--memory hugepage_size: {value!r} is not a huge page size (use 2M or 1G)")
    return size


def existing_path(value: str, option: str, hint: str) -> Path:
    """``value`` as a Path that must exist."""
    if not value:
        raise ConfigError(f"{option}: empty path ({hint})")
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{option}: no such file: {path} ({hint})")
    return path


def parse_memory(value: str | None) -> MemoryBacking:
    """``--memory size=512M[,shared=on][,file=PATH][,hugepages=on][,hugepage_size=2M|1G]
    [,prefault=on]``."""
    if value is None:
        return MemoryBacking(size=DEFAULT_MEMORY_SIZE)
    opts = split_options("--memory", value, MEMORY_KEYS, bare_key="size", keep_empty=("file",))
    size = parse_size(opts["size"], "--memory size") if "size" in opts else DEFAULT_MEMORY_SIZE
    if size <= 0:
        raise ConfigError(f"--memory size: {opts['size']!r} must be more than 0 (e.g. 512M)")
    file = None
    if "file" in opts:
        file = existing_path(opts["file"], "--memory file",
                             "give an existing file or a hugetlbfs directory such as /dev/hugepages")
        if file.is_dir():
            warn_unless_hugetlbfs(file)
    # A backing file only makes sense when writes reach it: shared unless said otherwise.
    shared = parse_bool(opts["shared"], "--memory shared") if "shared" in opts else file is not None
    hugepages = parse_bool(opts["hugepages"], "--memory hugepages") if "hugepages" in opts else False
    hugepage_size = 2 * layout.MiB
    if "hugepage_size" in opts:
        hugepage_size = parse_hugepage_size(opts["hugepage_size"])
        if not hugepages:
            raise ConfigError(f"--memory hugepage_size: {opts['hugepage_size']!r} needs hugepages=on")
    if hugepages and size % hugepage_size:
        raise ConfigError(f"--memory size: {opts.get('size', '512M')!r} is not a multiple of the "
                          f"huge page size {hugepage_size >> 20}M")
    prefault = parse_bool(opts["prefault"], "--memory prefault") if "prefault" in opts else False
    return MemoryBacking(size=size, shared=shared, file=file, hugepages=hugepages,
                         hugepage_size=hugepage_size, prefault=prefault)


# --------------------------------------------------------------------------- payload


@dataclass(frozen=True)
class PayloadConfig:
    """What to boot: kernel image, optional initramfs, kernel command line."""

    kernel: Path
    initramfs: Path | None = None
    cmdline: str = ""


def _readable_file(value: str, option: str, hint: str) -> Path:
    path = existing_path(value, option, hint)
    if not path.is_file():
        raise ConfigError(f"{option}: {path} is not a file ({hint})")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option}: cannot read {path}: permission denied")
    return path


def resolve_kernel(value: str | None) -> Path:
    """``--kernel PATH`` or ``--kernel builtin:NAME`` -> path of the image."""
    if value is None or not value.strip():
        raise ConfigError(f"--kernel is required ({KERNEL_HINT})")
    if value.startswith(BUILTIN_PREFIX):
        try:
            from .guests import builtin_kernel
        except ImportError as e:
            if e.name != "hyperpy.guests":
                raise
            raise ConfigError(f"--kernel: {value!r}: built-in guests are not available "
                              "in this installation") from None
        return builtin_kernel(value[len(BUILTIN_PREFIX):])
    return _readable_file(value, "--kernel", KERNEL_HINT)


def parse_cmdline(value: str | None) -> str:
    cmdline = value or ""
    if "\0" in cmdline:
        raise ConfigError("--cmdline: contains a NUL byte")
    if len(cmdline.encode()) >= layout.CMDLINE_MAX_SIZE:
        raise ConfigError(f"--cmdline: {len(cmdline.encode())} bytes is too long "
                          f"(at most {layout.CMDLINE_MAX_SIZE - 1})")
    return cmdline


def parse_payload(kernel: str | None, initramfs: str | None, cmdline: str | None) -> PayloadConfig:
    kernel_path = resolve_kernel(kernel)
    initrd = None
    if initramfs is not None:
        initrd = _readable_file(initramfs, "--initramfs", "give the path of a cpio archive")
    return PayloadConfig(kernel=kernel_path, initramfs=initrd, cmdline=parse_cmdline(cmdline))


# --------------------------------------------------------------------------- serial / console

OutputMode = Literal["tty", "file", "off", "null"]
OUTPUT_MODES: tuple[OutputMode, ...] = ("tty", "file", "off", "null")


@dataclass(frozen=True)
class SerialConfig:
    """Where the guest's COM1 goes: the terminal, a file, nowhere (off: no device; null: device
    present, output dropped)."""

    mode: OutputMode = "tty"
    path: Path | None = None


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the virtio console goes (same modes as :class:`SerialConfig`)."""

    mode: OutputMode = "off"
    path: Path | None = None
    iommu: bool = False


def parse_output(option: str, value: str) -> tuple[OutputMode, Path | None]:
    """``tty|off|null|file=PATH`` -> (mode, path)."""
    v = value.strip()
    key, eq, rest = v.partition("=")
    key = key.strip().lower()
    if not eq and key in ("tty", "off", "null"):
        return key, None  # type: ignore[return-value]
    if eq and key == "file":
        raw = unquote(rest.strip())
        if not raw:
            raise ConfigError(f"{option}: file= needs a path (e.g. file=/tmp/serial.log)")
        path = Path(raw).expanduser()
        if path.is_dir():
            raise ConfigError(f"{option}: {path} is a directory (give a file path)")
        if not path.parent.is_dir():
            raise ConfigError(f"{option}: no such directory: {path.parent}")
        return "file", path
    raise ConfigError(f"{option}: {value!r} is not one of tty, off, null, file=PATH")


def parse_serial(value: str | None) -> SerialConfig:
    if value is None:
        return SerialConfig()
    mode, path = parse_output("--serial", value)
    return SerialConfig(mode, path)


def parse_console(value: str | None) -> ConsoleConfig:
    if value is None:
        return ConsoleConfig()
    iommu = False
    head, sep, tail = value.rpartition(",")
    if sep and tail.strip().lower().startswith("iommu="):
        flag = tail.strip()[len("iommu="):].strip()
        iommu = parse_bool(flag, "--console iommu") if flag else False   # iommu= is off
        value = head
    mode, path = parse_output("--console", value)
    if iommu and mode == "off":
        raise ConfigError("--console: iommu=on needs a console (tty, null or file=PATH)")
    return ConsoleConfig(mode, path, iommu)


# --------------------------------------------------------------------------- devices

DISK_KEYS = ("path", "readonly", "direct", "num_queues", "queue_size", "id", "pci_device_id", "iommu")
NET_KEYS = ("tap", "mac", "ip", "mask", "num_queues", "queue_size", "id", "pci_device_id", "iommu")
RNG_KEYS = ("src", "iommu", "pci_device_id")
MAX_QUEUE_SIZE = 32768
TAP_TEMPLATE = "vmtap%d"      # an empty tap=: the kernel names the tap vmtap0, vmtap1, ...
MAC_MULTICAST_BIT = 0x01      # of the first byte (IEEE 802: I/G)
MAC_LOCAL_BIT = 0x02          # of the first byte (IEEE 802: U/L, locally administered)


@dataclass(frozen=True)
class DiskConfig:
    """One ``--disk``: a raw image served by virtio-blk."""

    path: Path
    readonly: bool = False
    direct: bool = False
    num_queues: int = 1
    queue_size: int = 256
    id: str = ""
    pci_device_id: int | None = None
    iommu: bool = False


@dataclass(frozen=True)
class NetConfig:
    """One ``--net``: virtio-net over a host TAP device.  ``tap`` may be a template such as
    ``vmtap%d`` (:data:`TAP_TEMPLATE`), which the kernel turns into a free name."""

    tap: str
    mac: bytes
    ip: str | None = None
    mask: str | None = None
    num_queues: int = 2
    queue_size: int = 256
    id: str = ""
    pci_device_id: int | None = None
    iommu: bool = False


@dataclass(frozen=True)
class RngConfig:
    src: Path = Path("/dev/urandom")
    iommu: bool = False
    pci_device_id: int | None = None


def _queue_size(value: str, option: str) -> int:
    n = parse_int(value, option, 1, MAX_QUEUE_SIZE)
    if n & (n - 1):
        raise ConfigError(f"{option}: {value!r} is not a power of two (e.g. 256)")
    return n


def _pci_slot(value: str, option: str) -> int:
    return parse_int(value, option, 1, 31)   # slot 0 is the host bridge


def parse_disk(value: str) -> DiskConfig:
    """``--disk path=F[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,id=..]``."""
    o = split_options("--disk", value, DISK_KEYS, bare_key="path")
    if "path" not in o:
        raise ConfigError("--disk: path= is required (e.g. --disk path=disk.img)")
    path = Path(unquote(o["path"])).expanduser()
    if not path.exists():
        raise ConfigError(f"--disk path: no such file: {path} (give a raw disk image)")
    if path.is_dir():
        raise ConfigError(f"--disk path: {path} is a directory (give a raw disk image)")
    return DiskConfig(
        path=path,
        readonly=parse_bool(o["readonly"], "--disk readonly") if "readonly" in o else False,
        direct=parse_bool(o["direct"], "--disk direct") if "direct" in o else False,
        num_queues=parse_int(o["num_queues"], "--disk num_queues", 1, 64) if "num_queues" in o else 1,
        queue_size=_queue_size(o["queue_size"], "--disk queue_size") if "queue_size" in o else 256,
        id=unquote(o.get("id", "")),
        pci_device_id=_pci_slot(o["pci_device_id"], "--disk pci_device_id") if "pci_device_id" in o else None,
        iommu=parse_bool(o["iommu"], "--disk iommu") if "iommu" in o else False,
    )


def parse_mac(value: str, option: str) -> bytes:
    parts = value.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or any(len(p) != 2 for p in parts):
        raise ConfigError(f"{option}: {value!r} is not a MAC address (e.g. 52:54:00:12:34:56)")
    if mac[0] & 1:
        raise ConfigError(f"{option}: {value!r} is a multicast address (the first byte must be even)")
    return mac


def random_mac() -> bytes:
    """A random locally administered unicast MAC, what cloud-hypervisor gives a device whose
    ``mac=`` is empty or absent: bit 1 of the first byte set (local), bit 0 clear (unicast)."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & ~MAC_MULTICAST_BIT & 0xFF) | MAC_LOCAL_BIT
    return bytes(mac)


def is_tap_template(name: str) -> bool:
    """A name with ``%d``: the kernel fills in the first number no interface uses."""
    return "%" in name


def tap_name_problem(name: str) -> str | None:
    """Why the kernel would refuse ``name`` as an interface name or name template (the rules of
    its dev_valid_name and dev_alloc_name), or None."""
    from ._fast.netio import IFNAMSIZ      # <linux/if.h>: the name and its NUL

    if len(name.encode()) >= IFNAMSIZ:
        return f"is not a valid interface name (at most {IFNAMSIZ - 1} characters)"
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        return "is not a valid interface name (no '/', ':' or white space; not . or ..)"
    if is_tap_template(name) and (name.count("%") != 1 or "%d" not in name):
        return f"is not a valid interface name template (one %d, e.g. {TAP_TEMPLATE})"
    return None


def parse_tap(value: str, option: str = "--net tap") -> str:
    """``tap=NAME``; empty or absent -> :data:`TAP_TEMPLATE` (the kernel picks the number)."""
    name = value or TAP_TEMPLATE
    problem = tap_name_problem(name)
    if problem:
        raise ConfigError(f"{option}: {name!r} {problem}")
    return name


def _ipv4(value: str, option: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigError(f"{option}: {value!r} is not an IPv4 address") from None


def parse_net(value: str) -> NetConfig:
    """``--net [tap=NAME][,mac=..][,ip=..,mask=..][,num_queues=N][,queue_size=N]``.

    An empty or absent ``tap=`` creates a tap named by the kernel from ``vmtap%d``; an empty or
    absent ``mac=`` is a random locally administered one (cloud-hypervisor's rules)."""
    o = split_options("--net", value, NET_KEYS) if value.strip() else {}
    nq = parse_int(o["num_queues"], "--net num_queues", 2, 16) if "num_queues" in o else 2
    if nq % 2:
        raise ConfigError(f"--net num_queues: {nq} is odd (give an even number, 2 to 16: "
                          "one rx and one tx queue per pair)")
    return NetConfig(
        tap=parse_tap(o.get("tap", "")),
        mac=parse_mac(o["mac"], "--net mac") if "mac" in o else random_mac(),
        ip=_ipv4(o["ip"], "--net ip") if "ip" in o else None,
        mask=_ipv4(o["mask"], "--net mask") if "mask" in o else None,
        num_queues=nq,
        queue_size=_queue_size(o["queue_size"], "--net queue_size") if "queue_size" in o else 256,
        id=o.get("id", ""),
        pci_device_id=_pci_slot(o["pci_device_id"], "--net pci_device_id") if "pci_device_id" in o else None,
        iommu=parse_bool(o["iommu"], "--net iommu") if "iommu" in o else False,
    )


def named_taps(nets: Sequence[NetConfig]) -> list[str]:
    """The taps asked for by name (templates get distinct names from the kernel)."""
    return [n.tap for n in nets if not is_tap_template(n.tap)]


def parse_rng(value: str | None) -> RngConfig | None:
    """``--rng [src=/dev/urandom][,iommu=on]``."""
    if value is None:
        return None
    o = split_options("--rng", value, RNG_KEYS, bare_key="src") if value.strip() else {}
    src = Path(unquote(o.get("src", "/dev/urandom"))).expanduser()
    if not src.exists():
        raise ConfigError(f"--rng src: no such file: {src} (e.g. src=/dev/urandom)")
    return RngConfig(src=src,
                     iommu=parse_bool(o["iommu"], "--rng iommu") if "iommu" in o else False,
                     pci_device_id=_pci_slot(o["pci_device_id"], "--rng pci_device_id") if "pci_device_id" in o else None)


IOMMU_KEYS = ("page_sizes", "bypass", "max_mappings", "max_domains", "pci_device_id")
DEVICE_KEYS = ("path", "iommu", "id", "pci_device_id", "entry_limit", "pin_ns", "batching")
SIM_PREFIX = "sim:"


@dataclass(frozen=True)
class IommuConfig:
    """``--iommu``: the virtio-iommu the ``iommu=on`` devices sit behind."""

    page_sizes: tuple[int, ...] = (4 * layout.KiB, 2 * layout.MiB, layout.GiB)
    bypass: bool = False
    max_mappings: int = 1 << 20
    max_domains: int = 1024
    pci_device_id: int | None = None


@dataclass(frozen=True)
class DeviceConfig:
    """``--device``: a passed-through host PCI device (VFIO), or ``sim:NAME``, the simulated
    type1 container used by tests and benchmarks on hosts without /dev/vfio."""

    path: str
    iommu: bool = False
    id: str = ""
    pci_device_id: int | None = None
    entry_limit: int | None = None   # simulation only: the container's dma_entry_limit
    pin_ns: int = 0                  # simulation only: modelled pinning cost per 4 KiB page
    batching: bool = True            # coalesce adjacent guest MAPs into one host MAP_DMA per extent

    @property
    def simulated(self) -> bool:
        return self.path.startswith(SIM_PREFIX)


def parse_iommu(value: str | None) -> IommuConfig | None:
    """``--iommu [page_sizes=4K,2M,1G][,bypass=on][,max_mappings=N][,max_domains=N]``."""
    if value is None:
        return None
    # Accept the unbracketed list of the syntax too: page_sizes=4K,2M,1G.
    items, merged = split_items(value, "--iommu") if value.strip() else [], []
    for item in items:
        if "=" not in item and merged and merged[-1].startswith("page_sizes="):
            merged[-1] += "," + item
        else:
            merged.append(item)
    merged = [f"page_sizes=[{m[len('page_sizes='):]}]" if m.startswith("page_sizes=") and "," in m
              and not m[len("page_sizes="):].startswith("[") else m for m in merged]
    o = split_options("--iommu", ",".join(merged), IOMMU_KEYS) if merged else {}
    sizes = IommuConfig.page_sizes
    if "page_sizes" in o:
        sizes = tuple(sorted({parse_size(v, "--iommu page_sizes") for v in parse_list(o["page_sizes"], "--iommu page_sizes")}))
        if not sizes or any(sz < 4096 or sz & (sz - 1) for sz in sizes):
            raise ConfigError(f"--iommu page_sizes: {o['page_sizes']!r} must be powers of two of at least 4K (e.g. 4K,2M,1G)")
    return IommuConfig(
        page_sizes=sizes,
        bypass=parse_bool(o["bypass"], "--iommu bypass") if "bypass" in o else False,
        max_mappings=parse_int(o["max_mappings"], "--iommu max_mappings", 1, 1 << 24) if "max_mappings" in o else 1 << 20,
        max_domains=parse_int(o["max_domains"], "--iommu max_domains", 1, 1 << 16) if "max_domains" in o else 1024,
        pci_device_id=_pci_slot(o["pci_device_id"], "--iommu pci_device_id") if "pci_device_id" in o else None,
    )


def parse_device(value: str) -> DeviceConfig:
    """``--device path=/sys/bus/pci/devices/DDDD:BB:DD.F[,iommu=on]`` or ``path=sim:NAME``."""
    o = split_options("--device", value, DEVICE_KEYS, bare_key="path")
    path = unquote(o.get("path", ""))
    if not path:
        raise ConfigError("--device: path= is required (e.g. path=/sys/bus/pci/devices/0000:01:00.0)")
    sim = path.startswith(SIM_PREFIX)
    if not sim and re.fullmatch(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]", path):
        path = f"/sys/bus/pci/devices/{path.lower()}"      # a bare DDDD:BB:DD.F
    if not sim and not Path(path).exists():
        raise ConfigError(f"--device path: no such device: {path} (give /sys/bus/pci/devices/DDDD:BB:DD.F, "
                          "or sim:NAME for the simulated VFIO container)")
    for key in ("entry_limit", "pin_ns"):
        if key in o and not sim:
            raise ConfigError(f"--device {key}: only for simulated devices (path=sim:NAME)")
    return DeviceConfig(
        path=path,
        iommu=parse_bool(o["iommu"], "--device iommu") if "iommu" in o else False,
        id=unquote(o.get("id", "")),
        pci_device_id=_pci_slot(o["pci_device_id"], "--device pci_device_id") if "pci_device_id" in o else None,
        entry_limit=parse_int(o["entry_limit"], "--device entry_limit", 1, 1 << 24) if "entry_limit" in o else None,
        pin_ns=parse_int(o["pin_ns"], "--device pin_ns", 0, 10**9) if "pin_ns" in o else 0,
        batching=parse_bool(o["batching"], "--device batching") if "batching" in o else True,
    )


# --------------------------------------------------------------------------- whole VM


@dataclass(frozen=True)
class VmConfig:
    """Everything ``hyperpy run`` was asked to do, validated."""

    cpus: CpusConfig
    memory: MemoryBacking
    payload: PayloadConfig
    serial: SerialConfig = SerialConfig()
    console: ConsoleConfig = ConsoleConfig()
    disks: tuple[DiskConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    rng: RngConfig | None = None
    iommu: IommuConfig | None = None
    devices: tuple[DeviceConfig, ...] = ()

    def iommu_endpoints(self) -> list:
        """The device configs tagged ``iommu=on`` (console included)."""
        found = [d for d in (*self.disks, *self.nets, self.rng, *self.devices) if d is not None and d.iommu]
        return found + ([self.console] if self.console.iommu else [])


def build_vm_config(cpus: str | None = None, memory: str | None = None,
                    kernel: str | None = None, initramfs: str | None = None,
                    cmdline: str | None = None, serial: str | None = None,
                    console: str | None = None, disks: Sequence[str] = (),
                    nets: Sequence[str] = (), rng: str | None = None,
                    iommu: str | None = None, devices: Sequence[str] = ()) -> VmConfig:
    """Parse and check every option; the first problem is raised as one ConfigError."""
    cfg = VmConfig(
        cpus=parse_cpus(cpus),
        memory=parse_memory(memory),
        payload=parse_payload(kernel, initramfs, cmdline),
        serial=parse_serial(serial),
        console=parse_console(console),
        disks=tuple(parse_disk(d) for d in disks),
        nets=tuple(parse_net(n) for n in nets),
        rng=parse_rng(rng),
        iommu=parse_iommu(iommu),
        devices=tuple(parse_device(d) for d in devices),
    )
    if cfg.iommu is None and cfg.iommu_endpoints():
        cfg = dataclasses.replace(cfg, iommu=IommuConfig())   # iommu=on implies a virtio-iommu
    taps = named_taps(cfg.nets)
    if len(set(taps)) != len(taps):
        raise ConfigError("--net: two devices use the same tap (give each its own tap=NAME, "
                          "or leave tap= empty for a generated one)")
    slots = [d.pci_device_id for d in (*cfg.disks, *cfg.nets, cfg.rng, cfg.iommu, *cfg.devices)
             if d is not None and d.pci_device_id]
    if len(set(slots)) != len(slots):
        raise ConfigError("pci_device_id: two devices ask for the same PCI slot")
    if cfg.serial.mode == "tty" and cfg.console.mode == "tty":
        raise ConfigError("--serial and --console cannot both be tty (send one to a file or off)")
    return cfg
