"""The Linux guest kit: Debian's 6.12 cloud kernel plus a busybox initramfs built per test.

``scripts/build-guest-kit.sh DIR`` downloads and unpacks the packages once (cached outside the
repository, default ``${XDG_CACHE_HOME:-~/.cache}/hyperpy/guest-kit``, or ``$HYPERPY_GUEST_KIT``);
this module turns a kit into initramfs archives:

    kit = linuxkit.ensure_kit()                     # builds the kit if it is missing
    initrd = linuxkit.build_initramfs(kit, "echo hello", ["virtio_blk"], {"/data": b"..."}, out)

The archive (cpio "newc", written here) holds busybox, the named modules and everything they
depend on (from modules.dep, decompressed, loaded in dependency order by the generated /init),
the extra files, and an /init that mounts /proc, /sys and /dev, loads the modules, runs the
test's script and powers the machine off (``poweroff -f``: ACPI, so QEMU exits).

Guest scripts report with ``check NAME COMMAND...``: a line ``HPCHECK ok NAME`` or
``HPCHECK fail NAME`` on the console; :func:`parse_checks` reads them back.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build-guest-kit.sh"

#: Modules every virtio test guest may want (the lead's VFIO test adds vfio_pci & co.).
VIRTIO_MODULES = ["virtio_blk", "virtio_net", "virtio_iommu"]


def default_kit_dir() -> Path:
    if os.environ.get("HYPERPY_GUEST_KIT"):
        return Path(os.environ["HYPERPY_GUEST_KIT"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hyperpy" / "guest-kit"


@dataclass(frozen=True)
class Kit:
    dir: Path
    version: str            # kernel release, e.g. 6.12.117+deb12-cloud-amd64
    package: str            # the Debian package it came from
    ext4: str               # "builtin", "module" or "absent"

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def busybox(self) -> Path:
        return self.dir / "busybox"

    @property
    def modules_dir(self) -> Path:
        return self.dir / "lib" / "modules" / self.version


class KitError(RuntimeError):
    pass


def load_kit(kit_dir: Path | None = None) -> Kit:
    """The kit in ``kit_dir`` (KitError if it is not complete)."""
    d = Path(kit_dir or default_kit_dir())
    info_file = d / "kit.txt"
    if not info_file.exists() or "ready" not in info_file.read_text().split():
        raise KitError(f"no complete guest kit in {d} (run scripts/build-guest-kit.sh {d})")
    info = dict(line.split("=", 1) for line in info_file.read_text().split("\n") if "=" in line)
    kit = Kit(d, info["version"], info.get("kernel", "?"), info.get("ext4", "absent"))
    for p in (kit.vmlinuz, kit.busybox, kit.modules_dir / "modules.dep"):
        if not p.exists():
            raise KitError(f"guest kit {d} lacks {p.name} (rebuild it: rm -r {d}; "
                           f"scripts/build-guest-kit.sh {d})")
    return kit


def ensure_kit(kit_dir: Path | None = None, timeout: float = 900) -> Kit:
    """Load the kit, building it first (scripts/build-guest-kit.sh) when it is missing."""
    d = Path(kit_dir or default_kit_dir())
    try:
        return load_kit(d)
    except KitError:
        pass
    r = subprocess.run(["bash", str(BUILD_SCRIPT), str(d)], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise KitError(f"scripts/build-guest-kit.sh {d} failed: {' | '.join(tail)}")
    return load_kit(d)


# ---------------------------------------------------------------------------- modules

def _modname(path_or_name: str) -> str:
    base = Path(path_or_name).name
    base = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base)
    return base.replace("-", "_")


def module_deps(kit: Kit) -> dict[str, tuple[str, list[str]]]:
    """{module name: (path relative to the module dir, [dependency names])} from modules.dep."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in (kit.modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        out[_modname(path)] = (path.strip(), [_modname(d) for d in deps.split()])
    return out


def builtin_modules(kit: Kit) -> set[str]:
    f = kit.modules_dir / "modules.builtin"
    return {_modname(x) for x in f.read_text().split()} if f.exists() else set()


