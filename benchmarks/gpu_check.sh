#!/usr/bin/env bash
# The GPU check, one prepared command (DESIGN.md; benchmarks/gpu_check.py says what it measures).
#
#   benchmarks/gpu_check.sh [--dry-run] [--output gpu_check.json] [--work DIR]
#
# For a machine with an NVIDIA GPU and no network: Python 3.12 with torch preinstalled; every other
# dependency that is not importable is installed from wheels in $SARMAE_WHEELS (default: ./wheels,
# made beforehand with `pip download -d wheels numpy rasterio ...` on a machine with network).
# Everything runs under one time limit ($SARMAE_CHECK_TIMEOUT_S, default 480 s = 8 minutes) and
# writes one JSON summary. --dry-run: the same code at a tiny scale, on a CPU too, in under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${SARMAE_WHEELS:-wheels}"
LIMIT="${SARMAE_CHECK_TIMEOUT_S:-480}"

"$PY" -c "import torch" 2>/dev/null || { echo "gpu_check: torch is not importable by $PY; set PYTHON" >&2; exit 2; }
# module -> distribution (the engine's run-time needs, without torch)
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"numpy": "numpy<2", "rasterio": "rasterio", "affine": "affine", "safetensors": "safetensors",
        "onnxruntime": "onnxruntime", "onnx": "onnx", "tqdm": "tqdm", "yaml": "pyyaml", "fiona": "fiona",
        "shapely": "shapely", "scipy": "scipy", "torchvision": "torchvision"}
print(" ".join(d for m, d in need.items() if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_check: missing $missing and no wheel folder '$WHEELS' (set SARMAE_WHEELS)" >&2
        exit 2
    fi
    echo "gpu_check: installing $missing from $WHEELS (no network)" >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" $missing
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 "$LIMIT" "$PY" benchmarks/gpu_check.py "$@"
