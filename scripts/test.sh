#!/usr/bin/env bash
# Installs what the tests need, builds the hyperpy wheel, installs it into a fresh virtual
# environment and runs the test suite against the installed package (not the source tree).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HYPERPY_TEST_VENV:-$ROOT/.venv-test}

need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# QEMU is the differential peer for the test guests (its tests skip without it).
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
# iasl/acpiexec disassemble and interpret the ACPI tables hyperpy generates.
command -v iasl >/dev/null || need_apt+=(acpica-tools)
# The Linux tier (tests/test_vhost_user_linux.py): qemu-storage-daemon is the benchmark's peer
# back-end; e2fsprogs makes and checks the guest's ext4; kmod (depmod) and zstd build the kit.
command -v qemu-storage-daemon >/dev/null || need_apt+=(qemu-system-common)
command -v mkfs.ext4 >/dev/null || [ -x /sbin/mkfs.ext4 ] || need_apt+=(e2fsprogs)
command -v depmod >/dev/null || [ -x /sbin/depmod ] || need_apt+=(kmod)
command -v zstd >/dev/null || need_apt+=(zstd)
# The nested tier (tests/nested/) runs this machine's own tools inside its L1 host: virtiofsd
# (qemu-system-common), curl for the API, ip for taps, python3 for a TCP sink.
[ -x /usr/lib/qemu/virtiofsd ] || command -v virtiofsd >/dev/null || need_apt+=(qemu-system-common)
command -v curl >/dev/null || need_apt+=(curl)
command -v ip >/dev/null || need_apt+=(iproute2)
[ -x /usr/bin/python3 ] || need_apt+=(python3)
# The nested-VFIO helper (tests/linux/vfio_map.c) is linked static against glibc and <linux/vfio.h>.
[ -n "$(ls /usr/lib/*/libc.a 2>/dev/null)" ] && [ -e /usr/include/linux/vfio.h ] || need_apt+=(libc6-dev linux-libc-dev)
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install ${need_apt[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null) \
        || echo "warning: apt-get install ${need_apt[*]} failed; the tests that need them will say so"
fi

echo "== building the wheel"
rm -rf "$VENV" dist
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" wheel -q --no-deps -w dist .
WHEEL=$(ls dist/hyperpy-*.whl)
echo "== installing $WHEEL into $VENV"
"$VENV/bin/pip" install -q "$WHEEL[test]"

cd "$ROOT"
echo "== fetching Debian's cloud kernel (an independent PVH ELF for the boot tests)"
export HYPERPY_DEBIAN_KERNEL_DIR=${HYPERPY_DEBIAN_KERNEL_DIR:-$ROOT/.kernels}
bash scripts/fetch-debian-kernel.sh "$HYPERPY_DEBIAN_KERNEL_DIR" \
    || echo "warning: could not fetch the Debian kernel; tests/test_external_kernel.py will say so"

echo "== building the Linux guest kit (Debian's 6.12 cloud kernel + busybox) for the linux tier"
export HYPERPY_GUEST_KIT=${HYPERPY_GUEST_KIT:-${XDG_CACHE_HOME:-$HOME/.cache}/hyperpy/guest-kit}
bash scripts/build-guest-kit.sh "$HYPERPY_GUEST_KIT" \
    || echo "warning: could not build the guest kit; the linux-tier tests will try again and fail"

echo "== benchmarks (figures only; never gated on a time)"
HYPERPY_BENCH_EXITS=${HYPERPY_BENCH_EXITS:-100000} HYPERPY_BENCH_STARTUP_ROUNDS=${HYPERPY_BENCH_STARTUP_ROUNDS:-3} \
    "$VENV/bin/pytest" -p no:cacheprovider bench -q -s --benchmark-columns=min,median,max

echo "== running the tests against the installed wheel"
set +e
"$VENV/bin/pytest" -p no:cacheprovider tests "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "no tests ran"; exit 1; }
exit $rc
