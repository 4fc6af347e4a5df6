"""Guest memory: mapping, bounds-checked translation, huge-page policy (no VM needed)."""

from __future__ import annotations

import pytest

from hyperpy import layout, memory
from hyperpy._fast.guestmem import GuestMemory
from hyperpy.errors import GuestMemoryError
from hyperpy.memory import MemoryBacking


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0, 1 << 20)
    m.add_region(0x10_0000_0000, 2 << 20)   # a second region far away
    return m


def test_read_write_roundtrip(mem):
    mem.write(0x1234, b"hello")
    assert mem.read(0x1234, 5) == b"hello"
    mem.write(0x10_0000_0000 + 10, b"x" * 100)
    assert mem.read(0x10_0000_0000 + 10, 100) == b"x" * 100
    assert mem.size == 3 << 20


@pytest.mark.parametrize("gpa,n", [
    ((1 << 20) - 2, 4),           # runs off the end of region 0
    (1 << 20, 1),                 # the gap between regions
    (0x10_0000_0000 - 1, 2),      # straddles into region 1 from the gap
    (0x10_0000_0000 + (2 << 20), 1),
    (2**64 - 1, 1),               # would wrap around
])
def test_out_of_range_accesses_are_refused(mem, gpa, n):
    assert not mem.contains(gpa, n)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        mem.read(gpa, n)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        mem.write(gpa, b"\0" * n)
    with pytest.raises(GuestMemoryError):
        mem.host_address(gpa, n)


def test_host_address_points_at_the_same_bytes(mem):
    import ctypes

    mem.write(0x2000, b"abc")
    host = mem.host_address(0x2000, 3)
    assert ctypes.string_at(host, 3) == b"abc"
    v = mem.view(0x2000, 3)
    v[0] = ord("z")
    assert mem.read(0x2000, 1) == b"z"


def test_overlapping_and_unaligned_regions_are_refused(mem):
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_region(0x8_0000, 1 << 20)
    with pytest.raises(GuestMemoryError, match="not page aligned"):
        mem.add_region(0x2000_0000, 100)


def test_ram_split_around_the_32bit_hole():
    assert layout.ram_ranges(512 << 20) == [(0, 512 << 20)]
    assert layout.ram_ranges(4 << 30) == [(0, 3 << 30), (4 << 30, 1 << 30)]


def test_too_few_hugepages_message(monkeypatch):
    monkeypatch.setattr(memory, "free_hugepages", lambda size: 3)
    with pytest.raises(GuestMemoryError) as e:
        memory.check_hugepages(MemoryBacking(size=64 << 20, hugepages=True))
    msg = str(e.value)
    assert "32 needed" in msg and "3 free" in msg and "nr_hugepages" in msg
    assert "\n" not in msg


def test_enough_hugepages_passes(monkeypatch):
    monkeypatch.setattr(memory, "free_hugepages", lambda size: 32)
    memory.check_hugepages(MemoryBacking(size=64 << 20, hugepages=True))


def test_anonymous_guest_memory_layout():
    m = memory.create_guest_memory(MemoryBacking(size=64 << 20))
    assert [(g, s) for g, s, _ in m.regions] == [(0, 64 << 20)]


def test_memory_file_that_cannot_be_used(tmp_path):
    bad = tmp_path / "ro"
    bad.mkdir()
    bad.chmod(0o500)
    f = bad / "nope" / "ram"
    with pytest.raises(GuestMemoryError, match="cannot use memory file"):
        memory.create_guest_memory(MemoryBacking(size=64 << 20, file=f))
