"""``sarmae:zeroshot`` and ``sarmae:textquery`` end to end with the real engine worker and a tiny random
CLIP package: class names and phrases typed in the algorithm, the package filter (textquery runs
zeroshot packages), the outputs moved to their destinations, and a second phrase on cached embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qgis import processing
from qgis.core import QgsProcessingException, QgsRasterLayer, QgsVectorLayer

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("provider")]

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def clip_pkg(tmp_path_factory) -> Path:
    """``sarmae init --clip custom`` (engine.clip.TINY_CONFIG), written by the engine's Python."""
    out = tmp_path_factory.mktemp("clip") / "tiny_clip.pkg"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # -m from the repository (cwd)
    subprocess.run([sys.executable, "-m", "engine.cli", "init", "--clip", "custom", "--clip-config", json.dumps(TINY),
                    "--name", "tiny-clip", "--output", str(out)], check=True, cwd=REPO, env=env,
                   timeout=300, capture_output=True)
    return out


def test_zeroshot_class_map_with_typed_classes(assets, clip_pkg, tmp_path):
    out = processing.run("sarmae:zeroshot", {
        "INPUT": str(assets / "scene.tif"), "MODEL": str(clip_pkg), "CLASSES": "water, land",
        "TEMPLATES": "a SAR image of {}.; a radar image of {}.", "OUTPUT": str(tmp_path / "classes.tif"),
        "CONFIDENCE": str(tmp_path / "conf.tif"), "GRID": str(tmp_path / "cells.gpkg")})
    classes = QgsRasterLayer(out["OUTPUT"], "c", "gdal")
    assert classes.isValid() and (classes.width(), classes.height()) == (2, 2)  # 64 px in cells of 32 px
    assert QgsRasterLayer(out["CONFIDENCE"], "p", "gdal").isValid()
    cells = QgsVectorLayer(out["GRID"], "g", "ogr")
    assert cells.isValid() and cells.featureCount() == 4 and "p_water" in cells.fields().names()
    stats = json.loads(out["STATISTICS"])
    assert set(stats["per_class"]) == {"water", "land"} and stats["templates"] == ["a SAR image of {}.",
                                                                                   "a radar image of {}."]
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".aux.xml"))
    assert left == ["cells.gpkg", "classes.tif", "conf.tif"]


def test_textquery_phrases_and_a_second_phrase_from_the_cache(assets, clip_pkg, tmp_path):
    params = {"INPUT": str(assets / "scene.tif"), "MODEL": str(clip_pkg), "OVERLAP": 0.5}
    out = processing.run("sarmae:textquery", {**params, "QUERY": "ships at sea; a harbour",
                                              "OUTPUT": str(tmp_path / "sim.tif")})
    sim = QgsRasterLayer(out["OUTPUT"], "s", "gdal")
    assert sim.isValid() and sim.bandCount() == 2 and (sim.width(), sim.height()) == (4, 4)
    again = processing.run("sarmae:textquery", {**params, "QUERY": "flooded fields",
                                                "OUTPUT": str(tmp_path / "sim2.tif")})
    stats = json.loads(again["STATISTICS"])
    assert stats["embeddings"]["cached"] is True and set(stats["per_query"]) == {"flooded fields"}


def test_wrong_package_or_empty_text_is_refused(assets, clip_pkg, tmp_path):
    with pytest.raises(QgsProcessingException, match="segment model, not a zeroshot model"):
        processing.run("sarmae:textquery", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "segment.pkg"),
                                            "QUERY": "ships", "OUTPUT": str(tmp_path / "x.tif")})
    with pytest.raises(QgsProcessingException, match="type a phrase"):
        processing.run("sarmae:textquery", {"INPUT": str(assets / "scene.tif"), "MODEL": str(clip_pkg),
                                            "QUERY": " ; ", "OUTPUT": str(tmp_path / "x.tif")})
    with pytest.raises(QgsProcessingException, match="given more than once: water"):
        processing.run("sarmae:zeroshot", {"INPUT": str(assets / "scene.tif"), "MODEL": str(clip_pkg),
                                           "CLASSES": "water,land,water", "OUTPUT": str(tmp_path / "x.tif"),
                                           "CONFIDENCE": str(tmp_path / "xc.tif")})


def test_run_task_adds_styled_clip_layers(assets, clip_pkg, tmp_path, project):
    """The Run tab's path: a RunRequest with classes, then with phrases, through RunTask."""
    from qgis.core import QgsPalettedRasterRenderer, QgsSingleBandPseudoColorRenderer

    from sarmae_qgis.tasks.run_task import RunRequest, RunTask

    def run(name: str, **kw) -> RunTask:
        task = RunTask(RunRequest(run_name=name, layer_name="scene", raster_path=str(assets / "scene.tif"),
                                  model_path=str(clip_pkg), model_name="tiny-clip", task="zeroshot",
                                  output_dir=str(tmp_path / name), **kw))
        ok = task.run()
        task.finished(ok)
        assert ok, task.error
        return task

    t = run("classes", classes=("water", "land"))
    layers = [node.layer() for node in t.group.findLayers()]
    assert sorted(lyr.name() for lyr in layers) == ["classes", "classes", "confidence"]  # cells, raster, confidence
    assert sum(isinstance(lyr, QgsVectorLayer) for lyr in layers) == 1
    assert any(isinstance(lyr.renderer(), QgsPalettedRasterRenderer) for lyr in layers if isinstance(lyr, QgsRasterLayer))
    assert "water" in t.summary and " s" in t.summary
    q = run("ships", query=("ships at sea",))
    (sim,) = [node.layer() for node in q.group.findLayers()]
    assert isinstance(sim.renderer(), QgsSingleBandPseudoColorRenderer) and sim.renderer().classificationMin() == -1.0
    assert "'ships at sea' best cosine" in q.summary
