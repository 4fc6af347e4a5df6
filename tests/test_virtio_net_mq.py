"""Multi-queue virtio-net from a host-side driver on a real multi-queue TAP (no VM).

The device sits behind the real virtio-pci transport (fake VM, MSI router and event loop); a
simulated driver (``virtio_driver.Driver``) drives every queue.  Covers the queue layout and the
features offered, the control queue (VQ_PAIRS_SET and everything it must refuse), frames sent
from a second tx queue and seen on the tap, frames injected on the tap arriving only in the rx
queues in use, and ``--net num_queues`` parsing.  Every tap lives in the test's own network
namespace (tests/netns.py).
"""

from __future__ import annotations

import itertools
import os
import random
import select
import socket
import struct
import time

import pytest

from hyperpy._fast import netio
from hyperpy._fast import uapi as U
from hyperpy._fast.addrspace import AddressSpace
from hyperpy._fast.guestmem import GuestMemory
from hyperpy.config import parse_net
from hyperpy.devices.virtio.net import CTRL_QUEUE_SIZE, Net
from hyperpy.devices.virtio.pci import COMMON_OFF, DEVICE_OFF, NOTIFY_OFF, VirtioPciDevice
from hyperpy.errors import ConfigError

from test_pci import FakeRouter
from virtio_driver import Driver

MAC = bytes.fromhex("525400abcdef")
ETHERTYPE = 0x88B5            # IEEE 802 local experimental: nothing else on the tap uses it
VNET_HDR = b"\0" * netio.VNET_HDR_SIZE
QSIZE = 64
RX_BUF = netio.VNET_HDR_SIZE + 1514
OK, ERR = U.VIRTIO_NET_OK, U.VIRTIO_NET_ERR
_names = itertools.count()


def _tun_problem() -> str | None:
    if os.geteuid() != 0:
        return "creating a TAP needs root (CAP_NET_ADMIN)"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as e:
        return f"/dev/net/tun: {e.strerror}"
    return None


needs_tun = pytest.mark.skipif(_tun_problem() is not None, reason=str(_tun_problem()))


class FakeVm:
    def ioeventfd(self, fd, addr, length=0, datamatch=None, pio=False, deassign=False):
        pass


class FakeLoop:
    """epoll's level-triggered behaviour with select(): runs the handlers of readable fds."""

    def __init__(self):
        self.fds = {}

    def add(self, fd, handler, events=None):
        assert fd not in self.fds, f"fd {fd} added twice"
        self.fds[fd] = handler

    def remove(self, fd):
        self.fds.pop(fd, None)

    def run_ready(self, rounds: int = 20):
        for _ in range(rounds):
            ready = select.select(list(self.fds), [], [], 0)[0] if self.fds else []
            if not ready:
                return
            for fd in ready:
                handler = self.fds.get(fd)
                if handler is not None:
                    handler()


def frame(src: bytes = MAC, dst: bytes = b"\xff" * 6, payload: bytes = b"hyperpy-mq") -> bytes:
    return (dst + src + ETHERTYPE.to_bytes(2, "big") + payload).ljust(60, b"\0")


