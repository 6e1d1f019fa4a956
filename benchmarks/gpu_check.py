"""The GPU check: what ``benchmarks/gpu_check.sh`` runs, one JSON summary at the end.

1. inference: the engine's torch backend (bf16 autocast on CUDA) over a generated SIZE^2 x 2 raster,
   ViT-Tiny segmentation, window 224, overlap 0.25: windows/s end to end and model only, their ratio
   (efficiency; the reader thread must keep the GPU fed), peak GPU memory, and the GPU busy share
   (nvidia-smi utilisation sampled every 0.2 s while the model runs; model time / total without it).
2. pretraining: one epoch of MAE steps (AdamW, bf16 autocast) over generated chips, with 75 % of the
   tokens masked (what pretraining runs) and with none masked (all tokens): images/s for each.
3. torchrun: ``python -m torch.distributed.run --nproc_per_node 1 -m engine.distributed`` over a
   smaller raster: the scale-out path starts, runs and merges on this machine.

``--dry-run`` runs the same code at a tiny scale on whatever device is there (CPU included), in
well under a minute: what the tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, big_scene, small_package


class GpuSampler:
    """nvidia-smi utilisation.gpu sampled on a thread (None without nvidia-smi)."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.samples, self.stop = every_s, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                self.available = False
                return
            self.stop.wait(self.every_s)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def busy_share(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100.0 if self.available and self.samples else None


def _scene(work: Path, size: int) -> Path:
    return big_scene(work / f"scene{size}.tif", size, tile=min(1024, size))


def _package(work: Path, depth: int, img: int) -> Path:
    return small_package(work / f"seg_d{depth}_{img}.pkg", "segment", depth=depth, img=img)


def inference(work: Path, size: int, batch: int, device: str, depth: int, img: int) -> dict:
    import torch

    from engine.backends import TorchBackend
    from engine.inference import InferenceOptions, run_inference
    from engine.package import load_package

    raster = _scene(work, size)
    pkg = load_package(_package(work, depth, img), device="cpu")
    backend = TorchBackend(pkg.model, "segment", device)  # bf16 autocast on CUDA (where supported)
    cuda = backend.device.startswith("cuda")
    x = __import__("numpy").zeros((batch, 2, img, img), "float32")
    for _ in range(3):  # warm-up: kernels, cuDNN choices
        backend.run(x)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    opts = InferenceOptions(batch_size=batch, overlap=0.25, device=device, overwrite=True)
    with GpuSampler() as sampler:
        res = run_inference(str(raster), work / "seg.tif", pkg, opts, backend=backend)
    n = len(__import__("engine.tiling", fromlist=["plan_tiles"]).plan_tiles(size, size, img, 0.25).windows)
    total, model = res.timings["total_s"], res.timings["model_s"]
    return {"raster": f"{size}x{size}x2 float32", "window": img, "windows": n, "batch": batch, "backend": res.provenance["backend"],
            "windows_per_s": n / total, "model_windows_per_s": n / model, "efficiency": model / total,
            "peak_gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "gpu_busy_share": sampler.busy_share(),
            "gpu_samples": len(sampler.samples)}


def pretraining(n_chips: int, batch: int, device: str, img: int, depth: int, decoder: dict | None) -> dict:
    import torch

    from engine.models import create_model

    torch.manual_seed(0)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model("mae_vit_tiny_patch16", in_chans=2, img_size=img, depth=depth, decoder=decoder).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    chips = torch.randn(n_chips, 2, img, img)  # generated chips (speed does not depend on the content)
    amp = dev.type == "cuda"
    out = {"chips": n_chips, "batch": batch, "img": img, "device": str(dev), "amp": "bf16" if amp else None}
    def step(xb, ratio: float):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(xb, mask_ratio=ratio).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for name, ratio in (("masked_0.75", 0.75), ("all_tokens", 0.0)):
        step(chips[:batch].to(dev), ratio)  # untimed: optimizer state and kernel set-up are not the phase's cost
        steps = 0
        if amp:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, n_chips, batch):
            loss = step(chips[i:i + batch].to(dev, non_blocking=True), ratio)
            steps += 1
        if amp:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[name] = {"images_per_s": n_chips / dt, "steps": steps, "seconds": dt, "loss": float(loss.detach())}
    return out


def torchrun(work: Path, size: int, depth: int, img: int, timeout_s: float) -> dict:
    raster = _scene(work, size)
    pkg = _package(work, depth, img)
    out, rec = work / "dist.tif", work / "dist.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
           "engine.distributed", str(raster), "--model", str(pkg), "--output", str(out), "--result", str(rec),
           "--options", json.dumps({"batch_size": 8, "overwrite": True})]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    res = {"returncode": proc.returncode, "seconds": time.perf_counter() - t0, "command": " ".join(cmd[1:6]) + " ..."}
    if proc.returncode == 0 and rec.exists():
        r = json.loads(rec.read_text())
        res.update(outputs=sorted(r["outputs"]), backend=r["provenance"]["backend"], model_s=r["timings"]["model_s"])
    else:
        res["stderr_tail"] = proc.stderr[-2000:]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny scale, any device (CPU included): under a minute")
    p.add_argument("--output", default="gpu_check.json", help="the JSON summary (default: %(default)s)")
    p.add_argument("--work", help="folder for the generated rasters and packages (default: a temporary one)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    dry = a.dry_run
    cfg = (dict(size=256, window=64, batch=4, depth=2, chips=8, chip_batch=4, img=32, pre_depth=1,
                decoder={"embed_dim": 32, "depth": 1, "num_heads": 1}, dist_size=128)
           if dry else dict(size=8192, window=224, batch=64, depth=12, chips=4096, chip_batch=256, img=224,
                            pre_depth=12, decoder=None, dist_size=4096))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sarmae_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    summary: dict = {"dry_run": dry, "config": cfg, "python": sys.version.split()[0], "torch": torch.__version__,
                     "cuda": torch.cuda.is_available(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    t0 = time.perf_counter()
    for name, fn in (("inference", lambda: inference(work, cfg["size"], cfg["batch"], a.device, cfg["depth"],
                                                     cfg["window"])),
                     ("pretraining", lambda: pretraining(cfg["chips"], cfg["chip_batch"], a.device, cfg["img"],
                                                         cfg["pre_depth"], cfg["decoder"])),
                     ("torchrun", lambda: torchrun(work, cfg["dist_size"], cfg["depth"], cfg["window"],
                                                   60 if dry else 240))):
        t1 = time.perf_counter()
        try:
            summary[name] = fn()
        except Exception as e:  # one failed part must not hide the others' figures
            summary[name] = {"error": f"{type(e).__name__}: {e}"}
        summary[name]["wall_s"] = time.perf_counter() - t1
        print(f"{name}: {json.dumps(summary[name])}", file=sys.stderr)
    summary["total_s"] = time.perf_counter() - t0
    tmp = Path(a.output).with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, a.output)
    print(json.dumps(summary, indent=1))
    failed = [k for k in ("inference", "pretraining", "torchrun") if "error" in summary[k]
              or summary[k].get("returncode", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
