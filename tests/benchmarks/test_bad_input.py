"""Issue 15: the bad-input battery (benchmarks/bad_input.py), its quick subset: every third CLI case,
every worker case and one qgis_process case (when QGIS is installed). Fails on any traceback, any
changed input file, any file left behind by a failed case, a worker ``internal`` error, or a message
without the words that say what was wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_battery_is_all_clean():
    spec = importlib.util.spec_from_file_location("bad_input", REPO / "benchmarks" / "bad_input.py")
    battery = importlib.util.module_from_spec(spec)
    sys.modules["bad_input"] = battery  # its dataclasses look their module up
    spec.loader.exec_module(battery)
    lines: list[str] = []
    rows = battery.run_battery(quick=True, work=battery.WORK.with_name("bad_input_test"), log=lines.append)
    surfaces = {r.case.surface for r in rows}
    assert {"cli", "worker"} <= surfaces and len(rows) >= 30
    bad = [line for line, r in zip(lines, rows) if not r.clean]
    assert not bad, "\n".join(bad)
