"""Which file system a path lives on, from ``/proc/self/mountinfo``.

``os.statvfs`` has no ``f_type``, so the file system type comes from the mount table: the mount
whose mount point is the longest whole-component prefix of the path (symlinks resolved); when
several mounts share that mount point, the last one listed is the one on top.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: where it is mounted, its type and its source."""

    mount_point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text, in table order (malformed lines skipped)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(_unescape(fields[4]), _unescape(tail[0]), _unescape(tail[1])))
    return mounts


def _contains(mount_point: str, path: str) -> bool:
    if mount_point == "/":
        return True
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def mount_of(path: str | os.PathLike, mounts: list[Mount] | None = None) -> Mount | None:
    """The mount holding ``path`` (its symlinks resolved), or None when the table is unreadable."""
    if mounts is None:
        try:
            mounts = parse_mountinfo(MOUNTINFO.read_text())
        except OSError as e:
            log.debug("cannot read %s: %s", MOUNTINFO, e.strerror)
            return None
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts:
        if _contains(m.mount_point, real) and (best is None or len(m.mount_point) >= len(best.mount_point)):
            best = m
    return best


def filesystem_type(path: str | os.PathLike, mounts: list[Mount] | None = None) -> str | None:
    """``"hugetlbfs"``, ``"tmpfs"``, ``"ext4"``, ... for ``path``; None when unknown."""
    m = mount_of(path, mounts)
    return m.fstype if m is not None else None
