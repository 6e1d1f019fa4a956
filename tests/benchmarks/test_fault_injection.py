"""benchmarks/fault_injection.py with a few trials (one of each fault: ENOSPC, SIGKILL, SIGTERM, a
second writer): no corrupt output published, the earlier output intact, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_fault_injection_small(tmp_path):
    out = tmp_path / "faults.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_injection.py"), "-n", "4", "--seed", "3",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())["summary"]
    assert s["trials"] == 4 and s["failed"] == 0 and s["corrupt_published"] == 0
    assert s["earlier_intact"] == 4
    assert all(k["trials"] == 1 for k in s["per_kind"].values())
