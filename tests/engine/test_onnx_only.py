"""Inference through onnxruntime never imports torch (issue 3, memory): ``sarmae infer`` and
``run_inference`` with ``--backend onnxruntime``, and ``auto`` once its choice is cached.

Each run under test is a fresh Python process (a SUBPROCESS) that reports what it imported:
``'torch' in sys.modules`` at the end is the criterion. The test process itself imports torch freely
(to build and export the tiny packages, and to compute the torch backend's reference outputs).
Outputs of the torch-free runs must equal the torch backend's within the tolerance of
``test_cli_infer.test_torch_and_onnxruntime_agree_after_export``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import torch
from helpers.rasters import speckle, write_raster

from engine.cli import main
from engine.errors import PackageError
from engine.inference import InferenceOptions, run_inference
from engine.package import load_package

REPO = Path(__file__).resolve().parents[2]

# Runs in the child process: argv[1] is a JSON object {mode, argv | run_inference arguments, block_torch}.
CHILD = r"""
import json, sys
args = json.loads(sys.argv[1])
if args.get("block_torch"):
    sys.modules["torch"] = None  # as if torch were not installed: importing it fails, find_spec gives None
report = {}
if args["mode"] == "cli":
    from engine.cli import main
    report["rc"] = main(["infer", *args["argv"]])
elif args["mode"] == "api":
    from engine.inference import InferenceOptions, run_inference
    from engine.package import load_package
    pkg = load_package(args["model"], lazy=True)
    res = run_inference(args["inputs"], args["output"], pkg, InferenceOptions(**args["options"]))
    report.update(result=res.to_dict(), model_loaded=pkg.model_loaded)
else:  # "import": the modules of the inference path, and the CLI's parser (with its extensions)
    import importlib
    for name in args["modules"]:
        importlib.import_module(name)
    from engine.cli import build_parser
    build_parser()
