#!/usr/bin/env bash
# Installs hyperpy (and what building it needs) and boots a VM with the built-in default guest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HYPERPY_VENV:-$PWD/.venv}
if ! command -v gcc >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc python3-venv python3-dev >/dev/null
fi
[ -x "$VENV/bin/hyperpy" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --upgrade pip; }
"$VENV/bin/pip" install -q .
exec "$VENV/bin/hyperpy" run --kernel builtin:hello --cpus boot=1 --memory size=256M \
    --cmdline "console=ttyS0 hello from the README" -v "$@"
