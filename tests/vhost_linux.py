"""Linux-tier helpers: hyperpy vhost-user back-ends (as processes) + QEMU TCG booting the guest kit.

Used by tests/test_vhost_user_linux.py and bench/test_bench_vhost_user.py.  QEMU runs the guest
(q35, TCG, guest RAM in a shared memfd) and plays the vhost-user front-end; the back-ends are
``hyperpy vhost-user blk|net`` processes whose logs say what the Linux driver negotiated.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-system-x86_64")
QSD = shutil.which("qemu-storage-daemon")
MISSING_QEMU = "qemu-system-x86_64 not installed (apt-get install -y qemu-system-x86)"


def require_qemu() -> None:
    """Skip without QEMU -- except under CI, where the Linux tier must run: fail there."""
    if QEMU is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {MISSING_QEMU}")
        pytest.skip(MISSING_QEMU)


def feature_line(log: str) -> str:
    """The names of the last 'driver features' line a back-end logged."""
    lines = re.findall(r"driver features 0x[0-9a-f]+: (.*)", log)
    return lines[-1] if lines else ""


class Backend:
    """``hyperpy vhost-user KIND --socket SOCK ARGS...`` as a child process, logging to a file.

    ``netns`` (a tests/netns.py NetNs): run it in that network namespace -- the net back-end,
    which creates a tap and addresses it, always runs in the test's own namespace.  Its Unix
    socket is a file, so QEMU reaches it from any namespace."""

    def __init__(self, kind: str, sock: Path, args: list[str], log: Path, timeout: float = 20,
                 netns=None) -> None:
        self.sock, self.log_path = sock, log
        argv = [sys.executable, "-m", "hyperpy", "vhost-user", kind, "--socket", str(sock), *args,
                "-v", "--log-file", str(log)]
        self.proc = subprocess.Popen(
            netns.cmd(argv) if netns is not None else argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=tempfile.gettempdir())
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"vhost-user {kind} back-end exited: "
                                     f"{self.proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"vhost-user {kind} back-end did not create {sock}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User + system CPU time the back-end process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tick

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Guest:
    kernel: Path
    initrd: Path
    smp: int = 1
    mem_mb: int = 256
    devices: list[str] = field(default_factory=list)   # extra QEMU arguments
    append: str = "console=ttyS0 panic=-1 quiet"       # kernel command line

    def command(self) -> list[str]:
        return [QEMU, "-M", "q35,accel=tcg,memory-backend=mem", "-m", f"{self.mem_mb}M",
                "-object", f"memory-backend-memfd,id=mem,size={self.mem_mb}M,share=on",
                "-smp", str(self.smp), "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-no-reboot", "-kernel", str(self.kernel),
                "-initrd", str(self.initrd), "-append", self.append,
                *self.devices]

    def run(self, timeout: float = 150) -> tuple[int, str]:
        """Boot, wait for power-off; (QEMU's exit status, console output)."""
        try:
            p = subprocess.run(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace")
            raise AssertionError(f"guest did not power off within {timeout}s; console:\n{out[-3000:]}") from None
        return p.returncode, p.stdout.decode(errors="replace").replace("\r\n", "\n")


def blk_device(chardev: str, sock: Path, *props: str) -> list[str]:
    return ["-chardev", f"socket,id={chardev},path={sock}",
            "-device", ",".join(["vhost-user-blk-pci", f"chardev={chardev}", *props])]


def net_device(chardev: str, sock: Path, mac: str, queues: int = 1, *props: str) -> list[str]:
    # vectors=0 (INTx): QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers when a
    # virtio-net-pci with a vhost-user netdev unmasks its MSI-X vectors (before any vhost-user
    # traffic of the data path); with INTx it works.  vhost-user-blk-pci is not affected.
    extra = ["mq=on"] if queues > 1 else []
    extra.append("vectors=0")
    return ["-chardev", f"socket,id={chardev},path={sock}",
            "-netdev", f"vhost-user,id={chardev}n,chardev={chardev},queues={queues}",
            "-device", ",".join(["virtio-net-pci", f"netdev={chardev}n", f"mac={mac}", *extra,
                                 *props])]
