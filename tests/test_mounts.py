"""hyperpy.mounts: the file system holding a path, from a mountinfo table."""

from __future__ import annotations

from pathlib import Path

from hyperpy.mounts import Mount, filesystem_type, mount_of, parse_mountinfo

MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=123k
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw
40 24 0:40 / /dev/hugepages rw,relatime shared:9 - hugetlbfs hugetlbfs rw,pagesize=2M
41 27 0:41 / /srv/vm\\040images rw - hugetlbfs none rw,pagesize=1G
42 27 0:42 / /mnt rw - tmpfs tmpfs rw
43 42 0:43 / /mnt rw - hugetlbfs none rw
44 27 0:44 / /data rw - xfs /dev/vdb rw
this line is not mountinfo
"""


def table() -> list[Mount]:
    return parse_mountinfo(MOUNTINFO)


def test_parse_mountinfo() -> None:
    t = table()
    assert len(t) == 8
    assert t[0] == Mount("/", "ext4", "/dev/vda")
    assert t[3] == Mount("/dev/hugepages", "hugetlbfs", "hugetlbfs")   # optional fields skipped
    assert t[4].mount_point == "/srv/vm images"                          # \040 is a space


def test_longest_whole_component_prefix() -> None:
    t = table()
    assert filesystem_type("/dev/hugepages", t) == "hugetlbfs"
    assert filesystem_type("/dev/hugepages/vm1", t) == "hugetlbfs"
    assert filesystem_type("/dev/hugepagesX", t) == "devtmpfs"          # not a component prefix
    assert filesystem_type("/dev/shm/x", t) == "tmpfs"
    assert filesystem_type("/dev", t) == "devtmpfs"
    assert filesystem_type("/home/user", t) == "ext4"
    assert filesystem_type("/srv/vm images/a", t) == "hugetlbfs"
    assert filesystem_type("/srv/vm", t) == "ext4"
    assert filesystem_type("/data2", t) == "ext4"


def test_the_mount_on_top_wins() -> None:
    # Two mounts on /mnt: the later one hides the earlier.
    assert mount_of("/mnt/x", table()) == Mount("/mnt", "hugetlbfs", "none")


def test_symlinks_are_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    t = [Mount("/", "ext4", "/dev/vda"), Mount(str(real), "hugetlbfs", "none")]
    assert filesystem_type(tmp_path / "link", t) == "hugetlbfs"
    assert filesystem_type(tmp_path / "link" / "sub", t) == "hugetlbfs"
    assert filesystem_type(tmp_path, t) == "ext4"


def test_this_hosts_table() -> None:
    assert filesystem_type("/") is not None
    assert filesystem_type("/proc/self") == "proc"
