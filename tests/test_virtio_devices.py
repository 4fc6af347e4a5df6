"""The virtio device guests on hyperpy: blk, net, console and rng through virtio-pci, polled and
with MSI-X; and the same guests on QEMU, compared fact by fact (a peer nobody here wrote)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from testutil import load_module

TESTS = Path(__file__).resolve().parent
expect = load_module("virtio_expect", TESTS / "virtio_expect.py")

QEMU = shutil.which("qemu-system-x86_64")
GUEST_MAC = "52:54:00:12:34:56"
pytestmark = pytest.mark.kvm


def hyperpy(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "hyperpy", "run", "--no-reboot", "--memory", "size=128M",
                        *args],
                       capture_output=True, timeout=timeout, cwd=tempfile.gettempdir())
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def qemu(kernel: Path, append: str, *devices: str, timeout: float = 120) -> str:
    p = subprocess.run([QEMU, "-M", "q35", "-accel", "tcg", "-nographic", "-no-reboot", "-m", "128",
                        "-net", "none", "-kernel", str(kernel), "-append", append, *devices],
                       capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return p.stdout.decode(errors="replace").replace("\r\n", "\n")


# --- virtio-blk -------------------------------------------------------------------------------

BLK_RUNS = [("", 1, False, False), ("sector=5 write=1", 5, True, False),
            ("irq sector=7 write=1", 7, True, True)]


@pytest.mark.parametrize(("append", "sector", "wrote", "irq"), BLK_RUNS,
                         ids=["read", "write", "write-irq"])
def test_blk(kvm, guests, tmp_path, append, sector, wrote, irq):
    before = expect.blk_image(2048)
    img = tmp_path / "disk.img"
    img.write_bytes(before)
    rc, out, err = hyperpy("--kernel", str(guests["virtio_blk"]), "--cmdline", append,
                           "--disk", f"path={img},id=hyperpy-blk-0")
    assert rc == 0, err
    facts = expect.parse_blk(out)
    expect.check_blk(facts, before, sector=sector, wrote=wrote, serial="hyperpy-blk-0", irq=irq)
    assert facts["ids"] == "1af4:1042" and not facts["unparsed"], facts
    after = img.read_bytes()
    if wrote:
        expect.check_blk_image_after(before, after, sector=sector)
    else:
        assert after == before


def test_blk_readonly_refuses_writes(kvm, guests, tmp_path):
    before = expect.blk_image(64)
    img = tmp_path / "disk.img"
    img.write_bytes(before)
    rc, out, err = hyperpy("--kernel", str(guests["virtio_blk"]), "--cmdline", "sector=3 write=1",
                           "--disk", f"path={img},readonly=on")
    assert rc == 0, err
    facts = expect.parse_blk(out)
    assert facts["write"] == {"sector": 3, "status": expect.BLK_S_IOERR}
    assert img.read_bytes() == before


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
def test_blk_same_facts_as_qemu(kvm, guests, tmp_path):
    image = expect.blk_image(2048)
    runs = {}
    for vmm in ("hyperpy", "qemu"):
        img = tmp_path / f"{vmm}.img"
        img.write_bytes(image)
        if vmm == "hyperpy":
            rc, out, err = hyperpy("--kernel", str(guests["virtio_blk"]), "--cmdline", "sector=9 write=1",
                                   "--disk", f"path={img}")
            assert rc == 0, err
        else:
            out = qemu(guests["virtio_blk"], "sector=9 write=1",
                       "-device", "virtio-blk-pci,disable-legacy=on,drive=d0",
                       "-drive", f"if=none,id=d0,file={img},format=raw")
        runs[vmm] = (expect.comparable_blk(expect.parse_blk(out)), img.read_bytes())
    assert runs["hyperpy"][0] == runs["qemu"][0]
    assert runs["hyperpy"][1] == runs["qemu"][1]   # the same bytes reached both images


# --- virtio-rng and virtio-console ----------------------------------------------------------

@pytest.mark.parametrize("irq", [False, True], ids=["poll", "irq"])
def test_rng(kvm, guests, irq):
    rc, out, err = hyperpy("--kernel", str(guests["virtio_rng"]), "--cmdline", "irq" if irq else "",
                           "--rng", "src=/dev/urandom")
    assert rc == 0, err
    expect.check_rng(expect.parse_rng(out), irq=irq)


def test_console_output_to_file(kvm, guests, tmp_path):
    log = tmp_path / "hvc0.log"
    rc, out, err = hyperpy("--kernel", str(guests["virtio_console"]), "--console", f"file={log}")
    assert rc == 0, err
    expect.check_console(expect.parse_console(out))
    assert log.read_bytes() == expect.CONSOLE_TEXT


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_rng_and_console_same_facts_as_qemu(kvm, guests, tmp_path):
    rc, out, err = hyperpy("--kernel", str(guests["virtio_rng"]), "--rng", "src=/dev/urandom")
    assert rc == 0, err
    q = qemu(guests["virtio_rng"], "", "-device", "virtio-rng-pci,disable-legacy=on")
    assert expect.comparable_rng(expect.parse_rng(out)) == expect.comparable_rng(expect.parse_rng(q))
    log = tmp_path / "h.log"
    rc, out, err = hyperpy("--kernel", str(guests["virtio_console"]), "--console", f"file={log}")
    assert rc == 0, err
    qlog = tmp_path / "q.log"
    q = qemu(guests["virtio_console"], "", "-device", "virtio-serial-pci,disable-legacy=on",
             "-chardev", f"file,id=c0,path={qlog}", "-device", "virtconsole,chardev=c0")
    assert expect.comparable_console(expect.parse_console(out)) == \
        expect.comparable_console(expect.parse_console(q))
    assert log.read_bytes() == qlog.read_bytes() == expect.CONSOLE_TEXT


# --- virtio-net over a tap --------------------------------------------------------------------
# hyperpy runs in the test's own network namespace (tests/netns.py): the tap, its address and
# every frame stay there.

def _net_vm(ns, kernel: Path, cmdline: str, net: str, *extra: str) -> subprocess.Popen:
    return ns.popen([sys.executable, "-m", "hyperpy", "run", "--no-reboot", "--memory", "size=128M",
                     "--kernel", str(kernel), "--cmdline", cmdline, "--net", net, *extra],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())


def _exchange(ns, proc: subprocess.Popen, tap: str | None, guest_mac: str | None):
    """Wait for the tap (``tap``, or the one tap hyperpy creates when None), answer the guest's
    frame; (tap name, the guest's frame, stdout, stderr) once hyperpy has exited."""
    sock = None
    try:
        deadline = time.monotonic() + 60
        name = ns.wait_for_link(tap, 60, proc)
        assert name is not None, "hyperpy did not create the tap"
        while sock is None and time.monotonic() < deadline and proc.poll() is None:
            try:   # the tap exists once hyperpy has built the device
                sock = ns.packet_socket(name, expect.NET_ETHERTYPE)
            except OSError:
                time.sleep(0.05)
        assert sock is not None, f"cannot open a socket on {name}"
        frame = expect.exchange_frame(sock, proc, guest_mac, deadline)
        out, err = proc.communicate(timeout=60)
    finally:
        if sock is not None:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return name, frame, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.parametrize("irq", [False, True], ids=["poll", "irq"])
def test_net_frames_cross_the_tap(kvm, guests, netns, irq):
    tap = f"hpt{os.getpid() % 10000}{int(irq)}"
    proc = _net_vm(netns, guests["virtio_net"], "irq" if irq else "",
                   f"tap={tap},mac={GUEST_MAC},ip=192.168.249.1,mask=255.255.255.0")
    name, _, out, err = _exchange(netns, proc, tap, GUEST_MAC)
    assert name == tap
    assert proc.returncode == 0, err
    facts = expect.parse_net(out)
    expect.check_net(facts, mac=GUEST_MAC, irq=irq)
    assert facts["ids"] == "1af4:1041" and facts["link"] == "up"


def test_net_generated_tap_and_mac(kvm, guests, netns):
    """``--net tap=,mac=`` (cloud-hypervisor's "pick one"): hyperpy creates a tap that the kernel
    names vmtapN, logs that name, and gives the guest a random locally administered unicast MAC,
    which the guest reads from config space and sends its frame from."""
    before = set(netns.links())
    proc = _net_vm(netns, guests["virtio_net"], "irq", "tap=,mac=", "-v")
    name, frame, out, err = _exchange(netns, proc, None, None)
    assert proc.returncode == 0, err
    assert name not in before and re.fullmatch(r"vmtap\d+", name), name
    assert f"created tap {name} (from vmtap%d)" in err, err
    facts = expect.parse_net(out)
    expect.check_net(facts, mac=frame[6:12].hex(":"), irq=True)   # config space == frame source
    first = int(facts["mac"].split(":")[0], 16)
    assert first & 0x02 and not first & 0x01, f"{facts['mac']} is not a locally administered unicast MAC"


def test_net_generated_taps_never_take_an_existing_name(kvm, netns):
    """The seed's ``--net tap=,mac=,iommu=on``, twice: with a vmtap0 already there, the kernel
    names hyperpy's taps vmtap1 and vmtap2 and the existing one is left alone."""
    netns.ip("tuntap", "add", "dev", "vmtap0", "mode", "tap")
    p = netns.run([sys.executable, "-m", "hyperpy", "run", "--no-reboot", "--memory", "size=128M",
                   "--kernel", "builtin:hello", "--net", "tap=,mac=,iommu=on", "--net", "mac=",
                   "--console", "off", "-v"],
                  check=False, timeout=120, cwd=tempfile.gettempdir(), errors="replace")
    assert p.returncode == 0, p.stderr
    assert "Hello from hyperpy guest" in p.stdout
    created = re.findall(r"created tap (\S+) \(from vmtap%d\)", p.stderr)
    assert sorted(created) == ["vmtap1", "vmtap2"], p.stderr
    assert "attached to the existing tap" not in p.stderr
    assert "virtio-iommu" in p.stderr
    assert "vmtap0" in netns.links() and not {"vmtap1", "vmtap2"} & set(netns.links())


def test_all_devices_together_from_the_cli(kvm, tmp_path, netns):
    """The acceptance command line: every device at once, the default guest still boots."""
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * (1 << 20))
    tap = f"hpa{os.getpid() % 10000}"
    p = netns.run([sys.executable, "-m", "hyperpy", "run", "--no-reboot", "--memory", "size=128M",
                   "--kernel", "builtin:hello", "--disk", f"path={img}", "--net", f"tap={tap}",
                   "--rng", "src=/dev/urandom", "--console", "off", "-v"],
                  check=False, timeout=120, cwd=tempfile.gettempdir(), errors="replace")
    assert p.returncode == 0, p.stderr
    assert "Hello from hyperpy guest" in p.stdout
    for dev in ("virtio-blk", "virtio-net", "virtio-rng"):
        assert dev in p.stderr
    assert f"created tap {tap}" in p.stderr


