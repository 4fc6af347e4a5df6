"""A private network namespace per test, for every test that creates a tap.

No test may put an address on a tap (hyperpy's ``--net ...,ip=,mask=``, ``hyperpy vhost-user
net --ip``, or the IPv6 link-local address the kernel gives any interface that goes up) in this
machine's own network namespace.  Tests create a namespace named ``hptest-<random>``, run the
process that owns the tap (hyperpy, a vhost-user back-end, QEMU) in it with ``ip netns exec``,
open their own sockets on the tap from inside it (:meth:`NetNs.entered`), and delete it
afterwards, also when the test fails.  Traffic stays on loopback or inside the namespace.

Use the ``netns`` fixture (tests/conftest.py) or the :func:`netns` context manager.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hptest-"
NETNS_DIR = Path("/run/netns")          # where `ip netns add` pins the namespaces
IP = shutil.which("ip") or shutil.which("ip", path="/sbin:/usr/sbin")


def problem() -> str | None:
    """Why this host cannot give a test its own network namespace, or None."""
    if os.geteuid() != 0:
        return "network namespaces and taps need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    if IP is None:
        return "iproute2's ip is not installed (apt-get install -y iproute2)"
    return None


def _setns(fd: int) -> None:
    """Move the calling thread into the namespace ``fd`` refers to (type 0: whatever it is)."""
    if hasattr(os, "setns"):                      # Python 3.12+
        os.setns(fd, 0)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass(frozen=True)
class NetNs:
    """One network namespace created by :func:`netns`."""

    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: same pid)."""
        return [IP, "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(argv), check=check, **kw)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kw)

    def ip(self, *args: str) -> str:
        """``ip -n NAME ARGS``; its output."""
        return subprocess.run([IP, "-n", self.name, *args], check=True, capture_output=True,
                              text=True).stdout

    def read(self, path: str) -> str:
        """A file as the namespace sees it (``/sys/class/net/...`` is per namespace)."""
        return self.run(["cat", path]).stdout

    def listdir(self, path: str) -> list[str]:
        return self.run(["ls", "-1", path]).stdout.split()

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread inside the namespace: sockets opened and taps created here stay
        in it after the block; the thread comes back to its own namespace."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def links(self) -> list[str]:
        """The names of the namespace's interfaces."""
        with self.entered():
            return [name for _, name in socket.if_nameindex()]

    def wait_for_link(self, name: str | None = None, timeout: float = 60,
                      proc: subprocess.Popen | None = None) -> str | None:
        """Wait until interface ``name`` (any but ``lo`` when None) exists; its name, or None
        on timeout or when ``proc`` exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [n for n in self.links() if n != "lo" and (name is None or n == name)]
            if found:
                return found[0]
            if proc is not None and proc.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def packet_socket(self, ifname: str, ethertype: int) -> socket.socket:
        """An AF_PACKET socket bound to ``ifname`` in the namespace, for one ethertype."""
        with self.entered():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
            try:
                s.bind((ifname, 0))
            except OSError:
                s.close()
                raise
        return s

    def pids(self) -> list[int]:
        out = subprocess.run([IP, "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def _delete(ns: NetNs) -> None:
    # Only this test's processes can be in its namespace: end any it left behind (they would
    # keep the namespace, and its taps, alive), then remove the namespace.
    for pid in ns.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run([IP, "netns", "delete", ns.name], capture_output=True)


@contextlib.contextmanager
def netns(disable_ipv6: bool = True) -> Iterator[NetNs]:
    """A fresh ``hptest-<random>`` namespace with loopback up (and, by default, no IPv6: no
    link-local addresses or router solicitations on its taps); deleted on the way out."""
    why = problem()
    if why:
        raise RuntimeError(why)
    ns = NetNs(PREFIX + secrets.token_hex(4))
    subprocess.run([IP, "netns", "add", ns.name], check=True, capture_output=True)
    try:
        ns.ip("link", "set", "lo", "up")
        if disable_ipv6:
            ns.run(["sh", "-c", "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 "
                    "/proc/sys/net/ipv6/conf/default/disable_ipv6; do "
                    "[ -e $f ] && echo 1 > $f; done; true"])
        yield ns
    finally:
        _delete(ns)
