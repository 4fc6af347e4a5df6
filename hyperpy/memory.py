"""Guest RAM: allocation policy (anonymous, shared, file, huge pages) and checks.

The mapping itself and the bounds-checked guest-physical -> host translation live in Cython
(:mod:`hyperpy._fast.guestmem`) because every device's DMA goes through them.  This module decides
*how* RAM is backed and checks, before a VM starts, that the host can back it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .errors import GuestMemoryError

log = logging.getLogger(__name__)

HUGEPAGE_SIZES = {2 * layout.MiB: "2048kB", layout.GiB: "1048576kB"}


@dataclass(frozen=True)
class MemoryBacking:
    """How guest RAM is backed on the host."""

    size: int
    shared: bool = False
    file: Path | None = None
    hugepages: bool = False
    hugepage_size: int = 2 * layout.MiB
    prefault: bool = False


def warn_unless_hugetlbfs(directory: Path) -> bool:
    """Log one warning when ``directory`` (a ``file=`` directory) is not on hugetlbfs: guest RAM
    in an unlinked file there is ordinary page-cache memory, not huge pages.  Returns whether it
    is on hugetlbfs (False too when the file system cannot be told)."""
    from .mounts import filesystem_type

    fstype = filesystem_type(directory)
    if fstype == "hugetlbfs":
        return True
    log.warning("--memory file: %s is on %s, not hugetlbfs: guest RAM there is not on huge pages "
                "(mount hugetlbfs there with 'mount -t hugetlbfs none %s', or use hugepages=on "
                "without file=)", directory, fstype or "an unknown file system", directory)
    return False


def free_hugepages(page_size: int) -> int:
    """Free (not reserved) huge pages of ``page_size`` on the host."""
    name = HUGEPAGE_SIZES.get(page_size)
    if name is None:
        raise GuestMemoryError(f"huge page size {page_size} is not supported", "use 2M or 1G")
    base = Path("/sys/kernel/mm/hugepages") / f"hugepages-{name}"
    try:
        free = int((base / "free_hugepages").read_text())
        resv = int((base / "resv_hugepages").read_text())
    except OSError:
        return 0
    return max(0, free - resv)


def check_hugepages(backing: MemoryBacking) -> None:
    """Fail before the VM starts when the host has too few free huge pages."""
    if not backing.hugepages:
        return
    psize = backing.hugepage_size
    if backing.size % psize:
        raise GuestMemoryError(
            f"memory size {backing.size} is not a multiple of the huge page size {psize}",
            "choose a size that is a multiple of the huge page size",
        )
    needed = backing.size // psize
    free = free_hugepages(psize)
    if free < needed:
        name = HUGEPAGE_SIZES[psize]
        raise GuestMemoryError(
            f"not enough free {psize // layout.MiB}M huge pages: {needed} needed, {free} free",
            f"reserve more with 'echo {needed} > /sys/kernel/mm/hugepages/hugepages-{name}/nr_hugepages'",
        )


def open_backing_fd(backing: MemoryBacking, size: int) -> tuple[int, bool]:
    """Open the file (or memfd) that backs one RAM region.

    Returns ``(fd, shared)``; ``fd == -1`` means anonymous memory.  The caller closes the fd once
    it is mapped (the mapping keeps the file alive).
    """
    if backing.file is not None:
        path = backing.file
        try:
            if path.is_dir():
                # A hugetlbfs mount (e.g. /dev/hugepages) or any directory: an unlinked file in it.
                fd, name = tempfile.mkstemp(prefix="hyperpy-ram-", dir=path)
                os.unlink(name)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        except OSError as e:
            raise GuestMemoryError(
                f"cannot use memory file {path}: {e.strerror}",
                "give a writable file or a hugetlbfs directory such as /dev/hugepages",
            ) from None
        # The config layer defaults shared=on with file= (writes reach the file, as other
        # processes expect); shared=off gives a private copy-on-write mapping of it.
        return fd, backing.shared
    if backing.hugepages:
        flags = os.MFD_CLOEXEC | os.MFD_HUGETLB
        if backing.hugepage_size == layout.GiB:
            flags |= os.MFD_HUGE_1GB
        else:
            flags |= os.MFD_HUGE_2MB
        try:
            fd = os.memfd_create("hyperpy-ram", flags)
            os.ftruncate(fd, size)
        except OSError as e:
            raise GuestMemoryError(
                f"cannot allocate {size} bytes of huge-page memory: {e.strerror}",
                "reserve huge pages in /sys/kernel/mm/hugepages or drop hugepages=on",
            ) from None
        return fd, True
    if backing.shared:
        fd = os.memfd_create("hyperpy-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd, True
    return -1, False


def create_guest_memory(backing: MemoryBacking):
    """Map guest RAM as described by ``backing`` and return a :class:`GuestMemory`."""
    from ._fast.guestmem import GuestMemory

    if backing.size < 16 * layout.MiB:
        raise GuestMemoryError(
            f"memory size {backing.size} bytes is too small", "give at least 16M (e.g. size=64M)"
        )
    check_hugepages(backing)
    mem = GuestMemory()
    offset = 0
    for gpa, length in layout.ram_ranges(backing.size):
        fd, shared = open_backing_fd(backing, length if backing.file is None else backing.size)
        try:
            file_offset = offset if backing.file is not None else 0
            mem.add_region(gpa, length, fd, file_offset, shared, backing.prefault,
                           backing.hugepage_size if backing.hugepages else 0)
        except OSError as e:
            raise GuestMemoryError(
                f"cannot map {length} bytes of guest RAM at {gpa:#x}: {e.strerror}",
                "lower --memory size or free host memory/huge pages",
            ) from None
        finally:
            if fd >= 0:
                os.close(fd)
        offset += length
    log.info("guest RAM: %d MiB in %d region(s)%s", backing.size >> 20, len(mem.regions),
             " on huge pages" if backing.hugepages else "")
    return mem