report["imported"] = {m: sys.modules.get(m) is not None for m in ("torch", "torchvision", "safetensors")}
print("CHILD-REPORT " + json.dumps(report, default=str))
"""


def child(tmp_path: Path, args: dict, cache_home: Path | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    """Run CHILD with ``args`` in a fresh interpreter; return (its report, the process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GDAL_CACHEMAX": "64",
           "XDG_CACHE_HOME": str(cache_home or tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD-REPORT ")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("CHILD-REPORT "):]), proc


def cli_record(proc: subprocess.CompletedProcess) -> dict:
    """The ``--json`` result record printed by ``sarmae infer`` before the child's report."""
    return json.loads(proc.stdout[: proc.stdout.index("CHILD-REPORT ")])


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tiny_package, tmp_path_factory):
    """Factory: a copy of ``tiny_package(task)`` with a model.onnx from ``sarmae export``."""
    made: dict[str, Path] = {}

    def make(task: str) -> Path:
        if task not in made:
            pkg = shutil.copytree(tiny_package(task), tmp_path_factory.mktemp(f"onnx_{task}") / "model")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's warnings about shape-dependent branches
                assert main(["export", str(pkg)]) == 0
            assert (pkg / "model.onnx").is_file()
            made[task] = pkg
        return made[task]

    return make


def db_raster(path: Path, height: int = 70, width: int = 90) -> Path:
    return write_raster(path, 10 * np.log10(speckle((2, height, width))), descriptions=["VV", "VH"])


def torch_reference(src: Path, out: Path, pkg: Path) -> dict[str, str]:
    res = run_inference([str(src)], out, pkg, InferenceOptions(backend="torch", device="cpu", threads=1))
    assert res.provenance["backend"].startswith("torch")
    return res.outputs


def read(path: str) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def classify_rows(path: str) -> list[tuple]:
    with fiona.open(path) as f:
        return sorted((p["row_off"], p["col_off"], p["class_id"], p["p_water"], p["p_land"])
                      for p in (feat["properties"] for feat in f))


def assert_same_as_torch(task: str, ours: dict[str, str], ref: dict[str, str]) -> None:
    assert set(ours) == set(ref)
    if task == "segment":
        conf_o, conf_r = read(ours["confidence"]), read(ref["confidence"])
        assert np.abs(conf_o - conf_r).max() <= 1e-4
        clear = conf_r > 0.5 + 1e-4  # argmax is only defined away from a tie of the two classes
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(read(ours["class"])[clear], read(ref["class"])[clear])
    elif task == "embed":  # float16 on disk: at most one float16 step apart
        np.testing.assert_allclose(read(ours["embedding"]), read(ref["embedding"]), rtol=2e-3, atol=2e-3)
        with rasterio.open(ours["pca"]) as a, rasterio.open(ref["pca"]) as b:
            assert (a.shape, a.count) == (b.shape, b.count)
    else:
        ro, rr = classify_rows(ours["grid"]), classify_rows(ref["grid"])
        assert [r[:2] for r in ro] == [r[:2] for r in rr] and len(ro) == 9
        np.testing.assert_allclose(np.array([r[3:] for r in ro]), np.array([r[3:] for r in rr]), atol=1e-4)


# ------------------------------------------------------------------------------------ imports
def test_inference_modules_import_without_torch(tmp_path):
    modules = ["engine.inference", "engine.backends", "engine.package", "engine.reader", "engine.radiometry",
               "engine.tiling", "engine.stitching", "engine.writers", "engine.serve", "engine.tasks",
               *(f"engine.tasks.{t}" for t in ("segment", "classify", "embed", "detect", "reconstruct"))]
    report, _ = child(tmp_path, {"mode": "import", "modules": modules})
    assert report["imported"] == {"torch": False, "torchvision": False, "safetensors": False}


def test_torch_names_still_reachable_from_backends():
    import engine.backends as b
    from engine import torch_backend

    assert b.TorchBackend is torch_backend.TorchBackend and b.export_onnx is torch_backend.export_onnx
    with pytest.raises(AttributeError):
        b.NoSuchBackend  # noqa: B018


# ------------------------------------------------------------------------- explicit onnxruntime
@pytest.mark.slow
@pytest.mark.parametrize("task, mode, name", [("segment", "cli", "out.tif"), ("embed", "api", "emb.tif"),
                                              ("classify", "cli", "grid.gpkg")])
def test_onnxruntime_run_never_imports_torch_and_matches_torch(tmp_path, exported, task, mode, name):
    pkg = exported(task)
    src = db_raster(tmp_path / "in.tif")
    ref = torch_reference(src, tmp_path / "ref" / name, pkg)
    out = tmp_path / "ort" / name
    if mode == "cli":
        report, proc = child(tmp_path, {"mode": "cli", "argv": [
            "-m", str(pkg), "-i", str(src), "-o", str(out), "--backend", "onnxruntime", "--threads", "1",
            "--quiet", "--json"]})
        assert report["rc"] == 0, proc.stderr
        rec = cli_record(proc)
    else:
        report, _ = child(tmp_path, {"mode": "api", "model": str(pkg), "inputs": [str(src)], "output": str(out),
                                     "options": {"backend": "onnxruntime", "threads": 1}})
        rec = report["result"]
        assert report["model_loaded"] is False  # the torch model (and its weights) were never built
    assert report["imported"] == {"torch": False, "torchvision": False, "safetensors": False}
    assert rec["provenance"]["backend"].startswith("onnxruntime")
    assert_same_as_torch(task, rec["outputs"], ref)


# ---------------------------------------------------------------------------------------- auto
@pytest.mark.slow
def test_auto_imports_torch_only_to_time_then_follows_the_cached_choice(tmp_path, exported):
    pkg = exported("segment")
    src = db_raster(tmp_path / "in.tif")
    ref = torch_reference(src, tmp_path / "ref.tif", pkg)
    cache = tmp_path / "xdg"

    def auto_run(i: str) -> tuple[dict, dict]:
        report, proc = child(tmp_path, {"mode": "cli", "argv": [
            "-m", str(pkg), "-i", str(src), "-o", str(tmp_path / f"auto{i}.tif"), "--backend", "auto",
            "--threads", "1", "--quiet", "--json"]}, cache_home=cache)
        assert report["rc"] == 0, proc.stderr
        return report, cli_record(proc)

    report, rec = auto_run("first")  # nothing cached: both backends are timed, so torch is imported once
    assert report["imported"]["torch"] is True
    assert any(m.startswith("backend auto: torch ") and "ms/batch" in m for m in rec["log"])
    choice_file = cache / "sarmae" / "backend_choice.json"
    choices = json.loads(choice_file.read_text())
    assert len(choices) == 1
    key = next(iter(choices))
    for chosen in ("onnxruntime", "torch"):  # whatever was measured, a later run obeys the cached choice
        choice_file.write_text(json.dumps({key: {**choices[key], "backend": chosen}}))
        report, rec = auto_run(chosen)
        assert rec["provenance"]["backend"].startswith(chosen)
        assert report["imported"]["torch"] is (chosen == "torch")
        assert any(f"backend auto: {chosen} (cached choice" in m for m in rec["log"])
        assert_same_as_torch("segment", rec["outputs"], ref)


@pytest.mark.slow
def test_without_torch_auto_runs_onnxruntime_and_torch_is_refused_plainly(tmp_path, exported, tiny_package):
    src = db_raster(tmp_path / "in.tif")
    common = ["-i", str(src), "--threads", "1", "--quiet", "--json"]
    report, proc = child(tmp_path, {"mode": "cli", "block_torch": True, "argv": [
        "-m", str(exported("segment")), "-o", str(tmp_path / "auto.tif"), *common]})
    assert report["rc"] == 0, proc.stderr
    rec = cli_record(proc)
    assert rec["provenance"]["backend"].startswith("onnxruntime")
    assert "backend auto: torch is not installed -> onnxruntime" in rec["log"]
    assert not (tmp_path / "cache" / "sarmae" / "backend_choice.json").exists()  # nothing was timed

    report, proc = child(tmp_path, {"mode": "cli", "block_torch": True, "argv": [
        "-m", str(tiny_package("segment")), "-o", str(tmp_path / "torch.tif"), *common]})
    assert report["rc"] == 2 and not (tmp_path / "torch.tif").exists()
    assert "torch is not installed" in proc.stderr and "sarmae export" in proc.stderr


# ------------------------------------------------------------------------------- lazy packages
def test_lazy_package_checks_the_hash_without_loading_the_weights(tmp_path, exported):
    pkg = exported("segment")
    z = tmp_path / "model.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(pkg.iterdir()):
            zf.write(f, f"model/{f.name}")
    for path in (pkg, z):
        lp = load_package(path, lazy=True)
        assert lp.has_onnx and not lp.model_loaded
        assert lp.onnx_model() == (pkg / "model.onnx" if path == pkg else (pkg / "model.onnx").read_bytes())
        assert isinstance(lp.model, torch.nn.Module) and lp.model_loaded  # built on first use
    bad = shutil.copytree(pkg, tmp_path / "bad")
    w = bad / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 0xFF]))
    with pytest.raises(PackageError, match="do not match model.json.*re-copy or re-export"):
        load_package(bad, lazy=True)
