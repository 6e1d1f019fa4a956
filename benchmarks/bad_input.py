"""A battery of bad inputs over the three ways in: the CLI (subprocesses), the engine worker (the
JSON-lines protocol over a pipe) and QGIS Processing (``qgis_process``). Issue 15, "Targets".

Each case prints a row: surface, case, exit code (the worker: the event's code), the first line of
the message, whether a traceback was printed, and the files it changed or left. A case is CLEAN
when it gave a sentence (no traceback; ``failed`` / ``protocol``, never ``internal``, from the
worker), exited non-zero when it should fail, changed no input file, and left no file (hidden
temporaries included) beyond the outputs of the cases that should succeed.

    .venv/bin/python benchmarks/bad_input.py            # every case (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/bad_input.py --quick    # every third CLI case, every worker case, one qgis
    .venv/bin/python benchmarks/bad_input.py --no-qgis  # without qgis_process

The packages are tiny (a depth-2 ViT-Tiny at 32 px); the work folder is ``benchmarks/_work/
bad_input`` (ignored by git). Exit status 1 when any case is not clean.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / "_work" / "bad_input"
QGIS_PROCESS = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "QT_QPA_PLATFORM": "offscreen",
       "XDG_CACHE_HOME": str(WORK / "cache")}


@dataclass
class Case:
    surface: str  # cli | worker | qgis
    name: str
    args: list | dict  # CLI arguments, a worker request (or a raw line under "raw"), qgis_process arguments
    ok: bool = False  # the case should succeed (its outputs may stay; it must still be clean)
    expect: str = ""  # words its message (or log) must hold


@dataclass
class Row:
    case: Case
    code: str
    message: str
    traceback: bool
    changed: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        failed = self.code not in ("0", "result")
        return (not self.traceback and failed != self.case.ok and not self.changed and self.code != "internal"
                and (not self.case.expect or self.case.expect in self.message))


# ------------------------------------------------------------------------------------ inputs
def make_inputs(d: Path) -> dict[str, Path]:
    """Rasters, packages and checkpoints, good and bad, in ``d/in``."""
    import rasterio
    from affine import Affine
    from rasterio.transform import from_origin
    from scipy.io import netcdf_file

    from engine.models import build_from_architecture, create_model
    from engine.package import default_classes, default_input, new_card, save_package

    i = d / "in"
    i.mkdir(parents=True)
    rng = np.random.default_rng(0)
    prof = dict(driver="GTiff", count=2, dtype="float32", crs="EPSG:32631", transform=from_origin(5e5, 4.6e6, 10, 10))
    paths = {}

    def tif(name, data, **kw):
        p = i / name
        with rasterio.open(p, "w", width=data.shape[2], height=data.shape[1], **{**prof, "count": data.shape[0], **kw}) as f:
            f.write(data.astype(kw.get("dtype", "float32")))
            for b in range(data.shape[0]):
                f.set_band_description(b + 1, ["VV", "VH"][b])
        paths[name] = p
        return p

    db = (10 * np.log10(rng.gamma(1.0, 0.05, (2, 64, 64)))).astype("float32")
    tif("scene.tif", db)
    big = tif("big.tif", (10 * np.log10(rng.gamma(1.0, 0.05, (2, 256, 256)))), tiled=True, blockxsize=64,
              blockysize=64)
    (i / "truncated.tif").write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # its header is at the end
    import rasterio.shutil

    rasterio.shutil.copy(big, i / "cog.tif", driver="COG", BLOCKSIZE=64, OVERVIEWS="NONE")  # header first
    (i / "truncated_cog.tif").write_bytes((i / "cog.tif").read_bytes()[: (i / "cog.tif").stat().st_size // 2])
    (i / "cog.tif").unlink()
    tif("nodata.tif", np.full((2, 64, 64), -9999.0), nodata=-9999)
    tif("radar.tif", db, crs="EPSG:4326", transform=Affine.identity())
    tif("tiny.tif", db[:, :1, :1])
    (i / "text.tif").write_text("not a raster\n")
    (i / "empty.tif").write_bytes(b"")
    f = netcdf_file(str(i / "scene.nc"), "w")
    f.createDimension("y", 40)
    f.createDimension("x", 40)
    for name in ("VV", "VH"):
        f.createVariable(name, "f4", ("y", "x"))[:] = rng.random((40, 40)).astype("f4")
    f.close()
    for name in ("truncated.tif", "truncated_cog.tif", "text.tif", "empty.tif", "scene.nc"):
        paths[name] = i / name

    def package(name, task, classes, in_chans=2, onnx=False):
        import torch

        torch.manual_seed(0)
        enc = create_model("vit_tiny_patch16", in_chans=in_chans, img_size=32, depth=2)
        arch = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict()}
        if task in ("segment", "detect"):
            arch["head"] = {"channels": 32} if task == "segment" else {}
        cls = default_classes(list(classes))
        card = new_card(f"bad-input-{name}", task, arch, default_input(in_chans), cls, {"training": "none"})
        p = save_package(build_from_architecture(arch, task, len(cls)).state_dict(), card, i / name)
        if onnx:
            from engine.export import export_package

            export_package(p, log=lambda m: None)
        paths[name] = p
        return p

    seg = package("seg.pkg", "segment", ("water", "land"), onnx=True)
    package("seg1.pkg", "segment", ("water", "land"), in_chans=1, onnx=True)
    package("det.pkg", "detect", ("ship",))
    subprocess.run([sys.executable, "-m", "engine.cli", "init", "--task", "detect", "--method", "cfar", "--classes",
                    "ship", "-o", str(i / "cfar.pkg")], env=ENV, check=True, capture_output=True)
    paths["cfar.pkg"] = i / "cfar.pkg"

    def damaged(name, edit=None, files=None):
        p = shutil.copytree(seg, i / name)
        if edit is not None:
            card = json.loads((p / "model.json").read_text())
            edit(card)
            (p / "model.json").write_text(json.dumps(card))
        for fname, data in (files or {}).items():
            (p / fname).write_bytes(data)
        paths[name] = p

    def old_card(card):
        card.pop("onnx", None)

    damaged("garbage_onnx.pkg", old_card, {"model.onnx": rng.bytes(4096)})
    damaged("swapped_onnx.pkg", old_card, {"model.onnx": (i / "seg1.pkg" / "model.onnx").read_bytes()})
    damaged("huge_img.pkg", lambda c: c["architecture"]["encoder"].update(img_size=1_000_000))
    damaged("chans.pkg", lambda c: (c["architecture"]["encoder"].update(in_chans=3),
                                    c["input"].update(bands=["VV", "VH", "HH"], mean=[0.5] * 3, std=[0.5] * 3)))
    w = (seg / "weights.safetensors").read_bytes()
    damaged("tampered.pkg", files={"weights.safetensors": w[:-1] + bytes([w[-1] ^ 1])})
    damaged("bad_json.pkg", files={"model.json": b"{not json"})
    (i / "nocard.pkg").mkdir()
    (i / "nocard.pkg" / "weights.safetensors").write_bytes(w)
    (i / "empty.pth").write_bytes(b"")
    (i / "garbage.pth").write_bytes(b"PK\x03\x04" + rng.bytes(200))
    for name in ("nocard.pkg", "empty.pth", "garbage.pth"):
        paths[name] = i / name
    return paths


# ------------------------------------------------------------------------------------- cases
def cases(p: dict[str, Path], out: Path, quick: bool, qgis: bool) -> list[Case]:
    s, seg, det = str(p["scene.tif"]), str(p["seg.pkg"]), str(p["det.pkg"])

    def infer(name, model, inp, output, *flags, ok=False, expect=""):
        return Case("cli", name, ["infer", "-m", str(model), "-i", str(inp), "-o", str(out / output), "--device", "cpu",
                                  "--threads", "1", *flags], ok, expect)

    cli = [
        infer("overlap 1.5", seg, s, "a.tif", "--overlap", "1.5", expect="--overlap 1.5"),
        infer("batch size 0", seg, s, "a.tif", "--batch-size", "0", expect="--batch-size 0"),
        infer("batch size -1", seg, s, "a.tif", "--batch-size", "-1", expect="--batch-size -1"),
        infer("threads -3", seg, s, "a.tif", "--threads", "-3", expect="--threads -3"),
        infer("threads 0", seg, s, "a.tif", "--threads", "0", expect="--threads 0"),
        infer("window 0", seg, s, "a.tif", "--window", "0", expect="--window 0"),
        infer("window 100000", seg, s, "a.tif", "--window", "100000", expect="GiB of memory"),
        infer("window 40 (not x16)", seg, s, "a.tif", "--window", "40", expect="patch size 16"),
        infer("score threshold 5", det, s, "a.gpkg", "--score-threshold", "5", expect="--score-threshold 5.0"),
        infer("nms iou -1", det, s, "a.gpkg", "--nms-iou", "-1", expect="--nms-iou -1.0"),
        infer("device gpu", seg, s, "a.tif", "--device", "gpu", expect="--device 'gpu'"),
        infer("backend bogus", seg, s, "a.tif", "--backend", "tensorflow", expect="--backend 'tensorflow'"),
        infer("precision int8 without int8", seg, s, "a.tif", "--precision", "int8", expect="no model.int8.onnx"),
        infer("band 9 of 2", seg, s, "a.tif", "--bands", "9,1"),
        infer("band name XX", seg, s, "a.tif", "--bands", "XX,VH"),
        infer("extent outside", seg, s, "a.tif", "--extent", "500", "500", "10", "10", expect="does not overlap"),
        infer("input units bogus", seg, s, "a.tif", "--input-units", "decibel", expect="--input-units 'decibel'"),
        infer("truncated GeoTIFF", seg, p["truncated.tif"], "a.tif", "--input-units", "db", expect="truncated.tif"),
        infer("truncated COG: blocks missing", seg, p["truncated_cog.tif"], "a.tif", "--input-units", "db",
              expect="truncated or damaged"),
        infer("NetCDF container", seg, p["scene.nc"], "a.tif", expect="subdatasets"),
        infer("text named .tif", seg, p["text.tif"], "a.tif", expect="text.tif"),
        infer("empty .tif", seg, p["empty.tif"], "a.tif", expect="empty.tif"),
        infer("missing input", seg, out / "none.tif", "a.tif", expect="not found"),
        infer("folder as input", seg, out.parent / "in", "a.tif"),
        infer("1x1 raster", seg, p["tiny.tif"], "a.tif", expect="too small"),
        infer("segment output .gpkg", seg, s, "a.gpkg", expect="name the output a.tif"),
        infer("detect output .tif", det, s, "a.tif", expect="name the output a.gpkg"),
        infer("output = input", seg, s, "../in/scene.tif"),
        infer("output folder missing: created", seg, s, "no/such/dir/a.tif", ok=True),
        infer("garbage model.onnx, backend onnx", p["garbage_onnx.pkg"], s, "a.tif", "--backend", "onnxruntime",
              expect="not a valid ONNX model"),
        infer("garbage model.onnx, backend auto", p["garbage_onnx.pkg"], s, "g.tif", ok=True,
              expect="falls back to torch"),
        infer("another model's onnx, backend onnx", p["swapped_onnx.pkg"], s, "a.tif", "--backend", "onnxruntime",
              expect="exported from other weights"),
        infer("img_size 1e6 in model.json", p["huge_img.pkg"], s, "a.tif", expect="img_size 1000000"),
        infer("in_chans 3 vs weights 2", p["chans.pkg"], s, "a.tif", expect="in_chans is 3"),
        infer("tampered weights", p["tampered.pkg"], s, "a.tif", expect="do not match model.json"),
        infer("malformed model.json", p["bad_json.pkg"], s, "a.tif", expect="malformed JSON"),
        infer("no model.json", p["nocard.pkg"], s, "a.tif", expect="model.json is missing"),
        infer("package missing", out / "none.pkg", s, "a.tif", expect="not found"),
        infer("detect all nodata: warns", det, p["nodata.tif"], "nd.gpkg", "--input-units", "db", ok=True,
              expect="is nodata"),
        infer("segment all nodata", seg, p["nodata.tif"], "a.tif", "--input-units", "db", expect="nodata"),
        infer("radar geometry: areas in px", seg, p["radar.tif"], "r.tif", "--json", ok=True,
              expect='"area_unit": "px"'),
        Case("cli", "info --verify another model's onnx", ["info", str(p["swapped_onnx.pkg"]), "--verify"],
             expect="exported from other weights"),
        Case("cli", "info --verify garbage onnx", ["info", str(p["garbage_onnx.pkg"]), "--verify"],
             expect="not a valid ONNX model"),
        Case("cli", "convert empty .pth", ["convert", str(p["empty.pth"]), "-o", str(out / "c.pkg")],
             expect="is empty (0 bytes)"),
        Case("cli", "convert garbage .pth", ["convert", str(p["garbage.pth"]), "-o", str(out / "c.pkg")],
             expect="not a readable PyTorch checkpoint"),
        Case("cli", "export onto a CFAR package", ["export", str(p["cfar.pkg"])], expect="without a network"),
    ]
    if quick:
        cli = cli[::3]

    def run(rid, model, inp, output, **options):
        return Case("worker", rid, {"id": rid, "type": "run", "task": "infer", "inputs": [str(inp)], "model": str(model),
                                    "output": str(out / output), "options": {"device": "cpu", "threads": 1, **options}})

    worker = [
        Case("worker", "malformed JSON line", {"raw": "{not json"}),
        Case("worker", "unknown request type", {"id": "t", "type": "teleport"}),
        Case("worker", "options not an object", {"id": "o", "type": "run", "task": "infer", "inputs": [s], "model": seg,
                                                 "output": str(out / "a.tif"), "options": [1]}),
        Case("worker", "inputs a number", {"id": "n", "type": "run", "task": "infer", "inputs": 3, "model": seg,
                                           "output": str(out / "a.tif")}),
        run("overlap 1.5", seg, s, "a.tif", overlap=1.5),
        run("batch size '8'", seg, s, "a.tif", batch_size="8"),
        run("threads 0", seg, s, "a.tif", threads=0),
        run("window 100000", seg, s, "a.tif", window=100000),
        run("truncated GeoTIFF", seg, p["truncated.tif"], "a.tif", input_units="db"),
        run("truncated COG: blocks missing", seg, p["truncated_cog.tif"], "a.tif", input_units="db"),
        run("NetCDF container", seg, p["scene.nc"], "a.tif"),
        run("garbage onnx, backend onnx", p["garbage_onnx.pkg"], s, "a.tif", backend="onnxruntime"),
        run("img_size 1e6", p["huge_img.pkg"], s, "a.tif"),
        run("segment output .gpkg", seg, s, "a.gpkg"),
        run("missing input", seg, out / "none.tif", "a.tif"),
        Case("worker", "model_info verify swapped onnx", {"id": "v", "type": "model_info",
                                                          "package": str(p["swapped_onnx.pkg"]), "verify": True}),
    ]
    qg = []
    if qgis and Path(QGIS_PROCESS).exists():
        def alg(name, *params):
            return Case("qgis", name, ["run", "sarmae:segment", "--", *params, f"CONFIDENCE={out / 'c.tif'}"])

        qg = [
            alg("truncated GeoTIFF", f"INPUT={p['truncated.tif']}", f"MODEL={seg}", f"OUTPUT={out / 'a.tif'}"),
            alg("truncated COG: blocks missing", f"INPUT={p['truncated_cog.tif']}", f"MODEL={seg}",
                f"OUTPUT={out / 'a.tif'}"),
            alg("img_size 1e6 in model.json", f"INPUT={s}", f"MODEL={p['huge_img.pkg']}", f"OUTPUT={out / 'a.tif'}"),
            alg("NetCDF container", f"INPUT={p['scene.nc']}", f"MODEL={seg}", f"OUTPUT={out / 'a.tif'}"),
            alg("window 100000", f"INPUT={s}", f"MODEL={seg}", f"OUTPUT={out / 'a.tif'}", "WINDOW=100000"),
            alg("tampered weights", f"INPUT={s}", f"MODEL={p['tampered.pkg']}", f"OUTPUT={out / 'a.tif'}"),
            alg("package missing", f"INPUT={s}", f"MODEL={out / 'none.pkg'}", f"OUTPUT={out / 'a.tif'}"),
        ]
        qg = qg[1:2] if quick else qg  # the truncated COG: the engine's read fails, QGIS shows the file
    return cli + worker + qg


# ------------------------------------------------------------------------------------ running
def snapshot(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and "cache" not in f.parts}


def first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("input:", "input units", "the input has", "precision", "backend",
                                          "Warning", "warnings.warn", "dataset =")) and "%|" not in line:
            return line
    return ""


class WorkerPipe:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.serve"], cwd=ROOT, env=ENV, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert json.loads(self.proc.stdout.readline())["event"] == "hello"

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write((request["raw"] if "raw" in request else json.dumps(request)) + "\n")
        self.proc.stdin.flush()
        while True:
            event = json.loads(self.proc.stdout.readline())
            if event["event"] in ("result", "error"):
                return event

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def qgis_runner(work: Path):
    """qgis_process with the plugin installed in a throw-away profile; the engine is this checkout's
    (a wrapper interpreter under the repository, so the plugin starts the worker here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_plugin", ROOT / "scripts" / "build_plugin.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    root = work / "qgis"
    profile = root / "profiles" / "default"
    build.install_zip(build.build_zip(root / "dist"), profile)
    build.enable_plugin(profile)
    wrapper = work / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {**ENV, "QGIS_CUSTOM_CONFIG_PATH": str(root), "SARMAE_PYTHON": str(wrapper),
           "GDAL_PAM_ENABLED": "NO"}  # QGIS would write scene.tif.aux.xml (its statistics) beside the input
    env.pop("PYTHONPATH")
    return lambda args: subprocess.run([QGIS_PROCESS, *args], env=env, capture_output=True, text=True, timeout=300,
                                       cwd=root)


def run_case(case: Case, worker: WorkerPipe | None, qgis) -> tuple[str, str, bool]:
    if case.surface == "cli":
        proc = subprocess.run([sys.executable, "-m", "engine.cli", *case.args], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=600)
        text = proc.stderr + proc.stdout
        errors = [ln for ln in proc.stderr.splitlines() if " error: " in ln]
        message = (errors[-1] if errors else first_line(proc.stderr)) if proc.returncode else \
            next((ln for ln in text.splitlines() if case.expect and case.expect in ln), first_line(proc.stdout))
        return str(proc.returncode), message, "Traceback" in text
    if case.surface == "worker":
        event = worker.ask(case.args)
        if event["event"] == "result":
            return "result", "result", False
        err = event["error"]
        return err["code"], err["message"].splitlines()[0], "traceback" in err
    proc = qgis(case.args)
    text = proc.stdout + proc.stderr
    lines = text.splitlines()
    at = next((k for k, ln in enumerate(lines) if ln.startswith("ERROR:")), None)
    message = first_line(text) if at is None else " ".join(
        ln.strip() for ln in lines[at:at + (2 if "checking parameter values" in lines[at] else 1)])
    return str(proc.returncode), message, "Traceback" in text


def run_battery(quick: bool = False, qgis: bool = True, work: Path = WORK, log=print) -> list[Row]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inputs = make_inputs(work)
    out = work / "out"
    out.mkdir()
    todo = cases(inputs, out, quick, qgis)
    worker = WorkerPipe() if any(c.surface == "worker" for c in todo) else None
    runner = qgis_runner(work) if any(c.surface == "qgis" for c in todo) else None
    before_in = snapshot(work / "in")
    rows = []
    try:
        for case in todo:
            t0 = time.perf_counter()
            code, message, tb = run_case(case, worker, runner)
            after_in = snapshot(work / "in")
            changed = [f"changed in/{k}" for k in before_in if after_in.get(k) != before_in[k]]
            changed += [f"left in/{k}" for k in after_in if k not in before_in]
            left = sorted(f.name for f in out.iterdir())
            if not case.ok:
                changed += [f"left {n}" for n in left]
            else:
                changed += [f"left {n}" for n in left if n.startswith(".")]  # hidden temporaries
            for f in out.iterdir():  # the next case starts from an empty folder
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            row = Row(case, code, message, tb, changed)
            rows.append(row)
            log(f"{'ok ' if row.clean else 'BAD'} {case.surface:<6} {case.name:<38} {code:>8}  "
                f"{'traceback' if tb else '-':<9} {', '.join(changed) or '-':<12} {message[:160]}  "
                f"({time.perf_counter() - t0:.1f} s)")
    finally:
        if worker is not None:
            worker.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every third CLI case, every worker case, one qgis_process case")
    ap.add_argument("--no-qgis", action="store_true", help="leave out the qgis_process cases")
    a = ap.parse_args()
    print(f"{'':3} {'where':<6} {'case':<38} {'exit':>8}  {'traceback':<9} {'files':<12} first line of the message")
    rows = run_battery(a.quick, not a.no_qgis)
    bad = [r for r in rows if not r.clean]
    print(f"\n{len(rows)} cases ({sum(r.case.surface == 'cli' for r in rows)} CLI, "
          f"{sum(r.case.surface == 'worker' for r in rows)} worker, {sum(r.case.surface == 'qgis' for r in rows)} "
          f"qgis_process): {len(rows) - len(bad)} clean, {len(bad)} not")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
