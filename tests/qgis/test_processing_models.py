"""Processing: installed models as a list (plus a path that wins), the dialog's defaults, integers
shown as integers (issue 16, item 6)."""

from __future__ import annotations

import shutil

import pytest
from qgis import processing
from qgis.core import QgsApplication, QgsProcessingException, QgsSettings

from sarmae_qgis.processing.base import NO_INSTALLED
from sarmae_qgis.toolbelt import settings

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("provider")]


@pytest.fixture
def installed(assets, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("segment.pkg", "detect.pkg", "encoder.pkg"):
        shutil.copytree(assets / name, folder / name)
    settings.set_value("models_folder", str(folder))
    yield folder
    QgsSettings().remove("sarmae/models_folder")


def test_installed_models_are_listed_and_used(installed, assets, tmp_path):
    alg = QgsApplication.processingRegistry().createAlgorithmById("sarmae:segment")
    choice = alg.parameterDefinition("MODEL_INSTALLED")
    assert choice.options() == [NO_INSTALLED, "tiny-segment (segment)"]  # only the models of this task
    assert choice.defaultValue() == 1 and alg.parameterDefinition("MODEL").flags() & 8  # the path is optional
    out = processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL_INSTALLED": 1,
                                            "OUTPUT": str(tmp_path / "seg.tif"), "BATCH_SIZE": 8,
                                            "CONFIDENCE": str(tmp_path / "conf.tif")})
    assert (tmp_path / "seg.tif").is_file() and out["OUTPUT"]
    with pytest.raises(QgsProcessingException, match="choose a model"):
        processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL_INSTALLED": 0,
                                          "OUTPUT": str(tmp_path / "none.tif"),
                                          "CONFIDENCE": str(tmp_path / "c2.tif")})


def test_finetune_defaults_match_the_dialog(installed):
    alg = QgsApplication.processingRegistry().createAlgorithmById("sarmae:finetune")
    minutes = alg.parameterDefinition("MAX_MINUTES")
    assert minutes.defaultValue() == 5.0 and minutes.metadata()["widget_wrapper"]["decimals"] == 1
    assert alg.parameterDefinition("BATCH_SIZE").defaultValue() == 16
    assert alg.parameterDefinition("MODE").options()[1] == "Quick (frozen encoder)"
    encoders = alg.parameterDefinition("ENCODER_INSTALLED")
    assert encoders.options() == [NO_INSTALLED, "tiny-encoder (embed)"] and encoders.defaultValue() == 1
