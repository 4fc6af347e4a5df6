"""The nested tier's L1 host ("H"): a Linux with a real /dev/kvm and a real /dev/vfio, under QEMU.

L0 (this machine) runs QEMU TCG with ``-cpu max``, which emulates AMD SVM with nested paging.
H is Debian's 6.12 cloud kernel (the guest kit, tests/linuxkit.py) with a busybox initramfs that
loads kvm_amd, virtio_iommu, vfio_pci, vfio_iommu_type1 and tun, and mounts this machine's root
file system read-only over virtio-fs (QEMU's virtiofsd, ``-o sandbox=chroot``).  Commands run
``chroot``-ed into that tree, so H runs the very wheel, Python, QEMU and e2fsprogs installed here;
writable places in H are tmpfs (``/run``, ``/dev/shm``) and a hugetlbfs at ``/dev/hugepages``.

L0 QEMU gives H a virtio-iommu and NVMe controllers (``nvme=N``) whose backing files live here:
H binds them to vfio-pci, so a VMM in H passes a real VFIO device to its guest ("G"), and what G
writes to it ends up in those files.

The harness talks to H over a second serial port (ttyS1, a Unix socket on L0): it sends one
command line, H runs it in the chroot and answers with its output and ``HPEND-<token> <status>``.
One H serves many commands, so a test session boots it once (tests/nested/conftest.py).

    with L1Host(kit, workdir) as h:
        r = h.sh("nproc; ls /dev/kvm")
        assert r.rc == 0, r.out
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import linuxkit  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64")
VIRTIOFSD = next((p for p in ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd",
                              shutil.which("virtiofsd") or "") if p and os.path.exists(p)), None)

#: Modules H loads (dependencies come from modules.dep); virtiofs, nvme and ext4 are built in.
HOST_MODULES = ["kvm_amd", "virtio_iommu", "vfio_pci", "vfio_iommu_type1", "tun", "virtio_rng"]

#: The mounts that make L0's read-only tree a usable root inside H.
HOST_INIT = r"""
echo 1 > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
mkdir -p /host
mount -t virtiofs -o ro hostroot /host || echo "HPCHECK fail virtiofs"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm /host/dev/hugepages
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o size=50% tmpfs /host/dev/shm
mount -t tmpfs -o size=75% tmpfs /host/run
mount -t hugetlbfs -o pagesize=2M hugetlbfs /host/dev/hugepages
mkdir -p /host/run/tmp
# A keeper VM (irqchip + one vCPU that never runs) for H's lifetime, created while H has one CPU:
# KVM flips kernel static keys when the first VM or vCPU comes and the last goes (the scheduler's
# preempt notifiers, the LAPIC "software disabled" key), patching H's text with int3 while the
# other CPU runs it -- an H oops in __schedule under L0's MTTCG.  With the keeper the counts never
# drop to 0, so G's VMs come and go without patching anything.
chroot /host /usr/bin/env -i PATH=/usr/bin:/bin @PY@ -c '
import time
from hyperpy._fast.kvm import Kvm
vm = Kvm().create_vm(); vm.create_irqchip(); cpu = vm.create_vcpu(0)
open("/run/keeper.ready", "w").close()
while True: time.sleep(3600)
' </dev/null >/dev/null 2>&1 &
for i in $(seq 900); do [ -e /host/run/keeper.ready ] && break; sleep 0.1; done
# H booted on one CPU (maxcpus=1, see L1Host.qemu_command): the others come up now, after its
# boot-time code patching, the module loads and the keeper.
for c in /sys/devices/system/cpu/cpu[1-9]*/online; do echo 1 > $c; done
ip link set lo up 2>/dev/null
echo "HPHOST keeper=$(test -e /host/run/keeper.ready && echo yes || echo no)"
echo "HPHOST cpus=$(grep -c ^processor /proc/cpuinfo) kvm=$(test -c /dev/kvm && echo yes || echo no) nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null) npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null) groups=$(ls /sys/kernel/iommu_groups | wc -l)"
# NVMe controllers from L0 go to vfio-pci (H's own nvme driver is built in and takes them first).
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/class)" = 0x010802 ]; then
        b=$(basename $d)
        [ -e $d/driver ] && echo $b > $d/driver/unbind
        echo vfio-pci > $d/driver_override
        echo $b > /sys/bus/pci/drivers_probe
        echo "HPHOST nvme $b group $(basename $(readlink $d/iommu_group)) driver $(basename $(readlink $d/driver))"
    fi
