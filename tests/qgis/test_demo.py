"""`make demo` end to end at smoke scale (``scripts/demo.py --quick``): scene, pretraining, two
fine-tunings, segmentation and detection through ``qgis_process``, then the .qgz opened here in
QGIS with every layer valid and styled, and the QGIS-rendered preview PNG. Then ``--input`` on the
demo's own scene (no labels): embed, reconstruct and the installed models, through qgis_process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsSingleBandGrayRenderer,
)
from qgis.PyQt.QtGui import QImage

pytestmark = pytest.mark.qgis
REPO = Path(__file__).resolve().parents[2]


def run_demo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = run_demo("--output", str(out), "--models-folder", str(out / "plugin_models"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"QGIS project: {out / 'sarmae_demo.qgz'}" in proc.stdout
    # the demo installs its models where the plugin looks, and says so (issue 16, item 6)
    assert f"into {out / 'plugin_models'}, the SARMAE plugin's models folder" in proc.stdout
    assert (out / "plugin_models" / "demo_water_segmenter" / "model.json").is_file()
    return out


def test_demo_project_opens_with_styled_layers(demo):
    project = QgsProject.instance()
    try:
        assert project.read(str(demo / "sarmae_demo.qgz"))
        layers = {layer.name(): layer for layer in project.mapLayers().values()}
        assert set(layers) == {"ships (detected)", "ships (CFAR, no training)", "water polygons", "water / land",
                               "confidence", "ground truth", "synthetic S1 (VV, dB)"}
        assert layers["ships (CFAR, no training)"].featureCount() > 0  # CFAR finds ships with no training
        assert all(layer.isValid() for layer in layers.values())
        classes = layers["water / land"]
        assert isinstance(classes.renderer(), QgsPalettedRasterRenderer)
        assert [c.label for c in classes.renderer().classes()] == ["water", "land"]
        assert isinstance(layers["ships (detected)"].renderer(), QgsCategorizedSymbolRenderer)
        assert isinstance(layers["synthetic S1 (VV, dB)"].renderer(), QgsSingleBandGrayRenderer)
        scene = layers["synthetic S1 (VV, dB)"]
        assert classes.extent() == scene.extent() and classes.crs() == scene.crs()
        assert project.crs().authid() == "EPSG:32631"
        assert [g.name() for g in project.layerTreeRoot().children()] == ["SARMAE results", "sample scene"]
    finally:
        project.clear()
    image = QImage(str(demo / "preview.png"))
    assert image.width() == 1000 and image.height() == 1000
    assert len({image.pixel(x, y) for x in range(0, 1000, 50) for y in range(0, 1000, 50)}) > 20  # not blank


def test_demo_models_are_packages_with_the_label_classes(demo):
    seg = json.loads((demo / "models" / "demo_water_segmenter" / "model.json").read_text())
    det = json.loads((demo / "models" / "demo_ship_detector" / "model.json").read_text())
    assert seg["task"] == "segment" and [c["name"] for c in seg["classes"]] == ["water", "land"]
    assert det["task"] == "detect" and [c["name"] for c in det["classes"]] == ["ship"]
    cfar = json.loads((demo / "models" / "demo_ship_cfar" / "model.json").read_text())
    assert cfar["task"] == "detect" and cfar["architecture"]["name"] == "cfar" and cfar["weights"] == {}
    assert (demo / "models" / "demo_water_segmenter" / "training_curves.png").is_file()


def test_demo_on_a_user_raster_reuses_the_encoder(demo, tmp_path):
    """`make demo INPUT=...`: no labels; embed + reconstruct + the installed models."""
    scene = demo / "scene" / "synthetic_s1.tif"
    out = tmp_path / "mine"
    # the demo's models folder is where installed models are looked for: share the first run's
    (out / "models").mkdir(parents=True)
    for name in ("demo_encoder", "demo_mae", "demo_water_segmenter", "demo_ship_detector", "demo_ship_cfar"):
        os.symlink(demo / "models" / name, out / "models" / name)
    # and never the user's own plugin folder: an empty one stands in for it
    proc = run_demo("--output", str(out), "--input", str(scene), "--no-install",
                    "--models-folder", str(tmp_path / "empty_plugin_models"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "randomly initialised" not in proc.stdout  # the pretrained demo encoder was used
    spec = json.loads((out / "project_spec.json").read_text())
    roles = sorted(item["role"] for item in spec["layers"])
    assert roles == ["class", "detections", "detections", "input", "pca", "reconstruction"]  # CFAR runs too
    assert (out / "sarmae_demo.qgz").is_file() and (out / "preview.png").is_file()


def test_demo_refuses_a_missing_input(tmp_path):
    proc = run_demo("--output", str(tmp_path), "--input", str(tmp_path / "nope.tif"))
    assert proc.returncode != 0 and "nope.tif: no such file" in proc.stderr
