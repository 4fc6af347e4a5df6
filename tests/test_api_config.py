"""cloud-hypervisor VmConfig JSON <-> hyperpy's VmConfig (hyperpy.api.vmconfig), without a VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from api_util import schema_errors
from hyperpy.api.vmconfig import ApiConfigError, from_json, to_json
from hyperpy.config import (TAP_TEMPLATE, ConsoleConfig, CpusConfig, DeviceConfig, DiskConfig,
                            IommuConfig, NetConfig, RngConfig, SerialConfig)
from hyperpy.memory import MemoryBacking

VMCONFIG = "#/components/schemas/VmConfig"


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + bytes(60))
    return k


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    d = tmp_path / "disk.img"
    d.write_bytes(bytes(4096))
    return d


def test_minimal_config_gets_hyperpys_defaults(kernel):
    cfg = from_json({"payload": {"kernel": str(kernel)}})
    assert cfg.cpus == CpusConfig(boot=1)
    assert cfg.memory == MemoryBacking(size=512 << 20)
    assert cfg.payload.kernel == kernel and cfg.payload.cmdline == ""
    assert cfg.serial == SerialConfig("null") and cfg.console == ConsoleConfig("off")
    assert cfg.disks == () and cfg.nets == () and cfg.rng is None and cfg.iommu is None


def test_full_config(kernel, disk, tmp_path):
    body = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "kvm_hyperv": False, "nested": True},
        "memory": {"size": 256 << 20, "shared": True, "hugepages": True, "hugepage_size": 2 << 20,
                   "prefault": True, "mergeable": False, "thp": True, "hotplug_method": "Acpi"},
        "payload": {"kernel": str(kernel), "cmdline": "console=ttyS0", "initramfs": str(disk)},
        "disks": [{"path": str(disk), "readonly": True, "direct": False, "iommu": True,
                   "num_queues": 2, "queue_size": 128, "id": "root", "vhost_user": False,
                   "pci_segment": 0, "image_type": "Raw"}],
        "net": [{"tap": "hp9", "mac": "52:54:00:aa:bb:cc", "ip": "192.168.249.1",
                 "mask": "255.255.255.0", "num_queues": 4, "queue_size": 512, "pci_device_id": 7,
                 "offload_tso": True}],
        "rng": {"src": "/dev/urandom", "iommu": False},
        "serial": {"mode": "File", "file": str(tmp_path / "serial.log")},
        "console": {"mode": "Off"},
        "devices": [{"path": "sim:gpu0", "iommu": True, "id": "gpu0"}],
        "iommu": False, "watchdog": False, "pvpanic": False, "fs": [],
        "debug_console": {"mode": "Off"},
    }
    assert not schema_errors(VMCONFIG, body)
    cfg = from_json(body)
    assert cfg.cpus == CpusConfig(boot=2)
    assert cfg.memory == MemoryBacking(size=256 << 20, shared=True, hugepages=True, prefault=True)
    assert cfg.payload.initramfs == disk and cfg.payload.cmdline == "console=ttyS0"
    assert cfg.disks == (DiskConfig(path=disk, readonly=True, num_queues=2, queue_size=128, id="root",
                                    iommu=True),)
    assert cfg.nets == (NetConfig(tap="hp9", mac=bytes.fromhex("525400aabbcc"), ip="192.168.249.1",
                                  mask="255.255.255.0", num_queues=4, queue_size=512, pci_device_id=7),)
    assert cfg.rng == RngConfig(src=Path("/dev/urandom"))
    assert cfg.serial == SerialConfig("file", tmp_path / "serial.log")
    assert cfg.devices == (DeviceConfig(path="sim:gpu0", iommu=True, id="gpu0"),)
    assert cfg.iommu == IommuConfig()          # iommu=on endpoints imply the virtio-iommu


def test_to_json_matches_the_spec_and_round_trips(kernel, disk, tmp_path):
    body = {"cpus": {"boot_vcpus": 3, "max_vcpus": 3}, "memory": {"size": 64 << 20},
            "payload": {"kernel": str(kernel), "cmdline": "a b"},
            "disks": [{"path": str(disk), "serial": "s1"}],
            "net": [{"tap": "hp1", "mac": "52:54:00:01:02:03"}],
            "console": {"mode": "File", "file": str(tmp_path / "hvc0"), "iommu": True},
            "devices": [{"path": "sim:x", "pci_device_id": 9}], "iommu": True}
    cfg = from_json(body)
    out = to_json(cfg)
    assert not schema_errors(VMCONFIG, out)
    assert from_json(out) == cfg
    assert out["disks"][0]["id"] == "s1" and out["net"][0]["mac"] == "52:54:00:01:02:03"
    assert out["iommu"] is True and out["console"] == {"mode": "File", "file": str(tmp_path / "hvc0"),
                                                        "iommu": True}


@pytest.mark.parametrize("net", [{}, {"tap": ""}, {"mac": ""}, {"tap": "", "mac": ""},
                                 {"tap": None, "mac": None, "iommu": True}])
def test_net_without_tap_or_mac_picks_them(kernel, net):
    """Absent, null or empty tap and mac, as in cloud-hypervisor: a tap the kernel names vmtapN
    and a random locally administered unicast MAC; two such devices are no duplicates."""
    body = {"payload": {"kernel": str(kernel)}, "net": [net, dict(net)]}
    cfg = from_json(body)
    assert [n.tap for n in cfg.nets] == [TAP_TEMPLATE, TAP_TEMPLATE]
    macs = [n.mac for n in cfg.nets]
    assert all(m[0] & 0x02 and not m[0] & 0x01 for m in macs) and macs[0] != macs[1]
    assert cfg.nets[0].iommu is bool(net.get("iommu"))
    out = to_json(cfg)
    assert not schema_errors(VMCONFIG, out)
    assert "tap" not in out["net"][0]               # reported as given: no tap
    again = from_json(out)
    assert [n.tap for n in again.nets] == [TAP_TEMPLATE] * 2 and [n.mac for n in again.nets] == macs


def test_net_tap_names_are_checked(kernel):
    cfg = from_json({"payload": {"kernel": str(kernel)}, "net": [{"tap": "hp%d"}]})
    assert cfg.nets[0].tap == "hp%d" and to_json(cfg)["net"][0]["tap"] == "hp%d"
    with pytest.raises(ApiConfigError, match=r"^net\[0\].tap: 'a:b' is not a valid interface name"):
        from_json({"payload": {"kernel": str(kernel)}, "net": [{"tap": "a:b"}]})
    with pytest.raises(ApiConfigError, match=r"^net\[1\].tap: 'x%d%d' is not a valid interface name template"):
        from_json({"payload": {"kernel": str(kernel)}, "net": [{}, {"tap": "x%d%d"}]})


def test_builtin_kernel(kernel):
    pytest.importorskip("hyperpy.guests")
    cfg = from_json({"payload": {"kernel": "builtin:hello"}})
    assert cfg.payload.kernel.name == "hello.elf"
    with pytest.raises(ApiConfigError, match=r"^payload.kernel: no built-in guest 'builtin:nope'"):
        from_json({"payload": {"kernel": "builtin:nope"}})


@pytest.mark.parametrize("body,message", [
    ({"payload": {"kernel": "K"}, "bogus": 1}, r"^bogus: unknown field: fields hyperpy accepts here: cpus, "),
    ({"payload": {"kernel": "K"}, "disk": []}, r"^disk: unknown field: did you mean 'disks'\?"),
    ({"payload": {"kernel": "K", "firmwar": "x"}}, r"^payload.firmwar: unknown field: did you mean 'firmware'\?"),
    ({"payload": {"kernel": "K"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "topology": {"packages": 2}}},
     r"^cpus.topology: \{\"packages\": 2\} is not supported by hyperpy: leave it out or empty"),
    ({"payload": {"kernel": "K"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": True}},
     r"^cpus.kvm_hyperv: true is not supported by hyperpy: leave it out or give false"),
    ({"payload": {"kernel": "K"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 4}},
     r"^cpus.max_vcpus: 4 differs from boot_vcpus 2: vCPU hotplug is not supported"),
    ({"payload": {"kernel": "K"}, "cpus": {"boot_vcpus": 0, "max_vcpus": 0}}, r"^cpus.boot_vcpus: 0 is out of range"),
    ({"payload": {"kernel": "K"}, "cpus": {"boot_vcpus": "2", "max_vcpus": 2}},
     r"^cpus.boot_vcpus: must be an integer, not a string"),
    ({"payload": {"kernel": "K"}, "cpus": {"boot_vcpus": True, "max_vcpus": 1}},
     r"^cpus.boot_vcpus: must be an integer, not a boolean"),
    ({"payload": {"kernel": "K"}, "cpus": {"max_vcpus": 1}}, r"^cpus.boot_vcpus: is required"),
    ({"payload": {"kernel": "K"}, "memory": {"size": 1 << 20, "hugepages": True}},
     r"^memory.size: 1048576 is not a multiple of the huge page size"),
    ({"payload": {"kernel": "K"}, "memory": {"size": 4 << 20, "hugepage_size": 4096, "hugepages": True}},
     r"^memory.hugepage_size: 4096 is not a huge page size"),
    ({"payload": {"kernel": "K"}, "memory": {"size": 1 << 30, "zones": [{"id": "a", "size": 1}]}},
     r"^memory.zones: .* is not supported by hyperpy"),
    ({}, r"^payload: is required"),
    ([], r"^VmConfig: must be an object, not an array"),
    ({"payload": {"kernel": "/no/such/kernel"}}, r"^payload.kernel: no such file: /no/such/kernel"),
    ({"payload": {"firmware": "/fw"}}, r"^payload.firmware: \"/fw\" is not supported by hyperpy"),
    ({"payload": {"kernel": "K", "cmdline": "a\u0000b"}}, r"^payload.cmdline: contains a NUL character"),
    ({"payload": {"kernel": "K"}, "disks": [{"path": "/no/disk"}]}, r"^disks\[0\].path: no such file"),
    ({"payload": {"kernel": "K"}, "disks": [{"path": "D", "vhost_user": True}]},
     r"^disks\[0\].vhost_user: true is not supported by hyperpy"),
    ({"payload": {"kernel": "K"}, "disks": [{"path": "D", "queue_size": 100}]},
     r"^disks\[0\].queue_size: 100 is not a power of two"),
    ({"payload": {"kernel": "K"}, "disks": [{"path": "D", "id": "a", "serial": "b"}]},
     r"^disks\[0\].serial: 'b' differs from id 'a'"),
    ({"payload": {"kernel": "K"}, "disks": {"path": "D"}}, r"^disks: must be an array, not an object"),
    ({"payload": {"kernel": "K"}, "net": [{"mac": "zz"}]}, r"^net\[0\].mac: 'zz' is not a MAC address"),
    ({"payload": {"kernel": "K"}, "net": [{"ip": "1.2.3"}]}, r"^net\[0\].ip: '1.2.3' is not an IPv4 address"),
    ({"payload": {"kernel": "K"}, "net": [{"num_queues": 3}]}, r"^net\[0\].num_queues: 3 is odd"),
    ({"payload": {"kernel": "K"}, "net": [{"tap": "a"}, {"tap": "a"}]}, r"^net: two devices use the same tap"),
    ({"payload": {"kernel": "K"}, "net": [{"pci_device_id": 40}]}, r"^net\[0\].pci_device_id: 40 is out of range"),
    ({"payload": {"kernel": "K"}, "rng": {"src": "/no/rng"}}, r"^rng.src: no such file: /no/rng"),
    ({"payload": {"kernel": "K"}, "serial": {"mode": "Pty"}}, r"^serial.mode: 'Pty' is not supported by hyperpy"),
    ({"payload": {"kernel": "K"}, "serial": {"mode": "File"}}, r"^serial.file: mode File needs a file path"),
    ({"payload": {"kernel": "K"}, "serial": {"mode": "Tty"}, "console": {"mode": "Tty"}},
     r"^console.mode: serial and console cannot both be Tty"),
    ({"payload": {"kernel": "K"}, "devices": [{"path": "/sys/bus/pci/devices/none"}]},
     r"^devices\[0\].path: no such device"),
    ({"payload": {"kernel": "K"}, "disks": [{"path": "D", "pci_device_id": 5}],
      "rng": {"src": "/dev/urandom", "pci_device_id": 5}}, r"^pci_device_id: two devices ask for the same PCI slot"),
    ({"payload": {"kernel": "K"}, "vsock": {"cid": 3, "socket": "/x"}}, r"^vsock: .* is not supported by hyperpy"),
])
def test_refused_with_a_one_line_message_naming_the_field(kernel, disk, body, message):
    def fill(v):
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x) for x in v]
        return {"K": str(kernel), "D": str(disk)}.get(v, v) if isinstance(v, str) else v

    with pytest.raises(ApiConfigError, match=message) as e:
        from_json(fill(body))
    assert "\n" not in str(e.value)
