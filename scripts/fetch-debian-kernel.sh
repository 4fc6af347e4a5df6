#!/usr/bin/env bash
# Fetches Debian's 6.12 cloud kernel (a kernel nobody in this repository wrote) for the tests
# that boot it: the bzImage as shipped, and the ELF vmlinux (PVH note included) unpacked from it.
# Usage: scripts/fetch-debian-kernel.sh DIR   -> DIR/vmlinuz, DIR/vmlinux
set -euo pipefail
DIR=${1:?usage: $0 DIR}
ROOT_SCRIPTS=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DIR"
[ -s "$DIR/vmlinux" ] && [ -s "$DIR/vmlinuz" ] && exit 0
command -v zstd >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd >/dev/null; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
[ -n "$(ls /var/lib/apt/lists/*Packages* 2>/dev/null)" ] || apt-get update -qq
pkg=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1)
[ -n "$pkg" ] || { echo "no linux-image-6.12.*-cloud-amd64-unsigned package found" >&2; exit 1; }
apt-get download -q "$pkg" >/dev/null 2>&1 || { chmod 777 "$tmp"; apt-get download -q "$pkg"; }
dpkg -x ./*.deb x
cp x/boot/vmlinuz-* "$DIR/vmlinuz.tmp" && mv "$DIR/vmlinuz.tmp" "$DIR/vmlinuz"
python3 "$ROOT_SCRIPTS/extract-vmlinux.py" "$DIR/vmlinuz" "$DIR/vmlinux"
echo "$pkg" > "$DIR/package"
