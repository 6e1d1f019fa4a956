"""Processing: installed models as a list (plus a path that wins), the dialog's defaults, integers
shown as integers (issue 16, item 6)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from qgis import processing
from qgis.core import QgsApplication, QgsProcessingContext, QgsProcessingException, QgsSettings

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
    seg = "tiny-segment (segment) [segment.pkg]"
    assert choice.options() == [NO_INSTALLED, seg]  # only the models of this task
    assert choice.defaultValue() == seg and alg.parameterDefinition("MODEL").flags() & 8  # the path is optional
    # a saved choice names its package, not a position: installing another one that sorts first changes nothing
    shutil.copytree(assets / "segment.pkg", installed / "aaa_other.pkg")
    again = QgsApplication.processingRegistry().createAlgorithmById("sarmae:segment")
    assert again.parameterDefinition("MODEL_INSTALLED").options()[1] == "tiny-segment (segment) [aaa_other.pkg]"
    chosen = again.package_path({"MODEL_INSTALLED": seg}, QgsProcessingContext(), "MODEL")
    assert Path(chosen).name == "segment.pkg"
    out = processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL_INSTALLED": seg,
                                            "OUTPUT": str(tmp_path / "seg.tif"), "BATCH_SIZE": 8,
                                            "CONFIDENCE": str(tmp_path / "conf.tif")})
    assert (tmp_path / "seg.tif").is_file() and out["OUTPUT"]
    with pytest.raises(QgsProcessingException, match="choose a model"):
        processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL_INSTALLED": NO_INSTALLED,
                                          "OUTPUT": str(tmp_path / "none.tif"),
                                          "CONFIDENCE": str(tmp_path / "c2.tif")})


def test_finetune_defaults_match_the_dialog(installed):
    alg = QgsApplication.processingRegistry().createAlgorithmById("sarmae:finetune")
    minutes = alg.parameterDefinition("MAX_MINUTES")
    assert minutes.defaultValue() == 5.0 and minutes.metadata()["widget_wrapper"]["decimals"] == 1
    assert alg.parameterDefinition("BATCH_SIZE").defaultValue() == 16
    assert alg.parameterDefinition("MODE").options()[1] == "Quick (frozen encoder)"
    encoders = alg.parameterDefinition("ENCODER_INSTALLED")
    assert encoders.options() == [NO_INSTALLED, "tiny-encoder (embed) [encoder.pkg]"]
    assert encoders.defaultValue() == "tiny-encoder (embed) [encoder.pkg]"
