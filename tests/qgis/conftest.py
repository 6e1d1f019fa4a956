"""Shared fixtures of the QGIS tests: tiny assets from the engine's Python, the ``sarmae``
Processing provider, isolated SARMAE settings, and one engine worker for the whole session.

Assets are written by ``make_assets.py`` in a subprocess of the engine's interpreter: this test
process (like QGIS) never imports torch, rasterio or the engine.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from qgis.core import QgsApplication, QgsProject, QgsSettings

from sarmae_qgis.toolbelt import engine as engine_toolbelt
from sarmae_qgis.toolbelt import settings as plugin_settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENGINE_PYTHON = sys.executable  # the project's venv: torch + the engine beside QGIS's bindings


def engine_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Model packages, rasters, labels and chips (see make_assets.py)."""
    out = tmp_path_factory.mktemp("sarmae_assets")
    subprocess.run([ENGINE_PYTHON, str(HERE / "make_assets.py"), str(out)], check=True, cwd=REPO, env=engine_env(),
                   timeout=300, capture_output=True)
    return out


def release_layers() -> None:
    """Free layers (and processing contexts holding layers) before QGIS exits.

    An exception raised in a Python ``processAlgorithm`` stays referenced inside QGIS's bindings
    until the next one; its traceback keeps its frames and, through ``f_back``, the finished
    frames of the caller (the test) alive with their locals: layers, contexts. Left for
    interpreter exit, their destructors run after exitQgis and crash in GDALClose. Clearing those
    frames lets them go now, while GDAL is still there.
    """
    for obj in gc.get_objects():
        if not isinstance(obj, types.TracebackType):
            continue
        tb = obj
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None:
                try:
                    frame.clear()
                except RuntimeError:  # a frame still executing (this one's callers)
                    pass
                frame = frame.f_back
            tb = tb.tb_next
    gc.collect()


@pytest.fixture(scope="session", autouse=True)
def sarmae_settings_isolated(qgis_app) -> Iterator[None]:
    """Every SARMAE setting starts at its default (engine: this venv) and is restored afterwards."""
    s = QgsSettings()
    saved = {k: s.value(k) for k in s.allKeys() if k.startswith(plugin_settings.PREFIX + "/")}
    s.remove(plugin_settings.PREFIX)
    plugin_settings.set_value("engine_python", ENGINE_PYTHON)
    yield
    engine_toolbelt.shutdown_client()
    release_layers()
    s.remove(plugin_settings.PREFIX)
    for k, v in saved.items():
        s.setValue(k, v)


@pytest.fixture(scope="session")
def provider(qgis_app, qgis_processing) -> Iterator:
    """The ``sarmae`` provider registered the way the plugin does it (initProcessing)."""
    import sarmae_qgis

    plugin = sarmae_qgis.classFactory(None)
    plugin.initProcessing()
    yield plugin.provider
    QgsApplication.processingRegistry().removeProvider(plugin.provider)
    plugin.provider = None


@pytest.fixture
def project() -> Iterator[QgsProject]:
    """The project, emptied after the test."""
    p = QgsProject.instance()
    yield p
    p.removeAllMapLayers()
    p.layerTreeRoot().removeAllChildren()



@pytest.fixture
def fresh_panel_state() -> Iterator[None]:
    """The dock panel's and the Fine-tune tab's remembered choices cleared before and after a test."""
    from qgis.core import QgsSettings

    for key in ("sarmae/panel", "sarmae/finetune"):
        QgsSettings().remove(key)
    yield
    for key in ("sarmae/panel", "sarmae/finetune"):
        QgsSettings().remove(key)


@pytest.fixture
def open_panel(qgis_iface, project, fresh_panel_state):
    """``open_panel(models_folder, **kwargs)``: a SARMAE dock panel on the test's project, released and
    deleted after the test (however it ends)."""
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    from sarmae_qgis.gui.dock_panel import SarmaePanel

    made = []

    def make(models_folder, **kwargs):
        made.append(SarmaePanel(qgis_iface.mainWindow(), canvas=qgis_iface.mapCanvas(), models_folder=models_folder,
                                project=project, **kwargs))
        return made[-1]

    yield make
    for panel in made:
        panel.release()
        panel.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
