"""The Cython KVM layer on its own: errors, capabilities, bus dispatch (no guest needed)."""

from __future__ import annotations

import pytest

from hyperpy._fast.iobus import IoBus
from hyperpy._fast.kvm import Kvm
from hyperpy._fast.nulldev import NullDevice
from hyperpy.errors import DeviceError, KvmError


def test_missing_kvm_device_is_one_clear_line(tmp_path):
    with pytest.raises(KvmError) as e:
        Kvm(str(tmp_path / "kvm"))
    msg = str(e.value)
    assert "does not exist" in msg and "modprobe kvm" in msg and "\n" not in msg


def test_non_kvm_device_is_refused(tmp_path):
    f = tmp_path / "notkvm"
    f.write_bytes(b"")
    with pytest.raises(KvmError):
        Kvm(str(f))


def test_capabilities_and_supported_cpuid(kvm):
    k = Kvm()
    k.require()
    assert k.check_extension("KVM_CAP_IRQCHIP") == 1
    assert k.vcpu_mmap_size >= 4096
    leaves = {e[0] for e in k.supported_cpuid()}
    assert 0 in leaves and 1 in leaves


def test_vcpu_register_state_roundtrip(kvm):
    vm = Kvm().create_vm()
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    vcpu.set_regs({"rip": 0x1234, "rbx": 0xdead})
    r = vcpu.get_regs()
    assert r["rip"] == 0x1234 and r["rbx"] == 0xdead
    vcpu.set_sregs({"cr0": 0x11, "cs": {"base": 0, "selector": 0x10, "type": 0xb}})
    s = vcpu.get_sregs()
    assert s["cs"]["selector"] == 0x10 and s["cr0"] & 1
    with pytest.raises(ValueError):
        vcpu.set_regs({"xyz": 1})


def test_iobus_lookup_and_overlap():
    bus = IoBus("test bus")
    a, b = NullDevice(), NullDevice()
    bus.register(0x100, 8, a)
    bus.register(0x80, 1, b)
    assert bus.handler_at(0x107) == (0x100, a)
    assert bus.handler_at(0x108) is None
    assert bus.handler_at(0x80) == (0x80, b)
    with pytest.raises(DeviceError, match="overlaps"):
        bus.register(0x104, 8, NullDevice())
    with pytest.raises(DeviceError, match="no read/write"):
        bus.register(0x200, 1, object())


def test_fast_device_python_path_matches_c_path():
    d = NullDevice()
    d.write(0, 1, 0x42)
    assert d.writes == 1
    assert d.read(0, 2) == 0xFFFF and d.reads == 1
