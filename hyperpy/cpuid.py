"""CPUID policy: what each vCPU sees when it executes CPUID.

KVM reports what it can virtualise on this host (``KVM_GET_SUPPORTED_CPUID``); this module turns
that list into the table one vCPU gets (``KVM_SET_CPUID2``):

* the topology leaves (1, 4, 0xB, 0x1F) describe ``nr_vcpus`` cores with one thread each, and
  this vCPU's APIC ID is its index;
* the "hypervisor present" bit is set and leaf 0x40000000 carries KVM's signature, so guests
  enable their paravirtual features (kvm-clock etc.);
* every feature the user masked (``--cpus features=[-avx2,...]``) is hidden.

Feature names follow Linux's ``/proc/cpuinfo`` flags (``arch/x86/include/asm/cpufeatures.h``).
Masking hides exactly the named bit and nothing else: hiding a feature that others build on
(``avx`` under ``avx2``/``fma``/``f16c``, ``avx2`` under the ``avx512*`` family, ``xsave`` under
``avx``) while leaving the dependents visible gives the guest a CPU that does not exist; mask
the whole family (e.g. ``features=[-avx2,-avx512f,-avx512dq,-avx512bw,-avx512vl]``).
:func:`unmasked_dependents` names what was left out.

Pure Python: no KVM access, so it is testable anywhere.  The KVM layer converts between
``struct kvm_cpuid_entry2`` and :class:`CpuidEntry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from .errors import ConfigError

Register = Literal["eax", "ebx", "ecx", "edx"]

# struct kvm_cpuid_entry2.flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

LEAF_VENDOR = 0x0
LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_EXT_FEATURES = 0x7
LEAF_EXT_TOPOLOGY = 0xB
LEAF_V2_EXT_TOPOLOGY = 0x1F
LEAF_HYPERVISOR = 0x4000_0000
LEAF_KVM_FEATURES = 0x4000_0001
LEAF_EXT_INFO = 0x8000_0001

# "KVMKVMKVM\0\0\0" as three little-endian registers (ebx, ecx, edx).
KVM_SIGNATURE = (0x4B4D564B, 0x564B4D56, 0x0000004D)

# Leaf 1 bits the topology code writes.
LEAF1_EDX_HTT = 28
LEAF1_ECX_HYPERVISOR = 31

# Leaf 0xB / 0x1F level types (ECX[15:8]).
LEVEL_TYPE_INVALID = 0
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2


@dataclass(frozen=True, slots=True)
class FeatureBit:
    """Where a CPUID feature flag lives: ``CPUID(leaf, subleaf).reg[bit]``."""

    leaf: int
    subleaf: int
    reg: Register
    bit: int

    @property
    def mask(self) -> int:
        return 1 << self.bit


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One CPUID leaf/subleaf, as in ``struct kvm_cpuid_entry2``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def matches(self, function: int, index: int) -> bool:
        """Whether CPUID(function, index) returns this entry (index only counts when flagged)."""
        if self.function != function:
            return False
        return not (self.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) or self.index == index


def _bits(leaf: int, subleaf: int, reg: Register, names: dict[str, int]) -> dict[str, FeatureBit]:
    return {name: FeatureBit(leaf, subleaf, reg, bit) for name, bit in names.items()}


FEATURES: dict[str, FeatureBit] = {
    # CPUID.1:ECX (cpufeatures.h word 4)
    **_bits(0x1, 0, "ecx", {
        "sse3": 0, "pclmulqdq": 1, "dtes64": 2, "monitor": 3, "ds_cpl": 4, "vmx": 5,
        "smx": 6, "est": 7, "tm2": 8, "ssse3": 9, "cid": 10, "sdbg": 11, "fma": 12,
        "cx16": 13, "xtpr": 14, "pdcm": 15, "pcid": 17, "dca": 18, "sse4_1": 19,
        "sse4_2": 20, "x2apic": 21, "movbe": 22, "popcnt": 23, "tsc_deadline_timer": 24,
        "aes": 25, "xsave": 26, "avx": 28, "f16c": 29, "rdrand": 30, "hypervisor": 31,
    }),
    # CPUID.1:EDX (word 0)
    **_bits(0x1, 0, "edx", {
        "fpu": 0, "vme": 1, "de": 2, "pse": 3, "tsc": 4, "msr": 5, "pae": 6, "mce": 7,
        "cx8": 8, "apic": 9, "sep": 11, "mtrr": 12, "pge": 13, "mca": 14, "cmov": 15,
        "pat": 16, "pse36": 17, "pn": 18, "clflush": 19, "dts": 21, "acpi": 22, "mmx": 23,
        "fxsr": 24, "sse": 25, "sse2": 26, "ss": 27, "ht": 28, "tm": 29, "ia64": 30,
        "pbe": 31,
    }),
    # CPUID.(7,0):EBX (word 9)
    **_bits(0x7, 0, "ebx", {
        "fsgsbase": 0, "tsc_adjust": 1, "sgx": 2, "bmi1": 3, "hle": 4, "avx2": 5,
        "smep": 7, "bmi2": 8, "erms": 9, "invpcid": 10, "rtm": 11, "mpx": 14, "rdt_a": 15,
        "avx512f": 16, "avx512dq": 17, "rdseed": 18, "adx": 19, "smap": 20,
        "avx512ifma": 21, "clflushopt": 23, "clwb": 24, "intel_pt": 25, "avx512pf": 26,
        "avx512er": 27, "avx512cd": 28, "sha_ni": 29, "avx512bw": 30, "avx512vl": 31,
    }),
    # CPUID.(7,0):ECX (word 16)
    **_bits(0x7, 0, "ecx", {
        "avx512vbmi": 1, "umip": 2, "pku": 3, "waitpkg": 5, "avx512_vbmi2": 6,
        "shstk": 7, "gfni": 8, "vaes": 9, "vpclmulqdq": 10, "avx512_vnni": 11,
        "avx512_bitalg": 12, "tme": 13, "avx512_vpopcntdq": 14, "la57": 16, "rdpid": 22,
        "bus_lock_detect": 24, "cldemote": 25, "movdiri": 27, "movdir64b": 28,
        "enqcmd": 29, "sgx_lc": 30,
    }),
    # CPUID.(7,0):EDX (word 18)
    **_bits(0x7, 0, "edx", {
        "avx512_4vnniw": 2, "avx512_4fmaps": 3, "fsrm": 4, "avx512_vp2intersect": 8,
        "md_clear": 10, "serialize": 14, "tsxldtrk": 16, "pconfig": 18, "arch_lbr": 19,
        "ibt": 20, "amx_bf16": 22, "avx512_fp16": 23, "amx_tile": 24, "amx_int8": 25,
    }),
    # CPUID.(7,1):EAX (word 12)
    **_bits(0x7, 1, "eax", {"avx_vnni": 4, "avx512_bf16": 5}),
    # CPUID.(0xD,1):EAX (word 10)
    **_bits(0xD, 1, "eax", {"xsaveopt": 0, "xsavec": 1, "xgetbv1": 2, "xsaves": 3}),
    # CPUID.0x80000001:ECX (word 6); "lzcnt" is the Intel name of AMD's "abm" bit.
    **_bits(0x8000_0001, 0, "ecx", {
        "lahf_lm": 0, "cmp_legacy": 1, "svm": 2, "extapic": 3, "cr8_legacy": 4, "abm": 5,
        "lzcnt": 5, "sse4a": 6, "misalignsse": 7, "3dnowprefetch": 8, "osvw": 9, "ibs": 10,
        "xop": 11, "skinit": 12, "wdt": 13, "lwp": 15, "fma4": 16, "tce": 17,
        "nodeid_msr": 19, "tbm": 21, "topoext": 22, "perfctr_core": 23, "perfctr_nb": 24,
        "bpext": 26, "ptsc": 27, "perfctr_llc": 28, "mwaitx": 29,
    }),
    # CPUID.0x80000001:EDX (word 1)
    **_bits(0x8000_0001, 0, "edx", {
        "syscall": 11, "mp": 19, "nx": 20, "mmxext": 22, "fxsr_opt": 25, "pdpe1gb": 26,
        "rdtscp": 27, "lm": 29, "3dnowext": 30, "3dnow": 31,
    }),
}

# Features that need another feature: masking the key but not the values leaves the guest with
# a CPU that cannot exist (see the module docstring).
_AVX512 = ("avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw",
           "avx512vl", "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg",
           "avx512_vpopcntdq", "avx512_4vnniw", "avx512_4fmaps", "avx512_vp2intersect",
           "avx512_fp16", "avx512_bf16")
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "xsave": ("avx", "xsaveopt", "xsavec", "xgetbv1", "xsaves"),
    "avx": ("avx2", "fma", "f16c", "vaes", "vpclmulqdq", "avx_vnni", *_AVX512),
    "avx2": _AVX512,
    "avx512f": tuple(n for n in _AVX512 if n != "avx512f"),
    "sse4_1": ("sse4_2",),
}


def mask_names() -> list[str]:
    """Names accepted in ``--cpus features=[-NAME,...]``, sorted."""
    return sorted(FEATURES)


def feature_bit(name: str) -> FeatureBit:
    """The location of feature ``name``; ConfigError for an unknown name."""
    try:
        return FEATURES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown CPU feature {name!r} (see hyperpy run --help)") from None


def unmasked_dependents(masked: Iterable[str]) -> list[str]:
    """Features that depend on a masked feature but are not masked themselves."""
    hidden = {name.lower() for name in masked}
    missing: list[str] = []
    for name in hidden:
        missing += [d for d in DEPENDENTS.get(name, ()) if d not in hidden and d not in missing]
    return missing


def ceil_log2(n: int) -> int:
    """Smallest ``s`` with ``2**s >= n`` (0 for n <= 1)."""
    return max(0, (n - 1).bit_length())


def _set_field(value: int, shift: int, width: int, field: int) -> int:
    mask = ((1 << width) - 1) << shift
    return (value & ~mask) | ((field << shift) & mask)


def _leaf1(entry: CpuidEntry, vcpu_id: int, nr_vcpus: int) -> CpuidEntry:
    ebx = _set_field(entry.ebx, 24, 8, vcpu_id & 0xFF)          # initial APIC ID
    ebx = _set_field(ebx, 16, 8, min(nr_vcpus, 0xFF))           # logical processors per package
    edx = entry.edx | (1 << LEAF1_EDX_HTT) if nr_vcpus > 1 else entry.edx & ~(1 << LEAF1_EDX_HTT)
    ecx = entry.ecx | (1 << LEAF1_ECX_HYPERVISOR)
    return replace(entry, ebx=ebx, ecx=ecx, edx=edx)


def _leaf4(entry: CpuidEntry, nr_vcpus: int) -> CpuidEntry:
    """Deterministic cache parameters: host cache geometry, guest core count and sharing."""
    if entry.eax & 0x1F == 0:           # cache type 0: no more caches, leave the terminator
        return entry
    eax = _set_field(entry.eax, 26, 6, min(nr_vcpus, 64) - 1)    # cores per package - 1
    level = (entry.eax >> 5) & 0x7
    sharing = nr_vcpus - 1 if level >= 3 else 0                  # L1/L2 per core, L3 shared
    eax = _set_field(eax, 14, 12, sharing)
    return replace(entry, eax=eax)


def topology_entries(function: int, vcpu_id: int, nr_vcpus: int) -> list[CpuidEntry]:
    """Leaf 0xB or 0x1F: SMT level (1 thread/core), core level (nr_vcpus cores), terminator."""
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(function, 0, flags, eax=0, ebx=1, ecx=(LEVEL_TYPE_SMT << 8) | 0, edx=vcpu_id),
        CpuidEntry(function, 1, flags, eax=ceil_log2(nr_vcpus), ebx=nr_vcpus,
                   ecx=(LEVEL_TYPE_CORE << 8) | 1, edx=vcpu_id),
        CpuidEntry(function, 2, flags, eax=0, ebx=0, ecx=(LEVEL_TYPE_INVALID << 8) | 2,
                   edx=vcpu_id),
    ]


def hypervisor_entry() -> CpuidEntry:
    """Leaf 0x40000000: KVM's signature; the highest hypervisor leaf is 0x40000001."""
    ebx, ecx, edx = KVM_SIGNATURE
    return CpuidEntry(LEAF_HYPERVISOR, 0, 0, eax=LEAF_KVM_FEATURES, ebx=ebx, ecx=ecx, edx=edx)


