#!/usr/bin/env bash
# Builds the Linux guest kit the Linux-driver tests boot under QEMU, from Debian's packages:
#
#   DIR/vmlinuz          Debian's 6.12 cloud kernel (bzImage) as shipped
#   DIR/vmlinux          the ELF vmlinux unpacked from it
#   DIR/config           the kernel's .config (tests read it: is ext4 built in?)
#   DIR/lib/modules/VERSION/  the kernel's whole module tree (*.ko.xz, modules.builtin, and the
#                        modules.dep that depmod writes: the .deb does not ship one)
#   DIR/busybox          busybox-static (the initramfs's only program)
#   DIR/kit.txt          the package versions, "ext4=builtin|module|absent", and a ready marker
#
# tests/linuxkit.py turns the kit into an initramfs (only the modules a test asks for, with their
# dependencies from modules.dep, decompressed). The kit is cached: a complete DIR is left alone.
#
# Usage: scripts/build-guest-kit.sh [DIR]
#        DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/hyperpy/guest-kit
set -euo pipefail
DIR=${1:-${HYPERPY_GUEST_KIT:-${XDG_CACHE_HOME:-$HOME/.cache}/hyperpy/guest-kit}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
if [ -s "$DIR/kit.txt" ] && grep -q '^ready$' "$DIR/kit.txt"; then
    echo "guest kit ready in $DIR"
    exit 0
fi

need=()
command -v zstd >/dev/null || need+=(zstd)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v depmod >/dev/null || [ -x /sbin/depmod ] || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -n "$(ls /var/lib/apt/lists/*Packages* 2>/dev/null)" ] || apt-get update -qq

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
chmod 777 "$tmp"   # apt-get download runs as _apt when it can

pick() {   # newest package whose name matches the regex $1
    apt-cache search --names-only "$1" | awk '{print $1}' | sort -V | tail -1
}
kpkg=$(pick '^linux-image-6\.12\..*-cloud-amd64-unsigned$')
[ -n "$kpkg" ] || kpkg=$(pick '^linux-image-6\.12\..*-cloud-amd64$')
[ -n "$kpkg" ] || { echo "build-guest-kit: no linux-image-6.12.*-cloud-amd64 package in the apt lists (run apt-get update)" >&2; exit 1; }
for p in "$kpkg" busybox-static; do
    apt-get download -q "$p" >/dev/null 2>&1 || apt-get download -q "$p" \
        || { echo "build-guest-kit: apt-get download $p failed" >&2; exit 1; }
done
dpkg-deb -x linux-image-*.deb k
dpkg-deb -x busybox-static_*.deb b

ver=$(ls k/lib/modules | head -1)
[ -n "$ver" ] || { echo "build-guest-kit: $kpkg has no /lib/modules" >&2; exit 1; }
rm -rf "$DIR/modules" "$DIR/lib" "$DIR/vmlinux" "$DIR/kit.txt"
mkdir -p "$DIR/lib/modules"
cp k/boot/vmlinuz-* "$DIR/vmlinuz"
cp k/boot/config-* "$DIR/config"
cp -a "k/lib/modules/$ver" "$DIR/lib/modules/$ver"
PATH=$PATH:/sbin:/usr/sbin depmod -b "$DIR" "$ver"
cp b/bin/busybox "$DIR/busybox"
chmod 755 "$DIR/busybox"

python3 "$SCRIPTS/extract-vmlinux.py" "$DIR/vmlinuz" "$DIR/vmlinux"

ext4=absent
grep -q '^CONFIG_EXT4_FS=y' "$DIR/config" && ext4=builtin
grep -q '^CONFIG_EXT4_FS=m' "$DIR/config" && ext4=module
# The modules the Linux-driver tests (and the VFIO test) load must be there.
# Module file names use '-' or '_' interchangeably (virtio-iommu.ko is module virtio_iommu).
for m in virtio_blk virtio_net virtio_iommu vfio vfio_iommu_type1 vfio_pci; do
    re="/${m//_/[-_]}\.ko"
    grep -q "$re" "$DIR/lib/modules/$ver/modules.dep" \
        || grep -q "$re" "$DIR/lib/modules/$ver/modules.builtin" \
        || { echo "build-guest-kit: module $m is missing from $kpkg" >&2; exit 1; }
done
{
    echo "kernel=$kpkg"
    echo "version=$ver"
    echo "busybox=$(ls busybox-static_*.deb)"
    echo "ext4=$ext4"
    echo "ready"
} > "$DIR/kit.txt"
echo "guest kit ready in $DIR ($kpkg, ext4 $ext4)"
