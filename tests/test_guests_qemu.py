"""The test guests (tests/guests) built and booted under QEMU TCG.

A differential check with a peer VMM that nobody here wrote: if a guest misbehaves under hyperpy
but passes here, suspect hyperpy. QEMU boots the PVH guests through its PVH loader and
bzimage.bin through the 16-bit Linux boot protocol (SeaBIOS + linuxboot option ROM), which
also exercises the bzImage header and the kernel's 32-bit -> 64-bit entries.

QEMU tests skip when qemu-system-x86_64 is missing: `apt-get install -y qemu-system-x86`
provides it. Build tests skip when gcc is missing.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testutil import load_module

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / "tests" / "guests"
QEMU = shutil.which("qemu-system-x86_64")

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 not installed (apt-get install -y qemu-system-x86)"
)




build = load_module("hyperpy_test_guest_build", GUEST_DIR / "build.py")
mkbzimage = load_module("hyperpy_test_guest_mkbzimage", GUEST_DIR / "mkbzimage.py")


@pytest.fixture(scope="session")
def guests(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return build.build_all(tmp_path_factory.mktemp("guests"))


# ---- QEMU ----

QEMU_ARGS = ["-M", "q35", "-accel", "tcg", "-nographic", "-no-reboot", "-m", "128", "-net", "none"]


def _qemu_cmd(image: Path, append: str, log: Path) -> list[str]:
    # -d cpu_reset logs "Triple fault" when the CPU shuts down, and not for an i8042 reset.
    return [QEMU, *QEMU_ARGS, "-kernel", str(image), "-append", append, "-d", "cpu_reset", "-D", str(log)]


def guest_output(stdout: bytes) -> str:
    """What the guest wrote to COM1: SeaBIOS's banner ends with "Booting from ROM.."."""
    text = stdout.decode("latin-1").replace("\r\n", "\n")
    marker = "Booting from ROM.."
    return text.rsplit(marker, 1)[1] if marker in text else text