done
stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 3<>/dev/ttyS1
echo HPREADY >&3
while read -r line <&3; do
    tok=${line%% *}
    cmd=${line#* }
    [ "$cmd" = exit ] && break
    chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root TMPDIR=/run/tmp LANG=C.UTF-8 /bin/bash -c "$cmd" </dev/null >&3 2>&1 3>&-
    echo "HPEND-$tok $?" >&3
done
"""


class HostError(AssertionError):
    """H did not boot, or a command did not answer in time."""


@dataclass
class Result:
    rc: int
    out: str
    seconds: float


class L1Host:
    """One L1 host under L0 QEMU TCG; see the module docstring."""

    def __init__(self, kit: linuxkit.Kit, workdir: Path, mem_mb: int = 6144, smp: int = 2,
                 nvme: int = 2, nvme_mb: int = 64, hugepages_2m: int = 0) -> None:
        self.kit, self.dir = kit, Path(workdir)
        self.mem_mb, self.smp, self.nvme, self.nvme_mb = mem_mb, smp, nvme, nvme_mb
        self.hugepages_2m = hugepages_2m
        self.dir.mkdir(parents=True, exist_ok=True)
        self.console_path = self.dir / "h-console.log"
        self.cmd_sock = self.dir / "h-cmd.sock"
        self.fs_sock = self.dir / "h-fs.sock"
        self.nvme_images = [self.dir / f"nvme{i}.img" for i in range(nvme)]
        self.procs: list[subprocess.Popen] = []
        self.chan: socket.socket | None = None
        self.buf = b""
        self.boot_seconds = 0.0
        self.facts: dict = {}

    # ------------------------------------------------------------------ set-up
    def _initramfs(self) -> Path:
        return linuxkit.build_initramfs(self.kit, HOST_INIT.replace("@PY@", sys.executable),
                                        HOST_MODULES, None,
                                        self.dir / "h-initramfs.cpio")

    def qemu_command(self, initrd: Path) -> list[str]:
        # maxcpus=1: H boots on one CPU and onlines the rest in HOST_INIT.  Under L0's
        # multi-threaded TCG, Linux patching kernel text that another CPU executes (int3-based
        # text_poke_bp) has oopsed H: a boot-time static key flip (sched_clock's "stable" at
        # late_initcall, seen as an int3 Oops in sched_clock_cpu) is such a patch; on one CPU
        # there is no other CPU to race.  docs/testing.md has the rest of the story.
        # panic_on_rcu_stall: when one of H's CPUs stops taking interrupts (the hang of
        # docs/testing.md: an RCU stall on it, then silence), H panics and L0 QEMU exits
        # (-no-reboot), so the harness knows within a minute instead of at the script's timeout.
        append = ("console=ttyS0 panic=-1 quiet loglevel=4 maxcpus=1 "
                  f"hugepagesz=2M hugepages={self.hugepages_2m} transparent_hugepage=never "
                  "sysctl.kernel.panic_on_rcu_stall=1")
        # Multi-threaded TCG (QEMU's default): one thread per vCPU of H.  docs/testing.md lists
        # the rare flakes it has shown and why one thread is not used (too slow for the budget).
        cmd = [QEMU, "-M", "q35,accel=tcg,memory-backend=mem", "-cpu", "max",
               "-smp", str(self.smp), "-m", f"{self.mem_mb}M",
               "-object", f"memory-backend-memfd,id=mem,size={self.mem_mb}M,share=on",
               "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               "-kernel", str(self.kit.vmlinuz), "-initrd", str(initrd), "-append", append,
               "-chardev", f"file,id=con,path={self.console_path}", "-serial", "chardev:con",
               "-chardev", f"socket,id=cmd,path={self.cmd_sock},server=on,wait=off",
               "-serial", "chardev:cmd",
               "-chardev", f"socket,id=fs,path={self.fs_sock}",
               "-device", "vhost-user-fs-pci,chardev=fs,tag=hostroot",
               "-device", "virtio-iommu-pci"]
        for i, img in enumerate(self.nvme_images):
            cmd += ["-drive", f"file={img},if=none,id=nv{i},format=raw,cache=writethrough",
                    "-device", f"nvme,drive=nv{i},serial=hpnv{i}"]
        return cmd

    def start(self, timeout: float = 240) -> "L1Host":
        if QEMU is None or VIRTIOFSD is None:
            raise HostError("the nested tier needs qemu-system-x86_64 and virtiofsd "
                            "(apt-get install qemu-system-x86)")
        t0 = time.monotonic()
        self.buf = b""
        if self.console_path.exists() and self.console_path.stat().st_size:
            # A second boot of H (after it died) keeps the first one's console: its oops.
            n = len(list(self.dir.glob("h-console.*.log")))
            self.console_path.rename(self.dir / f"h-console.{n}.log")
        for img in self.nvme_images:
            with open(img, "wb") as f:
                f.truncate(self.nvme_mb << 20)
        initrd = self._initramfs()
        for p in (self.cmd_sock, self.fs_sock):
            p.unlink(missing_ok=True)
        fs_log = open(self.dir / "virtiofsd.log", "wb")
        self.procs.append(subprocess.Popen(
            [VIRTIOFSD, f"--socket-path={self.fs_sock}", "-o", "source=/", "-o", "sandbox=chroot",
             "-o", "cache=auto", "-o", "no_posix_lock", "-o", "log_level=err"],
            stdin=subprocess.DEVNULL, stdout=fs_log, stderr=subprocess.STDOUT))
        self._wait_for(lambda: self.fs_sock.exists(), 20, "virtiofsd did not create its socket")
        q_log = open(self.dir / "qemu.log", "wb")
        self.procs.append(subprocess.Popen(self.qemu_command(initrd), stdin=subprocess.DEVNULL,
                                           stdout=q_log, stderr=subprocess.STDOUT))
        self._wait_for(lambda: self.cmd_sock.exists(), 30, "L0 QEMU did not create its socket")
        self.chan = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.chan.connect(str(self.cmd_sock))
        self._read_until(b"HPREADY\n", timeout)
        self.boot_seconds = time.monotonic() - t0
        self.buf = b""
        con = self.console()
        m = re.search(r"HPHOST cpus=(\d+) kvm=(\S+) nested=(\S+) npt=(\S+) groups=(\d+)", con)
        if not m:
            raise HostError(f"H did not report its KVM state; console:\n{con[-3000:]}")
        self.facts = {"cpus": int(m.group(1)), "kvm": m.group(2), "nested": m.group(3),
                      "npt": m.group(4), "groups": int(m.group(5)),
                      "nvme": re.findall(r"HPHOST nvme (\S+) group (\S+) driver (\S+)", con)}
        if "HPHOST keeper=yes" not in con:
            raise HostError(f"H's keeper VM did not start; console:\n{con[-3000:]}")
        if self.facts["cpus"] != self.smp:
            raise HostError(f"H brought up {self.facts['cpus']} of its {self.smp} CPUs")
        return self

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            for p in self.procs:
                if p.poll() is not None:
                    raise HostError(f"{what}: {Path(p.args[0]).name} exited {p.returncode}; "
                                    f"see {self.dir}")
            if time.monotonic() > end:
                raise HostError(what)
            time.sleep(0.05)

    def _read_until(self, marker: bytes, timeout: float) -> bytes:
        assert self.chan is not None
        end = time.monotonic() + timeout
        while marker not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise HostError(f"H gave no {marker!r} within {timeout:.0f} s; got:\n"
                                f"{self.buf[-3000:].decode(errors='replace')}\n"
                                f"H console:\n{self.console()[-3000:]}")
            self.chan.settimeout(min(left, 1.0))
            try:
                chunk = self.chan.recv(65536)
            except ConnectionError as e:
                raise HostError(f"H's command channel broke ({e}); H console:\n"
                                f"{self.console()[-3000:]}") from None
            except socket.timeout:
                if self.procs[-1].poll() is not None:
                    raise HostError(f"L0 QEMU exited {self.procs[-1].returncode}; H console:\n"
                                    f"{self.console()[-3000:]}") from None
                continue
            if not chunk:
                raise HostError(f"H closed its command channel; H console:\n{self.console()[-3000:]}")
            self.buf += chunk
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    # ------------------------------------------------------------------ use
    def sh(self, command: str, timeout: float = 300) -> Result:
        """Run ``command`` (bash, one line) chroot-ed in H; its output and exit status."""
        if "\n" in command:
            raise ValueError("one line per command: put longer scripts in a file under the workdir")
        assert self.chan is not None, "H is not started"
        tok = secrets.token_hex(6)
        t0 = time.monotonic()
        try:
            self.chan.sendall(f"{tok} {command}\n".encode())
        except OSError as e:
            raise HostError(f"H's command channel broke ({e})") from None
        raw = self._read_until(f"HPEND-{tok} ".encode(), timeout)
        tail = self._read_until(b"\n", 10)
        text = raw.decode(errors="replace")
        out = text[: text.rindex(f"HPEND-{tok} ")]
        return Result(int(tail.strip() or b"-1"), out, time.monotonic() - t0)

    def script(self, name: str, body: str, timeout: float = 300) -> Result:
        """Write ``body`` to a fresh file in the workdir (L0's files are H's) and run it with bash."""
        path = self.dir / f"{name}-{secrets.token_hex(3)}.sh"
        path.write_text("set -u\n" + body)
        return self.sh(f"bash {path}", timeout)

    def console(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def close(self) -> None:
        if self.chan is not None:
            try:
                self.chan.sendall(b"x exit\n")
            except OSError:
                pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20 if p is self.procs[-1] else 5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        self.procs.clear()

    def __enter__(self) -> "L1Host":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
