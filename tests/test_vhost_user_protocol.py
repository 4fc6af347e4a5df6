"""The vhost-user back-end driven by a Python front-end (tests/vhost_frontend.py) over its socket.

Feature negotiation, the memory table, vring set-up, virtio-blk requests served from a memfd
(direct and indirect chains, EVENT_IDX on and off, two queues), the device IOTLB (misses on the
back-end channel, updates, invalidations), reconnection, and hostile messages: each of those gets
the protocol's error path (a failed REPLY_ACK or an empty reply) and the back-end keeps serving.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time

import pytest

from hyperpy._fast import uapi as U
from hyperpy._fast import vhost_iotlb as V
from hyperpy.devices.virtio.blk import Block
from hyperpy.devices.virtio.console import Console
from hyperpy.devices.virtio.rng import Rng
from hyperpy.vhost_user import protocol as P
from hyperpy.vhost_user.backend import VhostUserBackend
from hyperpy.vhost_user.protocol import ProtocolFeature as PF
from hyperpy.vhost_user.protocol import Request as R

from vhost_frontend import Frontend

SECTOR = 512
T_IN, T_OUT = U.VIRTIO_BLK_T_IN, U.VIRTIO_BLK_T_OUT
RING_BASE = 0x10000
VERSION_1 = 1 << U.VIRTIO_F_VERSION_1
EVENT_IDX = 1 << U.VIRTIO_RING_F_EVENT_IDX
ACCESS_PLATFORM = 1 << U.VIRTIO_F_ACCESS_PLATFORM


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"".join(bytes([i % 251]) * SECTOR for i in range(256)))
    return p


@pytest.fixture
def backend(tmp_path, image):
    made = []

    def make(device=None, **kw):
        dev = device or Block(image, num_queues=kw.pop("num_queues", 1))
        b = VhostUserBackend(dev, tmp_path / f"vu{len(made)}.sock", **kw).start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def frontends():
    made = []

    def make(b, **kw):
        fe = Frontend(b.server.path, **kw)
        made.append(fe)
        return fe

    yield make
    for fe in made:
        fe.close()


def blk_request(ring, rtype, sector, data=b"", read_len=0, indirect=False):
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    head = ring.drv.add([hdr] + ([data] if data else []), ([read_len] if read_len else []) + [1],
                        indirect=indirect)
    added = ring.drv.inflight[head]
    ring.kick()
    (done, written), = ring.wait_used(1)
    assert done == head
    status = ring.fe.mem.read(added.writable[-1][0], 1)[0]
    got = ring.fe.mem.read(added.writable[0][0], read_len) if read_len else b""
    return status, written, got


def ready_blk(fe, drop=0, **kw):
    feats, _ = fe.negotiate(drop=drop | ACCESS_PLATFORM, **kw)   # guest-physical addresses
    assert fe.set_mem_table() == 0
    return feats


# ---------------------------------------------------------------------------- negotiation

def test_features_offered_and_negotiated(backend, frontends):
    b = backend()
    fe = frontends(b)
    offered = P.U64.unpack(fe.request(R.GET_FEATURES))[0]
    for bit in (U.VIRTIO_F_VERSION_1, U.VIRTIO_RING_F_EVENT_IDX, U.VIRTIO_RING_F_INDIRECT_DESC,
                U.VIRTIO_F_ACCESS_PLATFORM, P.F_PROTOCOL_FEATURES, U.VIRTIO_BLK_F_FLUSH,
                U.VIRTIO_BLK_F_SEG_MAX):
        assert offered >> bit & 1, bit
    pf = P.U64.unpack(fe.request(R.GET_PROTOCOL_FEATURES))[0]
    for f in (PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG):
        assert pf >> f & 1, f.name
    assert not pf >> PF.INFLIGHT_SHMFD & 1       # not implemented, so not offered
    fe.send(R.SET_PROTOCOL_FEATURES, P.u64(pf))
    # Unoffered bits and a driver without VERSION_1 are refused; the connection stays usable.
    assert fe.request(R.SET_FEATURES, P.u64(offered | 1 << 60)) == 1
    assert fe.request(R.SET_FEATURES, P.u64(offered & ~VERSION_1)) == 1
    assert fe.request(R.SET_FEATURES, P.u64(offered & ~EVENT_IDX)) == 0
    assert b.transport.negotiated_history[-1] == offered & ~EVENT_IDX
    assert P.U64.unpack(fe.request(R.GET_QUEUE_NUM))[0] == 1


def test_protocol_features_beyond_offer_refused(backend, frontends):
    fe = frontends(backend())
    pf = P.U64.unpack(fe.request(R.GET_PROTOCOL_FEATURES))[0]
    fe.send(R.SET_PROTOCOL_FEATURES, P.u64(pf))          # REPLY_ACK on from here
    assert fe.request(R.SET_PROTOCOL_FEATURES, P.u64(pf | 1 << PF.INFLIGHT_SHMFD)) == 1


def test_get_config_is_the_devices_config_space(backend, frontends, image):
    b = backend()
    fe = frontends(b)
    fe.negotiate()
    reply = fe.request(R.GET_CONFIG, P.CONFIG_HEADER.pack(0, 60, 0) + bytes(60))
    off, size, _ = P.CONFIG_HEADER.unpack_from(reply)
    assert (off, size) == (0, 60)
    capacity = struct.unpack_from("<Q", reply, P.CONFIG_HEADER.size)[0]
    assert capacity == image.stat().st_size // SECTOR
    assert reply[P.CONFIG_HEADER.size:] == bytes(b.device.config[:60])
    # Too large, or a size the payload does not carry: an empty reply (the spec's error).
    assert fe.request(R.GET_CONFIG, P.CONFIG_HEADER.pack(0, 300, 0) + bytes(300)) == b""
    assert fe.request(R.GET_CONFIG, P.CONFIG_HEADER.pack(0, 60, 0) + bytes(8)) == b""


# ---------------------------------------------------------------------------- blk requests

@pytest.mark.parametrize("event_idx,indirect", [(True, False), (False, True), (True, True)])
def test_blk_requests_served_from_shared_memory(backend, frontends, image, event_idx, indirect):
    b = backend()
    fe = frontends(b)
    ready_blk(fe, drop=0 if event_idx else EVENT_IDX)
    ring = fe.ring(0, base=RING_BASE, event_idx=event_idx)
    pattern = os.urandom(4 * SECTOR)
    st, written, _ = blk_request(ring, T_OUT, 10, data=pattern, indirect=indirect)
    assert (st, written) == (U.VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[10 * SECTOR:14 * SECTOR] == pattern
    st, written, got = blk_request(ring, T_IN, 10, read_len=4 * SECTOR, indirect=indirect)
    assert (st, written, got) == (U.VIRTIO_BLK_S_OK, 4 * SECTOR + 1, pattern)
    st, _, got = blk_request(ring, T_IN, 3, read_len=SECTOR)
    assert got == bytes([3]) * SECTOR
    # Past the end of the disk: IOERR, and the ring keeps going.
    st, _, _ = blk_request(ring, T_IN, 10_000, read_len=SECTOR)
    assert st == U.VIRTIO_BLK_S_IOERR
    st, _, got = blk_request(ring, T_IN, 4, read_len=SECTOR)
    assert (st, got) == (U.VIRTIO_BLK_S_OK, bytes([4]) * SECTOR)
    if event_idx:
        assert ring.drv.avail_event == ring.drv.avail_idx   # the device asked for the next kick
    # GET_VRING_BASE stops the ring and reports how far it got.
    idx, base = P.unpack_vring_state(fe.request(R.GET_VRING_BASE, P.pack_vring_state(0, 0)))
    assert (idx, base) == (0, 5)
    assert not b.transport.active


def test_two_queues_each_served(backend, frontends, image):
    b = backend(num_queues=2)
    fe = frontends(b)
    assert P.U64.unpack(fe.request(R.GET_QUEUE_NUM))[0] == 2
    ready_blk(fe)
    r0 = fe.ring(0, base=RING_BASE)
    r1 = fe.ring(1, base=RING_BASE + 0x100000)
    assert blk_request(r1, T_IN, 7, read_len=SECTOR)[2] == bytes([7]) * SECTOR
    assert blk_request(r0, T_IN, 8, read_len=SECTOR)[2] == bytes([8]) * SECTOR
    assert b.transport.kicks == [1, 1]


def test_rings_wait_for_enable_with_protocol_features(backend, frontends):
    b = backend()
    fe = frontends(b)
    ready_blk(fe)
    ring = fe.ring(0, base=RING_BASE, enable=False)
    hdr = struct.pack("<IIQ", T_IN, 0, 1)
    ring.drv.add([hdr], [SECTOR, 1])
    ring.kick()
    assert not ring.wait_call(0.3)               # disabled: not served
    assert fe.request(R.SET_VRING_ENABLE, P.pack_vring_state(0, 1)) == 0
    assert ring.wait_used(1)


def test_new_memory_table_while_running(backend, frontends):
    """SET_MEM_TABLE on a running device: the rings are translated again into the new map."""
    b = backend()
    fe = frontends(b)
    ready_blk(fe)
    ring = fe.ring(0, base=RING_BASE)
    assert blk_request(ring, T_IN, 1, read_len=SECTOR)[0] == U.VIRTIO_BLK_S_OK
    assert fe.set_mem_table() == 0
    assert blk_request(ring, T_IN, 2, read_len=SECTOR)[2] == bytes([2]) * SECTOR


def test_rng_and_console_through_the_same_transport(backend, frontends, tmp_path):
    b = backend(Rng())
    fe = frontends(b)
    ready_blk(fe)
    ring = fe.ring(0, base=RING_BASE)
    head = ring.drv.add([], [64])
    buf = ring.drv.inflight[head].writable[0][0]
    ring.kick()
    (h, written), = ring.wait_used(1)
    assert (h, written) == (head, 64)
    assert fe.mem.read(buf, 64) != bytes([0xEE]) * 64     # filled from /dev/urandom

    r, w = os.pipe()
    b2 = backend(Console(w))
    fe2 = frontends(b2)
    ready_blk(fe2)
    tx = fe2.ring(1, base=RING_BASE)
    tx.drv.add([b"hello from the guest\n"], [])
    tx.kick()
    tx.wait_used(1)
    assert os.read(r, 100) == b"hello from the guest\n"
    os.close(r)
    os.close(w)


# ---------------------------------------------------------------------------- reconnection

def test_reconnect_after_the_front_end_goes_away(backend, frontends):
    b = backend()
    fe = frontends(b)
    ready_blk(fe)
    ring = fe.ring(0, base=RING_BASE)
    assert blk_request(ring, T_IN, 1, read_len=SECTOR)[0] == U.VIRTIO_BLK_S_OK
    fe.close()                                   # mid-session, rings running
    deadline = time.monotonic() + 5
    while b.server.conn is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.server.conn is None and not b.transport.active
    assert b.transport.memory.size == 0          # the old front-end's memory is unmapped
    fe2 = frontends(b)
    ready_blk(fe2)
    ring2 = fe2.ring(0, base=RING_BASE)
    assert blk_request(ring2, T_IN, 9, read_len=SECTOR)[2] == bytes([9]) * SECTOR
    assert b.server.connections == 2


def test_second_front_end_is_turned_away(backend, frontends):
    b = backend()
    fe = frontends(b)
    fe.negotiate()
    other = socket.socket(socket.AF_UNIX)
    other.settimeout(5)
    other.connect(str(b.server.path))
    assert other.recv(1) == b""                   # closed at once
    other.close()
    assert P.U64.unpack(fe.request(R.GET_FEATURES))[0]


# ---------------------------------------------------------------------------- hostile messages

def _still_serving(fe, ring):
    st, _, got = blk_request(ring, T_IN, 5, read_len=SECTOR)
    assert (st, got) == (U.VIRTIO_BLK_S_OK, bytes([5]) * SECTOR)


@pytest.fixture
def running(backend, frontends):
    b = backend()
    fe = frontends(b)
    ready_blk(fe)
    ring = fe.ring(0, base=RING_BASE)
    return b, fe, ring


def test_hostile_wrong_sizes(running, caplog):
    b, fe, ring = running
    with caplog.at_level(logging.WARNING, logger="hyperpy"):
        assert fe.request(R.SET_VRING_NUM, b"\0" * 3) == 1
        assert fe.request(R.SET_FEATURES, b"\0" * 4) == 1
        assert fe.request(R.SET_VRING_ADDR, b"\0" * 8) == 1
        assert fe.request(R.IOTLB_MSG, b"\0" * 7) == 1
        assert fe.request(R.GET_VRING_BASE, b"\0" * 2) == b""
        assert fe.request(R.SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(32), [fe.memfd]) == 1
    assert "payload of 3 bytes, expected 8" in caplog.text
    assert b.server.refused == 6
    _still_serving(fe, ring)


def test_hostile_unknown_and_unoffered_requests(running, caplog):
    b, fe, ring = running
    with caplog.at_level(logging.WARNING, logger="hyperpy"):
        assert fe.request(99, b"") == 1
        assert fe.request(R.SET_LOG_BASE, P.u64(0)) == 1          # LOG_SHMFD not offered
        assert fe.request(R.SET_INFLIGHT_FD, bytes(24)) == 1
        assert fe.request(R.GET_VRING_BASE, P.pack_vring_state(200, 0)) == b""
        assert fe.request(R.SET_VRING_NUM, P.pack_vring_state(0, 100)) == 1   # not a power of 2
        fe.send(R.GET_FEATURES, flags=2)                            # protocol version 2
        assert fe.recv()[2] == b""
    assert "unknown request number 99" in caplog.text
    assert "ring index 200 does not exist" in caplog.text
    _still_serving(fe, ring)


def test_hostile_memory_tables(running, tmp_path):
    b, fe, ring = running
    mb = 1 << 20
    before = b.transport.memory.table
    # Overlapping guest-physical ranges.
    assert fe.set_mem_table([(0, 4 * mb, fe.uva, 0), (2 * mb, 4 * mb, fe.uva + 4 * mb, 0)]) == 1
    # Overlapping user addresses.
    assert fe.set_mem_table([(0, 4 * mb, fe.uva, 0), (8 * mb, 4 * mb, fe.uva + mb, 0)]) == 1
    # A region larger than the file behind it (touching it would SIGBUS the back-end).
    assert fe.set_mem_table([(0, 64 * mb, fe.uva, 0)]) == 1
    # Fewer fds than regions, and a pipe instead of a memory fd.
    assert fe.set_mem_table([(0, mb, fe.uva, 0), (4 * mb, mb, fe.uva + 4 * mb, 4 * mb)],
                            [fe.memfd]) == 1
    r, w = os.pipe()
    assert fe.set_mem_table([(0, mb, fe.uva, 0)], [r]) == 1
    os.close(r)
    os.close(w)
    # Nine regions (one more than fits).
    regions = [(i * mb, mb, fe.uva + i * mb, i * mb) for i in range(9)]
    assert fe.set_mem_table(regions, [fe.memfd] * 9) == 1
    assert b.transport.memory.table == before          # every refusal left the table alone
    _still_serving(fe, ring)


def test_hostile_too_many_fds(running):
    b, fe, ring = running
    fds = [os.dup(fe.memfd) for _ in range(12)]
    try:
        assert fe.set_mem_table([(0, fe.mem_size, fe.uva, 0)], fds) == 1
        assert fe.request(R.SET_VRING_CALL, P.u64(0), fds[:3]) == 1
        assert fe.request(R.GET_FEATURES, b"", fds[:1]) == b""
    finally:
        for fd in fds:
            os.close(fd)
    _still_serving(fe, ring)


def test_hostile_ring_outside_the_regions(backend, frontends):
    b = backend()
    fe = frontends(b)
    ready_blk(fe)
    size = fe.mem_size
    for desc, used, avail in ((fe.uva + size, fe.uva, fe.uva),             # desc past the end
                              (fe.uva, fe.uva + size - 16, fe.uva),       # used ring straddles it
                              (0x1000, fe.uva, fe.uva)):                  # not a front-end address
        assert fe.request(R.SET_VRING_ADDR, P.pack_vring_addr(0, 0, desc, used, avail)) == 1
    assert fe.request(R.SET_VRING_ADDR, P.pack_vring_addr(0, 1 << V.VRING_F_LOG, fe.uva,
                                                         fe.uva + 0x2000, fe.uva + 0x1000)) == 1
    ring = fe.ring(0, base=RING_BASE)
    _still_serving(fe, ring)


def test_hostile_payload_too_large_closes_only_that_connection(backend, frontends):
    b = backend()
    fe = frontends(b)
    fe.send(R.SET_MEM_TABLE, b"", size=1 << 30)
    with pytest.raises((ConnectionError, OSError)):
        fe.recv()
    fe2 = frontends(b)
    ready_blk(fe2)
    ring = fe2.ring(0, base=RING_BASE)
    _still_serving(fe2, ring)


def test_malformed_chain_stops_the_ring_not_the_backend(running, caplog):
    b, fe, ring = running
    with caplog.at_level(logging.WARNING, logger="hyperpy"):
        ring.drv.add_raw([(fe.mem_size + 0x1000, 512, 0)])     # buffer outside the memory
        ring.kick()
        deadline = time.monotonic() + 5
        while "outside guest memory" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "ring 0: buffer 0x" in caplog.text and "outside guest memory" in caplog.text
    # The front-end restarts the ring (as QEMU does on a device reset) and it serves again.
    fe.request(R.GET_VRING_BASE, P.pack_vring_state(0, 0))
    ring2 = fe.ring(0, base=RING_BASE + 0x200000)
    _still_serving(fe, ring2)


# ---------------------------------------------------------------------------- IOTLB

IOVA_OFF = 0x40_0000_0000          # IOVA = guest address + this (nothing like the GPAs)


def _iotlb(fe, typ, iova, size=0, uaddr=0, perm=0):
    return fe.request(R.IOTLB_MSG, V.pack_iotlb(iova, size, uaddr, perm, typ), ack=False)


def _serve_misses(fe, bsock, answered):
    """Answer every IOTLB miss waiting on the back-end channel with a 4 KiB update."""
    bsock.settimeout(0.3)
    n = 0
    while True:
        try:
            hdr = bsock.recv(P.HEADER_SIZE)
        except socket.timeout:
            return n
        req, flags, size = P.HEADER.unpack(hdr)
        body = bsock.recv(size)
        assert req == P.BackendRequest.IOTLB_MSG
        iova, _, _, perm, typ = V.unpack_iotlb(body)
        assert typ == V.IOTLB_MISS and iova % 4096 == 0 and perm in (V.ACCESS_RO, V.ACCESS_WO, V.ACCESS_RW)
        answered.append(iova)
        gpa = iova - IOVA_OFF
        assert _iotlb(fe, V.IOTLB_UPDATE, iova, 4096, fe.uva + gpa, V.ACCESS_RW) == 0
        n += 1


def test_iotlb_misses_updates_and_invalidations(backend, frontends, image):
    b = backend()
    fe = frontends(b)
    feats, proto = fe.negotiate()
    assert feats & ACCESS_PLATFORM and proto >> PF.BACKEND_REQ & 1 and proto >> PF.REPLY_ACK & 1
    assert fe.set_mem_table() == 0
    bsock = fe.backend_channel()
    ring = fe.ring(0, base=RING_BASE, iova_offset=IOVA_OFF)
    answered = []
    # The ring areas are IOVAs nobody mapped: the back-end asks for them, then starts the ring.
    assert _serve_misses(fe, bsock, answered) >= 2
    assert b.transport.rings[0].running
    # A request whose buffers are IOVAs: served after the misses are answered.
    pattern = os.urandom(2 * SECTOR)
    hdr_a, data_a, st_a = (ring.drv.alloc(16), ring.drv.alloc(2 * SECTOR, 4096), ring.drv.alloc(1))
    fe.mem.write(hdr_a, struct.pack("<IIQ", T_OUT, 0, 20))
    fe.mem.write(data_a, pattern)
    head = ring.drv.add_raw([(hdr_a + IOVA_OFF, 16, 0), (data_a + IOVA_OFF, 2 * SECTOR, 0),
                             (st_a + IOVA_OFF, 1, 2)])
    ring.kick()
    for _ in range(10):
        if ring.wait_call(0.2):
            break
        _serve_misses(fe, bsock, answered)
    assert ring.drv.get_used() == [(head, 1)]
    assert fe.mem.read(st_a, 1)[0] == U.VIRTIO_BLK_S_OK
    assert image.read_bytes()[20 * SECTOR:22 * SECTOR] == pattern
    assert any(data_a + IOVA_OFF <= a < data_a + IOVA_OFF + 2 * SECTOR for a in answered)
    # Invalidate the data page: the next request misses on it again.
    misses = b.transport.iotlb.misses
    assert _iotlb(fe, V.IOTLB_INVALIDATE, data_a + IOVA_OFF, 4096) == 0
    fe.mem.write(hdr_a, struct.pack("<IIQ", T_IN, 0, 20))
    head = ring.drv.add_raw([(hdr_a + IOVA_OFF, 16, 0), (data_a + IOVA_OFF, 2 * SECTOR, 2),
                             (st_a + IOVA_OFF, 1, 2)])
    fe.mem.fill(data_a, 2 * SECTOR, 0)
    ring.kick()
    for _ in range(10):
        if ring.wait_call(0.2):
            break
        _serve_misses(fe, bsock, answered)
    assert ring.drv.get_used() == [(head, 2 * SECTOR + 1)]
    assert fe.mem.read(data_a, 2 * SECTOR) == pattern
    assert b.transport.iotlb.misses > misses


def test_iotlb_update_must_land_in_a_region(backend, frontends):
    b = backend()
    fe = frontends(b)
    fe.negotiate()
    assert fe.set_mem_table() == 0
    assert _iotlb(fe, V.IOTLB_UPDATE, 0x1000, 4096, fe.uva + fe.mem_size, V.ACCESS_RW) == 1
    assert _iotlb(fe, V.IOTLB_UPDATE, 0x1000, 0, fe.uva, V.ACCESS_RW) == 1
    assert _iotlb(fe, V.IOTLB_UPDATE, 0x1000, 4096, fe.uva, 0) == 1
    assert _iotlb(fe, 9, 0x1000, 4096, fe.uva, V.ACCESS_RW) == 1
    assert _iotlb(fe, V.IOTLB_UPDATE, 0x1000, 4096, fe.uva, V.ACCESS_RW) == 0
    assert b.transport.iotlb.entries == [(0x1000, 0x1FFF, fe.uva, 3)]


def test_iotlb_not_negotiated_is_refused(backend, frontends):
    b = backend()
    fe = frontends(b)
    fe.negotiate(drop=ACCESS_PLATFORM)
    assert _iotlb(fe, V.IOTLB_UPDATE, 0x1000, 4096, fe.uva, V.ACCESS_RW) == 1


# ---------------------------------------------------------------------------- the IOTLB space

def test_iotlb_space_translation_rules(tmp_path):
    fd = os.memfd_create("t")
    os.ftruncate(fd, 1 << 20)
    mem = V.VhostMemory()
    uva = 0x7000_0000_0000
    mem.set_regions([(0, 1 << 20, uva, 0)], [fd])
    sp = V.IotlbAddressSpace(mem)
    host0 = mem.uva_translate_py(uva)
    # Two adjacent IOVA pages onto contiguous user addresses: one 8 KiB range translates.
    sp.update(0x10000, 0x1000, uva + 0x3000, V.ACCESS_RW)
    sp.update(0x11000, 0x1000, uva + 0x4000, V.ACCESS_RO)
    assert sp.translate_py(0x10800, 0x1000) == host0 + 0x3800
    assert sp.translate_py(0x10800, 0x1000, True) is None       # second page is read-only
    # Non-contiguous user addresses: refused (no single host range), no miss recorded.
    sp.update(0x12000, 0x1000, uva + 0x9000, V.ACCESS_RW)
    assert sp.translate_py(0x11800, 0x1000) is None
    assert sp.take_misses() == []
    # Unmapped: a miss per page, remembered once.
    assert sp.translate_py(0x20010, 8) is None
    assert sp.translate_py(0x20020, 8, True) is None
    assert sp.take_misses() == [(0x20000, V.ACCESS_RW)]
    # An update replaces what it overlaps; invalidate drops whole entries.
    sp.update(0x10000, 0x2000, uva, V.ACCESS_RW)
    assert sp.entries[0] == (0x10000, 0x11FFF, uva, 3)
    sp.invalidate(0x11000, 1)
    assert sp.translate_py(0x10000, 1) is None
    mem.close()
    os.close(fd)
    assert sp.translate_py(0x12000, 1) is None          # memory gone: nothing translates


# ---------------------------------------------------------------------------- command line

def test_cli_bad_options_are_one_line_errors(hyperpy_cli, tmp_path, image):
    r = hyperpy_cli("vhost-user", "blk", "--socket", str(tmp_path / "s.sock"),
                    "--disk", f"path={tmp_path / 'missing.img'}")
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [
        f"hyperpy: error: --disk path: no such file: {tmp_path / 'missing.img'} (give a raw disk image)"]
    r = hyperpy_cli("vhost-user", "blk", "--socket", str(tmp_path / "no" / "dir" / "s.sock"),
                    "--disk", f"path={image}")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "cannot listen there" in err[0], err
    r = hyperpy_cli("vhost-user", "net", "--socket", str(tmp_path / "n.sock"), "--tap", "hp0",
                    "--num-queues", "3")
    assert r.returncode == 2 and "num_queues: 3 is odd" in r.stderr.decode()
