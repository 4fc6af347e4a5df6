#!/usr/bin/env python3
"""Build the hyperpy test guests (stdlib only; needs gcc and objcopy).

    build_guest("hello", Path("out"))  -> out/hello.elf
    build_all(Path("out"))             -> {"hello": out/hello.elf, ...}
    python3 tests/guests/build.py OUT_DIR [NAME ...]

Each guest is one C file linked with one entry runtime (pvh_start.S or linux64_start.S, plus
longmode.S and lib.c) by guest.ld into a small ELF64 image at 1 MiB. "bzimage" is hello64.c
wrapped into a Linux bzImage (out/bzimage.bin) by mkbzimage.py. Outputs are rebuilt only when
a source (or this file) is newer, and are replaced atomically, so concurrent builds are safe.
Works when imported from a file path (importlib), whatever the current directory.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC_DIR = Path(__file__).resolve().parent

CC = os.environ.get("HYPERPY_GUEST_CC", "gcc")
OBJCOPY = os.environ.get("HYPERPY_GUEST_OBJCOPY", "objcopy")

# Required by the host's KVM instruction emulator: general registers only, no red zone (ring 0
# interrupts), static, no PIC.
CFLAGS = [
    "-ffreestanding", "-nostdlib", "-mgeneral-regs-only", "-mno-red-zone", "-fno-pic",
    "-fno-stack-protector", "-fno-builtin", "-O2", "-static",
    "-no-pie", "-std=gnu11", "-Wall", "-Wextra",
    "-fno-asynchronous-unwind-tables", "-fno-tree-loop-distribute-patterns",
    "-ffunction-sections", "-fdata-sections", "-Wa,--noexecstack",
]
LDFLAGS = [
    "-Wl,--gc-sections", "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noseparate-code", "-Wl,--no-warn-rwx-segments",
]

RUNTIMES = {
    "pvh": ["pvh_start.S", "longmode.S", "lib.c"],
    "linux64": ["linux64_start.S", "longmode.S", "lib.c"],
}
COMMON_DEPS = ["guest.h", "guest.ld", "build.py"]

# Shared C sources of the device guests (PCI, virtio-pci, IDT/LAPIC/timer), and their flags:
# optimized for size and stripped, to stay small like the other guests.
VIRTIO_LIB = ("virtio.c", "pci.c", "intr.c")
DEVICE_CFLAGS = ["-Os", "-s"]

# name -> (C source or tuple of C sources, runtime, extra cflags)
_SPECS: dict[str, tuple[str | tuple[str, ...], str, list[str]]] = {
    "hello": ("hello.c", "pvh", []),
    "cmdline": ("cmdline.c", "pvh", []),
    "hello64": ("hello64.c", "linux64", []),
    "bzimage": ("hello64.c", "linux64", ['-DGUEST_ENTRY_NAME="bzimage"']),
    "uart_loopback": ("uart_loopback.c", "pvh", []),
    "uart_irq": (("uart_irq.c", "intr.c"), "pvh", []),
    "echo": ("echo.c", "pvh", []),
    "boottimer": ("boottimer.c", "pvh", []),
    "triplefault": ("triplefault.c", "pvh", []),
    "exits": ("exits.c", "pvh", []),
    "mmio_exits": ("mmio_exits.c", "pvh", []),
    "emulfail": ("emulfail.c", "pvh", []),
    "cpuid": ("cpuid.c", "pvh", []),
    "initrd": ("initrd.c", "pvh", []),
    "initrd64": ("initrd.c", "linux64", []),
    "virtio_blk": (("virtio_blk.c", *VIRTIO_LIB), "pvh", DEVICE_CFLAGS),
    "virtio_net": (("virtio_net.c", *VIRTIO_LIB), "pvh", DEVICE_CFLAGS),
    "virtio_console": (("virtio_console.c", *VIRTIO_LIB), "pvh", DEVICE_CFLAGS),
    "virtio_rng": (("virtio_rng.c", *VIRTIO_LIB), "pvh", DEVICE_CFLAGS),
    "acpi": (("acpi.c", "intr.c"), "pvh", DEVICE_CFLAGS),
    "virtio_iommu": (("virtio_iommu.c", *VIRTIO_LIB), "pvh", DEVICE_CFLAGS),
    "iommu_map": (("iommu_map.c", *VIRTIO_LIB), "pvh", DEVICE_CFLAGS),
    "power_button": (("power_button.c", *VIRTIO_LIB), "pvh", DEVICE_CFLAGS),
    "vfio_dma": (("vfio_dma.c", *VIRTIO_LIB), "pvh", DEVICE_CFLAGS),
}
GUESTS: list[str] = list(_SPECS)
BZIMAGE_DEPS = ["bzsetup.S", "mkbzimage.py"]


class GuestBuildError(RuntimeError):
    """A guest could not be built (gcc/objcopy failed or is missing)."""


class UnknownGuestError(GuestBuildError, ValueError):
    """No guest of that name."""


def entry_protocol(name: str) -> str:
    """"pvh" or "linux64": the boot protocol guest ``name`` is linked for."""
    return _SPECS[name][1]


def output_name(name: str) -> str:
    """File name of a guest's image: NAME.elf, or bzimage.bin for the bzImage."""
    return "bzimage.bin" if name == "bzimage" else f"{name}.elf"


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=SRC_DIR, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{what}: {cmd[0]!r} not found (install gcc and binutils)") from e
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{what} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{proc.stderr}{proc.stdout}"
        )


