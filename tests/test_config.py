"""Option strings -> configuration dataclasses."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hyperpy import config, mounts
from hyperpy.config import (
    ConsoleConfig,
    CpusConfig,
    MemoryConfig,
    PayloadConfig,
    SerialConfig,
    VmConfig,
    build_vm_config,
    parse_bool,
    parse_console,
    parse_cpus,
    parse_memory,
    parse_payload,
    parse_serial,
    parse_size,
    split_items,
    split_options,
)
from hyperpy.errors import ConfigError, HyperpyError
from hyperpy.memory import MemoryBacking

M = 1 << 20
G = 1 << 30


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF")
    return k


def one_line(e: pytest.ExceptionInfo[HyperpyError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- sizes, bools


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("0", 0), ("512M", 512 * M), ("512m", 512 * M), ("2G", 2 * G),
    ("1g", G), ("64K", 64 << 10), ("1T", 1 << 40), ("512MiB", 512 * M), ("2GiB", 2 * G),
    ("2gb", 2 * G), ("100b", 100), (" 1G ", G), ("16 M", 16 * M),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12Q", "", "M", "-1G", "1.5G", "0x100", "1GG", "1 G B", "1iB"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_size(text)
    assert one_line(e) == f"--memory size: {text!r} is not a size (use e.g. 512M, 2G)"


def test_parse_size_names_option() -> None:
    with pytest.raises(ConfigError, match="^--memory hugepage_size: 'x'"):
        parse_size("x", "--memory hugepage_size")


@pytest.mark.parametrize("text, value", [("on", True), ("ON", True), ("true", True),
                                         ("off", False), ("False", False)])
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text, "--memory shared") is value


def test_parse_bool_error() -> None:
    with pytest.raises(ConfigError) as e:
        parse_bool("yes please", "--memory shared")
    assert one_line(e) == "--memory shared: 'yes please' is not on or off"


# --------------------------------------------------------------------------- splitter


def test_split_items_brackets_and_quotes() -> None:
    assert split_items("a=1,b=[x,y],c='p,q',d=\"r,s\"", "--x") == \
        ["a=1", "b=[x,y]", "c='p,q'", 'd="r,s"']


@pytest.mark.parametrize("text, what", [("a=[x,y", "unbalanced '['"), ("a=x]", "unbalanced ']'"),
                                        ("a='x", "unterminated quote")])
def test_split_items_errors(text: str, what: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(what)):
        split_items(text, "--x")


def test_split_options() -> None:
    opts = split_options("--memory", "size=1G,file='/a,b',shared=on", config.MEMORY_KEYS)
    assert opts == {"size": "1G", "file": "/a,b", "shared": "on"}


def test_split_options_unknown_key() -> None:
    with pytest.raises(ConfigError) as e:
        split_options("--memory", "sise=1G", config.MEMORY_KEYS)
    msg = one_line(e)
    assert msg.startswith("--memory: unknown key 'sise' (")
    assert "known: size, shared, file, hugepages, hugepage_size, prefault" in msg
    assert "did you mean 'size'" in msg


@pytest.mark.parametrize("text, what", [
    ("size=1G,size=2G", "key 'size' given twice"),
    ("size=1G,,shared=on", "empty item"),
    ("", "empty value"),
    ("size=1G,shared", "'shared' is not key=value"),
])
def test_split_options_errors(text: str, what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        split_options("--memory", text, config.MEMORY_KEYS, bare_key="size")


def test_split_options_bare_first_value() -> None:
    assert split_options("--cpus", "2", ("boot", "features"), bare_key="boot") == {"boot": "2"}
    with pytest.raises(ConfigError, match="is not key=value"):
        split_options("--cpus", "2", ("boot", "features"))


# --------------------------------------------------------------------------- --cpus


@pytest.mark.parametrize("text, cfg", [
    (None, CpusConfig(1, ())),
    ("boot=2", CpusConfig(2, ())),
    ("4", CpusConfig(4, ())),
    ("boot=255", CpusConfig(255, ())),
    ("boot=2,features=[-avx2,-popcnt]", CpusConfig(2, ("avx2", "popcnt"))),
    ("features=-avx2", CpusConfig(1, ("avx2",))),
    ("features=[-AVX2, -popcnt,-avx2]", CpusConfig(1, ("avx2", "popcnt"))),
    ("features=[]", CpusConfig(1, ())),
])
def test_parse_cpus(text: str | None, cfg: CpusConfig) -> None:
    assert parse_cpus(text) == cfg


@pytest.mark.parametrize("text, msg", [
    ("boot=0", "--cpus boot: 0 is out of range (give 1 to 255)"),
    ("boot=256", "--cpus boot: 256 is out of range (give 1 to 255)"),
    ("boot=two", "--cpus boot: 'two' is not a number"),
    ("features=[-nosuch]", "--cpus features: unknown CPU feature 'nosuch' (see hyperpy run --help)"),
    ("features=[avx2]", "--cpus features: 'avx2' must be written -avx2 (features can only be hidden)"),
    ("features=[+avx2]", "--cpus features: '+avx2' must be written -avx2 (features can only be hidden)"),
    ("max=4", "--cpus: unknown key 'max' (known: boot, features)"),
])
def test_parse_cpus_errors(text: str, msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_cpus(text)
    assert one_line(e) == msg


def test_cpus_dependents_warning(caplog: pytest.LogCaptureFixture) -> None:
    parse_cpus("features=[-avx2]")
    assert "avx512f" in caplog.text
    caplog.clear()
    parse_cpus("features=[-popcnt]")
    assert caplog.text == ""


# --------------------------------------------------------------------------- --memory


def test_memory_is_memory_backing() -> None:
    assert MemoryConfig is MemoryBacking


def test_parse_memory_defaults() -> None:
    assert parse_memory(None) == MemoryBacking(size=512 * M)
    assert parse_memory("size=1G") == MemoryBacking(size=G)
    assert parse_memory("2G") == MemoryBacking(size=2 * G)


def test_parse_memory_all_keys(tmp_path: Path) -> None:
    m = parse_memory(f"size=2G,shared=on,file={tmp_path},hugepages=on,hugepage_size=1G,prefault=on")
    assert m == MemoryBacking(size=2 * G, shared=True, file=tmp_path, hugepages=True,
                              hugepage_size=G, prefault=True)


def test_parse_memory_file_defaults_to_shared(tmp_path: Path) -> None:
    f = tmp_path / "ram"
    f.write_bytes(b"")
    assert parse_memory(f"size=64M,file={f}").shared is True
    assert parse_memory(f"size=64M,file={f},shared=off").shared is False


def test_parse_memory_quoted_file_with_comma(tmp_path: Path) -> None:
    d = tmp_path / "a,b"
    d.mkdir()
    assert parse_memory(f"size=64M,file='{d}'").file == d


def test_parse_memory_hugepages_default_2m() -> None:
    m = parse_memory("size=64M,hugepages=on")
    assert m.hugepages and m.hugepage_size == 2 * M


def test_parse_memory_empty_values_are_the_defaults() -> None:
    assert parse_memory("size=") == MemoryBacking(size=512 * M)
    assert parse_memory("size=64M,shared=,hugepages=,prefault=") == MemoryBacking(size=64 * M)
    assert parse_cpus("boot=,features=") == CpusConfig()


def test_parse_memory_empty_file_is_refused() -> None:
    # An empty path is a mistake (an unset shell variable), not "no file": refused, not ignored.
    with pytest.raises(ConfigError) as e:
        parse_memory("size=64M,file=")
    assert one_line(e).startswith("--memory file: empty path (give an existing file or a hugetlbfs")


def _ram_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "hyperpy.memory" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_memory_file_directory_not_on_hugetlbfs_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      where: str) -> None:
    d = tmp_path if where == "tmp_path" else Path(where)
    if not d.is_dir():
        pytest.skip(f"{d} does not exist")
    fstype = mounts.filesystem_type(d)
    assert fstype not in (None, "hugetlbfs")
    with caplog.at_level(logging.WARNING, logger="hyperpy.memory"):
        m = parse_memory(f"size=64M,file={d}")
    assert m.file == d and m.shared
    (msg,) = _ram_warnings(caplog)
    assert "\n" not in msg
    assert msg == (f"--memory file: {d} is on {fstype}, not hugetlbfs: guest RAM there is not on "
                   f"huge pages (mount hugetlbfs there with 'mount -t hugetlbfs none {d}', or use "
                   "hugepages=on without file=)")


def test_memory_file_regular_file_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "ram"
    f.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="hyperpy.memory"):
        parse_memory(f"size=64M,file={f}")
    assert _ram_warnings(caplog) == []


@pytest.fixture
def hugetlbfs(tmp_path: Path):
    """A hugetlbfs mounted on a fresh directory for the test, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting hugetlbfs needs root")
    d = tmp_path / "huge"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "hugetlbfs", "none", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount hugetlbfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_memory_file_on_hugetlbfs_does_not_warn(hugetlbfs: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    sub = hugetlbfs / "vm1"
    sub.mkdir()
    link = tmp_path / "pages"
    link.symlink_to(hugetlbfs)
    with caplog.at_level(logging.WARNING, logger="hyperpy.memory"):
        for d in (hugetlbfs, sub, link):     # the mount, a directory in it, a symlink to it
            m = parse_memory(f"size=8G,file={d}")   # the /dev/hugepages style keeps working
            assert m == MemoryBacking(size=8 * G, shared=True, file=d)
    assert _ram_warnings(caplog) == []
    # Only what is under the mount point: its parent directory is on another file system.
    assert mounts.filesystem_type(hugetlbfs) == "hugetlbfs"
    assert mounts.filesystem_type(tmp_path) != "hugetlbfs"


@pytest.mark.parametrize("text, msg", [
    ("size=12Q", "--memory size: '12Q' is not a size (use e.g. 512M, 2G)"),
    ("size=0", "--memory size: '0' must be more than 0 (e.g. 512M)"),
    ("sise=1G", "--memory: unknown key 'sise' (did you mean 'size'? known: size, shared, file, "
                "hugepages, hugepage_size, prefault)"),
    ("size=1G,shared=maybe", "--memory shared: 'maybe' is not on or off"),
    ("size=1G,hugepages=on,hugepage_size=4M",
     "--memory hugepage_size: '4M' is not a huge page size (use 2M or 1G)"),
    ("size=1G,hugepage_size=1G", "--memory hugepage_size: '1G' needs hugepages=on"),
    ("size=513M,hugepages=on", "--memory size: '513M' is not a multiple of the huge page size 2M"),
    ("size=1G,file=/no/such/file",
     "--memory file: no such file: /no/such/file (give an existing file or a hugetlbfs "
     "directory such as /dev/hugepages)"),
])
def test_parse_memory_errors(text: str, msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_memory(text)
    assert one_line(e) == msg


# --------------------------------------------------------------------------- payload


def test_payload(kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"070701")
    p = parse_payload(str(kernel), str(initrd), "console=ttyS0")
    assert p == PayloadConfig(kernel=kernel, initramfs=initrd, cmdline="console=ttyS0")
    assert parse_payload(str(kernel), None, None) == PayloadConfig(kernel, None, "")


def test_payload_missing_kernel() -> None:
    with pytest.raises(ConfigError) as e:
        parse_payload("/x/vmlinux", None, None)
    assert one_line(e) == ("--kernel: no such file: /x/vmlinux (give the path of a PVH ELF, "
                           "vmlinux or bzImage, or builtin:hello)")


def test_payload_kernel_required() -> None:
    with pytest.raises(ConfigError, match="^--kernel is required"):
        parse_payload(None, None, None)


def test_payload_kernel_is_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        parse_payload(str(tmp_path), None, None)


def test_payload_missing_initramfs(kernel: Path) -> None:
    with pytest.raises(ConfigError, match="^--initramfs: no such file: /x/initrd"):
        parse_payload(str(kernel), "/x/initrd", None)


def test_payload_cmdline_checks(kernel: Path) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        parse_payload(str(kernel), None, "a\0b")
    with pytest.raises(ConfigError, match="too long"):
        parse_payload(str(kernel), None, "x" * 70000)


def test_builtin_kernel(monkeypatch: pytest.MonkeyPatch, kernel: Path) -> None:
    calls: list[str] = []

    def builtin_kernel(name: str) -> Path:
        calls.append(name)
        if name != "hello":
            raise ConfigError(f"--kernel: unknown built-in guest {name!r}")
        return kernel

    fake = types.ModuleType("hyperpy.guests")
    fake.builtin_kernel = builtin_kernel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hyperpy.guests", fake)
    monkeypatch.setattr("hyperpy.guests", fake, raising=False)
    assert parse_payload("builtin:hello", None, None).kernel == kernel
    with pytest.raises(ConfigError, match="unknown built-in guest 'nope'"):
        parse_payload("builtin:nope", None, None)
    assert calls == ["hello", "nope"]


# --------------------------------------------------------------------------- serial / console


@pytest.mark.parametrize("text, cfg", [
    (None, SerialConfig("tty", None)),
    ("tty", SerialConfig("tty", None)),
    ("OFF", SerialConfig("off", None)),
    ("null", SerialConfig("null", None)),
])
def test_parse_serial(text: str | None, cfg: SerialConfig) -> None:
    assert parse_serial(text) == cfg


def test_parse_serial_file(tmp_path: Path) -> None:
    assert parse_serial(f"file={tmp_path}/log") == SerialConfig("file", tmp_path / "log")


@pytest.mark.parametrize("text, what", [
    ("pty", "--serial: 'pty' is not one of tty, off, null, file=PATH"),
    ("file=", "--serial: file= needs a path"),
    ("tty=1", "is not one of"),
    ("file=/no/such/dir/log", "--serial: no such directory: /no/such/dir"),
])
def test_parse_serial_errors(text: str, what: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(what)):
        parse_serial(text)


def test_parse_serial_file_is_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        parse_serial(f"file={tmp_path}")


def test_parse_console(tmp_path: Path) -> None:
    assert parse_console(None) == ConsoleConfig("off", None)
    assert parse_console("off") == ConsoleConfig("off", None)
    assert parse_console("tty") == ConsoleConfig("tty", None)
    assert parse_console(f"file={tmp_path}/c") == ConsoleConfig("file", tmp_path / "c")
    with pytest.raises(ConfigError, match="^--console: 'x' is not one of"):
        parse_console("x")


# --------------------------------------------------------------------------- whole VM


def test_build_vm_config(kernel: Path) -> None:
    cfg = build_vm_config(cpus="boot=2,features=[-popcnt]", memory="size=1G", kernel=str(kernel),
                          initramfs=None, cmdline="console=ttyS0", serial="tty", console="off")
    assert cfg == VmConfig(
        cpus=CpusConfig(2, ("popcnt",)),
        memory=MemoryBacking(size=G),
        payload=PayloadConfig(kernel, None, "console=ttyS0"),
        serial=SerialConfig("tty", None),
        console=ConsoleConfig("off", None),
    )


def test_build_vm_config_defaults(kernel: Path) -> None:
    cfg = build_vm_config(kernel=str(kernel))
    assert cfg.cpus == CpusConfig()
    assert cfg.memory == MemoryBacking(size=512 * M)
    assert cfg.serial == SerialConfig("tty", None)
    assert cfg.console == ConsoleConfig("off", None)


def test_build_vm_config_is_frozen(kernel: Path) -> None:
    cfg = build_vm_config(kernel=str(kernel))
    with pytest.raises(AttributeError):
        cfg.cpus = CpusConfig(2)  # type: ignore[misc]


def test_build_vm_config_reports_first_problem() -> None:
    with pytest.raises(ConfigError) as e:
        build_vm_config(cpus="boot=0", memory="size=12Q", kernel="/x/vmlinux")
    assert one_line(e).startswith("--cpus boot:")
    with pytest.raises(ConfigError) as e:
        build_vm_config(cpus="boot=1", memory="size=12Q", kernel="/x/vmlinux")
    assert one_line(e).startswith("--memory size:")


def test_build_vm_config_serial_console_both_tty(kernel: Path) -> None:
    with pytest.raises(ConfigError, match="cannot both be tty"):
        build_vm_config(kernel=str(kernel), serial="tty", console="tty")


def test_builtin_kernel_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    empty = types.ModuleType("hyperpy.guests")
    monkeypatch.setitem(sys.modules, "hyperpy.guests", empty)
    monkeypatch.setattr("hyperpy.guests", empty, raising=False)
    with pytest.raises(ConfigError, match="built-in guests are not available"):
        parse_payload("builtin:hello", None, None)
