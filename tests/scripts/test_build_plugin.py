"""scripts/build_plugin.py: zip layout, install into a profile, enable flag in QGIS3.ini."""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "build_plugin.py"


@pytest.fixture(scope="module")
def build_plugin() -> ModuleType:
    """The script loaded as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_plugin", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_ini(path: Path) -> configparser.ConfigParser:
    """Parse a QSettings-style ini keeping key case."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    return parser


def test_zip_layout(build_plugin: ModuleType, tmp_path: Path) -> None:
    """One top folder sarmae_qgis/ with metadata.txt, code and icon; no caches."""
    repo = tmp_path / "repo"  # a copy of the plugin sources, with caches to be left out
    shutil.copytree(REPO_ROOT / "sarmae_qgis", repo / "sarmae_qgis")
    shutil.copy(REPO_ROOT / "metadata.txt", repo / "metadata.txt")
    shutil.copytree(REPO_ROOT / "resources", repo / "resources")
    for cache in (
        repo / "sarmae_qgis" / "__pycache__",
        repo / "sarmae_qgis" / "gui" / "__pycache__",
    ):
        cache.mkdir(exist_ok=True)
        (cache / "plugin.cpython-311.pyc").write_bytes(b"\0")
    zip_path = build_plugin.build_zip(tmp_path / "out", repo_root=repo)
    assert zip_path == tmp_path / "out" / "sarmae_qgis-0.1.0.zip"
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        metadata = zf.read("sarmae_qgis/metadata.txt").decode()
    assert {n.split("/")[0] for n in names} == {"sarmae_qgis"}
    for required in ("__init__.py", "plugin.py", "metadata.txt", "resources/icons/sarmae.svg", "resources/styles/layers.json",
                     "resources/styles/classes.json", "resources/help/panel.html", "resources/prompts/text_search.json",
                     "resources/demo/settings.json"):
        assert f"sarmae_qgis/{required}" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert names.count("sarmae_qgis/metadata.txt") == 1
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(metadata)
    assert parser["general"]["qgisMinimumVersion"] == "3.22"
    assert parser["general"]["version"] == "0.1.0"


def test_install_and_enable_keeps_other_settings(build_plugin: ModuleType, tmp_path: Path) -> None:
    """Install replaces an older copy; the ini keeps its other sections, keys and % values."""
    zip_path = build_plugin.build_zip(tmp_path / "dist")
    profile = tmp_path / "profile"
    stale = profile / "python" / "plugins" / "sarmae_qgis" / "stale.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("old install\n")
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text(
        "[General]\nlocale%5CuserLocale=en_US\nlastPath=/home/u/data:1\n\n"
        "[PythonPlugins]\nprocessing=true\nMetaSearch=false\n\n"
        "[qgis]\ncolor=#ff0000\nfmt=%1 of %2\n"
    )

    target = build_plugin.install_zip(zip_path, profile)
    build_plugin.enable_plugin(profile)

    assert target == profile / "python" / "plugins" / "sarmae_qgis"
    assert (target / "metadata.txt").is_file() and (target / "plugin.py").is_file()
    assert not stale.exists()
    assert [p.name for p in target.parent.iterdir()] == ["sarmae_qgis"]  # no temp folders left
    parser = read_ini(ini)
    assert parser["PythonPlugins"]["sarmae_qgis"] == "true"
    assert parser["PythonPlugins"]["MetaSearch"] == "false"
    assert parser["PythonPlugins"]["processing"] == "true"
    assert parser["General"]["locale%5CuserLocale"] == "en_US"
    assert parser["General"]["lastPath"] == "/home/u/data:1"
    assert parser["qgis"]["fmt"] == "%1 of %2"
    assert "sarmae_qgis=true" in ini.read_text()  # QSettings style: no spaces around '='


def test_cli_install_into_home(tmp_path: Path) -> None:
    """`build_plugin.py --output DIR --install` with HOME=tmp_path: files land, ini is created."""
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(tmp_path / "dist"), "--install"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    profile = tmp_path / ".local/share/QGIS/QGIS3/profiles/default"
    assert (tmp_path / "dist" / "sarmae_qgis-0.1.0.zip").is_file()
    assert (profile / "python/plugins/sarmae_qgis/resources/icons/sarmae.svg").is_file()
    assert read_ini(profile / "QGIS/QGIS3.ini")["PythonPlugins"]["sarmae_qgis"] == "true"
    assert "built" in result.stdout and "installed into" in result.stdout
    assert "enabled in" in result.stdout
