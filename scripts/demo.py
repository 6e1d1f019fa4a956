"""`make demo`: the whole SARMAE workflow on a generated sample scene, or on your raster.

Without --input (about 8 minutes on 2 CPU cores; all budgets are wall-clock limits):
  1. a realistic synthetic dual-pol Sentinel-1-like scene (VV+VH in dB, EPSG:32631, 10 m): open
     water with wind streaks, a coastline and a river, field/forest/urban textures, ships as bright
     point targets with sidelobes, multiplicative speckle; plus ground-truth polygons;
  2. an encoder: the one an earlier demo pretrained (demo_output/models/demo_encoder), else a quick
     SARMAE pretraining on the scene (masked autoencoder + SARE speckle noise);
  3. fine-tuning from the polygons: a water/land segmenter (unlabelled pixels = land) and a ship
     detector, written as model packages into demo_output/models;
  4. segmentation and detection of the scene through `qgis_process` (the plugin's Processing
     algorithms, the plugin installed into a demo-only QGIS profile);
  5. a QGIS project (.qgz) with the styled layers, and a PNG preview rendered by QGIS.
With --input RASTER (no labels): embeddings + PCA preview, the MAE reconstruction, and every
installed model whose input fits (demo_output/models and the QGIS profile's models folder), all
through `qgis_process`, then the same project and preview.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Unable to import Axes3D")  # pip matplotlib beside Debian's toolkits
QGIS_PROCESS = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"
SETTINGS = json.loads((ROOT / "resources" / "demo" / "settings.json").read_text(encoding="utf-8"))
CFAR = SETTINGS["cfar"]  # the demo's CFAR settings (px), also run through Processing
SCALES = SETTINGS["scales"]  # full (make demo) and quick (--quick): scene size, ships, budgets, epochs


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


class Demo:
    def __init__(self, out: Path, scale: dict, fresh_encoder: bool, plugin_models: Path | None = None):
        self.out = out
        self.scale = scale
        self.fresh_encoder = fresh_encoder
        self.models = out / "models"
        self.plugin_models = plugin_models  # the plugin's models folder (--models-folder), also run on a user raster
        self.results = out / "results"
        self.layers: list[dict] = []  # for the project, top first
        self.timings: dict[str, float] = {}
        self._qgis_env: dict | None = None

    # ---- QGIS ---------------------------------------------------------------------------------
    def qgis_env(self) -> dict:
        """qgis_process with the plugin installed into demo_output/qgis_profile (never the user's)."""
        if self._qgis_env is None:
            if not Path(QGIS_PROCESS).exists():
                raise SystemExit(f"qgis_process not found ({QGIS_PROCESS}): install QGIS (make setup does)")
            sys.path.insert(0, str(ROOT / "scripts"))
            import build_plugin

            root = self.out / "qgis_profile"
            zip_path = build_plugin.build_zip(root / "dist")
            profile = root / "profiles" / "default"
            build_plugin.install_zip(zip_path, profile)
            build_plugin.enable_plugin(profile)
            env = {**os.environ, "QGIS_CUSTOM_CONFIG_PATH": str(root), "SARMAE_PYTHON": sys.executable,
                   "QT_QPA_PLATFORM": "offscreen"}
            env.pop("PYTHONPATH", None)
            self._qgis_env = env
        return self._qgis_env

    def qgis_run(self, algorithm: str, params: dict) -> dict:
        """`qgis_process.bin run sarmae:<algorithm> --KEY=VALUE ...`; returns its JSON results."""
        args = [QGIS_PROCESS, "--json", "run", f"sarmae:{algorithm}", "--", *[f"{k}={v}" for k, v in params.items()]]
        print("$ " + " ".join(a if " " not in a else f"'{a}'" for a in args[:4] + args[5:]), flush=True)
        t0 = time.time()
        proc = subprocess.run(args, env=self.qgis_env(), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
            raise SystemExit(f"qgis_process sarmae:{algorithm} failed (exit {proc.returncode}):\n{tail}")
        text = proc.stdout[proc.stdout.find("{"):]
        results = json.loads(text).get("results", {})
        print(f"   done in {time.time() - t0:.0f} s", flush=True)
        return results

    def write_project(self, title: str) -> tuple[Path, Path]:
        spec = {"project": str(self.out / "sarmae_demo.qgz"), "png": str(self.out / "preview.png"), "title": title,
                "layers": self.layers}
        spec_path = self.out / "project_spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_project.py"), str(spec_path)], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"could not write the QGIS project:\n{proc.stderr[-2000:]}")
        return Path(spec["project"]), Path(spec["png"])

    # ---- models -------------------------------------------------------------------------------
    def encoder(self, image: Path) -> Path:
        """The demo's dual-pol encoder: reused when an earlier demo made it, else pretrained now."""
        from engine.package import read_card

        pkg = self.models / "demo_encoder"
        if pkg.is_dir() and not self.fresh_encoder:
            try:
                card = read_card(pkg)
                if card.architecture["encoder"]["in_chans"] == 2:
                    print(f"reusing the encoder an earlier demo pretrained: {pkg} (--fresh-encoder pretrains again)")
                    return pkg
            except Exception as e:  # a damaged package: pretrain again
                print(f"{pkg} is not usable ({e}); pretraining a new encoder")
        from engine.cli import main as sarmae
        from training.config import load_config
        from training.pretrain import pretrain

        run = self.out / "pretrain"
        minutes = self.scale["pretrain_min"]
        print(f"pretraining a ViT-Tiny SARMAE encoder (MAE + SARE) on windows of the scene for {minutes} min "
              "(a real encoder needs hours on many scenes: see README, Pretraining)")
        cfg = load_config("cpu_vit_tiny", [
            f"run.output={json.dumps(str(run))}", f"data.paths={json.dumps([str(image)])}", "model.in_chans=2",
            "data.in_chans=2", "data.windows_per_raster=512", "optim.epochs=30", "optim.batch_size=32",
            "optim.warmup_epochs=1", f"run.max_minutes={minutes}", "run.checkpoint_every_epochs=100",
            "run.log_every_steps=20"])
        if run.exists():
            shutil.rmtree(run)
        summary = pretrain(cfg) or {}
        print(f"pretraining: {json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})}")
        if sarmae(["convert", str(run / "last.pt"), "--output", str(pkg), "--overwrite", "--name", "demo_encoder"]) != 0:
            raise SystemExit("could not convert the pretraining checkpoint into an encoder package")
        # the whole masked autoencoder too: `make demo INPUT=...` shows its reconstruction
        sarmae(["convert", str(run / "last.pt"), "--task", "reconstruct", "--output", str(self.models / "demo_mae"),
                "--overwrite", "--name", "demo_mae"])
        return pkg

    def finetune(self, image: Path, encoder: Path, labels: Path) -> tuple[Path, Path]:
        from training.finetune.cfar_scored import finetune_cfar_scored
        from training.finetune.config import FinetuneConfig
        from training.finetune.segment import finetune_segmenter

        water, ships = split_labels(labels, self.out / "labels")

        def show(row: dict) -> None:
            metric = next((k for k in row if k not in ("epoch", "epochs", "train_loss", "best", "elapsed_s")
                           and k not in ("eta_s", "metric") and isinstance(row[k], (int, float))), None)
            val = f", val {metric} {row[metric]:.3f}" if metric else ""
            print(f"   epoch {row['epoch'] + 1}: loss {row['train_loss']:.3f}{val}", flush=True)

        s = self.scale
        seg = self.models / "demo_water_segmenter"
        print(f"segmenter: water polygons, unlabelled pixels = land, {s['seg_min']} min budget")
        cfg = FinetuneConfig(task="segment", encoder=str(encoder), epochs=s["epochs"], batch_size=16,
                             max_minutes=s["seg_min"], device="cpu", max_chips=600, patience=6)
        r = finetune_segmenter([str(image)], seg, cfg, labels=str(water), class_field="class",
                               classes=["water", "land"], background="land", colours=["#1f78b4", "#b2df8a"],
                               progress=show, overwrite=True)
        print(f"-> {seg}: validation mean IoU {r['val_mean_iou']:.3f} ({r['val_iou']})")
        det = self.models / "demo_ship_detector"
        print(f"detector: ship boxes -> CFAR proposals scored by a small chip CNN (detect.cfar_scored), "
              f"{s['det_min']} min budget")
        cfg = FinetuneConfig(task="detect", epochs=25 if s["epochs"] > 2 else 2, batch_size=128,
                             max_minutes=s["det_min"], device="cpu", bands=[1], input_units="db", seed=0)
        r = finetune_cfar_scored([str(image)], det, cfg, labels=str(ships), class_field="class", classes=["ship"],
                                 progress=show, overwrite=True)
        print(f"-> {det}: {r['proposals']} CFAR proposals (pfa {r['cfar']['pfa']:g}) for {r['targets']} ships, "
              f"{r['epochs']} epochs, score threshold {r['score_threshold']:.2f}")
        self.cfar_beside(image, det, ships)
        return seg, det

    def cfar_beside(self, image: Path, det: Path, ships: Path) -> None:
        """The CFAR detector (no training) as a package beside the fine-tuned one, and both scored
        on the whole scene against the ship boxes (the detector trained on most of it: its row is
        optimistic; CFAR's is not)."""
        from engine.cli import main as sarmae
        from training.evaluate import evaluate_detections

        cfar = self.models / "demo_ship_cfar"
        if sarmae(["init", "--task", "detect", "--method", "cfar", "--pfa", str(CFAR["pfa"]), "--guard",
                   str(CFAR["guard"]), "--background", str(CFAR["background"]), "--classes", "ship", "--name",
                   "demo_ship_cfar", "--output", str(cfar), "--overwrite"]) != 0:
            raise SystemExit("could not write the CFAR detector package")
        ev = evaluate_detections(str(det), [str(image)], self.out / "results" / "ships_pr.png", labels=str(ships),
                                 class_field="class", cfar=CFAR)
        def f(v) -> str:
            return "  -  " if v is None else f"{v:.3f}"

        print("   whole scene, IoU 0.5     mAP@0.5  precision  recall  F1     false alarms/km2")
        for name, row in (("learned (CFAR + scorer)", ev), ("CFAR (no training)", ev["cfar"])):
            print(f"   {name:<22}  {f(row['map_50'])}    {f(row['precision'])}      {f(row['recall'])}   "
                  f"{f(row['f1'])}  {f(row.get('false_alarms_per_km2'))}")

    # ---- the two demos ------------------------------------------------------------------------
    def sample(self) -> str:
        from training.data.synthetic import make_scene

        s = self.scale
        step(f"1/5 a {s['size']}x{s['size']} synthetic dual-pol scene (VV+VH, dB, EPSG:32631, 10 m)")
        scene = make_scene(self.out / "scene", size=s["size"], seed=0, n_ships=s["ships"])
        print(f"scene:  {scene.image}\nlabels: {scene.labels} (water polygons, {len(scene.ships)} ship boxes)")
        step("2/5 encoder")
        t0 = time.time()
        encoder = self.encoder(scene.image)
        self.timings["encoder"] = time.time() - t0
        step("3/5 fine-tuning from the polygons")
        t0 = time.time()
        seg, det = self.finetune(scene.image, encoder, scene.labels)
        self.timings["finetune"] = time.time() - t0
        step("4/5 segmentation and detection through qgis_process (the plugin's Processing algorithms)")
        t0 = time.time()
        res = self.results
        res.mkdir(parents=True, exist_ok=True)
        self.qgis_run("segment", {"INPUT": scene.image, "MODEL": seg, "OUTPUT": res / "water_classes.tif",
                                  "CONFIDENCE": res / "water_confidence.tif", "VECTORS": res / "water_polygons.gpkg",
                                  "MIN_AREA": 50, "DEVICE": 1, "BATCH_SIZE": 8})
        self.qgis_run("detect", {"INPUT": scene.image, "MODEL": det, "OUTPUT": res / "ships.gpkg", "DEVICE": 1})
        self.qgis_run("cfar", {"INPUT": scene.image, "PFA": CFAR["pfa"], "GUARD": CFAR["guard"],
                               "BACKGROUND": CFAR["background"], "OUTPUT": res / "ships_cfar.gpkg"})
        self.timings["qgis_process"] = time.time() - t0
        seg_classes = [["water", "#1f78b4"], ["land", "#b2df8a"]]
        self.layers = [
            {"path": str(res / "ships.gpkg"), "name": "ships (detected)", "role": "detections",
             "classes": [["ship", "#ff3030"]], "group": "SARMAE results"},
            {"path": str(res / "ships_cfar.gpkg"), "name": "ships (CFAR, no training)", "role": "detections",
             "classes": [["ship", "#ffa500"]], "group": "SARMAE results", "visible": False},
            {"path": str(res / "water_polygons.gpkg"), "name": "water polygons", "role": "vectors",
             "classes": seg_classes, "group": "SARMAE results", "visible": False},
            {"path": str(res / "water_classes.tif"), "name": "water / land", "role": "class", "classes": seg_classes,
             "group": "SARMAE results", "opacity": 0.45},
            {"path": str(res / "water_confidence.tif"), "name": "confidence", "role": "confidence",
             "group": "SARMAE results", "visible": False},
            {"path": str(scene.labels), "name": "ground truth", "role": "labels",
             "classes": [["water", "#08306b"], ["ship", "#ffff00"]], "group": "sample scene", "visible": False},
            {"path": str(scene.image), "name": "synthetic S1 (VV, dB)", "role": "input", "group": "sample scene"},
        ]
        return "SARMAE demo: water segmentation and ship detection on a synthetic Sentinel-1 scene"

    def user_raster(self, image: Path) -> str:
        step(f"your raster: {image}")
        res = self.results
        res.mkdir(parents=True, exist_ok=True)
        n_bands, names = raster_bands(image)
        print(f"{n_bands} band(s): {', '.join(names)}")
        from engine.cli import main as sarmae

        step("encoder")
        chans = min(n_bands, 2)
        bands = ",".join(str(i + 1) for i in range(chans))
        enc = self.models / "demo_encoder"
        if not (enc.is_dir() and package_in_chans(enc) == chans):
            enc = self.models / f"random_encoder_{chans}ch"
            if not enc.exists():
                sarmae(["init", "--task", "embed", "--in-chans", str(chans), "--img-size", "128", "--output", str(enc)])
            print(f"no pretrained {chans}-channel encoder yet: using a randomly initialised ViT-Tiny ({enc}); "
                  "its features show backscatter and texture, not semantics. `make demo` without INPUT pretrains one.")
        mae = self.models / "demo_mae"
        step("embed + reconstruct through qgis_process")
        self.qgis_run("embed", {"INPUT": image, "MODEL": enc, "BANDS": bands, "OUTPUT": res / "embedding.tif",
                                "PCA": res / "embedding_pca.tif", "DEVICE": 1})
        self.layers.append({"path": str(res / "embedding_pca.tif"), "name": "embedding (PCA)", "role": "pca",
                            "group": "SARMAE results", "visible": False})
        if package_in_chans(mae) != chans:
            print(f"no {chans}-channel masked autoencoder from an earlier demo ({mae}): no reconstruction")
        else:
            self.qgis_run("reconstruct", {"INPUT": image, "MODEL": mae, "BANDS": bands,
                                          "OUTPUT": res / "reconstruction.tif", "DEVICE": 1})
            self.layers.append({"path": str(res / "reconstruction.tif"), "name": "MAE reconstruction",
                                "role": "reconstruction", "group": "SARMAE results", "visible": False})
        step("installed models")
        for card, folder in installed_models(self.models, self.plugin_models):
            if card["task"] not in ("segment", "detect", "classify"):
                continue
            encoder = card["architecture"].get("encoder")
            want = encoder["in_chans"] if encoder else 1  # a method without a network (CFAR) reads one band
            model_bands = (card.get("input") or {}).get("bands") or []
            if want > n_bands:
                print(f"skipping {card['name']}: it takes {want} channel(s), the raster has {n_bands}")
                continue
            use = ",".join(model_bands) if all(b in names for b in model_bands) and model_bands else \
                ",".join(str(i + 1) for i in range(want))
            name = card["name"]
            classes = [[c["name"], c.get("colour", "#808080")] for c in card.get("classes") or []]
            if card["task"] == "segment":
                self.qgis_run("segment", {"INPUT": image, "MODEL": folder, "BANDS": use, "DEVICE": 1,
                                          "OUTPUT": res / f"{name}_classes.tif",
                                          "CONFIDENCE": res / f"{name}_confidence.tif"})
                self.layers.append({"path": str(res / f"{name}_classes.tif"), "name": f"{name}: classes",
                                    "role": "class", "classes": classes, "group": "SARMAE results", "opacity": 0.5})
            else:
                role = "detections" if card["task"] == "detect" else "grid"
                self.qgis_run(card["task"], {"INPUT": image, "MODEL": folder, "BANDS": use, "DEVICE": 1,
                                             "OUTPUT": res / f"{name}.gpkg"})
                self.layers.insert(0, {"path": str(res / f"{name}.gpkg"), "name": name, "role": role,
                                       "classes": classes, "group": "SARMAE results"})
        self.layers.append({"path": str(image), "name": image.stem, "role": "input", "group": "input"})
        return f"SARMAE demo on {image.name}"


