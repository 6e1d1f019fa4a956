"""scripts/demo.py takes its settings (CFAR, scene sizes, budgets) from resources/demo/settings.json,
the file the plugin zip carries beside the other non-code assets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_reads_its_settings_from_resources() -> None:
    settings = json.loads((REPO_ROOT / "resources" / "demo" / "settings.json").read_text(encoding="utf-8"))
    spec = importlib.util.spec_from_file_location("demo_script", REPO_ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # module level: paths and settings only (no torch, no QGIS)
    assert demo.CFAR == settings["cfar"] and demo.SCALES == settings["scales"]
    assert set(demo.CFAR) == {"pfa", "guard", "background"} and demo.CFAR["guard"] < demo.CFAR["background"]
    for scale in ("full", "quick"):
        assert {"size", "ships", "pretrain_min", "seg_min", "det_min", "epochs"} <= set(demo.SCALES[scale])
    assert demo.SCALES["quick"]["size"] < demo.SCALES["full"]["size"]
