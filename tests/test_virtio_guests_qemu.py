"""The virtio-pci and ACPI test guests, proven against QEMU (q35, TCG), a peer nobody here wrote.

Each guest (tests/guests/virtio_blk.c, virtio_net.c, virtio_console.c, virtio_rng.c, acpi.c)
drives one modern-only virtio-pci device (or the ACPI tables) and reports on COM1; the parsers
and expectations live in tests/virtio_expect.py, which hyperpy's own device tests reuse, so that
a guest that passes here and fails under hyperpy points at hyperpy.

Skips without qemu-system-x86_64 (`apt-get install -y qemu-system-x86`) or gcc. The virtio-net
test also needs /dev/net/tun and root: in a network namespace of its own (tests/netns.py) it
creates a persistent tap, runs QEMU there attached to it, reads the guest's frame with an
AF_PACKET socket and answers it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from testutil import load_module

TESTS = Path(__file__).resolve().parent
GUEST_DIR = TESTS / "guests"
QEMU = shutil.which("qemu-system-x86_64")

needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 not installed (apt-get install -y qemu-system-x86)"
)
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")




build = load_module("hyperpy_test_guest_build", GUEST_DIR / "build.py")
expect = load_module("virtio_expect", TESTS / "virtio_expect.py")

DEVICE_GUESTS = ["virtio_blk", "virtio_net", "virtio_console", "virtio_rng", "acpi"]


@pytest.fixture(scope="module")
def guests(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    out = tmp_path_factory.mktemp("device-guests")
    return {name: build.build_guest(name, out) for name in DEVICE_GUESTS}


# ---- QEMU ----

QEMU_ARGS = ["-M", "q35", "-accel", "tcg", "-nographic", "-no-reboot", "-m", "128"]


def guest_output(stdout: bytes) -> str:
    """What the guest wrote to COM1: SeaBIOS's banner ends with "Booting from ROM.."."""
    text = stdout.decode("latin-1").replace("\r\n", "\n")
    marker = "Booting from ROM.."
    return text.rsplit(marker, 1)[1] if marker in text else text


def qemu_cmd(image: Path, append: str, *devices: str, net: bool = False) -> list[str]:
    return [QEMU, *QEMU_ARGS, *([] if net else ["-net", "none"]), "-kernel", str(image),
            "-append", append, *devices]


