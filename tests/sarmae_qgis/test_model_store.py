"""The models folder as a store (sarmae_qgis/model_store.py), without QGIS: import folders and zips
atomically, refuse unsafe zips before writing anything, export, delete only installed packages.

The packages here are hand-written cards with a few bytes of "weights" and their sha256: the
store never loads weights, it only checks that the file named by the card is there and whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from sarmae_qgis import model_store
from sarmae_qgis.errors import ModelCardError, SarmaePluginError
from sarmae_qgis.model_cards import list_packages, read_card
from sarmae_qgis.model_store import (
    ModelStoreError,
    PackageExistsError,
    delete_package,
    export_package,
    import_package,
    is_package,
    safe_name,
)


def make_package(folder: Path, name: str = "water-seg", task: str = "segment", weights: bytes = b"w" * 64,
                 classes: tuple[str, ...] = ("water", "land"), extra: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True)
    card = {"format": "sarmae-model", "format_version": 1, "name": name, "task": task,
            "architecture": {"name": "vit_tiny_patch16", "encoder": {"img_size": 32, "patch_size": 16,
                                                                    "in_chans": 2, "depth": 2}},
            "classes": [{"name": c, "colour": "#123456"} for c in classes],
            "input": {"bands": ["VV", "VH"], "units": "db", "clip": [-35.0, 10.0]},
            "provenance": {"training": "test"},
            "weights": {"file": "weights.safetensors", "sha256": hashlib.sha256(weights).hexdigest(),
                        "format": "safetensors"}}
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    (folder / "weights.safetensors").write_bytes(weights)
    for fname, data in (extra or {}).items():
        (folder / fname).write_bytes(data)
    return folder


def zip_folder(folder: Path, dest: Path, top: str | None = "pkg") -> Path:
    """Zip ``folder`` with ``writestr`` (no file types recorded), under ``top/`` or at the root."""
    with zipfile.ZipFile(dest, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                z.writestr(f"{top}/{rel}" if top else rel, p.read_bytes())
    return dest


def tree(folder: Path) -> list[str]:
    """Everything under ``folder`` (hidden entries included), relative, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def pkg(tmp_path) -> Path:
    return make_package(tmp_path / "src" / "water.pkg", extra={"training_curves.png": b"\x89PNG fake"})


@pytest.fixture
def models(tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


# ---- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "expected"), [
    ("water-seg", "water-seg"), ("Flood 2024 / VV+VH", "Flood_2024_VV_VH"), ("../../etc", "etc"),
    (".hidden", "hidden"), ("", "model"), ("///", "model"), ("CON", "CON_"), ("nul.txt", "nul.txt_"),
    ("é" * 3, "model"), ("a" * 200, "a" * 80),
])
def test_safe_name(name, expected):
    assert safe_name(name) == expected


# ---- import --------------------------------------------------------------------------------------
def test_import_folder_installs_a_copy_named_after_the_card(pkg, models):
    target = import_package(pkg, models)
    assert target == models / "water-seg"
    assert tree(models) == ["water-seg", "water-seg/model.json", "water-seg/training_curves.png",
                            "water-seg/weights.safetensors"]  # no temporary folder left
    assert (target / "weights.safetensors").read_bytes() == (pkg / "weights.safetensors").read_bytes()
    assert [c.name for c in list_packages(models)] == ["water-seg"]
    assert pkg.is_dir()  # the source is kept


def test_import_by_model_json_and_with_a_chosen_name(pkg, models):
    assert import_package(pkg / "model.json", models) == models / "water-seg"
    assert import_package(pkg, models, name="my copy") == models / "my_copy"


def test_import_falls_back_to_the_source_name(tmp_path, models):
    src = make_package(tmp_path / "Ship Finder.pkg", name="???")
    assert import_package(src, models) == models / "Ship_Finder"


@pytest.mark.parametrize("top", ["pkg", None])
def test_import_zip_with_a_top_folder_or_at_its_root(pkg, models, tmp_path, top):
    archive = zip_folder(pkg, tmp_path / "water.zip", top=top)
    target = import_package(archive, models)
    assert target == models / "water-seg"
    assert tree(models) == ["water-seg", "water-seg/model.json", "water-seg/training_curves.png",
                            "water-seg/weights.safetensors"]
    assert read_card(target).class_names == ["water", "land"]