# --- ACPI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cpus", [1, 3])
def test_acpi_tables_and_poweroff(kvm, guests, cpus):
    """The guest finds the RSDP, checks every table, and powers off through the FADT's
    hardware-reduced sleep register: the VM ends with status 0."""
    rc, out, err = hyperpy("--kernel", str(guests["acpi"]), "--cpus", f"boot={cpus}", "-v")
    assert rc == 0, err
    facts = expect.parse_acpi(out)
    expect.check_acpi(facts, cpus=cpus, hw_reduced=True, ecam_base=0xE000_0000)
    assert "guest power-off" in err


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_acpi_same_outcome_as_qemu(kvm, guests):
    rc, out, err = hyperpy("--kernel", str(guests["acpi"]))
    assert rc == 0, err
    q = qemu(guests["acpi"], "")
    assert expect.comparable_acpi(expect.parse_acpi(out)) == expect.comparable_acpi(expect.parse_acpi(q))


def test_console_input_from_interactive_stdin(kvm, guests, tmp_path):
    """--console tty on a terminal: typed bytes reach hvc0's receive queue."""
    import pty

    serial = tmp_path / "serial.log"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hyperpy", "run", "--no-reboot", "--memory", "size=128M",
                             "--kernel", str(guests["virtio_console"]), "--cmdline", "rxwait=20000",
                             "--serial", f"file={serial}", "--console", "tty"],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    os.close(slave)
    try:
        time.sleep(1.0)
        os.write(master, b"typed")
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert rc == 0, proc.stderr.read().decode()
    facts = expect.parse_console(serial.read_text())
    expect.check_console(facts, rx_text="typed")