def link_elf(sources: list[Path], output: Path, extra_cflags: list[str] = ()) -> Path:
    """Compile and link ``sources`` (C and .S) with guest.ld into ``output`` (one gcc call)."""
    cmd = [CC, *CFLAGS, *extra_cflags, f"-I{SRC_DIR}", *LDFLAGS,
           "-T", str(SRC_DIR / "guest.ld"), "-o", str(output), *map(str, sources)]
    _run(cmd, f"building {output.name}")
    return output


def _up_to_date(output: Path, deps: list[Path]) -> bool:
    try:
        built = output.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(dep.stat().st_mtime_ns <= built for dep in deps)


def _load_mkbzimage():
    spec = importlib.util.spec_from_file_location("_hyperpy_mkbzimage", SRC_DIR / "mkbzimage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_bzimage(tmp: Path, c_sources: list[Path], cflags: list[str], output: Path) -> None:
    mk = _load_mkbzimage()
    kernel_elf = link_elf(c_sources, tmp / "bzimage-kernel.elf", cflags)
    entry, low, high = mk.elf_load_span(kernel_elf.read_bytes())
    if low != mk.LOAD_ADDRESS or entry != mk.LOAD_ADDRESS + mk.ENTRY64_OFFSET:
        raise GuestBuildError(f"bzimage kernel: loads at 0x{low:x}, entry 0x{entry:x}; "
                              f"want 0x{mk.LOAD_ADDRESS:x} and +0x{mk.ENTRY64_OFFSET:x}")
    _run([OBJCOPY, "-O", "binary", str(kernel_elf), str(tmp / "kernel.bin")], "objcopy kernel")
    _run([CC, "-nostdlib", "-static", "-no-pie", "-Wa,--noexecstack", "-Wl,--build-id=none",
          "-Wl,-Ttext=0", "-Wl,-e,0", "-o", str(tmp / "setup.elf"), str(SRC_DIR / "bzsetup.S")],
         "building bzsetup")
    _run([OBJCOPY, "-O", "binary", "-j", ".text", str(tmp / "setup.elf"), str(tmp / "setup.bin")],
         "objcopy setup")
    image = mk.make_bzimage((tmp / "kernel.bin").read_bytes(), (tmp / "setup.bin").read_bytes(),
                            high - low)
    output.write_bytes(image)


def build_guest(name: str, out_dir: Path) -> Path:
    """Build guest ``name`` into ``out_dir`` if it is missing or stale; return its path."""
    if name not in _SPECS:
        raise UnknownGuestError(f"unknown test guest {name!r}; known: {', '.join(GUESTS)}")
    csrc, runtime, cflags = _SPECS[name]
    csrcs = (csrc,) if isinstance(csrc, str) else csrc
    sources = [SRC_DIR / s for s in RUNTIMES[runtime]] + [SRC_DIR / s for s in csrcs]
    deps = sources + [SRC_DIR / d for d in COMMON_DEPS] + sorted(SRC_DIR.glob("*.h"))
    if name == "bzimage":
        deps += [SRC_DIR / d for d in BZIMAGE_DEPS]
    out_dir = Path(out_dir).resolve()
    output = out_dir / output_name(name)
    if _up_to_date(output, deps):
        return output
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as tmpdir:
        tmp = Path(tmpdir)
        staged = tmp / output.name
        if name == "bzimage":
            _build_bzimage(tmp, sources, cflags, staged)
        else:
            link_elf(sources, staged, cflags)
        os.chmod(staged, 0o644)
        os.replace(staged, output)
    return output


def build_all(out_dir: Path) -> dict[str, Path]:
    """Build every guest in GUESTS into ``out_dir``; return {name: path}."""
    return {name: build_guest(name, out_dir) for name in GUESTS}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {Path(__file__).name} OUT_DIR [NAME ...]\nguests: {' '.join(GUESTS)}")
        return 0 if argv else 2
    out_dir = Path(argv[0])
    names = argv[1:] or GUESTS
    try:
        for name in names:
            path = build_guest(name, out_dir)
            print(f"{name:14} {path} ({path.stat().st_size} bytes)")
    except GuestBuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