def test_import_zip_made_by_make_archive_with_folder_entries(pkg, models, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "water"), "zip", pkg.parent, pkg.name)
    with zipfile.ZipFile(archive, "a") as z:  # Finder junk is ignored
        z.writestr("__MACOSX/water.pkg/._model.json", b"junk")
    target = import_package(archive, models)
    assert (target / "model.json").is_file() and not (models / "__MACOSX").exists()


MALICIOUS = {
    "dotdot": "../evil.txt",
    "absolute": "/abs.txt",
    "nested_dotdot": "pkg/../../evil.txt",
    "backslash": "..\\evil.txt",
    "drive": "C:/evil.txt",
    "stream": "pkg/evil.txt:stream",
}


@pytest.mark.parametrize("entry", MALICIOUS.values(), ids=MALICIOUS.keys())
def test_zip_slip_is_refused_before_anything_is_written(pkg, models, tmp_path, entry):
    archive = zip_folder(pkg, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr(entry, b"pwned")
    before = tree(tmp_path)
    with pytest.raises(ModelStoreError, match="refused"):
        import_package(archive, models)
    assert tree(tmp_path) == before  # nothing anywhere: not in models, not beside it
    assert not Path("/abs.txt").exists()


def test_symlink_entries_are_refused(pkg, models, tmp_path):
    archive = zip_folder(pkg, tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as z:
        info = zipfile.ZipInfo("pkg/link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "../../../../etc/passwd")
    with pytest.raises(ModelStoreError, match="symbolic link"):
        import_package(archive, models)
    assert tree(models) == []


def test_zip_holding_files_beside_its_package_folder_is_refused(pkg, models, tmp_path):
    archive = zip_folder(pkg, tmp_path / "two.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("other/readme.txt", b"x")
    with pytest.raises(ModelStoreError, match="outside its package folder"):
        import_package(archive, models)
    assert tree(models) == []


def test_zip_with_model_json_too_deep_is_refused(pkg, models, tmp_path):
    archive = zip_folder(pkg, tmp_path / "deep.zip", top="a/b")
    with pytest.raises(ModelStoreError, match="deeper than one folder"):
        import_package(archive, models)
    assert tree(models) == []


def test_not_a_package_is_refused_with_the_file_named(models, tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not a zip")
    with pytest.raises(ModelCardError, match="junk.zip"):
        import_package(junk, models)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ModelCardError, match="no model.json"):
        import_package(empty, models)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelCardError, match="no model.json in this folder"):
        import_package(tmp_path / "folder", models)
    with pytest.raises(ModelCardError, match="not found"):
        import_package(tmp_path / "missing", models)
    assert tree(models) == []


def test_truncated_zip_is_refused(pkg, models, tmp_path):
    archive = zip_folder(pkg, tmp_path / "cut.zip")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(SarmaePluginError):
        import_package(archive, models)
    assert tree(models) == []


def test_missing_or_damaged_weights_are_refused(pkg, models, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(pkg, damaged)
    (damaged / "weights.safetensors").write_bytes(b"x" * 64)
    with pytest.raises(ModelStoreError, match="does not match the sha256"):
        import_package(damaged, models)
    (damaged / "weights.safetensors").unlink()
    with pytest.raises(ModelStoreError, match="lacks its weights file"):
        import_package(damaged, models)
    assert tree(models) == []


def test_overwrite_refused_then_replaces_atomically(pkg, models, tmp_path):
    target = import_package(pkg, models)
    (target / "stale.txt").write_text("from the old copy")
    newer = make_package(tmp_path / "newer", name="water-seg", weights=b"v2" * 10)
    with pytest.raises(PackageExistsError) as info:
        import_package(newer, models)
    assert info.value.target == target and "overwrite" in str(info.value)
    assert (target / "stale.txt").is_file()
    assert import_package(newer, models, overwrite=True) == target
    assert tree(models) == ["water-seg", "water-seg/model.json", "water-seg/weights.safetensors"]
    assert (target / "weights.safetensors").read_bytes() == b"v2" * 10


def test_overwrite_never_replaces_something_that_is_not_a_package(pkg, models):
    (models / "water-seg").mkdir()
    (models / "water-seg" / "precious.txt").write_text("mine")
    with pytest.raises(ModelStoreError, match="not a model package"):
        import_package(pkg, models, overwrite=True)
    assert tree(models) == ["water-seg", "water-seg/precious.txt"]


def test_failed_extraction_leaves_the_installed_package_as_it_was(pkg, models, tmp_path, monkeypatch):
    target = import_package(pkg, models)
    archive = zip_folder(make_package(tmp_path / "v2", weights=b"v2"), tmp_path / "v2.zip")
    before = tree(models)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_store.shutil, "copyfileobj", disk_full)
    with pytest.raises(ModelStoreError, match="No space left on device.*nothing was changed"):
        import_package(archive, models, overwrite=True)
    assert tree(models) == before
    assert read_card(target).name == "water-seg"


def test_models_folder_inside_the_source_is_refused(pkg):
    with pytest.raises(ModelStoreError, match="inside this package folder"):
        import_package(pkg, pkg / "models")


def test_reimporting_an_installed_package_over_itself(pkg, models):
    target = import_package(pkg, models)
    with pytest.raises(PackageExistsError):
        import_package(target, models)
    assert import_package(target, models, overwrite=True) == target
    assert read_card(target).name == "water-seg" and (target / "weights.safetensors").is_file()


# ---- export --------------------------------------------------------------------------------------
def test_export_then_import_round_trip(pkg, models, tmp_path):
    out = export_package(read_card(pkg), tmp_path / "share" / "water")
    assert out == tmp_path / "share" / "water.zip"
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == ["water/model.json", "water/training_curves.png",
                                        "water/weights.safetensors"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert tree(out.parent) == ["water.zip"]  # no temporary file left
    target = import_package(out, models)
    assert read_card(target).class_names == ["water", "land"]
    for name in ("model.json", "weights.safetensors", "training_curves.png"):
        assert (target / name).read_bytes() == (pkg / name).read_bytes()


def test_export_refuses_existing_file_unless_overwrite(pkg, tmp_path):
    dest = tmp_path / "water.zip"
    dest.write_bytes(b"old")
    with pytest.raises(PackageExistsError):
        export_package(pkg, dest)
    assert dest.read_bytes() == b"old"
    export_package(pkg, dest, overwrite=True)
    assert is_package(dest)


def test_export_refuses_its_own_folder_and_non_packages(pkg, tmp_path):
    with pytest.raises(ModelStoreError, match="its own folder"):
        export_package(pkg, pkg / "self.zip")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelStoreError, match="not a model package"):
        export_package(tmp_path / "plain", tmp_path / "plain.zip")
    (tmp_path / "dir.zip").mkdir()
    with pytest.raises(ModelStoreError, match="is a folder"):
        export_package(pkg, tmp_path / "dir.zip")


def test_export_of_a_zipped_package_copies_it(pkg, tmp_path):
    archive = zip_folder(pkg, tmp_path / "a.zip")
    out = export_package(archive, tmp_path / "b.zip")
    assert out.read_bytes() == archive.read_bytes()


# ---- delete --------------------------------------------------------------------------------------
def test_delete_an_installed_package(pkg, models, tmp_path):
    target = import_package(pkg, models)
    archive = zip_folder(pkg, models / "zipped.zip")
    delete_package(target, models)
    delete_package(archive, models)
    assert tree(models) == []
    assert pkg.is_dir()


def test_delete_refuses_anything_outside_the_models_folder_or_not_a_package(pkg, models):
    with pytest.raises(ModelStoreError, match="not inside the models folder"):
        delete_package(pkg, models)
    with pytest.raises(ModelStoreError, match="not inside the models folder"):
        delete_package(models, models)
    (models / "notes").mkdir()
    (models / "notes" / "todo.txt").write_text("keep")
    with pytest.raises(ModelStoreError, match="not a model package"):
        delete_package(models / "notes", models)
    inner = import_package(pkg, models)
    nested = make_package(inner / "nested")
    with pytest.raises(ModelStoreError, match="not inside the models folder"):
        delete_package(nested, models)
    with pytest.raises(ModelStoreError, match="no such package"):
        delete_package(models / "gone", models)
    assert pkg.is_dir() and (models / "notes" / "todo.txt").is_file() and nested.is_dir()


def test_delete_a_linked_package_removes_the_link_only(pkg, models):
    os.symlink(pkg, models / "linked")
    delete_package(models / "linked", models)
    assert not (models / "linked").exists() and (pkg / "model.json").is_file()


def test_delete_a_package_whose_card_does_not_read(models):
    broken = models / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{not json")
    delete_package(broken, models)
    assert tree(models) == []
