"""Per-vCPU architectural set-up that is the same for every boot protocol.

CPUID (policy from :mod:`hyperpy.cpuid`), the MSRs a kernel expects at entry, the FPU, and the
local APIC's LINT0/LINT1 wiring.  The boot protocol's registers come from :mod:`hyperpy.boot`.
"""

from __future__ import annotations

import logging
import struct

from . import cpuid
from .errors import KvmError

log = logging.getLogger(__name__)

# x86 MSR numbers (architectural; there is no UAPI header for them).
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

BOOT_MSRS = (
    (MSR_IA32_SYSENTER_CS, 0), (MSR_IA32_SYSENTER_ESP, 0), (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0), (MSR_CSTAR, 0), (MSR_KERNEL_GS_BASE, 0), (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0), (MSR_IA32_TSC, 0), (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
)

# Local APIC register offsets and LVT delivery modes (Intel SDM vol. 3, 11.5.1).
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~0x700) | (mode << 8)


def setup_lapic(vcpu) -> None:
    """LINT0 = ExtINT (the legacy PIC), LINT1 = NMI, as PC firmware leaves them."""
    regs = bytearray(vcpu.get_lapic())
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (val,) = struct.unpack_from("<I", regs, off)
        struct.pack_into("<I", regs, off, _set_delivery_mode(val, mode))
    vcpu.set_lapic(bytes(regs))


def setup_msrs(vcpu) -> None:
    """Set the boot MSRs; one the host refuses is skipped with a warning, not fatal."""
    try:
        vcpu.set_msrs(list(BOOT_MSRS))
        return
    except KvmError:
        pass
    for idx, val in BOOT_MSRS:
        try:
            vcpu.set_msrs([(idx, val)])
        except KvmError:
            log.warning("vCPU %d: host KVM refused MSR %#x; left at its reset value", vcpu.index, idx)


def setup_cpuid(vcpu, supported: list[tuple], nr_vcpus: int, masked: tuple[str, ...]) -> None:
    entries = [cpuid.CpuidEntry(*e) for e in supported]
    policy = cpuid.apply_policy(entries, vcpu.index, nr_vcpus, masked)
    vcpu.set_cpuid([(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in policy])


def setup_vcpu(vcpu, supported_cpuid: list[tuple], nr_vcpus: int, masked: tuple[str, ...]) -> None:
    setup_cpuid(vcpu, supported_cpuid, nr_vcpus, masked)
    setup_msrs(vcpu)
    vcpu.set_fpu()
    setup_lapic(vcpu)
