"""`make demo`: the best end-to-end path that exists, on a sample scene or on your raster.

Without --input: makes a realistic synthetic dual-pol Sentinel-1-like scene (water, land textures,
ships with sidelobes, speckle) with ground-truth polygons, then runs the engine on it. With
--input: the same on your raster. What runs today (the plugin issue will extend it):
  1. an encoder package (the newest pretrained one under demo_output/models if any, else a
     randomly initialised ViT-Tiny, said plainly),
  2. `embed`: per-patch features + an RGB PCA preview,
  3. `similarity`: cosine similarity to a query point (the darkest region of the scene by default),
  4. `reconstruct`: what the MAE sees (random decoder unless a pretrained package exists),
  5. a PNG preview of input, PCA, similarity and reconstruction side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Unable to import Axes3D")  # pip matplotlib beside Debian's toolkits


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def init_package(task: str, out: Path, in_chans: int, bands: list[str], units: str) -> Path:
    from engine.cli import main as sarmae

    if not out.exists():
        args = ["init", "--arch", "vit_tiny_patch16", "--task", task, "--in-chans", str(in_chans), "--units", units,
                "--bands", ",".join(bands), "--img-size", "224", "--output", str(out)]
        if task == "reconstruct":
            args += ["--decoder-depth", "2", "--decoder-dim", "256"]
        if sarmae(args) != 0:
            raise SystemExit(f"could not create {out}")
    return out


def preview(paths: dict[str, Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio

    fig, axes = plt.subplots(1, len(paths), figsize=(5 * len(paths), 5))
    for ax, (title, p) in zip(np.atleast_1d(axes), paths.items()):
        with rasterio.open(p) as src:
            step_ = max(1, max(src.height, src.width) // 1024)
            a = src.read(out_shape=(src.count, src.height // step_, src.width // step_)).astype(np.float32)
        if a.shape[0] == 3 and a.dtype == np.float32 and title.startswith("PCA"):
            ax.imshow(np.moveaxis(a, 0, -1).astype(np.uint8))
        else:
            band = a[0]
            lo, hi = np.nanpercentile(band, 2), np.nanpercentile(band, 98)
            ax.imshow(band, cmap="magma" if "similarity" in title else "gray", vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="your SAR raster (default: a generated sample scene)")
    ap.add_argument("--output", default=str(ROOT / "demo_output"), help="folder for everything (default: %(default)s)")
    ap.add_argument("--size", type=int, default=1024, help="sample scene size in px (default: %(default)s)")
    a = ap.parse_args()
    t0 = time.time()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    import rasterio

    from engine.inference import InferenceOptions, run_inference
    from engine.similarity import run_similarity

    if a.input:
        image = Path(a.input)
        step(f"your raster: {image}")
    else:
        from training.data.synthetic import make_scene

        step(f"making a {a.size}x{a.size} synthetic dual-pol scene (VV+VH, dB, EPSG:32631, 10 m)")
        scene = make_scene(out / "scene", size=a.size, seed=0)
        image = scene.image
        print(f"scene:  {scene.image}\nlabels: {scene.labels} (water polygons, {len(scene.ships)} ship boxes)")
    with rasterio.open(image) as src:
        count = src.count
        descr = [d or f"band{i + 1}" for i, d in enumerate(src.descriptions)]
    in_chans = min(count, 2)
    bands = descr[:in_chans]
    from engine.radiometry import detect_units
    from engine.reader import SarRaster

    with SarRaster.open([str(image)], list(range(1, in_chans + 1))) as r:
        units, reason = detect_units(r)
    units = units if units in ("db", "linear_power", "amplitude", "uint8") else "db"
    print(f"input: {count} band(s) {descr}, units {units} ({reason}); using {'+'.join(bands)}")

    models = out / "models"
    step("encoder package")
    emb = init_package("embed", models / f"encoder_{in_chans}ch_{units}", in_chans, bands, units)
    rec = init_package("reconstruct", models / f"mae_{in_chans}ch_{units}", in_chans, bands, units)
    print(f"using {emb.name}: randomly initialised ViT-Tiny (no pretrained encoder yet: `sarmae pretrain` "
          "will make one); random ViT features already separate backscatter and texture, not semantics")

    opts = InferenceOptions(bands=list(range(1, in_chans + 1)), overwrite=True, batch_size=8)
    res = out / "results"
    step("embed: per-patch features (stride 16) + PCA preview")
    r_emb = run_inference([str(image)], res / "embedding.tif", emb, opts)
    print(f"{r_emb.outputs}  ({r_emb.timings['total_s']:.1f} s)")

    step("similarity to the darkest region (typically open water)")
    with rasterio.open(image) as src:
        small = src.read(1, out_shape=(64, 64)).astype(np.float64)
        small[~np.isfinite(small)] = np.inf
        rr, cc = np.unravel_index(np.argmin(small), small.shape)
        x, y = src.xy(int((rr + 0.5) * src.height / 64), int((cc + 0.5) * src.width / 64))
    r_sim = run_similarity(res / "embedding.tif", res / "similarity.tif", (x, y), overwrite=True)
    print(f"query point ({x:.1f}, {y:.1f}) -> {r_sim['output']}")

    step("reconstruct: the masked autoencoder's view (75 % of patches hidden)")
    r_rec = run_inference([str(image)], res / "reconstruction.tif", rec, opts)
    print(f"{r_rec.outputs}  ({r_rec.timings['total_s']:.1f} s)")

    step("preview")
    png = out / "preview.png"
    preview({"input (band 1)": image, "PCA of embeddings": Path(r_emb.outputs["pca"]),
             "similarity to query": res / "similarity.tif", "MAE reconstruction": res / "reconstruction.tif"}, png)
    print(f"\nDone in {time.time() - t0:.0f} s. Everything is in {out}:\n  preview: {png}\n  rasters: {res}\n"
          f"Open the GeoTIFFs in QGIS (Layer > Add Raster Layer), or run `sarmae --help` for more.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
