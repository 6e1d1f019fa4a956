#!/usr/bin/env bash
# Idempotent set-up used by `make test` and `make demo` on a fresh Debian 12 machine:
#  1. QGIS's Python bindings from apt (when `/usr/bin/python3 -c "import qgis"` fails);
#  2. .venv from the system Python with --system-site-packages (so qgis imports beside torch);
#  3. pip install -e .[dev] with pinned versions.
# A stamp file (keyed on pyproject.toml + this script) makes the second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.sarmae-setup-stamp"
key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] && /usr/bin/python3 -c "import qgis.core" 2>/dev/null; then
  exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! /usr/bin/python3 -c "import qgis.core" 2>/dev/null; then
  echo "[setup] installing QGIS and its Python bindings with apt ..."
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends qgis python3-qgis qgis-providers python3-venv >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV (system Python, --system-site-packages) ..."
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi

echo "[setup] installing sarmae and its pinned dependencies into $VENV ..."
"$VENV/bin/python" -m pip install -q --upgrade "pip>=23" 2>/dev/null || true
# (the local wheel indexes print one "is ignored" warning per package: hide that noise only)
"$VENV/bin/python" -m pip install -q -e ".[dev]" 2> >(grep -v "is ignored" >&2)
echo "$key" > "$STAMP"
echo "[setup] done."
