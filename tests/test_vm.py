"""Boot the test guests on /dev/kvm: CLI behaviour, exit statuses, devices, run loop, lifecycle."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from hyperpy.config import build_vm_config

pytestmark = pytest.mark.kvm


def _config(kernel, cmdline="", cpus="boot=1", memory="size=64M", serial="off"):
    return build_vm_config(cpus=cpus, memory=memory, kernel=str(kernel), initramfs=None,
                           cmdline=cmdline, serial=serial, console="off")


def _out(p):
    return p.stdout.decode(errors="replace")


def _err(p):
    return p.stderr.decode(errors="replace")


# --- the CLI boots guests and reports how they ended ---------------------------------------

def test_builtin_hello_prints_and_exits_zero(kvm, hyperpy_cli):
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--cmdline", "x y", "--memory", "size=128M")
    assert p.returncode == 0, _err(p)
    assert _out(p).splitlines()[:2] == ["Hello from hyperpy guest", "cmdline: x y"]


@pytest.mark.parametrize("guest,protocol", [("hello64", "linux64"), ("bzimage", "bzimage")])
def test_linux_boot_protocol_guests(kvm, hyperpy_cli, guests, guest, protocol):
    p = hyperpy_cli("run", "--kernel", str(guests[guest]), "--cmdline", "root=/dev/x quiet", "-v")
    assert p.returncode == 0, _err(p)
    lines = _out(p).splitlines()
    assert "cmdline: root=/dev/x quiet" in lines
    assert f"entry: {protocol}" in lines
    assert f"loaded {protocol} kernel" in _err(p)


def test_cmdline_and_ram_size_reach_the_guest(kvm, hyperpy_cli, guests):
    p = hyperpy_cli("run", "--kernel", str(guests["cmdline"]), "--memory", "size=96M",
                    "--cmdline", "console=ttyS0 a=b  c")
    assert p.returncode == 0, _err(p)
    out = _out(p)
    assert "CMDLINE[console=ttyS0 a=b  c]" in out
    ram = int(re.search(r"RAM (\d+) MiB", out).group(1))
    assert 95 <= ram <= 96   # the legacy hole below 1 MiB is not RAM


def test_ram_above_the_32bit_hole_is_reported(kvm, hyperpy_cli, guests):
    p = hyperpy_cli("run", "--kernel", str(guests["cmdline"]), "--memory", "size=3200M")
    assert p.returncode == 0, _err(p)
    ram = int(re.search(r"RAM (\d+) MiB", _out(p)).group(1))
    assert 3199 <= ram <= 3200


@pytest.mark.parametrize("no_reboot", [True, False], ids=["no-reboot", "reboot"])
def test_triple_fault_exits_nonzero_with_cpu_state(kvm, hyperpy_cli, guests, no_reboot):
    # Not a reset: a triple fault ends hyperpy whether or not resets reboot.
    p = hyperpy_cli("run", "--kernel", str(guests["triplefault"]), no_reboot=no_reboot)
    assert p.returncode == 1
    assert "about to triple fault" in _out(p)
    err = _err(p)
    assert "triple fault" in err and "RIP 0x" in err
    assert "Traceback" not in err


def test_emulation_failure_reports_rip_and_instruction_bytes(kvm, hyperpy_cli, guests):
    p = hyperpy_cli("run", "--kernel", str(guests["emulfail"]))
    assert p.returncode == 3, _err(p)
    err = _err(p)
    assert "emulation failure" in err
    m = re.search(r"RIP (0x[0-9a-f]+).*instruction bytes ([0-9a-f ]+|unavailable)", err)
    assert m, err
    # The guest executes `popcnt (%rax)` on MMIO: F3 (REX) 0F B8.
    assert m.group(2).startswith("f3 ") and "0f b8" in m.group(2), err
    assert "Traceback" not in err


def test_boot_timer_is_logged(kvm, hyperpy_cli, guests):
    p = hyperpy_cli("run", "--kernel", str(guests["boottimer"]), "-v")
    assert p.returncode == 0
    assert re.search(r"Guest-boot-time =\s+\d+ us", _err(p)), _err(p)


@pytest.mark.parametrize("cpus", [2, 4])
def test_smp_boot(kvm, hyperpy_cli, cpus):
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--cpus", f"boot={cpus}")
    assert p.returncode == 0, _err(p)
    assert "Hello from hyperpy guest" in _out(p)


# --- guest reboots -----------------------------------------------------------------------------

def test_plain_run_boots_without_typer_or_pydantic(kvm):
    """`hyperpy run` without --api-socket takes the argparse fast path too (hyperpy/launch.py):
    the command line's framework stays off the boot path."""
    import subprocess
    import sys
    import tempfile

    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "hyperpy", "run", "--kernel",
                        "builtin:hello", "--memory", "size=64M"], capture_output=True, timeout=120,
                       cwd=tempfile.gettempdir())
    assert p.returncode == 0 and "Hello from hyperpy guest" in _out(p), _err(p)
    imported = {ln.split("|")[-1].strip() for ln in _err(p).splitlines() if "|" in ln}
    assert "hyperpy.vmm" in imported
    for heavy in ("typer", "rich", "click", "pydantic", "hyperpy.cli"):
        assert heavy not in imported, heavy


