"""``qgis_process`` (QGIS's command-line Processing runner) loads the installed plugin's provider
and runs ``sarmae:segment`` end to end.

The plugin is built and installed with scripts/build_plugin.py (the ``make install-plugin`` code)
into a throw-away QGIS profile (QGIS_CUSTOM_CONFIG_PATH), never into the user's own. qgis_process
loads enabled plugins whose metadata.txt says ``hasProcessingProvider=yes`` and calls their
``initProcessing()``; the engine interpreter comes from $SARMAE_PYTHON (this venv).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qgis.core import QgsRasterLayer

pytestmark = pytest.mark.qgis
REPO = Path(__file__).resolve().parents[2]
QGIS_PROCESS = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"


def load_build_plugin():
    spec = importlib.util.spec_from_file_location("build_plugin", REPO / "scripts" / "build_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qgis_process(tmp_path_factory):
    """A function running qgis_process with the plugin installed in a temporary profile."""
    if not Path(QGIS_PROCESS).exists():
        pytest.skip(f"qgis_process not found ({QGIS_PROCESS}): install QGIS's qgis-providers / qgis package")
    build = load_build_plugin()
    root = tmp_path_factory.mktemp("qgis_config")
    zip_path = build.build_zip(root / "dist")
    profile = root / "profiles" / "default"
    build.install_zip(zip_path, profile)
    build.enable_plugin(profile)
    env = {**os.environ, "QGIS_CUSTOM_CONFIG_PATH": str(root), "SARMAE_PYTHON": sys.executable,
           "QT_QPA_PLATFORM": "offscreen", "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([QGIS_PROCESS, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=root)

    plugins = run("plugins")
    if "sarmae_qgis" not in plugins.stdout:
        pytest.skip(f"qgis_process does not see the plugin installed in {profile}: {plugins.stdout[-500:]}")
    return run


def test_qgis_process_lists_the_provider(qgis_process):
    plugins = qgis_process("plugins")
    assert "* sarmae_qgis" in plugins.stdout, plugins.stdout + plugins.stderr  # loaded, with a provider
    listing = qgis_process("list")
    assert listing.returncode == 0
    for name in ("segment", "detect", "classify", "embed", "similarity", "finetune", "pretrain", "export_onnx"):
        assert f"sarmae:{name}" in listing.stdout, listing.stdout[-2000:]
    help_text = qgis_process("help", "sarmae:segment")
    assert "class raster" in help_text.stdout.lower() and "INPUT" in help_text.stdout


def test_qgis_process_runs_segment(qgis_process, assets, tmp_path):
    out, conf = tmp_path / "classes.tif", tmp_path / "confidence.tif"
    done = qgis_process("run", "sarmae:segment", "--", f"INPUT={assets / 'scene.tif'}",
                        f"MODEL={assets / 'segment.pkg'}", f"OUTPUT={out}", f"CONFIDENCE={conf}", "DEVICE=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert out.is_file() and conf.is_file()
    layer, scene = QgsRasterLayer(str(out), "c", "gdal"), QgsRasterLayer(str(assets / "scene.tif"), "s", "gdal")
    assert layer.crs() == scene.crs() and layer.extent() == scene.extent()
    assert "STATISTICS" in done.stdout and "water" in done.stdout


def test_qgis_process_reports_a_wrong_model(qgis_process, assets, tmp_path):
    done = qgis_process("run", "sarmae:segment", "--", f"INPUT={assets / 'scene.tif'}",
                        f"MODEL={assets / 'detect.pkg'}", f"OUTPUT={tmp_path / 'x.tif'}",
                        f"CONFIDENCE={tmp_path / 'c.tif'}")
    assert done.returncode != 0
    assert "is a detect model, not a segment model" in done.stdout + done.stderr