def split_labels(labels: Path, out: Path) -> tuple[Path, Path]:
    """The ground truth as the two label layers an analyst would draw: water polygons, ship boxes."""
    import fiona

    out.mkdir(parents=True, exist_ok=True)
    paths = {"water": out / "water.gpkg", "ship": out / "ships.gpkg"}
    with fiona.open(labels) as src:
        feats = list(src)
        for cls, path in paths.items():
            if path.exists():
                path.unlink()
            with fiona.open(path, "w", driver="GPKG", crs=src.crs, schema=src.schema) as dst:
                dst.writerecords([f for f in feats if f["properties"]["class"] == cls])
    return paths["water"], paths["ship"]


def raster_bands(path: Path) -> tuple[int, list[str]]:
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.count, [d or str(i + 1) for i, d in enumerate(src.descriptions)]
    except rasterio.errors.RasterioIOError as e:
        raise SystemExit(f"{path}: not a raster GDAL can read ({e}); give a GeoTIFF or another GDAL raster") from e


def package_in_chans(pkg: Path) -> int | None:
    try:
        return int(json.loads((pkg / "model.json").read_text())["architecture"]["encoder"]["in_chans"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def installed_models(demo_models: Path, plugin_models: Path | None) -> list[tuple[dict, Path]]:
    """Packages in the demo's models folder and in the plugin's models folder (``--models-folder``)."""
    folders = [demo_models] + ([plugin_models] if plugin_models else [])
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for pkg in sorted(folder.iterdir()):
            try:
                out.append((json.loads((pkg / "model.json").read_text()), pkg))
            except (OSError, ValueError):
                continue
    return out


def plugin_models_folder() -> Path:
    """The models folder the QGIS plugin reads by default: <default QGIS profile>/sarmae/models."""
    return Path.home() / ".local/share/QGIS/QGIS3/profiles/default/sarmae/models"


def install_models(src: Path, dest: Path) -> list[str]:
    """Install every package folder of ``src`` into ``dest`` with the plugin's own
    ``model_store.import_package`` (weights checked, written aside and renamed, an older copy of the
    same name replaced); returns the names installed."""
    from sarmae_qgis.model_store import (
        import_package,  # standard library only: fine in the engine's Python
    )

    return [import_package(pkg, dest, overwrite=True, name=pkg.name).name
            for pkg in sorted(p for p in src.iterdir() if (p / "model.json").is_file())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="your SAR raster (default: a generated sample scene)")
    ap.add_argument("--output", default=str(ROOT / "demo_output"), help="folder for everything (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="tiny scene and budgets (a smoke test, about 2 minutes)")
    ap.add_argument("--fresh-encoder", action="store_true", help="pretrain again even if an earlier demo made one")
    ap.add_argument("--models-folder", default=str(plugin_models_folder()),
                    help="the QGIS plugin's models folder: the demo installs its models there, and --input also runs the "
                         "models found there (default: %(default)s)")
    ap.add_argument("--no-install", action="store_true", help="leave the models in the output folder only")
    a = ap.parse_args()
    t0 = time.time()
    out = Path(a.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    demo = Demo(out, SCALES["quick" if a.quick else "full"], a.fresh_encoder, Path(a.models_folder).expanduser())
    if a.input:
        image = Path(a.input).expanduser().resolve()
        if not image.is_file():
            raise SystemExit(f"{image}: no such file; give the path of a SAR raster (GeoTIFF, SAFE measurement, ...)")
        title = demo.user_raster(image)
    else:
        title = demo.sample()
    step("5/5 QGIS project and preview" if not a.input else "QGIS project and preview")
    qgz, png = demo.write_project(title)
    installed = "" if a.no_install else Path(a.models_folder).expanduser()
    if installed:
        names = install_models(demo.models, installed)
        print(f"installed {len(names)} model(s) into {installed}, the SARMAE plugin's models folder: "
              f"{', '.join(names)}")
    minutes = (time.time() - t0) / 60
    timings = ", ".join(f"{k} {v / 60:.1f} min" for k, v in demo.timings.items())
    print(f"\nDone in {minutes:.1f} min{' (' + timings + ')' if timings else ''}. Everything is in {out}:\n"
          f"  QGIS project: {qgz}\n      open it:  qgis {qgz}\n  preview:      {png}\n"
          f"  models:       {demo.models}"
          + (f" (installed into {installed}: the plugin lists them)\n" if installed else
             " (install them in QGIS: Raster > SARMAE > Models… > Import folder)\n") +
          f"  results:      {demo.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
