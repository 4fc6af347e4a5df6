"""CPUID policy: what each vCPU sees when it executes CPUID.

KVM reports what it can virtualise on this host (``KVM_GET_SUPPORTED_CPUID``); this module turns
that list into the table one vCPU gets (``KVM_SET_CPUID2``):

* the topology leaves (1, 4, 0xB, 0x1F) describe ``nr_vcpus`` cores with one thread each, and
  this vCPU's APIC ID is its index;
* the "hypervisor present" bit is set and leaf 0x40000000 carries KVM's signature, so guests
  enable their paravirtual features (kvm-clock etc.);
* every feature the user masked (``--cpus features=[-avx2,...]``) is hidden;
* leaf 0xD (XSAVE) is rebuilt from its sub-leaves after masking (:func:`xsave_entries`).

Feature names follow Linux's ``/proc/cpuinfo`` flags (``arch/x86/include/asm/cpufeatures.h``).
Masking hides exactly the named bit and nothing else: hiding a feature that others build on
(``avx`` under ``avx2``/``fma``/``f16c``, ``avx2`` under the ``avx512*`` family, ``xsave`` under
``avx``) while leaving the dependents visible gives the guest a CPU that does not exist; mask
the whole family (e.g. ``features=[-avx2,-avx512f,-avx512dq,-avx512bw,-avx512vl]``).
:func:`unmasked_dependents` names what was left out.  The one exception is the XSAVE state a
hidden feature owns (YMM for ``avx``, PKRU for ``pku``, ...): it leaves leaf 0xD with its
feature, since a guest must not be able to enable state for registers it has not got.

No KVM access (only ``KVM_CPUID_FLAG_SIGNIFCANT_INDEX`` comes from the compiled layer, which
takes it from ``<asm/kvm.h>``), so it is testable without /dev/kvm.  The KVM layer converts
between ``struct kvm_cpuid_entry2`` and :class:`CpuidEntry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from .errors import ConfigError


def _significant_index() -> int:
    """KVM_CPUID_FLAG_SIGNIFCANT_INDEX from <asm/kvm.h>, imported when first needed: parsing
    options (``hyperpy version``, ``--cpus features``) must not need the compiled layer."""
    from ._fast.kvm import CPUID_FLAG_SIGNIFCANT_INDEX
    return CPUID_FLAG_SIGNIFCANT_INDEX


def __getattr__(name: str) -> int:
    if name == "KVM_CPUID_FLAG_SIGNIFCANT_INDEX":
        return _significant_index()
    raise AttributeError(name)

Register = Literal["eax", "ebx", "ecx", "edx"]

LEAF_VENDOR = 0x0
LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_EXT_FEATURES = 0x7
LEAF_EXT_TOPOLOGY = 0xB
LEAF_XSAVE = 0xD
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

# XSAVE (Intel SDM vol. 1, ch. 13): the legacy region (x87 and SSE state, 512 bytes) and the
# XSAVE header (64 bytes) come first; state component i >= 2 is described by CPUID(0xD, i):
# EAX = size, EBX = offset in the standard format (user components), ECX bit 0 = managed by
# IA32_XSS (supervisor), ECX bit 1 = 64-byte aligned in the compacted format.
XSAVE_LEGACY_SIZE = 512
XSAVE_HEADER_SIZE = 64
XSAVE_FIXED_SIZE = XSAVE_LEGACY_SIZE + XSAVE_HEADER_SIZE
XSTATE_X87, XSTATE_SSE, XSTATE_YMM = 0, 1, 2
XSTATE_SUPERVISOR = 1 << 0          # CPUID(0xD, i).ECX
XSTATE_ALIGN64 = 1 << 1

# State components and the CPUID features that use them: a component goes when every one of
# its features is hidden (Linux's xsave_cpuid_features, arch/x86/kernel/fpu/xstate.c).
XSTATE_FEATURES: dict[int, tuple[str, ...]] = {
    2: ("avx",),                            # YMM_Hi128
    3: ("mpx",), 4: ("mpx",),               # BNDREGS, BNDCSR
    5: ("avx512f",), 6: ("avx512f",), 7: ("avx512f",),   # opmask, ZMM_Hi256, Hi16_ZMM
    8: ("intel_pt",),                       # PT (supervisor)
    9: ("pku",),                            # PKRU
    10: ("enqcmd",),                        # PASID (supervisor)
    11: ("shstk", "ibt"), 12: ("shstk", "ibt"),          # CET_U, CET_S (supervisor)
    15: ("arch_lbr",),                      # LBR (supervisor)
    17: ("amx_tile",), 18: ("amx_tile",),   # XTILECFG, XTILEDATA
}
# XCR0 components that XSETBV only accepts together (SDM vol. 1, 13.3).
XSTATE_GROUPS: tuple[tuple[int, ...], ...] = ((3, 4), (5, 6, 7), (17, 18))
XSTATE_AVX512 = (5, 6, 7)


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
        return not (self.flags & _significant_index()) or self.index == index


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
    flags = _significant_index()
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


def _bits_of(mask: int) -> list[int]:
    return [i for i in range(64) if mask >> i & 1]


def xsave_size_standard(components: dict[int, CpuidEntry], mask: int) -> int:
    """XSAVE area size in the standard format for state ``mask`` (CPUID(0xD,0).EBX's rule)."""
    ends = [components[i].ebx + components[i].eax for i in _bits_of(mask) if i in components]
    return max([XSAVE_FIXED_SIZE, *ends])


def xsave_size_compacted(components: dict[int, CpuidEntry], mask: int) -> int:
    """XSAVE area size in the compacted format (XSAVEC/XSAVES) for state ``mask``."""
    size = XSAVE_FIXED_SIZE
    for i in _bits_of(mask):
        c = components.get(i)
        if c is None:
            continue
        if c.ecx & XSTATE_ALIGN64:
            size = (size + 63) & ~63
        size += c.eax
    return size


def _xcr0_acceptable(xcr0: int) -> int:
    """``xcr0`` less the components XSETBV would not accept in it (SDM vol. 1, 13.3)."""
    def without(mask: int, bits: Iterable[int]) -> int:
        for b in bits:
            mask &= ~(1 << b)
        return mask
    if not xcr0 >> XSTATE_SSE & 1:
        xcr0 = without(xcr0, (XSTATE_YMM,))
    if not xcr0 >> XSTATE_YMM & 1:
        xcr0 = without(xcr0, XSTATE_AVX512)
    for group in XSTATE_GROUPS:
        if any(not xcr0 >> b & 1 for b in group):
            xcr0 = without(xcr0, group)
    return xcr0


def xsave_entries(entries: Sequence[CpuidEntry], hidden: Iterable[str] = ()) -> list[CpuidEntry]:
    """Leaf 0xD for the guest, rebuilt from KVM's leaf 0xD entries in ``entries``.

    The supported XCR0 (0xD.0 EAX/EDX) and IA32_XSS (0xD.1 ECX/EDX) masks keep only the state
    components that have a valid sub-leaf (non-zero size, user/supervisor as the mask says),
    whose features are not all ``hidden`` (:data:`XSTATE_FEATURES`), and that XSETBV accepts
    together (:data:`XSTATE_GROUPS`, YMM needs SSE, AVX-512 state needs YMM); supervisor state
    needs XSAVES.  Every remaining component gets exactly one sub-leaf, flagged
    ``KVM_CPUID_FLAG_SIGNIFCANT_INDEX``; no other sub-leaf is left.  0xD.0 EBX and ECX are the
    standard-format size of the whole XCR0 mask, 0xD.1 EBX the compacted size of XCR0|XSS (0
    without XSAVEC/XSAVES): the sizes a guest that enables everything gets.  KVM recomputes
    0xD.0 EBX and 0xD.1 EBX from the vCPU's XCR0/XSS whenever they change (it finds those
    entries by their significant index), so the guest sees the size for what it enabled.

    ``hidden`` containing ``xsave`` leaves 0xD.0 and 0xD.1 all zero and no sub-leaf.  Without a
    0xD.0 entry the leaf 0xD entries of ``entries`` are returned unchanged.
    """
    hidden = {name.lower() for name in hidden}
    sig = _significant_index()
    sub: dict[int, CpuidEntry] = {}
    for e in entries:
        if e.function == LEAF_XSAVE:
            sub.setdefault(e.index if e.flags & sig else 0, e)
    main = sub.get(0)
    if main is None:
        return [e for e in entries if e.function == LEAF_XSAVE]
    if "xsave" in hidden:
        return [CpuidEntry(LEAF_XSAVE, 0, sig), CpuidEntry(LEAF_XSAVE, 1, sig)]
    ext = sub.get(1, CpuidEntry(LEAF_XSAVE, 1, sig))

    xcr0 = main.eax | main.edx << 32
    xss = ext.ecx | ext.edx << 32
    if not ext.eax & FEATURES["xsaves"].mask:
        xss = 0                                  # supervisor state is XSAVES-only
    xss &= ~(xcr0 | (1 << XSTATE_YMM) - 1)      # x87/SSE are XCR0's; a component is one or other
    components: dict[int, CpuidEntry] = {}
    for i in _bits_of((xcr0 | xss) & ~((1 << XSTATE_YMM) - 1)):
        c = sub.get(i)
        supervisor = bool(xss >> i & 1)
        gate = XSTATE_FEATURES.get(i, ())
        if (c is None or c.eax == 0 or bool(c.ecx & XSTATE_SUPERVISOR) != supervisor
                or (gate and all(name in hidden for name in gate))):
            xcr0 &= ~(1 << i)
            xss &= ~(1 << i)
            continue
        components[i] = c

    xcr0 = _xcr0_acceptable(xcr0)
    components = {i: c for i, c in components.items() if (xcr0 | xss) >> i & 1}

    standard = xsave_size_standard(components, xcr0)
    compact = ext.eax & (FEATURES["xsavec"].mask | FEATURES["xsaves"].mask)
    out = [
        replace(main, index=0, flags=main.flags | sig, eax=xcr0 & 0xFFFF_FFFF, ebx=standard,
                ecx=standard, edx=xcr0 >> 32),
        replace(ext, index=1, flags=ext.flags | sig,
                ebx=xsave_size_compacted(components, xcr0 | xss) if compact else 0,
                ecx=xss & 0xFFFF_FFFF, edx=xss >> 32),
    ]
    out += [replace(c, flags=c.flags | sig, edx=0) for _, c in sorted(components.items())]
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

    first = next((i for i, e in enumerate(out) if e.function == LEAF_XSAVE), None)
    if first is not None:
        xsave = xsave_entries(out, masked)
        out = [e for e in out if e.function != LEAF_XSAVE]
        out[first:first] = xsave
    return out


def find(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry CPUID(function, index) returns, or None."""
    for e in entries:
        if e.matches(function, index):
            return e
    return None