def run_qemu(image: Path, append: str, tmp_path: Path, timeout: float = 60) -> tuple[int, str, str]:
    """Boot ``image``; return (exit code, guest output, QEMU's cpu_reset log)."""
    log = tmp_path / "qemu.log"
    proc = subprocess.run(_qemu_cmd(image, append, log), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, guest_output(proc.stdout), log.read_text(errors="replace") if log.exists() else ""


def run_qemu_interactive(image: Path, append: str, tmp_path: Path, ready: str, send: bytes,
                         timeout: float = 60) -> tuple[int, str, str]:
    """Boot ``image``, wait until the guest prints ``ready``, send ``send`` to its COM1."""
    log = tmp_path / "qemu.log"
    proc = subprocess.Popen(_qemu_cmd(image, append, log), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        sent = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"QEMU timed out; output so far: {out!r}")
            r, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if r:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
            if not sent and ready.encode() in out.split(b"Booting from ROM..")[-1]:
                proc.stdin.write(send)
                proc.stdin.flush()
                sent = True
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    return rc, guest_output(out), log.read_text(errors="replace") if log.exists() else ""


# (guest, -append, exact guest output)
SIMPLE_BOOTS = [
    ("hello", "a b", "Hello from hyperpy guest\ncmdline: a b\n"),
    ("hello", "", "Hello from hyperpy guest\ncmdline: \n"),
    ("uart_loopback", "a b", "UART loopback PASS\n"),
    ("uart_irq", "a b", "UART IRQ OK 3\n"),
    ("boottimer", "a b", "boot timer\n"),
    ("exits", "count=1000", "exits done 1000\n"),
    ("exits", "a b", "exits done 100000\n"),
    ("mmio_exits", "count=1000", "mmio exits done 1000\n"),
    ("mmio_exits", "count=10 addr=0xd0001000", "mmio exits done 10\n"),
    ("mmio_exits", "addr=0x1002", "mmio exits: bad addr 0x1002\n"),
    ("bzimage", "a b", "Hello from hyperpy guest\ncmdline: a b\nentry: bzimage\n"),
]


@needs_qemu
@pytest.mark.parametrize(("name", "append", "expected"), SIMPLE_BOOTS,
                         ids=[f"{n}-{a or 'empty'}" for n, a, _ in SIMPLE_BOOTS])
def test_boot_under_qemu(guests, tmp_path, name, append, expected):
    rc, out, log = run_qemu(guests[name], append, tmp_path)
    assert out == expected
    assert rc == 0, "the guest's i8042 reset must end QEMU (-no-reboot)"
    assert "Triple fault" not in log


@needs_qemu
def test_cmdline_and_ram_under_qemu(guests, tmp_path):
    rc, out, log = run_qemu(guests["cmdline"], "a b  key=0x10", tmp_path)
    m = re.fullmatch(r"CMDLINE\[a b  key=0x10\]\nRAM (\d+) MiB\n", out)
    assert m, out
    assert 120 <= int(m.group(1)) <= 128  # -m 128 less what QEMU's e820 reserves
    assert rc == 0 and "Triple fault" not in log


@needs_qemu
def test_triplefault_under_qemu(guests, tmp_path):
    rc, out, log = run_qemu(guests["triplefault"], "a b", tmp_path)
    # A triple fault is a shutdown; with -no-reboot QEMU exits 0 with no further output.
    assert out == "about to triple fault\n"
    assert rc == 0
    assert "Triple fault" in log


@needs_qemu
def test_echo_under_qemu(guests, tmp_path):
    rc, out, log = run_qemu_interactive(guests["echo"], "", tmp_path, "ECHO READY\n", b"hi there q")
    assert out == "ECHO READY\nhi there \nECHO DONE\n"
    assert rc == 0 and "Triple fault" not in log


@needs_qemu
def test_uart_irq_echo_under_qemu(guests, tmp_path):
    rc, out, log = run_qemu_interactive(guests["uart_irq"], "echo", tmp_path, "ECHO READY\n", b"xyz q")
    assert out == "UART IRQ OK 3\nECHO READY\nxyz \nECHO DONE\n"
    assert rc == 0 and "Triple fault" not in log


@needs_qemu
def test_qemu_refuses_linux64_elf(guests, tmp_path):
    # hello64.elf has no PVH note; QEMU's -kernel loads only PVH ELFs (and bzImages).
    rc, out, _ = run_qemu(guests["hello64"], "", tmp_path)
    assert rc != 0 and "Hello" not in out


# ---- Image structure (no QEMU needed) ----

def _elf(path: Path):
    data = path.read_bytes()
    entry, phoff = struct.unpack_from("<QQ", data, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    phdrs = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    return data, entry, phdrs


def _notes(data: bytes, phdrs) -> list[tuple[bytes, int, bytes]]:
    notes = []
    for p_type, _f, off, _v, _p, filesz, _m, _a in phdrs:
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = off, off + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz]
            dpos = pos + 12 + (namesz + 3 & ~3)
            notes.append((name, ntype, data[dpos : dpos + descsz]))
            pos = dpos + (descsz + 3 & ~3)
    return notes


@needs_gcc
def test_pvh_images_carry_the_phys32_entry_note(guests):
    for name, path in guests.items():
        if build.entry_protocol(name) != "pvh":
            continue
        data, entry, phdrs = _elf(path)
        xen = [(t, d) for n, t, d in _notes(data, phdrs) if n == b"Xen\0"]
        assert xen == [(18, struct.pack("<I", entry))], name  # XEN_ELFNOTE_PHYS32_ENTRY
        loads = [p for p in phdrs if p[0] == 1]
        assert loads and min(p[4] for p in loads) == 0x100000, name
        assert path.stat().st_size < (24 if name in ("virtio_iommu", "vfio_dma") else 16) * 1024, name


@needs_gcc
def test_linux64_image_has_no_pvh_note_and_a_64bit_entry(guests):
    data, entry, phdrs = _elf(guests["hello64"])
    assert entry == 0x100200
    assert not [n for n, _t, _d in _notes(data, phdrs) if n == b"Xen\0"]


@needs_gcc
def test_bzimage_header(guests):
    image = guests["bzimage"].read_bytes()
    hdr = mkbzimage.parse_header(image)
    assert hdr["boot_flag"] == 0xAA55
    assert hdr["header"].to_bytes(4, "little") == b"HdrS"
    assert hdr["version"] >= 0x020C
    assert hdr["loadflags"] & 0x01  # LOADED_HIGH
    assert hdr["xloadflags"] & 0x01  # XLF_KERNEL_64
    assert hdr["pref_address"] == hdr["code32_start"] == 0x100000
    setup_size = (hdr["setup_sects"] + 1) * 512
    kernel = image[setup_size:]
    assert hdr["syssize"] * 16 == len(kernel)
    assert hdr["init_size"] >= len(kernel) and hdr["init_size"] % 4096 == 0
    assert kernel[0] == kernel[0x200] == 0xFA  # cli: startup_32 at +0, startup_64 at +0x200
    version = image[0x200 + hdr["kernel_version"] :].split(b"\0", 1)[0]
    assert version.startswith(b"hyperpy")


# ---- build.py ----

def test_unknown_guest_raises(tmp_path):
    with pytest.raises(RuntimeError, match="unknown test guest"):
        build.build_guest("no_such_guest", tmp_path)
    with pytest.raises(ValueError):
        build.build_guest("../hello", tmp_path)
    assert not list(tmp_path.iterdir())


@needs_gcc
def test_compile_error_raises_with_gcc_stderr(tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text('#include "guest.h"\nvoid guest_main(const struct boot_info *bi) { oops }\n')
    sources = [GUEST_DIR / s for s in build.RUNTIMES["pvh"]] + [bad]
    with pytest.raises(RuntimeError, match=r"(?s)building bad\.elf failed.*error"):
        build.link_elf(sources, tmp_path / "bad.elf")


@needs_gcc
def test_build_is_cached(tmp_path):
    out = build.build_guest("hello", tmp_path)
    first = out.stat().st_mtime_ns
    assert build.build_guest("hello", tmp_path) == out
    assert out.stat().st_mtime_ns == first
    os.utime(out, ns=(0, 0))  # older than the sources: rebuilt
    build.build_guest("hello", tmp_path)
    assert out.stat().st_mtime_ns > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hello.elf"]


@needs_gcc
def test_build_as_setup_py_does(tmp_path):
    # setup.py loads build.py by path from the repo root and builds the default guest.
    code = (
        "import importlib.util, sys; from pathlib import Path\n"
        "spec = importlib.util.spec_from_file_location('guest_build', 'tests/guests/build.py')\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"print(m.build_guest('hello', Path({str(tmp_path / 'pkg')!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "pkg" / "hello.elf"
    assert (tmp_path / "pkg" / "hello.elf").read_bytes()[:4] == b"\x7fELF"


@needs_gcc
def test_build_script(tmp_path):
    proc = subprocess.run([sys.executable, str(GUEST_DIR / "build.py"), str(tmp_path), "boottimer"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "boottimer.elf").exists()
    assert build.output_name("bzimage") == "bzimage.bin"
    assert set(build.GUESTS) >= {"hello", "cmdline", "hello64", "bzimage", "uart_loopback",
                                 "uart_irq", "echo", "boottimer", "triplefault", "exits",
                                 "mmio_exits"}