def run_qemu(image: Path, append: str, *devices: str, timeout: float = 60) -> tuple[int, str]:
    proc = subprocess.run(qemu_cmd(image, append, *devices), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    out = guest_output(proc.stdout)
    print(f"QEMU exit {proc.returncode}; guest output:\n{out}")  # shown when a test fails
    return proc.returncode, out


def blk_devices(img: Path, serial: str = "hyperpy-blk-0") -> list[str]:
    return ["-device", f"virtio-blk-pci,disable-legacy=on,drive=d0,serial={serial}",
            "-drive", f"if=none,id=d0,file={img},format=raw"]


# ---- virtio-blk ----

BLK_RUNS = [
    # (cmdline, sector, wrote, irq)
    ("", 1, False, False),
    ("sector=5 write=1", 5, True, False),
    ("irq sector=7 write=1", 7, True, True),
]


@needs_qemu
@pytest.mark.parametrize(("append", "sector", "wrote", "irq"), BLK_RUNS,
                         ids=[a or "default" for a, *_ in BLK_RUNS])
def test_blk(guests, tmp_path, append, sector, wrote, irq):
    before = expect.blk_image(2048)
    img = tmp_path / "disk.img"
    img.write_bytes(before)
    rc, out = run_qemu(guests["virtio_blk"], append, *blk_devices(img))
    facts = expect.parse_blk(out)
    expect.check_blk(facts, before, sector=sector, wrote=wrote, serial="hyperpy-blk-0", irq=irq)
    assert facts["ids"] == "1af4:1042"
    assert facts["caps"] == ["common", "notify", "isr", "device", "pci"]
    assert not facts["unparsed"], facts["unparsed"]
    assert out.endswith("BLK done\n")
    assert rc == 0
    after = img.read_bytes()
    if wrote:
        expect.check_blk_image_after(before, after, sector=sector)
    else:
        assert after == before
    if irq:
        # Every request (2 reads, write, flush, readback, GET_ID, past-end read) was completed
        # by its MSI-X interrupt.
        assert facts["irq_count"] == 7 and facts["msix_entries"] >= 2


@needs_qemu
def test_blk_assigns_unassigned_bars(guests, tmp_path):
    # zerobars clears the device's memory BARs: the guest must size and place them itself.
    image = expect.blk_image(64)
    img = tmp_path / "disk.img"
    img.write_bytes(image)
    rc, out = run_qemu(guests["virtio_blk"], "zerobars irq", *blk_devices(img))
    facts = expect.parse_blk(out)
    expect.check_blk(facts, image, irq=True)
    assert 0xC000_0000 <= facts["common_addr"] < 0xD000_0000, hex(facts["common_addr"])
    assert rc == 0


@needs_qemu
def test_blk_bar_above_4g(guests, tmp_path):
    # A 2 GiB BAR does not fit SeaBIOS's 32-bit window, so it moves the 64-bit BARs (virtio's
    # included) above 4 GiB, outside the guest's initial identity map.
    image = expect.blk_image(64)
    img = tmp_path / "disk.img"
    img.write_bytes(image)
    rc, out = run_qemu(guests["virtio_blk"], "irq", *blk_devices(img),
                       "-object", "memory-backend-ram,id=big,size=2G",
                       "-device", "ivshmem-plain,memdev=big")
    facts = expect.parse_blk(out)
    expect.check_blk(facts, image, irq=True)
    assert facts["common_addr"] >= 1 << 32, hex(facts["common_addr"])
    assert rc == 0


# ---- virtio-rng ----

@needs_qemu
@pytest.mark.parametrize("irq", [False, True], ids=["poll", "irq"])
def test_rng(guests, irq):
    rc, out = run_qemu(guests["virtio_rng"], "irq" if irq else "",
                       "-device", "virtio-rng-pci,disable-legacy=on")
    facts = expect.parse_rng(out)
    expect.check_rng(facts, irq=irq)
    assert facts["ids"] == "1af4:1044" and not facts["unparsed"]
    assert rc == 0


@needs_qemu
def test_transitional_devices_are_driven_through_their_modern_interface(guests, tmp_path):
    # Without disable-legacy=on QEMU's devices on the root bus are transitional: legacy ids
    # (0x1005 entropy, 0x1003 console) plus the modern capabilities, which the guests use.
    rc, out = run_qemu(guests["virtio_rng"], "irq", "-device", "virtio-rng-pci")
    facts = expect.parse_rng(out)
    expect.check_rng(facts, irq=True)
    assert facts["ids"] == "1af4:1005" and rc == 0
    sink = tmp_path / "console.out"
    rc, out = run_qemu(guests["virtio_console"], "", "-device", "virtio-serial-pci",
                       "-chardev", f"file,id=c0,path={sink}", "-device", "virtconsole,chardev=c0")
    facts = expect.parse_console(out)
    expect.check_console(facts)
    assert facts["ids"] == "1af4:1003" and rc == 0
    assert sink.read_bytes() == expect.CONSOLE_TEXT


# ---- virtio-console ----

@needs_qemu
def test_console(guests, tmp_path):
    sink = tmp_path / "console.out"
    rc, out = run_qemu(guests["virtio_console"], "",
                       "-device", "virtio-serial-pci,disable-legacy=on",
                       "-chardev", f"file,id=c0,path={sink}", "-device", "virtconsole,chardev=c0")
    facts = expect.parse_console(out)
    expect.check_console(facts)
    assert facts["ids"] == "1af4:1043" and not facts["unparsed"]
    assert sink.read_bytes() == expect.CONSOLE_TEXT
    assert rc == 0


@needs_qemu
def test_console_rx_with_irq(guests, tmp_path):
    # A pipe chardev: QEMU reads PATH.in (our input, written before it starts) and writes
    # PATH.out; we hold both FIFOs open so that neither side blocks and nothing is lost.
    base = tmp_path / "console"
    fifo_in, fifo_out = Path(f"{base}.in"), Path(f"{base}.out")
    os.mkfifo(fifo_in)
    os.mkfifo(fifo_out)
    fd_in = os.open(fifo_in, os.O_RDWR | os.O_NONBLOCK)
    fd_out = os.open(fifo_out, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd_in, b"ping-from-host")
        rc, out = run_qemu(guests["virtio_console"], "rxwait=10000 irq",
                           "-device", "virtio-serial-pci,disable-legacy=on",
                           "-chardev", f"pipe,id=c0,path={base}",
                           "-device", "virtconsole,chardev=c0")
        written = os.read(fd_out, 4096)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    facts = expect.parse_console(out)
    expect.check_console(facts, rx_text="ping-from-host", irq=True)
    assert written == expect.CONSOLE_TEXT
    assert rc == 0


# ---- virtio-net ----

GUEST_MAC = "52:54:00:12:34:56"


@pytest.fixture
def tap(netns):
    """A persistent tap, up, in the test's own network namespace (IPv6 is off there); it goes
    with the namespace."""
    name = f"hptest{os.getpid() % 100000}"
    netns.ip("tuntap", "add", "dev", name, "mode", "tap")
    netns.ip("link", "set", name, "up")
    return name


@needs_qemu
@pytest.mark.parametrize("irq", [False, True], ids=["poll", "irq"])
def test_net(guests, netns, tap, irq):
    sock = netns.packet_socket(tap, expect.NET_ETHERTYPE)
    cmd = qemu_cmd(guests["virtio_net"], "irq" if irq else "",
                   "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                   "-device", f"virtio-net-pci,disable-legacy=on,netdev=n0,mac={GUEST_MAC}",
                   net=True)
    proc = netns.popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    try:
        expect.exchange_frame(sock, proc, GUEST_MAC, time.monotonic() + 60)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = guest_output(stdout)
    print(f"QEMU exit {proc.returncode}; guest output:\n{out}")
    facts = expect.parse_net(out)
    expect.check_net(facts, mac=GUEST_MAC, irq=irq)
    assert facts["ids"] == "1af4:1041" and facts["link"] == "up" and not facts["unparsed"]
    assert proc.returncode == 0


@needs_qemu
def test_net_without_rx(guests):
    # rxwait=0: transmit only (QEMU's default user-mode backend swallows the frame).
    rc, out = run_qemu(guests["virtio_net"], "rxwait=0",
                       "-device", f"virtio-net-pci,disable-legacy=on,netdev=n0,mac={GUEST_MAC}",
                       "-netdev", "user,id=n0")
    facts = expect.parse_net(out)
    expect.check_net(facts, mac=GUEST_MAC, rx=False)
    assert facts["rx"] == "skipped"
    assert rc == 0


# ---- ACPI ----

@needs_qemu
@pytest.mark.parametrize("cpus", [1, 2])
def test_acpi_tables_and_poweroff(guests, cpus):
    rc, out = run_qemu(guests["acpi"], "", "-smp", str(cpus))
    facts = expect.parse_acpi(out)
    # QEMU's q35: full (not hardware-reduced) ACPI, MMCONFIG at 0xB0000000, \_S5_ = {0, 0}.
    expect.check_acpi(facts, cpus=cpus, hw_reduced=False, ecam_base=0xB000_0000)
    assert facts["mcfg"] == [{"base": 0xB000_0000, "seg": 0, "bus": (0, 255)}]
    assert facts["s5"] == (0, 0)
    assert facts["rsdp"]["from"] == "pvh"  # QEMU's PVH loader fills hvm_start_info.rsdp_paddr
    assert not facts["unparsed"], facts["unparsed"]
    assert out.endswith("ACPI poweroff\n"), out
    assert rc == 0  # QEMU exits 0 on the guest's S5


# ---- Build ----

@needs_gcc
def test_uapi_and_fallback_definitions_build_identically(guests, tmp_path):
    # virtio_defs.h uses <linux/virtio_*.h> when installed, else its own spec definitions.
    for name in ("virtio_blk", "virtio_net", "virtio_console", "virtio_rng"):
        csrcs, runtime, cflags = build._SPECS[name]
        sources = [GUEST_DIR / s for s in build.RUNTIMES[runtime]] + [GUEST_DIR / s for s in csrcs]
        fallback = build.link_elf(sources, tmp_path / f"{name}.elf", [*cflags, "-DHYPERPY_NO_UAPI"])
        assert fallback.read_bytes() == guests[name].read_bytes(), name


@needs_gcc
def test_device_guests_are_small_pvh_images(guests):
    for name, path in guests.items():
        assert build.entry_protocol(name) == "pvh"
        assert path.read_bytes()[:4] == b"\x7fELF"
        assert path.stat().st_size < 16 * 1024, (name, path.stat().st_size)


# ---- The parsers, on canned output (no QEMU needed) ----

def test_parsers_on_sample_output():
    image = expect.blk_image(16)
    s0, s3 = expect.sector_digest(image[:512]), expect.sector_digest(image[3 * 512:4 * 512])
    p3 = expect.sector_digest(expect.blk_write_pattern(3))
    blk = (
        "BLK pci 00:02.0 1af4:1042\nBLK caps common notify isr device pci mult 4 at 0xfe000000\n"
        "BLK msix entries 2 table bar 1\nBLK features device 0x10130006e54 driver 0x100000254\n"
        "BLK offered SEG_MAX FLUSH\nBLK capacity 16\nBLK seg_max 254\n"
        f"BLK read 0 status 0 data {s0[0]} sum {s0[1]}\nBLK read 3 status 0 data {s3[0]} sum {s3[1]}\n"
        f"BLK write 3 status 0\nBLK flush status 0\nBLK readback 3 status 0 data {p3[0]} sum {p3[1]}\n"
        "BLK write 3 OK\nBLK id status 0 disk-1\nBLK read 16 status 1\nBLK irq OK 7\nBLK done\n"
    )
    f = expect.parse_blk(blk)
    expect.check_blk(f, image, sector=3, wrote=True, serial="disk-1", irq=True)
    assert not f["unparsed"]
    assert expect.comparable_blk(f) == expect.comparable_blk(expect.parse_blk(
        blk.replace("00:02.0", "00:05.0").replace("BLK seg_max 254\n", "").replace("BLK irq OK 7", "BLK irq OK 3")))
    with pytest.raises(AssertionError):
        expect.check_blk(expect.parse_blk(blk.replace("BLK read 16 status 1", "BLK read 16 status 0")),
                         image, sector=3, wrote=True)
    with pytest.raises(AssertionError):
        expect.check_blk(expect.parse_blk(blk + "BLK FAIL timeout waiting for the used ring\n"),
                         image, sector=3, wrote=True)

    net = expect.parse_net("NET mac 52:54:00:12:34:56\nNET link up\nNET tx OK\n"
                           "NET rx 60 0x88b5 hello-from-host\nNET isr 0x1\nNET done\n"
                           "NET caps common notify\nNET features device 0x100000020 driver 0x100000020\n")
    expect.check_net(net, mac="52:54:00:12:34:56")
    con = expect.parse_console("CONSOLE caps common notify\nCONSOLE features device 0x100000000 "
                               "driver 0x100000000\nCONSOLE tx OK\nCONSOLE rx 9 a b..c d\nCONSOLE done\n")
    assert con["rx"] == {"len": 9, "text": "a b..c d"}
    rng = expect.parse_rng("RNG caps common notify\nRNG features device 0x100000000 driver 0x100000000\n"
                           f"RNG 32 bytes {'01' * 32}\nRNG 32 bytes {'02' * 32}\nRNG nonzero OK\n"
                           f"RNG 64 bytes {'03' * 64}\nRNG distinct OK\nRNG isr 0x1\nRNG done\n")
    expect.check_rng(rng)
    assert rng["blocks"][0] == b"\x01" * 32 + b"\x02" * 32
    acpi = expect.parse_acpi(
        "ACPI rsdp 0xe0000 from pvh rev 2 ok\nACPI table XSDT len 52 ok\nACPI table FACP len 276 ok\n"
        "ACPI table DSDT len 100 ok\nACPI table APIC len 90 ok\nACPI madt lapics 2 ioapics 1\n"
        "ACPI table MCFG len 60 ok\nACPI mcfg base 0xe0000000 seg 0 bus 0-255\n"
        "ACPI fadt rev 6 hw_reduced 1\nACPI _S5_ 5 0\nACPI poweroff\n")
    expect.check_acpi(acpi, cpus=2, hw_reduced=True, ecam_base=0xE000_0000)
    assert expect.comparable_acpi(acpi)["has"] == ["APIC", "DSDT", "FACP"]
    with pytest.raises(AssertionError):
        expect.check_acpi(expect.parse_acpi("ACPI rsdp 0xe0000 from scan rev 0 ok\n"
                                            "ACPI table RSDT len 40 bad\n"))


def test_guest_frame_and_reply():
    reply = expect.net_reply_frame(GUEST_MAC)
    assert len(reply) == 60 and reply[:6] == expect.mac_bytes(GUEST_MAC)
    assert reply[12:14] == b"\x88\xb5" and reply[14:29] == b"hello-from-host"
    frame = b"\xff" * 6 + expect.mac_bytes(GUEST_MAC) + b"\x88\xb5" + b"hyperpy-net-test"
    expect.check_guest_frame(frame.ljust(60, b"\0"), GUEST_MAC)
    with pytest.raises(AssertionError):
        expect.check_guest_frame(frame.ljust(60, b"x"), GUEST_MAC)
