"""Pretraining: learning happens, resume after a kill repeats the uninterrupted losses, 2 CPU
processes (DDP, gloo) match one process with the same global batch, SARC with local teachers,
clear errors before training starts."""

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from engine.models import create_model
from training.config import ConfigError, load_config
from training.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.img_size=32", "model.in_chans=1", "model.depth=2", "model.decoder_dim=32", "model.decoder_depth=1",
        "model.decoder_heads=2", "optim.batch_size=8", "optim.warmup_epochs=1", "optim.lr=1e-3",
        "run.log_every_steps=1", "run.checkpoint_every_epochs=0", "run.preview_samples=2"]


def chips(root: Path, n: int = 32, size: int = 32, seed: int = 0, channels: int = 1) -> Path:
    """Speckled 8-bit chips with a bright square at a random place (something to reconstruct)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((size, size), 40.0)
        r, c = rng.integers(0, size - 10, 2)
        img[r:r + 10, c:c + 10] = 200.0
        img = np.clip(img * rng.gamma(4, 0.25, img.shape), 0, 255).astype(np.uint8)
        path = root / f"chip{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path, "w", driver="PNG", width=size, height=size, count=channels, dtype="uint8") as d:
                d.write(np.repeat(img[None], channels, 0))
    return root


def losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def config(tmp_path, data, *extra):
    return load_config("cpu_vit_tiny", [*TINY, f"data.paths=['{data}']", f"run.output={tmp_path / 'run'}", *extra])


def test_learns_and_writes_feedback(tmp_path):
    data = chips(tmp_path / "chips")
    summary = pretrain(config(tmp_path, data, "optim.epochs=6", "run.epoch_size=32"))
    run = tmp_path / "run"
    ls = [v for _, v in losses(run)]
    assert summary["step"] == 24 and len(ls) == 24
    assert np.mean(ls[-4:]) < 0.7 * np.mean(ls[:4])  # the reconstruction loss falls
    for name in ("config.yaml", "last.pt", "loss_curves.png", "reconstructions.png"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())


def test_encoder_package_from_own_checkpoint(tmp_path):
    from engine.convert import convert_checkpoint
    from engine.package import load_package

    data = chips(tmp_path / "chips")
    pretrain(config(tmp_path, data, "optim.epochs=1", "run.epoch_size=16"))
    report = convert_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "enc")
    assert report.fraction == 1.0
    pkg = load_package(tmp_path / "enc")
    assert pkg.card.input["units"] == "uint8" and pkg.card.input["clip"] == [0.0, 255.0]
    convert_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "rec", task="reconstruct")
    rec = load_package(tmp_path / "rec")
    assert rec.card.architecture["decoder"]["num_heads"] == 2  # from the checkpoint, not guessed


def test_conv_stem_with_acquisition_views_pretrains_converts_and_fine_tunes(tmp_path):
    """model.arch vit_tiny_conv8 (ConvStem, 8 px tokens) with data.acquisition: the run learns, its
    checkpoint converts to an encoder package that describes the stem, and fine-tuning loads it."""
    import torch

    from engine.convert import convert_checkpoint
    from engine.package import load_package
    from training.data.sare import SAREConfig
    from training.finetune.common import load_encoder
    from training.finetune.config import FinetuneConfig
    from training.pretrain import prepare_batch

    data = chips(tmp_path / "chips")
    cfg = config(tmp_path, data, "model.arch=vit_tiny_conv8", "data.acquisition=1.0", "optim.epochs=4",
                 "run.epoch_size=32")
    items = {"sar": torch.rand(4, 1, 32, 32), "optical": torch.zeros(4, 1), "paired": torch.zeros(4)}
    idx = torch.arange(4)
    plain = config(tmp_path, data, "model.arch=vit_tiny_conv8")
    b0 = prepare_batch(items, idx, 0, plain, SAREConfig(enabled=False), 16, "cpu")
    b1 = prepare_batch(items, idx, 0, cfg, SAREConfig(enabled=False), 16, "cpu")
    assert torch.equal(b0.clean, b0.noised) and torch.equal(b1.clean, b1.noised)  # SARE off: the same view
    assert not torch.allclose(b0.clean, b1.clean)  # the acquisition view is the target too
    summary = pretrain(cfg)
    ls = [v for _, v in losses(tmp_path / "run")]
    assert summary["step"] == 16 and np.mean(ls[-3:]) < np.mean(ls[:3])
    convert_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "enc")
    enc = load_package(tmp_path / "enc")
    assert enc.card.architecture["name"] == "vit_tiny_conv8"
    assert enc.card.architecture["encoder"]["stem"] == "conv" and enc.card.patch_size == 8
    loaded = load_encoder(FinetuneConfig(encoder=str(tmp_path / "enc"), img_size=48, in_chans=2))
    assert loaded.model.cfg.stem == "conv" and loaded.model.grid == (6, 6)
    assert "1->2 channels" in loaded.report
    with pytest.raises(ConfigError, match="unknown ViT architecture 'vit_tiny_hex16'"):
        pretrain(config(tmp_path, data, "model.arch=vit_tiny_hex16", f"run.output={tmp_path / 'bad'}"))


def _cli(*args):
    return [sys.executable, "-m", "engine.cli", "pretrain", "-q", "--config", "cpu_vit_tiny", *args]


@pytest.mark.slow
def test_resume_after_kill_repeats_the_losses(tmp_path):
    data = chips(tmp_path / "chips")
    common = [*TINY, "optim.epochs=3", "run.epoch_size=32", "run.checkpoint_every_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cli("--data", str(data), "--output", str(ref), *common), check=True, env=env, cwd=REPO,
                   capture_output=True)
    run = tmp_path / "killed"
    p = subprocess.Popen(_cli("--data", str(data), "--output", str(run), *common), env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it mid-epoch 1 (steps 5..7 of 12)
        if (run / "metrics.csv").exists() and len(losses(run)) >= 6:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(losses(run))
    assert 0 < done < 12, f"the run was not killed mid-way ({done} steps)"
    subprocess.run(_cli("--data", str(data), "--output", str(run), "--resume", *common), check=True, env=env,
                   cwd=REPO, capture_output=True)
    a, b = losses(ref), losses(run)
    assert [s for s, _ in b] == list(range(1, 13))
    assert np.allclose([v for _, v in a], [v for _, v in b], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    data = chips(tmp_path / "chips", n=32)
    common = [*TINY, "optim.epochs=2", "run.epoch_size=32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(_cli("--data", str(data), "--output", str(one), *common, "optim.batch_size=16"), check=True,
                   env=env, cwd=REPO, capture_output=True)
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "engine.cli", "pretrain", "-q", "--config", "cpu_vit_tiny"]
    r = subprocess.run(torchrun + ["--data", str(data), "--output", str(two), *common, "optim.batch_size=8"],
                       env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert np.allclose([v for _, v in a], [v for _, v in b], rtol=1e-4, atol=1e-5)


def save_teacher(path: Path, width: int = 64) -> Path:
    from safetensors.torch import save_file

    vit = create_model("vit_base_patch16", in_chans=3, img_size=32, depth=1, embed_dim=width, num_heads=2)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("mode", ["patchembed", "full"])
def test_sarc_with_local_teacher(tmp_path, mode):
    import json

    sar = chips(tmp_path / "sar", n=16)
    opt = chips(tmp_path / "opt", n=16, seed=1, channels=3)
    pairs = {"paired": [{"sar": str(sar / f"chip{i:03d}.png"), "optical": str(opt / f"chip{i:03d}.png")} for i in range(12)],
             "unpaired": [str(sar / f"chip{i:03d}.png") for i in range(12, 16)]}
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    teacher = save_teacher(tmp_path / "teacher.safetensors")
    cfg = load_config("cpu_vit_tiny", [*TINY, f"data.pairs={tmp_path / 'pairs.json'}", f"run.output={tmp_path / 'run'}",
                                       "optim.epochs=2", "run.epoch_size=16", "sarc.enabled=true",
                                       f"sarc.teacher_path={teacher}", f"sarc.teacher_mode={mode}"])
    pretrain(cfg)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    sarc = [float(r["loss_sarc"]) for r in rows]
    assert all(np.isfinite(sarc)) and max(sarc) > 0
    assert all(float(r["loss"]) > float(r["loss_mae"]) for r in rows)


def test_bad_inputs_fail_before_training(tmp_path):
    from engine.errors import SarmaeError

    (tmp_path / "empty").mkdir()
    with pytest.raises(SarmaeError, match="empty"):
        pretrain(config(tmp_path, tmp_path / "empty"))
    data = chips(tmp_path / "chips", n=4)
    with pytest.raises(SarmaeError, match="larger than the dataset"):
        pretrain(config(tmp_path, data))
    data = chips(tmp_path / "more", n=16)
    with pytest.raises(SarmaeError, match="teacher_path|teacher weights not found"):
        pretrain(config(tmp_path, data, "sarc.enabled=true", f"data.pairs={tmp_path / 'nope.json'}",
                        f"sarc.teacher_path={tmp_path / 'missing.safetensors'}"))
    pretrain(config(tmp_path, data, "optim.epochs=1", "run.epoch_size=8"))
    with pytest.raises(SarmaeError, match="different config"):
        pretrain(config(tmp_path, data, "optim.epochs=1", "run.epoch_size=8", "optim.lr=5e-4"))
    with pytest.raises(SarmaeError, match="--resume"):
        pretrain(config(tmp_path, data, "optim.epochs=1", "run.epoch_size=8"))
    with pytest.raises(ConfigError, match="unknown model options"):
        load_config("cpu_vit_tiny", ["model.widht=3"])
    with pytest.raises(ConfigError, match="preset"):
        load_config("no_such_preset")
