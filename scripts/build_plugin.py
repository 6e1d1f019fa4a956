#!/usr/bin/env python3
"""Build the QGIS plugin zip, and optionally install it into the default QGIS 3 profile.

    python scripts/build_plugin.py --output dist            # -> dist/sarmae_qgis-<version>.zip
    python scripts/build_plugin.py --output dist --install  # ... and install + enable it

The zip holds one top folder, ``sarmae_qgis/``: the package files (no ``__pycache__``), the
repository's ``resources/`` (icons, layer styles, help) as ``sarmae_qgis/resources/``, and its
``metadata.txt`` copied into it (QGIS reads it from there).
``--install`` unpacks the zip into
``~/.local/share/QGIS/QGIS3/profiles/default/python/plugins/sarmae_qgis`` (through a temporary
folder and a rename, so a half-copied plugin is never visible to QGIS) and sets
``[PythonPlugins] sarmae_qgis=true`` in the profile's ``QGIS/QGIS3.ini``, keeping every other
entry. Standard library only.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "sarmae_qgis"
RESOURCES = "resources"  # the top-level assets folder, copied to sarmae_qgis/resources/
EXCLUDED_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
EXCLUDED_SUFFIXES = {".pyc", ".pyo"}


def read_version(metadata: Path) -> str:
    """The ``version`` entry of a QGIS ``metadata.txt``."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(metadata, encoding="utf-8")
    try:
        return parser["general"]["version"].strip()
    except KeyError:
        raise SystemExit(f"error: {metadata} has no [general] version entry") from None


def plugin_files(package_dir: Path) -> list[Path]:
    """Files of the plugin package, sorted, without caches and compiled files."""
    files = []
    for path in sorted(package_dir.rglob("*")):
        rel = path.relative_to(package_dir)
        if path.is_dir() or EXCLUDED_DIRS.intersection(rel.parts):
            continue
        if path.suffix in EXCLUDED_SUFFIXES or path.name == "metadata.txt":
            continue
        files.append(path)
    return files


def build_zip(output_dir: Path, repo_root: Path = REPO_ROOT) -> Path:
    """Write ``<output_dir>/sarmae_qgis-<version>.zip`` and return its path."""
    metadata = repo_root / "metadata.txt"
    package_dir = repo_root / PLUGIN_NAME
    version = read_version(metadata)
    output_dir.mkdir(parents=True, exist_ok=True)
    zip_path = output_dir / f"{PLUGIN_NAME}-{version}.zip"
    tmp_path = zip_path.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(metadata, f"{PLUGIN_NAME}/metadata.txt")
        for path in plugin_files(package_dir):
            zf.write(path, f"{PLUGIN_NAME}/{path.relative_to(package_dir).as_posix()}")
        resources = repo_root / RESOURCES
        if resources.is_dir():  # icons, styles, help: read by sarmae_qgis/toolbelt/resources.py
            for path in plugin_files(resources):
                zf.write(path, f"{PLUGIN_NAME}/{RESOURCES}/{path.relative_to(resources).as_posix()}")
    os.replace(tmp_path, zip_path)
    return zip_path


def default_profile_dir() -> Path:
    """The default QGIS 3 profile folder of the current user (Linux layout)."""
    return Path.home() / ".local/share/QGIS/QGIS3/profiles/default"


def install_zip(zip_path: Path, profile_dir: Path) -> Path:
    """Unpack the plugin into ``<profile>/python/plugins/sarmae_qgis``; return that folder.

    The zip is extracted into a temporary folder beside the target, then renamed into place;
    an older install is moved aside first and deleted only once the new one is in place.
    """
    plugins_dir = profile_dir / "python" / "plugins"
    plugins_dir.mkdir(parents=True, exist_ok=True)
    target = plugins_dir / PLUGIN_NAME
    staging = Path(tempfile.mkdtemp(prefix=f".{PLUGIN_NAME}-new-", dir=plugins_dir))
    old = None
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
            if any(not n.startswith(f"{PLUGIN_NAME}/") or ".." in n.split("/") for n in names):
                raise SystemExit(f"error: {zip_path} is not a {PLUGIN_NAME} plugin zip")
            zf.extractall(staging)
        # the engine this checkout runs: the installed plugin finds its interpreter here
        venv_python = REPO_ROOT / ".venv" / "bin" / "python"
        if venv_python.exists():
            (staging / PLUGIN_NAME / "engine.json").write_text(json.dumps({"python": str(venv_python)}) + "\n")
        if target.exists():
            old = plugins_dir / f".{PLUGIN_NAME}-old-{os.getpid()}"
            os.replace(target, old)
        os.replace(staging / PLUGIN_NAME, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def enable_plugin(profile_dir: Path, name: str = PLUGIN_NAME) -> Path:
    """Set ``[PythonPlugins] <name>=true`` in the profile's ``QGIS/QGIS3.ini``; return its path.

    The ini is written by Qt's QSettings: keys are case-sensitive, values may contain ``%`` and
    ``:``, and other sections must survive untouched, hence the parser options below. The file is
    replaced atomically. QGIS must not be running (it rewrites the file when it quits).
    """
    ini_path = profile_dir / "QGIS" / "QGIS3.ini"
    parser = configparser.ConfigParser(
        interpolation=None,
        delimiters=("=",),
        strict=False,
        default_section="__sarmae_no_default__",
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case
    if ini_path.exists():
        parser.read(ini_path, encoding="utf-8")
    if not parser.has_section("PythonPlugins"):
        parser.add_section("PythonPlugins")
    parser.set("PythonPlugins", name, "true")
    ini_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ini_path.with_name(ini_path.name + ".sarmae-tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        parser.write(fh, space_around_delimiters=False)
    os.replace(tmp, ini_path)
    return ini_path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "dist",
        help="folder for the zip (default: dist/ in the repository)",
    )
    ap.add_argument(
        "--install",
        action="store_true",
        help="also unpack it into the default QGIS 3 profile and enable it",
    )
    args = ap.parse_args(argv)

    zip_path = build_zip(args.output)
    with zipfile.ZipFile(zip_path) as zf:
        count = len(zf.namelist())
    print(f"built {zip_path} ({count} files)")
    if args.install:
        profile = default_profile_dir()
        target = install_zip(zip_path, profile)
        print(f"installed into {target}")
        ini = enable_plugin(profile)
        print(f"enabled in {ini} ([PythonPlugins] {PLUGIN_NAME}=true); restart QGIS to load it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
