"""virtio-blk request handling from a host-side driver (no VM): every request type and error."""

from __future__ import annotations

import os
import struct

import pytest

from hyperpy._fast import uapi as U
from hyperpy._fast.addrspace import AddressSpace
from hyperpy._fast.guestmem import GuestMemory
from hyperpy._fast.virtqueue import SplitQueue
from hyperpy.devices.virtio.blk import Block

from virtio_driver import Driver

SECTOR = 512


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0, 8 << 20)
    return m


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"".join(bytes([i % 251]) * SECTOR for i in range(64)))   # sector k = byte k
    return p


class Harness:
    def __init__(self, mem, path, **kw):
        self.dev = Block(path, **kw)
        self.q = SplitQueue(AddressSpace(mem), 256)
        self.drv = Driver(mem, 256)
        self.drv.attach(self.q)
        self.mem = mem

    def request(self, rtype, sector=0, data=b"", read_len=0, extra=b""):
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        head = self.drv.add([hdr + extra if extra else hdr] + ([data] if data else []),
                            ([read_len] if read_len else []) + [1])
        added = self.drv.inflight[head]
        self.dev.worker.process(self.q)
        (done_head, written), = self.drv.get_used()
        assert done_head == head
        status_addr = added.writable[-1][0]
        status = self.mem.read(status_addr, 1)[0]
        payload = self.mem.read(added.writable[0][0], read_len) if read_len else b""
        return status, written, payload


def test_read_sectors(mem, image):
    h = Harness(mem, image)
    st, written, data = h.request(U.VIRTIO_BLK_T_IN, sector=5, read_len=2 * SECTOR)
    assert st == U.VIRTIO_BLK_S_OK and written == 2 * SECTOR + 1
    assert data == bytes([5]) * SECTOR + bytes([6]) * SECTOR


def test_write_then_flush_reaches_the_file(mem, image):
    h = Harness(mem, image)
    st, written, _ = h.request(U.VIRTIO_BLK_T_OUT, sector=3, data=b"W" * SECTOR)
    assert st == U.VIRTIO_BLK_S_OK and written == 1
    st, _, _ = h.request(U.VIRTIO_BLK_T_FLUSH)
    assert st == U.VIRTIO_BLK_S_OK
    with open(image, "rb") as f:
        f.seek(3 * SECTOR)
        assert f.read(SECTOR) == b"W" * SECTOR   # on the file when the guest saw completion


def test_get_id(mem, image):
    h = Harness(mem, image, serial="disk-serial-01")
    st, written, data = h.request(U.VIRTIO_BLK_T_GET_ID, read_len=U.VIRTIO_BLK_ID_BYTES)
    assert st == U.VIRTIO_BLK_S_OK and data.rstrip(b"\0") == b"disk-serial-01"


def test_readonly_rejects_writes(mem, image):
    h = Harness(mem, image, readonly=True)
    st, _, _ = h.request(U.VIRTIO_BLK_T_OUT, sector=0, data=b"x" * SECTOR)
    assert st == U.VIRTIO_BLK_S_IOERR
    assert image.read_bytes()[:SECTOR] == bytes([0]) * SECTOR


@pytest.mark.parametrize("sector,length", [(64, SECTOR), (63, 2 * SECTOR), (2**63, SECTOR), (0, 100)])
def test_requests_outside_the_disk_are_ioerr(mem, image, sector, length):
    h = Harness(mem, image)
    st, _, _ = h.request(U.VIRTIO_BLK_T_IN, sector=sector, read_len=length)
    assert st == U.VIRTIO_BLK_S_IOERR


def test_unknown_request_is_unsupp(mem, image):
    h = Harness(mem, image)
    st, _, _ = h.request(0x7777)
    assert st == U.VIRTIO_BLK_S_UNSUPP


def test_truncated_header_is_ioerr(mem, image):
    h = Harness(mem, image)
    head = h.drv.add([b"\0" * 8], [1])
    status_addr = h.drv.inflight[head].writable[-1][0]
    h.dev.worker.process(h.q)
    assert h.drv.get_used() == [(head, 1)]
    assert mem.read(status_addr, 1)[0] == U.VIRTIO_BLK_S_IOERR


def test_discard_and_write_zeroes(mem, image):
    h = Harness(mem, image)
    seg = struct.pack("<QII", 10, 2, 0)
    st, _, _ = h.request(U.VIRTIO_BLK_T_WRITE_ZEROES, extra=seg)
    assert st == U.VIRTIO_BLK_S_OK
    assert image.read_bytes()[10 * SECTOR:12 * SECTOR] == b"\0" * (2 * SECTOR)
    st, _, _ = h.request(U.VIRTIO_BLK_T_DISCARD, extra=struct.pack("<QII", 20, 1, 0))
    assert st == U.VIRTIO_BLK_S_OK
    st, _, _ = h.request(U.VIRTIO_BLK_T_DISCARD, extra=struct.pack("<QII", 63, 5, 0))
    assert st == U.VIRTIO_BLK_S_IOERR   # runs past the end


def test_image_shorter_than_a_sector_is_refused(tmp_path):
    from hyperpy.errors import DeviceError

    p = tmp_path / "tiny.img"
    p.write_bytes(b"x" * 100)
    with pytest.raises(DeviceError, match="smaller than one 512-byte sector"):
        Block(p)


def test_malformed_chain_breaks_only_the_queue(mem, image):
    """A descriptor pointing outside RAM: the queue needs reset, no request is served."""
    h = Harness(mem, image)
    h.drv.add_raw([(0x7FF_FFFF_F000, 16, 0), (0x2000, 1, 2)])
    result = h.dev.worker.process(h.q)
    assert result & 1 and result >> 2 == 0 and h.q.needs_reset   # broken, nothing done


def test_counters_count_completed_reads_and_writes(mem, image):
    h = Harness(mem, image)
    h.request(U.VIRTIO_BLK_T_IN, sector=0, read_len=2 * SECTOR)
    h.request(U.VIRTIO_BLK_T_OUT, sector=1, data=b"w" * SECTOR)
    h.request(U.VIRTIO_BLK_T_IN, sector=64, read_len=SECTOR)          # past the end: an error
    h.request(U.VIRTIO_BLK_T_FLUSH)
    assert h.dev.counters() == {"requests": 4, "errors": 1, "read_ops": 1, "read_bytes": 2 * SECTOR,
                                "write_ops": 1, "write_bytes": SECTOR}