def _clear_feature(entries: list[CpuidEntry], fb: FeatureBit) -> list[CpuidEntry]:
    out = []
    for e in entries:
        if e.matches(fb.leaf, fb.subleaf):
            e = replace(e, **{fb.reg: getattr(e, fb.reg) & ~fb.mask})
        out.append(e)
    return out


def _max_basic_leaf(entries: Sequence[CpuidEntry]) -> int:
    for e in entries:
        if e.function == LEAF_VENDOR:
            return e.eax
    return 0


def apply_policy(supported: list[CpuidEntry], vcpu_id: int, nr_vcpus: int,
                 masked: tuple[str, ...] = ()) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``vcpu_id`` of ``nr_vcpus``, built from KVM's supported list.

    Returns a new list (``supported`` is not changed).  Leaf 6 (power management), 0xA
    (performance monitoring) and everything not named below pass through unchanged.
    """
    if nr_vcpus < 1:
        raise ValueError(f"nr_vcpus must be >= 1, not {nr_vcpus}")
    if not 0 <= vcpu_id < nr_vcpus:
        raise ValueError(f"vcpu_id {vcpu_id} out of range for {nr_vcpus} vCPUs")
    masks = [feature_bit(name) for name in masked]

    has_1f = any(e.function == LEAF_V2_EXT_TOPOLOGY for e in supported)
    kvm_features = [e for e in supported if e.function == LEAF_KVM_FEATURES]
    out: list[CpuidEntry] = []
    for e in supported:
        if e.function in (LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY, LEAF_HYPERVISOR,
                          LEAF_KVM_FEATURES):
            continue                          # regenerated below
        if e.function == LEAF_VENDOR and e.eax < LEAF_EXT_TOPOLOGY:
            e = replace(e, eax=LEAF_EXT_TOPOLOGY)   # make leaf 0xB reachable
        elif e.function == LEAF_FEATURES:
            e = _leaf1(e, vcpu_id, nr_vcpus)
        elif e.function == LEAF_CACHE_PARAMS:
            e = _leaf4(e, nr_vcpus)
        out.append(e)
    out += topology_entries(LEAF_EXT_TOPOLOGY, vcpu_id, nr_vcpus)
    if has_1f and _max_basic_leaf(out) >= LEAF_V2_EXT_TOPOLOGY:
        out += topology_entries(LEAF_V2_EXT_TOPOLOGY, vcpu_id, nr_vcpus)
    out.append(hypervisor_entry())
    out += kvm_features

    for fb in masks:
        out = _clear_feature(out, fb)
    return out


def find(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry CPUID(function, index) returns, or None."""
    for e in entries:
        if e.matches(function, index):
            return e
    return None
