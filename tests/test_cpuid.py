"""CPUID policy: feature bit numbers, topology leaves, hypervisor leaves, masking."""

from __future__ import annotations

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
