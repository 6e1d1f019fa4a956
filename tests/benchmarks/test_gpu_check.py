"""benchmarks/gpu_check.sh --dry-run: the prepared GPU check runs end to end (tiny scale, any device)
and writes its JSON summary with every part's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_summary(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "SARMAE_CHECK_TIMEOUT_S": "300"}
    proc = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--output", str(out),
                           "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["dry_run"] is True
    inf = s["inference"]
    assert inf["windows"] == 25 and inf["windows_per_s"] > 0 and 0 < inf["efficiency"] <= 1.0
    assert inf["model_windows_per_s"] >= inf["windows_per_s"]
    pre = s["pretraining"]
    assert pre["masked_0.75"]["images_per_s"] > 0 and pre["all_tokens"]["images_per_s"] > 0
    assert s["torchrun"]["returncode"] == 0 and s["torchrun"]["outputs"] == ["class", "confidence"]