def test_builtin_hello_ends_without_flags(kvm, hyperpy_cli):
    """The default guest powers off (ACPI S5), so a plain `hyperpy run` of it ends by itself."""
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--memory", "size=64M", "-v", no_reboot=False)
    assert p.returncode == 0, _err(p)
    assert _out(p) == "Hello from hyperpy guest\ncmdline: \n"
    assert "VM ended: guest power-off" in _err(p) and "rebooting" not in _err(p)


def test_no_reboot_exits_on_a_guest_reset(kvm, hyperpy_cli, guests):
    p = hyperpy_cli("run", "--no-reboot", "--kernel", str(guests["cmdline"]), "--memory", "size=64M",
                    "-v", no_reboot=False)
    assert p.returncode == 0, _err(p)
    assert _out(p).count("CMDLINE[") == 1
    assert "VM ended: guest reset" in _err(p) and "rebooting" not in _err(p)


def test_a_real_mode_jump_to_the_bios_reset_vector_is_a_guest_reset(kvm, guests):
    """Linux without firmware reboots by dropping to real mode and far-jumping to F000:FFF0
    (its BIOS method, after the EFI one did nothing): what hyperpy puts there resets the VM."""
    from hyperpy.vmm import ExitReason, build_vm

    vm = build_vm(_config(guests["hello"]))
    try:
        def seg(sel, kind):
            return {"base": sel << 4, "limit": 0xFFFF, "selector": sel, "type": kind,
                    "present": 1, "dpl": 0, "db": 0, "s": 1, "l": 0, "g": 0, "unusable": 0}

        data = seg(0, 3)
        vm.vcpus[0].set_sregs({"cs": seg(0xF000, 0xB), "ds": data, "es": data, "fs": data,
                               "gs": data, "ss": data, "cr0": 0x60000010, "cr3": 0, "cr4": 0,
                               "efer": 0, "idt": {"base": 0, "limit": 0x3FF}})
        vm.vcpus[0].set_regs({"rip": 0xFFF0, "rflags": 0x2, "rsp": 0x7000})
        result = vm.run()
    finally:
        vm.close()
    assert result.reason is ExitReason.RESET, result
    assert vm.acpi_pm.resets == 1 and vm.i8042.resets == 0


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _text(path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _start_rebooting(guest, *args):
    import subprocess
    import sys
    import tempfile

    from testutil import hyperpy_command

    return subprocess.Popen(hyperpy_command("run", "--kernel", str(guest), "--memory", "size=64M",
                                            *args, "-v", no_reboot=False),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=tempfile.gettempdir())


@pytest.mark.parametrize("sig,status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_guest_reset_reboots_until_a_signal(kvm, guests, tmp_path, sig, status):
    """Without --no-reboot a reset boots the guest again in the same process with the same
    configuration, and each boot appends to the serial file; the process stays until a signal
    ends it cleanly, wherever in the boot-reset-rebuild cycle the signal lands."""
    import signal

    serial = tmp_path / "serial.log"
    serial.write_text("before\n")
    proc = _start_rebooting(guests["cmdline"], "--cmdline", "boot a=b", "--serial", f"file={serial}")
    boots = lambda: serial.read_text().count("CMDLINE[boot a=b]")  # noqa: E731
    try:
        assert _wait_for(lambda: boots() >= 3 or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.stderr.read().decode()   # still running after 3 boots
    finally:
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=30)
    err = proc.stderr.read().decode(errors="replace")
    assert rc == status, err
    assert f"hyperpy: VM stopped: {'terminated (SIGTERM)' if status == 143 else 'interrupted (SIGINT)'}" in err
    assert "Traceback" not in err
    assert "guest reset: rebooting the VM (boot 2)" in err and "(boot 3)" in err
    text = serial.read_text()
    # The first boot truncated the file; every boot's complete output follows the one before.
    assert not text.startswith("before")
    lines = text.splitlines()
    done = len(lines) // 2 * 2
    assert lines[:done] == ["CMDLINE[boot a=b]", "RAM 63 MiB"] * (done // 2), text[-500:]
    assert done // 2 >= 3


def test_console_file_is_appended_on_reboot(kvm, guests, tmp_path):
    serial, console = tmp_path / "serial.log", tmp_path / "hvc0.log"
    proc = _start_rebooting(guests["virtio_console"], "--serial", f"file={serial}",
                            "--console", f"file={console}")
    try:
        assert _wait_for(lambda: _text(serial).count("CONSOLE done") >= 2 or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
    assert rc == 143
    assert console.read_text().count("hello from virtio-console\n") >= 2


# --- serial port ------------------------------------------------------------------------------

def test_uart_loopback(kvm, hyperpy_cli, guests):
    p = hyperpy_cli("run", "--kernel", str(guests["uart_loopback"]))
    assert p.returncode == 0
    assert "UART loopback PASS" in _out(p)


def test_uart_interrupt_through_ioapic(kvm, hyperpy_cli, guests):
    p = hyperpy_cli("run", "--kernel", str(guests["uart_irq"]))
    assert p.returncode == 0
    assert re.search(r"UART IRQ OK [1-9]", _out(p)), _out(p)


def test_serial_to_file_and_off(kvm, hyperpy_cli, tmp_path):
    log = tmp_path / "serial.log"
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--serial", f"file={log}", "--cmdline", "f")
    assert p.returncode == 0
    assert _out(p) == ""
    assert log.read_text().startswith("Hello from hyperpy guest\ncmdline: f\n")
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--serial", "off")
    assert p.returncode == 0 and _out(p) == ""


def test_serial_input_from_interactive_stdin(kvm, guests):
    """On a terminal, typed bytes reach the guest's UART: the echo guest echoes until 'q'."""
    import pty
    import select
    import subprocess
    import sys
    import tempfile

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hyperpy", "run", "--no-reboot",
                             "--kernel", str(guests["echo"])],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    os.close(slave)
    seen = b""
    sent = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and b"ECHO DONE" not in seen:
            if not sent and b"ECHO READY" in seen:
                os.write(master, b"hi there q")
                sent = True
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 1024)
                except OSError:
                    break
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"hi there \r\nECHO DONE" in seen.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), seen


def test_serial_input_from_a_pipe(kvm, guests):
    """``--serial tty`` reads stdin when it is a pipe too (as cloud-hypervisor does), so a
    script can type into the guest; the pipe's end stops the feed, not the VM."""
    import subprocess
    import sys
    import tempfile

    proc = subprocess.Popen([sys.executable, "-m", "hyperpy", "run", "--no-reboot",
                             "--kernel", str(guests["echo"])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tempfile.gettempdir())
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"ECHO READY" not in seen and time.monotonic() < deadline:
            seen += os.read(proc.stdout.fileno(), 1024)
        proc.stdin.write(b"piped in q")
        proc.stdin.close()
        seen += proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert b"piped in \nECHO DONE" in seen.replace(b"\r\n", b"\n"), seen


# --- the run loop: fast C dispatch, Python fallback, reference loop --------------------------

@pytest.mark.parametrize("run_loop", ["cython", "python"])
def test_port_exits_reach_the_null_device(kvm, guests, run_loop):
    from hyperpy.vmm import ExitReason, build_vm

    vm = build_vm(_config(guests["exits"], "count=3000"), run_loop=run_loop)
    result = vm.run()
    assert result.reason is ExitReason.RESET
    assert vm.post_port.writes == 3000
    assert vm.stats.exits >= 3000
    if run_loop == "cython":
        assert vm.stats.fast_exits >= 3000          # served in C without Python
        assert vm.stats.slow_exits < 3000


@pytest.mark.parametrize("run_loop", ["cython", "python"])
def test_mmio_exits_reach_a_python_device(kvm, guests, run_loop):
    from hyperpy.vmm import ExitReason, build_vm

    class Recorder:
        def __init__(self):
            self.writes = []

        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            self.writes.append((offset, size, value))

    vm = build_vm(_config(guests["mmio_exits"], "count=500 addr=0xd0000000"), run_loop=run_loop)
    rec = Recorder()
    vm.mmio_bus.register(0xD000_0000, 0x1000, rec)
    assert vm.run().reason is ExitReason.RESET
    assert len(rec.writes) == 500
    assert all(off == 0 and size == 4 for off, size, _ in rec.writes)


def test_pause_resume_and_stop(kvm, guests):
    from hyperpy.vmm import ExitReason, VmExit, build_vm

    vm = build_vm(_config(guests["exits"], "count=100000000"))
    t = threading.Thread(target=vm.run)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while vm.post_port.writes < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.post_port.writes >= 1000
        vm.pause()
        assert vm.paused
        frozen = vm.post_port.writes
        time.sleep(0.3)
        assert vm.post_port.writes == frozen      # no vCPU runs while paused
        vm.resume()
        deadline = time.monotonic() + 30
        while vm.post_port.writes == frozen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.post_port.writes > frozen
    finally:
        vm.finish(VmExit(ExitReason.STOPPED, "test"))
        t.join(timeout=30)
    assert not t.is_alive()


def test_stop_kicks_vcpus_blocked_in_kvm_run(kvm, guests):
    """Application processors wait for INIT/SIPI inside KVM_RUN; stopping must still end."""
    from hyperpy.vmm import ExitReason, VmExit, build_vm

    vm = build_vm(_config(guests["exits"], "count=100000000", cpus="boot=3"))
    t = threading.Thread(target=vm.run)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    vm.finish(VmExit(ExitReason.STOPPED, "test"))
    t.join(timeout=10)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 5


# --- bad input: one clear line, no traceback ---------------------------------------------

def test_missing_kernel_file(kvm, hyperpy_cli, tmp_path):
    p = hyperpy_cli("run", "--kernel", str(tmp_path / "nope"))
    assert p.returncode == 2
    err = _err(p).strip()
    assert len(err.splitlines()) == 1 and "no such file" in err and "nope" in err


@pytest.mark.parametrize("content,needle", [
    (b"this is not a kernel at all" * 10, "not an ELF or bzImage"),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 9, "truncated"),
])
def test_bad_kernel_file(kvm, hyperpy_cli, tmp_path, content, needle):
    k = tmp_path / "bad.bin"
    k.write_bytes(content)
    p = hyperpy_cli("run", "--kernel", str(k))
    assert p.returncode == 2
    err = _err(p).strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err and "bad.bin" in err


def test_kernel_larger_than_ram(kvm, hyperpy_cli, guests, tmp_path):
    """An ELF whose segment lies beyond guest RAM is refused before the VM starts."""
    import struct

    data = bytearray(guests["hello"].read_bytes())
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if struct.unpack_from("<I", data, off)[0] == 1:  # PT_LOAD: move it to 3 GiB
            struct.pack_into("<QQ", data, off + 0x10, 0xC000_0000, 0xC000_0000)
    k = tmp_path / "far.elf"
    k.write_bytes(bytes(data))
    p = hyperpy_cli("run", "--kernel", str(k), "--memory", "size=64M")
    assert p.returncode == 2, _err(p)
    assert len(_err(p).strip().splitlines()) == 1


# --- guest memory backings ------------------------------------------------------------------

HUGEPAGES = "/proc/sys/vm/nr_hugepages"


@pytest.fixture
def hugepages_reserved():
    """Reserve 2 MiB huge pages for the test (root only) and restore the old count after."""
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages needs root")
    with open(HUGEPAGES) as f:
        old = int(f.read())

    def reserve(n):
        with open(HUGEPAGES, "w") as f:
            f.write(str(n))
        with open(HUGEPAGES) as f:
            return int(f.read())

    yield reserve
    reserve(old)


def test_hugepages_boot_when_free(kvm, hyperpy_cli, hugepages_reserved):
    got = hugepages_reserved(40)
    assert got >= 32, f"host could only reserve {got} huge pages"
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--memory", "size=64M,hugepages=on", "-v")
    assert p.returncode == 0, _err(p)
    assert "Hello from hyperpy guest" in _out(p)
    assert "on huge pages" in _err(p)


def test_hugepages_too_few_is_a_clear_error(kvm, hyperpy_cli, hugepages_reserved):
    hugepages_reserved(4)
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--memory", "size=64M,hugepages=on")
    assert p.returncode == 2
    err = _err(p).strip()
    assert len(err.splitlines()) == 1
    assert "32 needed" in err and "4 free" in err and "nr_hugepages" in err


def test_hugetlbfs_file_backing(kvm, hyperpy_cli, hugepages_reserved, tmp_path):
    import subprocess

    hugepages_reserved(40)
    mnt = tmp_path / "huge"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "hugetlbfs", "none", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount hugetlbfs here")
    try:
        p = hyperpy_cli("run", "--kernel", "builtin:hello", "--memory", f"size=64M,file={mnt}")
        assert p.returncode == 0, _err(p)
        assert "Hello from hyperpy guest" in _out(p)
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.parametrize("memory", ["size=64M,shared=on", "size=64M,prefault=on"])
def test_shared_and_prefaulted_memory(kvm, hyperpy_cli, memory):
    p = hyperpy_cli("run", "--kernel", "builtin:hello", "--memory", memory)
    assert p.returncode == 0, _err(p)
    assert "Hello from hyperpy guest" in _out(p)


def test_file_backed_memory_holds_guest_writes(kvm, guests, tmp_path):
    """With file= and shared=on the guest's RAM is the file: the loaded kernel is in it."""
    from hyperpy.vmm import build_vm

    f = tmp_path / "ram"
    f.touch()
    vm = build_vm(_config(guests["hello"], memory=f"size=64M,file={f}"))
    vm.run()
    data = f.read_bytes()
    assert len(data) == 64 << 20
    elf_text = guests["hello"].read_bytes()
    # the first PT_LOAD of the hello guest lands at 1 MiB
    assert b"Hello from hyperpy guest" in data[1 << 20:(1 << 20) + len(elf_text) + 4096]


# --- initramfs ------------------------------------------------------------------------------

@pytest.mark.parametrize("guest", ["initrd", "initrd64"])
def test_initramfs_reaches_the_guest(kvm, hyperpy_cli, guests, guest, tmp_path):
    img = tmp_path / "initrd.img"
    # The guest prints the image's leading printable bytes: end the marker with a NUL.
    img.write_bytes(b"INITRAMFS-MARKER-0123456789\0" + os.urandom(100_000))
    p = hyperpy_cli("run", "--kernel", str(guests[guest]), "--initramfs", str(img), "--memory", "size=64M")
    assert p.returncode == 0, _err(p)
    m = re.search(r"INITRD (\d+) (0x[0-9a-f]+) \[(.*)\]", _out(p))
    assert m, _out(p)
    assert int(m.group(1)) == img.stat().st_size
    addr = int(m.group(2), 16)
    assert addr % 4096 == 0 and addr + int(m.group(1)) <= 64 << 20
    assert m.group(3) == "INITRAMFS-MARKER-0123456789"


def test_initramfs_larger_than_ram_is_refused(kvm, hyperpy_cli, guests, tmp_path):
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(80 << 20)
    p = hyperpy_cli("run", "--kernel", str(guests["initrd"]), "--initramfs", str(img), "--memory", "size=64M")
    assert p.returncode == 2
    err = _err(p).strip()
    assert len(err.splitlines()) == 1 and "big.img" in err, err


def test_sigterm_stops_the_vm_cleanly(kvm, guests):
    import signal
    import subprocess
    import sys
    import tempfile

    proc = subprocess.Popen([sys.executable, "-m", "hyperpy", "run", "--no-reboot",
                             "--kernel", str(guests["exits"]), "--cmdline", "count=100000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    err = proc.stderr.read().decode()
    assert rc == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