def resolve_modules(kit: Kit, names: list[str]) -> list[str]:
    """Module paths (relative to the module dir) to load, dependencies first; built-in modules
    are skipped; an unknown name raises KitError."""
    deps = module_deps(kit)
    builtin = builtin_modules(kit)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name in builtin:
            seen.add(name)
            return
        if name not in deps:
            raise KitError(f"module {name} is neither in modules.dep nor built into {kit.version}")
        if name in chain:
            raise KitError(f"module dependency loop: {' -> '.join(chain + (name,))}")
        for d in deps[name][1]:
            visit(d, chain + (name,))
        seen.add(name)
        order.append(deps[name][0])

    for n in names:
        visit(n, ())
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-d", "-q", "-c"], input=data, capture_output=True,
                              check=True).stdout
    if path.suffix == ".gz":
        import gzip
        return gzip.decompress(data)
    return data


# ---------------------------------------------------------------------------- cpio

class _Cpio:
    """A cpio "newc" archive (the format the kernel's initramfs unpacker reads)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.lstrip("/")
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        self.ino += 1
        blob = hdr.encode() + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.parts.append(blob)

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        parent = os.path.dirname(name)
        if parent:
            self.dir(parent)
        self.dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.dir(parent)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def node(self, name: str, mode: int, major: int, minor: int) -> None:
        name = name.lstrip("/")
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, 0, 0, 0, 0, major, minor, len(name) + 1, 0))
        self.ino += 1
        blob = hdr.encode() + name.encode() + b"\0"
        self.parts.append(blob + b"\0" * (-len(blob) % 4))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = b"".join(self.parts)
        return data + b"\0" * (-len(data) % 512)


INIT_PREAMBLE = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
check() { name=$1; shift; if "$@"; then echo "HPCHECK ok $name"; else echo "HPCHECK fail $name"; fi; }
echo HPBOOT up
"""
INIT_EPILOGUE = """
echo HPDONE
sync
poweroff -f
"""


def build_initramfs(kit: Kit, init_script: str, modules: list[str],
                    extra_files: dict[str, bytes | str | Path] | None = None,
                    out: Path | None = None) -> Path:
    """Write an initramfs whose /init loads ``modules`` (with dependencies) and runs
    ``init_script`` (busybox sh), then powers off.  ``extra_files`` maps guest paths to bytes,
    text or a host file.  Returns the archive's path (``out``, default in the kit's dir)."""
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "mnt", "etc", "lib/modules"):
        c.dir(d)
    c.node("dev/console", stat.S_IFCHR | 0o600, 5, 1)
    c.file("bin/busybox", kit.busybox.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    loads = []
    for rel in resolve_modules(kit, modules):
        name = re.sub(r"\.(xz|zst|gz)$", "", Path(rel).name)
        c.file(f"lib/modules/{name}", _module_bytes(kit.modules_dir / rel))
        loads.append(f"insmod /lib/modules/{name} || echo 'HPCHECK fail insmod-{name}'")
    for guest_path, content in (extra_files or {}).items():
        if isinstance(content, Path):
            content = content.read_bytes()
        elif isinstance(content, str):
            content = content.encode()
        c.file(guest_path, content, 0o755 if guest_path.endswith(".sh") else 0o644)
    init = INIT_PREAMBLE + "\n".join(loads) + "\n" + init_script + INIT_EPILOGUE
    c.file("init", init.encode(), 0o755)
    out = Path(out) if out else kit.dir / "initramfs.cpio"
    out.write_bytes(c.finish())
    return out


def parse_checks(console: str) -> dict[str, bool]:
    """{check name: passed} from the ``HPCHECK ok|fail NAME`` lines of a console log."""
    res: dict[str, bool] = {}
    for m in re.finditer(r"HPCHECK (ok|fail) (\S+)", console):
        res[m.group(2)] = res.get(m.group(2), True) and m.group(1) == "ok"
    return res
