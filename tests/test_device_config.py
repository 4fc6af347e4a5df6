"""--disk, --net, --rng, --console: parsing, and one-line errors for every bad value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hyperpy.config import (TAP_TEMPLATE, DiskConfig, IommuConfig, RngConfig, build_vm_config,
                            parse_disk, parse_mac, parse_net, parse_rng, random_mac)
from hyperpy.errors import ConfigError


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\0" * 4096)
    return p


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF")
    return k


def test_disk_options(img):
    d = parse_disk(f"path={img},readonly=on,direct=off,num_queues=2,queue_size=128,id=sys,pci_device_id=5")
    assert d == DiskConfig(path=img, readonly=True, direct=False, num_queues=2, queue_size=128,
                           id="sys", pci_device_id=5)
    assert parse_disk(str(img)).path == img   # bare value is the path


def local_unicast(mac: bytes) -> bool:
    return len(mac) == 6 and bool(mac[0] & 0x02) and not mac[0] & 0x01


def test_net_options():
    n = parse_net("tap=hp7,mac=52:54:00:aa:bb:cc,ip=192.168.249.1,mask=255.255.255.0")
    assert n.tap == "hp7" and n.mac == bytes.fromhex("525400aabbcc")
    assert n.ip == "192.168.249.1" and n.mask == "255.255.255.0"
    auto = parse_net("")
    assert auto.tap == "vmtap%d" == TAP_TEMPLATE and local_unicast(auto.mac)


@pytest.mark.parametrize("value,tap,iommu", [
    ("tap=,mac=,iommu=on", TAP_TEMPLATE, True),     # the seed's command line
    ("tap=,mac=", TAP_TEMPLATE, False),
    ("mac=", TAP_TEMPLATE, False),
    ("tap=", TAP_TEMPLATE, False),
    ('tap="",mac=""', TAP_TEMPLATE, False),
    ("tap= ,mac= ,iommu=", TAP_TEMPLATE, False),
    ("mac=,tap=hp3", "hp3", False),
    ("tap=hp%d,mac=", "hp%d", False),
])
def test_net_empty_tap_and_mac_pick_one(value, tap, iommu):
    n = parse_net(value)
    assert (n.tap, n.iommu) == (tap, iommu)
    assert local_unicast(n.mac), n.mac.hex(":")
    assert n.ip is None and n.mask is None and n.num_queues == 2 and n.queue_size == 256


def test_net_empty_values_are_the_defaults():
    empty = parse_net("tap=hp1,ip=,mask=,num_queues=,queue_size=,id=,pci_device_id=,iommu=")
    plain = parse_net("tap=hp1")
    assert dataclasses.replace(empty, mac=plain.mac) == plain


def test_random_macs_are_random_local_unicast():
    macs = [random_mac() for _ in range(300)]
    assert all(local_unicast(m) for m in macs)
    assert len(set(macs)) == len(macs)
    # every bit but the two fixed ones varies (a fixed prefix such as 52:54:00 would not)
    assert len({m[0] for m in macs}) > 16 and len({m[1] for m in macs}) > 16
    assert parse_net("mac=").mac != parse_net("mac=").mac


def test_generated_taps_are_not_duplicates(kernel):
    cfg = build_vm_config(kernel=str(kernel), nets=["tap=,mac=,iommu=on", "mac=", "", "tap=hp0"])
    assert [n.tap for n in cfg.nets] == [TAP_TEMPLATE] * 3 + ["hp0"]
    assert len({n.mac for n in cfg.nets}) == 4
    assert cfg.iommu is not None                     # iommu=on still implies the virtio-iommu
    with pytest.raises(ConfigError, match="same tap"):
        build_vm_config(kernel=str(kernel), nets=["tap=", "tap=hp0", "tap=hp0"])


@pytest.mark.parametrize("value,needle", [
    ("tap=a:b", "not a valid interface name (no '/', ':'"),
    ("tap=a/b", "not a valid interface name (no '/', ':'"),
    ("tap=..", "not a valid interface name"),
    ("tap=hp%d%d", "not a valid interface name template (one %d"),
    ("tap=hp%s", "not a valid interface name template (one %d"),
    ("tap=hp%", "not a valid interface name template (one %d"),
    ("tap=0123456789abcdef", "at most 15 characters"),
    ("mac=,mac=", "key 'mac' given twice"),
    ("tap=,tap=hp0", "key 'tap' given twice"),
])
def test_bad_tap_names(value, needle):
    with pytest.raises(ConfigError) as e:
        parse_net(value)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("--net"), msg


def test_other_empty_values_are_the_defaults(img, tmp_path):
    from hyperpy.config import parse_console, parse_device, parse_iommu

    assert parse_disk(f"path={img},readonly=,direct=,num_queues=,queue_size=,id=,pci_device_id=,iommu=") \
        == DiskConfig(path=img)
    assert parse_rng("src=") == parse_rng("src=,iommu=,pci_device_id=") == RngConfig()
    assert parse_iommu("page_sizes=,bypass=,max_mappings=") == IommuConfig()
    assert parse_console("null,iommu=").iommu is False
    for bad, needle in ((parse_disk, "--disk: path= is required"), (parse_device, "--device: path= is required")):
        with pytest.raises(ConfigError, match="^" + needle):
            bad("path=")


def test_rng_options(tmp_path):
    assert parse_rng(None) is None
    assert parse_rng("src=/dev/urandom").src == Path("/dev/urandom")
    assert parse_rng("").src == Path("/dev/urandom")


@pytest.mark.parametrize("value,needle", [
    ("readonly=on", "path= is required"),
    ("path=/nonexistent/x.img", "no such file"),
    ("path={img},readonly=maybe", "readonly"),
    ("path={img},queue_size=100", "power of two"),
    ("path={img},queue_size=0", "queue_size"),
    ("path={img},num_queues=0", "num_queues"),
    ("path={img},pci_device_id=0", "pci_device_id"),
    ("path={img},pci_device_id=32", "pci_device_id"),
    ("path={img},colour=blue", "unknown key 'colour'"),
])
def test_bad_disk_values(img, value, needle):
    with pytest.raises(ConfigError) as e:
        parse_disk(value.format(img=img))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("--disk")


@pytest.mark.parametrize("value,needle", [
    ("tap=hp0,mac=52:54:00:12:34", "not a MAC"),
    ("tap=hp0,mac=01:00:00:00:00:01", "multicast"),
    ("tap=hp0,mac=zz:54:00:12:34:56", "not a MAC"),
    ("tap=this-name-is-far-too-long", "interface name"),
    ("tap=hp0,ip=300.1.1.1", "not an IPv4"),
    ("tap=hp0,mask=nope", "not an IPv4"),
    ("tap=hp0,queue_size=3", "power of two"),
    ("tap=hp0,speed=10G", "unknown key 'speed'"),
])
def test_bad_net_values(value, needle):
    with pytest.raises(ConfigError) as e:
        parse_net(value)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("--net")


def test_bad_rng_source():
    with pytest.raises(ConfigError, match="^--rng src: no such file"):
        parse_rng("src=/dev/does-not-exist")


def test_duplicate_taps_and_slots(img, kernel):
    with pytest.raises(ConfigError, match="same tap"):
        build_vm_config(kernel=str(kernel), nets=["tap=hp0", "tap=hp0"])
    with pytest.raises(ConfigError, match="same PCI slot"):
        build_vm_config(kernel=str(kernel), disks=[f"path={img},pci_device_id=3"],
                        rng="src=/dev/urandom,pci_device_id=3")


def test_mac_parser():
    assert parse_mac("02:00:00:00:00:01", "--net mac") == bytes([2, 0, 0, 0, 0, 1])


def test_cli_bad_device_values_are_one_line(hyperpy_cli, img):
    for args, needle in ((["--disk", "path=/nope.img"], "--disk path"),
                         (["--net", "tap=hp0,mac=bad"], "--net mac"),
                         (["--rng", "src=/nope"], "--rng src"),
                         (["--console", "sideways"], "--console")):
        p = hyperpy_cli("run", "--kernel", "builtin:hello", *args)
        err = p.stderr.decode().strip()
        assert p.returncode == 2, err
        assert len(err.splitlines()) == 1 and needle in err, err


def test_iommu_options():
    from hyperpy.config import parse_iommu

    assert parse_iommu(None) is None
    c = parse_iommu("page_sizes=4K,2M,1G,bypass=on")
    assert c.page_sizes == (4096, 2 << 20, 1 << 30) and c.bypass
    assert parse_iommu("page_sizes=[2M]").page_sizes == (2 << 20,)
    for bad, needle in (("page_sizes=3K", "powers of two"), ("bypass=perhaps", "bypass"),
                        ("colour=red", "unknown key")):
        with pytest.raises(ConfigError) as e:
            parse_iommu(bad)
        assert needle in str(e.value) and str(e.value).startswith("--iommu")


def test_device_options_and_simulation_label(tmp_path):
    from hyperpy.config import parse_device

    d = parse_device("path=sim:gpu0,iommu=on,entry_limit=1000")
    assert d.simulated and d.iommu and d.entry_limit == 1000
    with pytest.raises(ConfigError, match="no such device"):
        parse_device("path=/sys/bus/pci/devices/0000:99:99.9")
    with pytest.raises(ConfigError, match="only for simulated devices"):
        parse_device(f"path={tmp_path},entry_limit=5")


def test_iommu_on_implies_a_virtio_iommu(img, kernel):
    cfg = build_vm_config(kernel=str(kernel), disks=[f"path={img},iommu=on"], console="null,iommu=on",
                          serial="off")
    assert cfg.iommu is not None
    assert [type(e).__name__ for e in cfg.iommu_endpoints()] == ["DiskConfig", "ConsoleConfig"]
    assert build_vm_config(kernel=str(kernel), disks=[f"path={img}"]).iommu is None
