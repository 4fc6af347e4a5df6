#!/usr/bin/env bash
# Fetches Debian's 6.12 cloud kernel (a kernel nobody in this repository wrote) for the tests
# that boot it: the bzImage as shipped, and the ELF vmlinux (PVH note included) unpacked from it.
# Usage: scripts/fetch-debian-kernel.sh DIR   -> DIR/vmlinuz, DIR/vmlinux
set -euo pipefail
DIR=${1:?usage: $0 DIR}
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
# The bzImage payload is a zstd stream holding the ELF vmlinux; find the frame that decodes to ELF.
python3 - "$DIR/vmlinuz" "$DIR/vmlinux" <<'PY'
import subprocess, sys
data = open(sys.argv[1], "rb").read()
at = 0
while (at := data.find(b"\x28\xb5\x2f\xfd", at)) >= 0:
    out = subprocess.run(["zstd", "-d", "-q", "-c"], input=data[at:], capture_output=True).stdout
    if out[:4] == b"\x7fELF":
        open(sys.argv[2] + ".tmp", "wb").write(out)
        break
    at += 1
else:
    sys.exit("no zstd-compressed ELF found in the bzImage")
PY
mv "$DIR/vmlinux.tmp" "$DIR/vmlinux"
echo "$pkg" > "$DIR/package"