class Harness:
    """A Net on a fresh tap in ``ns``, behind the virtio-pci transport, with one Driver per
    queue."""

    def __init__(self, num_queues: int, ns):
        self.ns = ns
        self.mem = GuestMemory()
        self.mem.add_region(0, 16 << 20)
        self.tap = f"hpmq{os.getpid() % 10000}n{next(_names)}"
        self.loop = FakeLoop()
        with ns.entered():     # the tap is created in the namespace of the thread opening it
            self.net = Net(self.tap, MAC, num_queues=num_queues)
        self.dev = VirtioPciDevice(self.net, vm=FakeVm(), router=FakeRouter(), loop=self.loop,
                                   address_space=AddressSpace(self.mem))
        self.drivers: dict[int, Driver] = {}
        self.ctrl: int | None = None

    # --- transport registers
    def w(self, off, size, value):
        self.dev.bar_write(0, COMMON_OFF + off, size, value)

    def r(self, off, size):
        return self.dev.bar_read(0, COMMON_OFF + off, size)

    def offered(self) -> int:
        feats = 0
        for sel in (0, 1):
            self.w(U.VIRTIO_PCI_COMMON_DFSELECT, 4, sel)
            feats |= self.r(U.VIRTIO_PCI_COMMON_DF, 4) << (32 * sel)
        return feats

    def queue_max(self, i: int) -> int:
        self.w(U.VIRTIO_PCI_COMMON_Q_SELECT, 2, i)
        return self.r(U.VIRTIO_PCI_COMMON_Q_SIZE, 2)

    def start(self, features: int, queues: list[int]) -> None:
        """Negotiate ``features``, set up ``queues`` and set DRIVER_OK."""
        self.w(U.VIRTIO_PCI_COMMON_STATUS, 1, 0)
        self.w(U.VIRTIO_PCI_COMMON_STATUS, 1, U.VIRTIO_CONFIG_S_ACKNOWLEDGE | U.VIRTIO_CONFIG_S_DRIVER)
        for sel in (0, 1):
            self.w(U.VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
            self.w(U.VIRTIO_PCI_COMMON_GF, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(U.VIRTIO_PCI_COMMON_STATUS, 1, 0x0B)   # ACKNOWLEDGE|DRIVER|FEATURES_OK
        assert self.r(U.VIRTIO_PCI_COMMON_STATUS, 1) & U.VIRTIO_CONFIG_S_FEATURES_OK
        for i in queues:
            base = 0x10000 + i * 0x80000
            drv = Driver(self.mem, QSIZE, base=base, data=base + 0x10000, data_end=base + 0x80000)
            self.w(U.VIRTIO_PCI_COMMON_Q_SELECT, 2, i)
            self.w(U.VIRTIO_PCI_COMMON_Q_SIZE, 2, drv.size)
            self.w(U.VIRTIO_PCI_COMMON_Q_DESCLO, 4, drv.desc_addr)
            self.w(U.VIRTIO_PCI_COMMON_Q_AVAILLO, 4, drv.avail_addr)
            self.w(U.VIRTIO_PCI_COMMON_Q_USEDLO, 4, drv.used_addr)
            self.w(U.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
            self.drivers[i] = drv
        self.w(U.VIRTIO_PCI_COMMON_STATUS, 1, 0x0F)   # + DRIVER_OK
        self.loop.run_ready()

    def start_mq(self, ctrl_vq: bool = True, mq: bool = True) -> None:
        pairs = self.net.max_pairs
        feats = 1 << U.VIRTIO_F_VERSION_1 | 1 << U.VIRTIO_NET_F_MAC
        if ctrl_vq:
            feats |= 1 << U.VIRTIO_NET_F_CTRL_VQ
        if mq:
            feats |= 1 << U.VIRTIO_NET_F_MQ
        n_data = 2 * pairs if mq else 2
        self.ctrl = n_data if ctrl_vq else None
        self.start(feats, list(range(n_data)) + ([self.ctrl] if ctrl_vq else []))

    @property
    def needs_reset(self) -> bool:
        return bool(self.r(U.VIRTIO_PCI_COMMON_STATUS, 1) & U.VIRTIO_CONFIG_S_NEEDS_RESET)

    def kick(self, i: int) -> None:
        self.dev.bar_write(0, NOTIFY_OFF + 4 * i, 2, i)   # the transport forwards it to the kick fd
        self.loop.run_ready()

    # --- control queue
    def command(self, readable: list[bytes], writable: list[int] = (1,)) -> tuple[int | None, int]:
        """Send one control command; returns (first writable byte or None, used length)."""
        drv = self.drivers[self.ctrl]
        head = drv.add(readable, list(writable))
        added = drv.inflight[head]
        self.kick(self.ctrl)
        used = drv.get_used()
        assert len(used) == 1 and used[0][0] == head, used
        ack = self.mem.read(added.writable[0][0], 1)[0] if added.writable else None
        return ack, used[0][1]

    def pairs_set(self, n: int) -> int | None:
        hdr = bytes([U.VIRTIO_NET_CTRL_MQ, U.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET])
        ack, written = self.command([hdr, struct.pack("<H", n)])
        assert written == 1
        return ack

    # --- frames
    def post_rx(self, pair: int) -> None:
        """Fill rx queue ``pair`` with buffers and kick it."""
        drv = self.drivers[2 * pair]
        while drv.free:
            drv.add([], [RX_BUF], publish=False)
        drv.publish()
        self.kick(2 * pair)

    def received(self, pair: int) -> list[bytes]:
        """Frames (vnet header stripped, after checking it) completed in rx queue ``pair``."""
        drv = self.drivers[2 * pair]
        bufs = dict(drv.inflight)
        out = []
        for head, n in drv.get_used():
            data = self.mem.read(bufs[head].writable[0][0], n)
            assert n >= netio.VNET_HDR_SIZE
            assert struct.unpack_from("<H", data, 10)[0] == 1   # num_buffers
            out.append(data[netio.VNET_HDR_SIZE:])
        return out

    def send(self, pair: int, f: bytes) -> int:
        """Queue ``f`` on tx queue ``pair`` and kick it; returns the chain head."""
        return self.drivers[2 * pair + 1].add([VNET_HDR + f])

    def attached_queues(self) -> int:
        return sum(1 for d in self.ns.listdir(f"/sys/class/net/{self.tap}/queues") if d.startswith("rx-"))

    def tun_flags(self) -> int:
        return int(self.ns.read(f"/sys/class/net/{self.tap}/tun_flags"), 16)

    def close(self) -> None:
        self.dev.close()


@pytest.fixture
def make(netns):
    made = []

    def _make(num_queues: int) -> Harness:
        h = Harness(num_queues, netns)
        made.append(h)
        return h

    yield _make
    for h in made:
        h.close()


@pytest.fixture
def sniffer(netns):
    """An AF_PACKET socket on a tap of the test's namespace, for our ethertype only."""
    socks = []

    def _open(tap: str) -> socket.socket:
        s = netns.packet_socket(tap, ETHERTYPE)
        socks.append(s)
        return s

    yield _open
    for s in socks:
        s.close()


def recv_frames(sock: socket.socket, timeout: float) -> list[bytes]:
    """What arrives within ``timeout`` (after a frame, only what follows within 0.1 s)."""
    out = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
        out.append(sock.recv(4096))
        deadline = min(deadline, time.monotonic() + 0.1)
    return out


# --- layout and features ----------------------------------------------------------------------

@needs_tun
def test_single_pair_is_unchanged(make):
    h = make(2)
    feats = h.offered()
    assert not feats & (1 << U.VIRTIO_NET_F_MQ) and not feats & (1 << U.VIRTIO_NET_F_CTRL_VQ)
    assert h.r(U.VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    assert h.dev.bar_read(0, DEVICE_OFF + 8, 2) == 1       # max_virtqueue_pairs
    assert not h.tun_flags() & netio.IFF_MULTI_QUEUE
    assert len(h.net.tap_fds) == 1 and h.net.tap_fd == h.net.tap_fds[0]
    # The tap is in the test's namespace, not in this machine's own.
    assert h.tap in h.ns.links() and h.tap not in [name for _, name in socket.if_nameindex()]


@needs_tun
@pytest.mark.parametrize("num_queues", [4, 8, 16])
def test_multi_queue_layout(make, num_queues):
    h = make(num_queues)
    pairs = num_queues // 2
    feats = h.offered()
    assert feats & (1 << U.VIRTIO_NET_F_MQ) and feats & (1 << U.VIRTIO_NET_F_CTRL_VQ)
    assert h.r(U.VIRTIO_PCI_COMMON_NUMQ, 2) == num_queues + 1          # rx/tx pairs + control
    assert h.dev.bar_read(0, DEVICE_OFF + 8, 2) == pairs                 # max_virtqueue_pairs
    assert h.queue_max(num_queues) == CTRL_QUEUE_SIZE
    assert all(h.queue_max(i) == 256 for i in range(num_queues))
    assert h.tun_flags() & netio.IFF_MULTI_QUEUE
    assert len(h.net.tap_fds) == pairs
    assert h.attached_queues() == 1      # only the first pair until VQ_PAIRS_SET


def test_num_queues_option():
    assert parse_net("tap=hp0").num_queues == 2
    for n in (2, 4, 8, 16):
        assert parse_net(f"tap=hp0,num_queues={n}").num_queues == n
    for bad, needle in (("3", "odd"), ("1", "out of range"), ("0", "out of range"),
                        ("18", "out of range"), ("15", "odd"), ("two", "not a number")):
        with pytest.raises(ConfigError) as e:
            parse_net(f"tap=hp0,num_queues={bad}")
        msg = str(e.value)
        assert msg.startswith("--net num_queues") and needle in msg and "\n" not in msg


# --- control queue ----------------------------------------------------------------------------

@needs_tun
def test_pairs_set_and_refusals(make):
    h = make(8)
    h.start_mq()
    assert h.net.active_pairs == 1
    assert h.pairs_set(4) == OK
    assert h.net.active_pairs == 4 and h.attached_queues() == 4
    assert h.pairs_set(2) == OK
    assert h.net.active_pairs == 2 and h.attached_queues() == 2
    for bad in (0, 5, U.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX, 0xFFFF):
        assert h.pairs_set(bad) == ERR
    assert h.net.active_pairs == 2 and h.attached_queues() == 2

    mq, pairs_set = U.VIRTIO_NET_CTRL_MQ, U.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
    # Unknown class (RX: promiscuous on), unknown MQ command (RSS config).
    assert h.command([bytes([0, 0]), b"\x01"]) == (ERR, 1)
    assert h.command([bytes([0x7F, 0x33]), b"\x01\x00"]) == (ERR, 1)
    assert h.command([bytes([mq, 1]), struct.pack("<H", 2)]) == (ERR, 1)
    # Truncated: half a header, a header without data, one byte of data, too much data.
    assert h.command([bytes([mq])]) == (ERR, 1)
    assert h.command([bytes([mq, pairs_set])]) == (ERR, 1)
    assert h.command([bytes([mq, pairs_set]), b"\x03"]) == (ERR, 1)
    assert h.command([bytes([mq, pairs_set]), b"\x03\x00\x00"]) == (ERR, 1)
    assert h.command([bytes([mq, pairs_set]) + b"\x03\x00" + b"\0" * 8192]) == (ERR, 1)
    # No readable part at all; no room for the ack (completed with nothing written).
    assert h.command([], [1]) == (ERR, 1)
    assert h.command([bytes([mq, pairs_set]), struct.pack("<H", 3)], []) == (None, 0)
    assert h.net.active_pairs == 2
    # The whole command in one buffer, and the ack in a larger writable buffer, both work.
    assert h.command([bytes([mq, pairs_set]) + struct.pack("<H", 3)], [4]) == (OK, 1)
    assert h.net.active_pairs == 3 and h.attached_queues() == 3
    assert not h.needs_reset


@needs_tun
def test_garbled_commands_never_break_the_device(make):
    h = make(4)
    h.start_mq()
    rnd = random.Random(1234)
    pairs = 1
    for _ in range(300):
        parts = [bytes(rnd.choice([0, 1, 2, 4, 0xFF]) if rnd.random() < 0.5 else rnd.randrange(256)
                       for _ in range(rnd.randint(1, 4)))
                 for _ in range(rnd.randint(0, 3))]
        writable = [rnd.randint(1, 3) for _ in range(rnd.randint(0, 2))]
        if not parts and not writable:
            continue
        raw = b"".join(parts)
        valid = (len(raw) == 4 and raw[0] == U.VIRTIO_NET_CTRL_MQ
                 and raw[1] == U.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
                 and 1 <= int.from_bytes(raw[2:], "little") <= 2 and writable)
        ack, written = h.command(parts, writable)
        if writable:
            assert (ack, written) == (OK if valid else ERR, 1), (parts, writable)
            if valid:
                pairs = int.from_bytes(raw[2:], "little")
        else:
            assert (ack, written) == (None, 0)
        assert h.net.active_pairs == pairs
    assert not h.needs_reset
    assert h.pairs_set(2) == OK


@needs_tun
def test_control_queue_without_mq_is_queue_2(make):
    """CTRL_VQ without MQ: the control queue is queue 2 and VQ_PAIRS_SET is refused."""
    h = make(4)
    h.start_mq(ctrl_vq=True, mq=False)
    assert h.ctrl == 2
    assert h.pairs_set(2) == ERR
    assert h.net.active_pairs == 1 and h.attached_queues() == 1


@needs_tun
def test_reset_goes_back_to_one_pair(make):
    h = make(8)
    h.start_mq()
    assert h.pairs_set(4) == OK and h.attached_queues() == 4
    h.w(U.VIRTIO_PCI_COMMON_STATUS, 1, 0)
    assert h.net.active_pairs == 1 and h.attached_queues() == 1
    assert not h.loop.fds.keys() & set(h.net.tap_fds)
    h.start_mq()
    assert h.net.active_pairs == 1
    assert h.pairs_set(3) == OK and h.attached_queues() == 3


# --- frames -----------------------------------------------------------------------------------

@needs_tun
def test_tx_on_second_pair_reaches_the_tap(make, sniffer):
    h = make(6)
    h.start_mq()
    sock = sniffer(h.tap)
    assert h.pairs_set(2) == OK
    f1 = frame(payload=b"from tx queue 1")
    head = h.send(1, f1)
    h.kick(3)
    assert h.drivers[3].get_used() == [(head, 0)]
    assert recv_frames(sock, 2.0) == [f1]
    assert h.net.workers[1].tx_frames == 1 and h.net.workers[0].tx_frames == 0

    # A tx queue of a pair not in use is not served ...
    f2 = frame(payload=b"from tx queue 2")
    head = h.send(2, f2)
    h.kick(5)
    assert h.drivers[5].get_used() == []
    assert recv_frames(sock, 0.3) == []
    # ... until VQ_PAIRS_SET turns the pair on.
    assert h.pairs_set(3) == OK
    assert h.drivers[5].get_used() == [(head, 0)]
    assert recv_frames(sock, 2.0) == [f2]


def udp_frame(k: int, tag: bytes) -> bytes:
    """An IPv4/UDP frame to the guest; ``k`` varies addresses and ports (one flow per k), so the
    tap spreads such frames over its queues by flow hash."""
    payload = tag + bytes([k])
    udp = struct.pack("!HHHH", 1000 + k, 2000 + 7 * k, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), k, 0, 64, socket.IPPROTO_UDP, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, k, 2]))
    return (MAC + bytes([0x02, 0, 0, 0, 0, 1]) + b"\x08\x00" + ip + udp).ljust(60, b"\0")


@needs_tun
def test_host_frames_reach_only_the_rx_queues_in_use(make, sniffer):
    h = make(8)
    h.start_mq()
    sock = sniffer(h.tap)

    def inject(tag: bytes, count: int) -> tuple[set[bytes], dict[int, list[bytes]]]:
        for pair in range(4):
            h.post_rx(pair)
        sent = {udp_frame(k, tag) for k in range(count)}
        for f in sent:
            sock.sendto(f, (h.tap, 0x0800))    # protocol IPv4, so the tap hashes the flow
        got: dict[int, list[bytes]] = {p: [] for p in range(4)}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            h.loop.run_ready()
            for p in range(4):
                got[p] += [g for g in h.received(p) if g in sent]   # (the host's IPv6 chatter aside)
            if sum(len(v) for v in got.values()) >= count:
                break
            time.sleep(0.01)
        return sent, got

    # Before VQ_PAIRS_SET only the first pair receives (the other tap queues are detached).
    sent, got = inject(b"one-pair", 8)
    assert sorted(got[0]) == sorted(sent)
    assert got[1] == got[2] == got[3] == []

    # With two pairs, every frame arrives exactly once, in rx0 or rx1 (both get flows), never
    # in rx2/rx3 although they have buffers.
    assert h.pairs_set(2) == OK
    sent, got = inject(b"two-pairs", 24)
    assert sorted(got[0] + got[1]) == sorted(sent)
    assert got[0] and got[1]
    assert got[2] == got[3] == []
    assert h.net.workers[2].rx_frames == h.net.workers[3].rx_frames == 0
    assert not h.needs_reset
