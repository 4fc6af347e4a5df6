#!/usr/bin/env python3
"""Unpack the ELF vmlinux from a bzImage whose payload is zstd-compressed (Debian's 6.12 kernels).

Usage: scripts/extract-vmlinux.py BZIMAGE OUT   (OUT is written atomically; exit 1 if none found)
"""
import os
import subprocess
import sys

bzimage, out = sys.argv[1], sys.argv[2]
data = open(bzimage, "rb").read()
at = 0
# Try every zstd frame magic until one decodes to an ELF image.
while (at := data.find(b"\x28\xb5\x2f\xfd", at)) >= 0:
    elf = subprocess.run(["zstd", "-d", "-q", "-c"], input=data[at:], capture_output=True).stdout
    if elf[:4] == b"\x7fELF":
        with open(out + ".tmp", "wb") as f:
            f.write(elf)
        os.replace(out + ".tmp", out)
        break
    at += 1
else:
    sys.exit(f"extract-vmlinux: no zstd-compressed ELF found in {bzimage}")
