"""CPUID policy: feature bit numbers, topology leaves, hypervisor leaves, masking, leaf 0xD."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hyperpy import cpuid
from hyperpy.cpuid import (
    FEATURES,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX as SIG,
    CpuidEntry,
    FeatureBit,
    apply_policy,
    ceil_log2,
    find,
    mask_names,
    unmasked_dependents,
)
from hyperpy.errors import ConfigError

ALL = 0xFFFF_FFFF


def host_like_supported(max_leaf: int = 0x1F) -> list[CpuidEntry]:
    """A KVM_GET_SUPPORTED_CPUID-like list: every feature bit set, host topology garbage."""
    return [
        CpuidEntry(0x0, 0, 0, eax=max_leaf, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        # EBX: APIC id 0x2a, 64 logical, clflush 8; EDX has HTT set.
        CpuidEntry(0x1, 0, 0, eax=0x000806F8, ebx=0x2A40_0800, ecx=0x7FFA_3203, edx=ALL),
        # Leaf 4: L1d (type 1, level 1), L2 (type 3, level 2), L3 (type 3, level 3), null.
        CpuidEntry(0x4, 0, SIG, eax=(31 << 26) | (1 << 14) | (1 << 5) | 1, ebx=0x02C0003F, ecx=63),
        CpuidEntry(0x4, 1, SIG, eax=(31 << 26) | (1 << 14) | (2 << 5) | 3, ebx=0x03C0003F, ecx=2047),
        CpuidEntry(0x4, 2, SIG, eax=(31 << 26) | (127 << 14) | (3 << 5) | 3, ebx=0x03C0003F,
                   ecx=0xFFFF),
        CpuidEntry(0x4, 3, SIG, eax=0),
        CpuidEntry(0x6, 0, 0, eax=0x4, ecx=0x1),
        CpuidEntry(0x7, 0, SIG, eax=1, ebx=ALL, ecx=ALL, edx=ALL),
        CpuidEntry(0x7, 1, SIG, eax=ALL),
        CpuidEntry(0xA, 0, 0, eax=0x07300805, edx=0x603),
        CpuidEntry(0xB, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=0x2A),
        CpuidEntry(0xB, 1, SIG, eax=6, ebx=64, ecx=0x201, edx=0x2A),
        CpuidEntry(0xD, 1, SIG, eax=0xF),
        CpuidEntry(0x1F, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=0x2A),
        CpuidEntry(0x4000_0000, 0, 0, eax=0x4000_0001, ebx=1, ecx=2, edx=3),
        CpuidEntry(0x4000_0001, 0, 0, eax=0x0100_7AFB, edx=0),
        CpuidEntry(0x8000_0000, 0, 0, eax=0x8000_0008),
        CpuidEntry(0x8000_0001, 0, 0, ecx=ALL, edx=ALL),
    ]


# --------------------------------------------------------------------------- bit numbers


@pytest.mark.parametrize("name, where", [
    ("avx2", FeatureBit(7, 0, "ebx", 5)),
    ("popcnt", FeatureBit(1, 0, "ecx", 23)),
    ("sse4_2", FeatureBit(1, 0, "ecx", 20)),
    ("sse4_1", FeatureBit(1, 0, "ecx", 19)),
    ("lm", FeatureBit(0x8000_0001, 0, "edx", 29)),
    ("nx", FeatureBit(0x8000_0001, 0, "edx", 20)),
    ("syscall", FeatureBit(0x8000_0001, 0, "edx", 11)),
    ("pdpe1gb", FeatureBit(0x8000_0001, 0, "edx", 26)),
    ("rdtscp", FeatureBit(0x8000_0001, 0, "edx", 27)),
    ("hypervisor", FeatureBit(1, 0, "ecx", 31)),
    ("x2apic", FeatureBit(1, 0, "ecx", 21)),
    ("aes", FeatureBit(1, 0, "ecx", 25)),
    ("xsave", FeatureBit(1, 0, "ecx", 26)),
    ("avx", FeatureBit(1, 0, "ecx", 28)),
    ("rdrand", FeatureBit(1, 0, "ecx", 30)),
    ("fpu", FeatureBit(1, 0, "edx", 0)),
    ("tsc", FeatureBit(1, 0, "edx", 4)),
    ("apic", FeatureBit(1, 0, "edx", 9)),
    ("sep", FeatureBit(1, 0, "edx", 11)),
    ("sse2", FeatureBit(1, 0, "edx", 26)),
    ("ht", FeatureBit(1, 0, "edx", 28)),
    ("smep", FeatureBit(7, 0, "ebx", 7)),
    ("erms", FeatureBit(7, 0, "ebx", 9)),
    ("avx512f", FeatureBit(7, 0, "ebx", 16)),
    ("smap", FeatureBit(7, 0, "ebx", 20)),
    ("sha_ni", FeatureBit(7, 0, "ebx", 29)),
    ("avx512vl", FeatureBit(7, 0, "ebx", 31)),
    ("umip", FeatureBit(7, 0, "ecx", 2)),
    ("pku", FeatureBit(7, 0, "ecx", 3)),
    ("gfni", FeatureBit(7, 0, "ecx", 8)),
    ("rdpid", FeatureBit(7, 0, "ecx", 22)),
    ("lahf_lm", FeatureBit(0x8000_0001, 0, "ecx", 0)),
    ("abm", FeatureBit(0x8000_0001, 0, "ecx", 5)),
    ("lzcnt", FeatureBit(0x8000_0001, 0, "ecx", 5)),
    ("sse4a", FeatureBit(0x8000_0001, 0, "ecx", 6)),
    ("3dnowprefetch", FeatureBit(0x8000_0001, 0, "ecx", 8)),
    ("xop", FeatureBit(0x8000_0001, 0, "ecx", 11)),
    ("fma4", FeatureBit(0x8000_0001, 0, "ecx", 16)),
    ("tbm", FeatureBit(0x8000_0001, 0, "ecx", 21)),
])
def test_feature_bits(name: str, where: FeatureBit) -> None:
    assert FEATURES[name] == where


REQUIRED = """sse3 pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand
hypervisor fpu tsc msr pae cx8 apic sep pge cmov pat pse36 clflush mmx fxsr sse sse2 ht fsgsbase
bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap clflushopt clwb sha_ni
avx512bw avx512vl avx512vbmi umip pku waitpkg gfni vaes vpclmulqdq rdpid lahf_lm abm lzcnt sse4a
misalignsse 3dnowprefetch xop fma4 tbm syscall nx pdpe1gb rdtscp lm""".split()


def test_required_names_present_and_sane() -> None:
    assert set(REQUIRED) <= set(FEATURES)
    for name, fb in FEATURES.items():
        assert fb.reg in ("eax", "ebx", "ecx", "edx"), name
        assert 0 <= fb.bit < 32, name


def test_no_two_names_share_a_bit_except_aliases() -> None:
    seen: dict[FeatureBit, str] = {}
    for name, fb in FEATURES.items():
        if fb in seen:
            assert {seen[fb], name} == {"abm", "lzcnt"}
        seen[fb] = name


def test_mask_names_sorted_complete() -> None:
    names = mask_names()
    assert names == sorted(FEATURES)
    assert "avx2" in names and "popcnt" in names


def test_unknown_feature_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown CPU feature 'nosuch'"):
        cpuid.feature_bit("nosuch")
    with pytest.raises(ConfigError):
        apply_policy(host_like_supported(), 0, 1, ("nosuch",))


def test_unmasked_dependents() -> None:
    assert "avx512f" in unmasked_dependents(("avx2",))
    assert unmasked_dependents(("avx2", *cpuid._AVX512)) == []
    assert unmasked_dependents(("popcnt",)) == []


@pytest.mark.parametrize("n, s", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (255, 8)])
def test_ceil_log2(n: int, s: int) -> None:
    assert ceil_log2(n) == s


# --------------------------------------------------------------------------- topology


def leaf(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    e = find(entries, function, index)
    assert e is not None, f"no leaf {function:#x}.{index}"
    return e


@pytest.mark.parametrize("nr", [1, 2, 3, 4])
def test_topology(nr: int) -> None:
    supported = host_like_supported()
    for vcpu in range(nr):
        out = apply_policy(supported, vcpu, nr, ())
        l1 = leaf(out, 1)
        assert (l1.ebx >> 24) & 0xFF == vcpu
        assert (l1.ebx >> 16) & 0xFF == nr
        assert (l1.ebx >> 8) & 0xFF == 0x08                  # CLFLUSH line size kept
        assert bool(l1.edx & (1 << 28)) == (nr > 1)          # HTT
        assert l1.ecx & (1 << 31)                            # hypervisor
        assert l1.eax == 0x000806F8                          # family/model/stepping kept

        for function in (0xB, 0x1F):
            smt, core, end = (leaf(out, function, i) for i in range(3))
            assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, (smt.ecx >> 8) & 0xFF, smt.ecx & 0xFF) == \
                (0, 1, 1, 0)
            assert (core.eax & 0x1F, core.ebx & 0xFFFF, (core.ecx >> 8) & 0xFF, core.ecx & 0xFF) \
                == (ceil_log2(nr), nr, 2, 1)
            assert (end.ebx, (end.ecx >> 8) & 0xFF, end.ecx & 0xFF) == (0, 0, 2)
            assert smt.edx == core.edx == end.edx == vcpu
            assert len([e for e in out if e.function == function]) == 3

        caches = [e for e in out if e.function == 4]
        assert len(caches) == 4
        for c in caches[:3]:
            assert c.eax >> 26 == nr - 1
        assert (caches[0].eax >> 14) & 0xFFF == 0            # L1 per core
        assert (caches[1].eax >> 14) & 0xFFF == 0            # L2 per core
        assert (caches[2].eax >> 14) & 0xFFF == nr - 1       # L3 shared by all
        assert caches[2].ebx == 0x03C0003F and caches[2].ecx == 0xFFFF   # geometry kept
        assert caches[3].eax == 0                            # terminator untouched


def test_topology_shift_values() -> None:
    shifts = {nr: leaf(apply_policy(host_like_supported(), 0, nr), 0xB, 1).eax for nr in (1, 2, 3, 4)}
    assert shifts == {1: 0, 2: 1, 3: 2, 4: 2}


def test_no_1f_when_host_lacks_it() -> None:
    supported = [e for e in host_like_supported(max_leaf=0xD) if e.function != 0x1F]
    out = apply_policy(supported, 0, 2)
    assert find(out, 0x1F) is None
    assert leaf(out, 0xB, 1).ebx == 2
    assert leaf(out, 0).eax == 0xD


def test_leaf_0xb_reachable_on_small_max_leaf() -> None:
    supported = [e for e in host_like_supported(max_leaf=0x7) if e.function not in (0xB, 0x1F)]
    out = apply_policy(supported, 0, 2)
    assert leaf(out, 0).eax == 0xB
    assert leaf(out, 0xB, 1).ebx == 2


def test_hypervisor_leaves() -> None:
    out = apply_policy(host_like_supported(), 0, 1)
    hv = leaf(out, 0x4000_0000)
    assert hv.eax == 0x4000_0001
    sig = b"".join(r.to_bytes(4, "little") for r in (hv.ebx, hv.ecx, hv.edx))
    assert sig == b"KVMKVMKVM\0\0\0"
    assert leaf(out, 0x4000_0001).eax == 0x0100_7AFB           # KVM features kept
    assert len([e for e in out if e.function == 0x4000_0000]) == 1


def test_hypervisor_leaf_without_kvm_features() -> None:
    supported = [e for e in host_like_supported() if e.function < 0x4000_0000]
    out = apply_policy(supported, 0, 1)
    assert leaf(out, 0x4000_0000).eax == 0x4000_0001
    assert find(out, 0x4000_0001) is None


def test_untouched_leaves_and_input_not_modified() -> None:
    supported = host_like_supported()
    before = list(supported)
    out = apply_policy(supported, 1, 2, ("avx2",))
    assert supported == before
    for function in (0x6, 0xA, 0x8000_0000):
        assert leaf(out, function) == leaf(supported, function)


@pytest.mark.parametrize("vcpu, nr", [(0, 0), (2, 2), (-1, 1)])
def test_bad_vcpu_numbers(vcpu: int, nr: int) -> None:
    with pytest.raises(ValueError):
        apply_policy(host_like_supported(), vcpu, nr)


# --------------------------------------------------------------------------- masking


def registers(entries: list[CpuidEntry]) -> dict[tuple[int, int, str], int]:
    return {(e.function, e.index, r): getattr(e, r) for e in entries
            for r in ("eax", "ebx", "ecx", "edx")}


@pytest.mark.parametrize("name", ["avx2", "popcnt", "sse4_2", "lm", "avx512f", "rdpid", "fma4",
                                  "xsaveopt", "avx_vnni", "amx_tile", "hypervisor"])
def test_masking_clears_exactly_that_bit(name: str) -> None:
    plain = registers(apply_policy(host_like_supported(), 0, 2))
    masked = registers(apply_policy(host_like_supported(), 0, 2, (name,)))
    fb = FEATURES[name]
    key = (fb.leaf, fb.subleaf, fb.reg)
    assert plain[key] & fb.mask
    assert masked[key] == plain[key] & ~fb.mask
    assert {k: v for k, v in masked.items() if k != key} == \
        {k: v for k, v in plain.items() if k != key}


def test_masking_several_and_case_insensitive() -> None:
    out = apply_policy(host_like_supported(), 0, 1, ("AVX2", "popcnt", "lm"))
    assert not leaf(out, 7).ebx & (1 << 5)
    assert not leaf(out, 1).ecx & (1 << 23)
    assert not leaf(out, 0x8000_0001).edx & (1 << 29)


def test_masking_subleaf_only_hits_that_subleaf() -> None:
    out = apply_policy(host_like_supported(), 0, 1, ("avx_vnni",))
    assert leaf(out, 7, 1).eax == ALL & ~(1 << 4)
    assert leaf(out, 7, 0).eax == 1


def test_cpuid_entry_matches_index_only_when_significant() -> None:
    assert CpuidEntry(1, 0, 0).matches(1, 5)
    assert not CpuidEntry(7, 0, SIG).matches(7, 1)
    assert CpuidEntry(7, 1, SIG).matches(7, 1)


# --------------------------------------------------------------------------- leaf 0xD (XSAVE)
#
# What Linux does with leaf 0xD (arch/x86/kernel/fpu/xstate.c, fpu__init_system_xstate): it
# takes the XCR0 mask from 0xD.0 EAX/EDX (and XSS from 0xD.1 ECX/EDX), drops the components
# whose CPUID feature is missing, writes XCR0, reads every component's size/offset/flags from
# sub-leaf i, and compares the area size those add up to with 0xD.0 EBX (standard format) or
# 0xD.1 EBX (compacted, with XSAVEC/XSAVES): "XSAVE consistency problem: size X != kernel_size
# Y" when they differ.  KVM keeps 0xD.0/0xD.1 EBX current for the vCPU's XCR0/XSS at run time,
# from the entries it finds by their significant index.

XSAVES_ALL = 0xF            # 0xD.1 EAX: xsaveopt, xsavec, xgetbv1, xsaves


def icelake_supported(arch_lbr: bool = False) -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID of an Ice Lake-SP host (AVX-512 and PKRU, no MPX), the leaves
    that matter here.  ``arch_lbr``: a Sapphire Rapids-like host whose KVM also offers the
    supervisor (IA32_XSS) LBR state, component 15."""
    xss = 1 << 15 if arch_lbr else 0
    table = [
        CpuidEntry(0x0, 0, 0, eax=0x1B, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        CpuidEntry(0x1, 0, 0, eax=0x000606A6, ebx=0x0040_0800, ecx=0xF7FA3203, edx=0x0F8BFBFF),
        CpuidEntry(0x7, 0, SIG, eax=0x1, ebx=0xF1BF07AB, ecx=0x00415F4E,
                   edx=0x410 | (0x80000 if arch_lbr else 0)),
        CpuidEntry(0x7, 1, SIG, eax=0x0),
        # XCR0 = x87 | SSE | YMM | opmask | ZMM_Hi256 | Hi16_ZMM | PKRU; EBX = ECX = its size.
        CpuidEntry(0xD, 0, SIG, eax=0x2E7, ebx=0xA88, ecx=0xA88, edx=0),
        CpuidEntry(0xD, 1, SIG, eax=XSAVES_ALL, ebx=0xCB0 if arch_lbr else 0x988, ecx=xss, edx=0),
        CpuidEntry(0xD, 2, SIG, eax=0x100, ebx=0x240),
        CpuidEntry(0xD, 5, SIG, eax=0x40, ebx=0x440),
        CpuidEntry(0xD, 6, SIG, eax=0x200, ebx=0x480),
        CpuidEntry(0xD, 7, SIG, eax=0x400, ebx=0x680),
        CpuidEntry(0xD, 9, SIG, eax=0x8, ebx=0xA80),
    ]
    if arch_lbr:
        table.append(CpuidEntry(0xD, 15, SIG, eax=0x328, ebx=0, ecx=1))
    table += [
        CpuidEntry(0xB, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=0x2A),
        CpuidEntry(0xB, 1, SIG, eax=7, ebx=64, ecx=0x201, edx=0x2A),
        CpuidEntry(0x4000_0000, 0, 0, eax=0x4000_0001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        CpuidEntry(0x4000_0001, 0, 0, eax=0x0100_7AFB),
        CpuidEntry(0x8000_0000, 0, 0, eax=0x8000_0008),
        CpuidEntry(0x8000_0001, 0, 0, ecx=0x121, edx=0x2C10_0800),
    ]
    return table


def xsave_leaf(entries: list[CpuidEntry]) -> list[CpuidEntry]:
    return [e for e in entries if e.function == 0xD]


def masks(entries: list[CpuidEntry]) -> tuple[int, int]:
    d0, d1 = leaf(entries, 0xD, 0), leaf(entries, 0xD, 1)
    return d0.eax | d0.edx << 32, d1.ecx | d1.edx << 32


def linux_sizes(entries: list[CpuidEntry], xcr0: int, xss: int) -> tuple[int, int]:
    """(standard, compacted) XSAVE sizes as Linux adds them up from sub-leaves 2..63."""
    standard = compacted = 576
    for i in range(2, 64):
        if not (xcr0 | xss) >> i & 1:
            continue
        sub = find(entries, 0xD, i)
        assert sub is not None and sub.flags & SIG and sub.index == i, f"no sub-leaf 0xD.{i}"
        assert sub.eax, f"0xD.{i} has size 0"
        assert bool(sub.ecx & 1) == bool(xss >> i & 1), f"0xD.{i} user/supervisor flag wrong"
        if xcr0 >> i & 1:
            standard = max(standard, sub.ebx + sub.eax)
        if sub.ecx & 2:
            compacted = (compacted + 63) & ~63
        compacted += sub.eax
    return standard, compacted


def guest_xcr0_values(supported_xcr0: int) -> list[int]:
    """Every XCR0 a guest may write with XSETBV (x87 set, YMM needs SSE, AVX-512 state as one
    group on top of YMM) within the supported mask."""
    optional = [b for b in range(1, 64) if supported_xcr0 >> b & 1]
    values = []
    for n in range(1 << len(optional)):
        x = 1 | sum(1 << b for k, b in enumerate(optional) if n >> k & 1)
        avx512 = x >> 5 & 7
        if x >> 2 & 1 and not x >> 1 & 1:
            continue
        if avx512 not in (0, 7) or (avx512 and not x >> 2 & 1):
            continue
        values.append(x)
    return values


def assert_xsave_consistent(out: list[CpuidEntry]) -> None:
    xcr0, xss = masks(out)
    d0, d1 = leaf(out, 0xD, 0), leaf(out, 0xD, 1)
    subs = xsave_leaf(out)
    assert all(e.flags & SIG for e in subs), "leaf 0xD entry without the significant-index flag"
    indices = [e.index for e in subs]
    assert len(indices) == len(set(indices)), f"duplicate 0xD sub-leaves {indices}"
    assert set(indices) == {0, 1} | {i for i in range(2, 64) if (xcr0 | xss) >> i & 1}
    assert not xcr0 & xss
    # Sizes for everything the guest can enable, which is what a guest enabling all gets.
    standard, compacted = linux_sizes(out, xcr0, xss)
    assert d0.ebx == d0.ecx == standard
    assert d1.ebx == (compacted if d1.eax & 0xA else 0)
    # Every XCR0 the guest may set adds up from present, non-overlapping sub-leaves.
    user = sorted((find(out, 0xD, i).ebx, find(out, 0xD, i).eax)
                  for i in range(2, 64) if xcr0 >> i & 1)
    for (off, size), (next_off, _) in zip(user, user[1:]):
        assert off + size <= next_off
    assert all(off >= 576 for off, _ in user)
    for x in guest_xcr0_values(xcr0):
        assert linux_sizes(out, x, 0)[0] <= d0.ecx


@pytest.mark.parametrize("arch_lbr", [False, True])
@pytest.mark.parametrize("nr", [1, 2])
def test_xsave_leaf_self_consistent_and_same_on_every_vcpu(nr: int, arch_lbr: bool) -> None:
    supported = icelake_supported(arch_lbr)
    tables = [apply_policy(supported, vcpu, nr) for vcpu in range(nr)]
    for out in tables:
        assert_xsave_consistent(out)
        assert masks(out) == (0x2E7, 1 << 15 if arch_lbr else 0)
        assert leaf(out, 0xD, 0).ebx == 2696              # PKRU at 0xA80 + 8 is topmost
        assert leaf(out, 0xD, 1).ebx == (3248 if arch_lbr else 2440)
        assert leaf(out, 0xD, 1).eax == XSAVES_ALL
        assert [e.index for e in xsave_leaf(out)] == [0, 1, 2, 5, 6, 7, 9] + [15] * arch_lbr
    assert all(xsave_leaf(t) == xsave_leaf(tables[0]) for t in tables)


def without_apic_ids(entries: list[CpuidEntry]) -> list[CpuidEntry]:
    """The table with the per-vCPU fields (APIC IDs in leaf 1 EBX[31:24], 0xB/0x1F EDX) zeroed."""
    out = []
    for e in entries:
        if e.function == 1:
            e = replace(e, ebx=e.ebx & 0x00FF_FFFF)
        elif e.function in (0xB, 0x1F):
            e = replace(e, edx=0)
        out.append(e)
    return out


@pytest.mark.parametrize("nr", [2, 3])
def test_tables_differ_only_in_apic_ids(nr: int) -> None:
    tables = [apply_policy(icelake_supported(True), v, nr, ("avx512f",)) for v in range(nr)]
    assert len({len(t) for t in tables}) == 1
    assert all(without_apic_ids(t) == without_apic_ids(tables[0]) for t in tables)
    assert [leaf(t, 1).ebx >> 24 for t in tables] == list(range(nr))


@pytest.mark.parametrize("hidden, xcr0, gone, standard, compacted", [
    # Hiding AVX takes YMM and with it the AVX-512 state (XSETBV wants YMM under it).
    (("avx", "avx2", "fma", "f16c", *cpuid._AVX512), 0x203, [2, 5, 6, 7], 2696, 584),
    (("avx512f",), 0x207, [5, 6, 7], 2696, 840),
    (("pku",), 0xE7, [9], 2688, 2432),
    (("avx512f", "pku"), 0x7, [5, 6, 7, 9], 832, 832),
])
def test_hidden_feature_takes_its_xsave_state(hidden, xcr0, gone, standard, compacted) -> None:
    for vcpu in (0, 1):
        out = apply_policy(icelake_supported(), vcpu, 2, hidden)
        assert_xsave_consistent(out)
        assert masks(out) == (xcr0, 0)
        for i in gone:
            assert find(out, 0xD, i) is None
        assert (leaf(out, 0xD, 0).ebx, leaf(out, 0xD, 0).ecx) == (standard, standard)
        assert leaf(out, 0xD, 1).ebx == compacted


def test_hidden_xsave_empties_leaf_0xd() -> None:
    out = apply_policy(icelake_supported(True), 0, 2, ("xsave", "avx"))
    assert not leaf(out, 1).ecx & (1 << 26)
    assert [(e.index, e.eax, e.ebx, e.ecx, e.edx) for e in xsave_leaf(out)] == \
        [(0, 0, 0, 0, 0), (1, 0, 0, 0, 0)]
    assert all(e.flags & SIG for e in xsave_leaf(out))


@pytest.mark.parametrize("hidden, d1_eax, d1_ebx", [
    (("xsaves",), 0x7, 2440),           # supervisor state needs XSAVES; XSAVEC stays compacted
    (("arch_lbr",), 0xF, 2440),
    (("xsavec", "xsaves"), 0x5, 0),     # no compacted format left: 0xD.1 EBX is 0
])
def test_supervisor_state_follows_xsaves(hidden, d1_eax, d1_ebx) -> None:
    out = apply_policy(icelake_supported(arch_lbr=True), 0, 1, hidden)
    assert_xsave_consistent(out)
    assert masks(out) == (0x2E7, 0)
    assert find(out, 0xD, 15) is None
    assert (leaf(out, 0xD, 1).eax, leaf(out, 0xD, 1).ebx) == (d1_eax, d1_ebx)


def test_xcr0_bits_without_a_valid_subleaf_are_dropped() -> None:
    """A host table whose masks name components it has no (or a wrong) sub-leaf for: the guest
    must not be told it may enable them."""
    supported = [e for e in icelake_supported() if (e.function, e.index) != (0xD, 9)]
    supported = [replace(e, eax=0) if (e.function, e.index) == (0xD, 6) else e
                 for e in supported]
    out = apply_policy(supported, 0, 1)
    assert_xsave_consistent(out)
    # 9 has no sub-leaf; 6 has size 0, which takes the whole AVX-512 group (5, 6, 7).
    assert masks(out) == (0x7, 0)
    assert leaf(out, 0xD, 0).ebx == 832


def test_xsave_subleaves_get_the_significant_index_flag() -> None:
    """KVM finds 0xD.0/0xD.1 by index to keep EBX current; an entry without the flag would
    answer every sub-leaf."""
    supported = [replace(e, flags=0) if e.function == 0xD and e.index < 2 else e
                 for e in icelake_supported()]
    out = apply_policy(supported, 0, 1)
    assert_xsave_consistent(out)
    assert masks(out) == (0x2E7, 0)


def test_kvm_holds_the_xsave_leaf_as_set(kvm) -> None:
    """On this host's KVM: every vCPU gets the same leaf 0xD, every sub-leaf survives
    KVM_SET_CPUID2 with its index flag, and KVM took over 0xD.0 EBX (the size for the reset
    XCR0, x87 only), i.e. it found the entry it maintains at run time."""
    from hyperpy._fast.kvm import Kvm

    k = Kvm()
    supported = [CpuidEntry(*e) for e in k.supported_cpuid()]
    vm = k.create_vm()
    vm.create_irqchip()
    got = []
    for i in range(2):
        vcpu = vm.create_vcpu(i)
        policy = apply_policy(supported, i, 2)
        vcpu.set_cpuid([(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                        for e in policy])
        held = [CpuidEntry(*e) for e in vcpu.get_cpuid()]
        assert [(e.function, e.index, e.flags) for e in held] == \
            [(e.function, e.index, e.flags) for e in policy]
        got.append(held)
    if find(got[0], 0xD, 0) is None:
        pytest.skip("this host's KVM offers no leaf 0xD")
    assert xsave_leaf(got[0]) == xsave_leaf(got[1])
    want = xsave_leaf(apply_policy(supported, 0, 2))
    assert [e for e in xsave_leaf(got[0]) if e.index >= 2] == [e for e in want if e.index >= 2]
    assert leaf(got[0], 0xD, 0).eax == leaf(want, 0xD, 0).eax
    assert leaf(got[0], 0xD, 0).ebx == 576
