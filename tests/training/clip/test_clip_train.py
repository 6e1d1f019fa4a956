"""``sarmae finetune --task clip``: the contrastive loop learns, resumes exactly, and writes a zeroshot package."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clipdata import class_chips, tiny_model

from engine.errors import SarmaeError
from training.clip.caption_sources import make_captions
from training.clip.captions import read_table
from training.clip.config import ClipConfigError, ClipTrainConfig
from training.clip.train import PairData, contrastive_step, start_model, train_clip

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture()
def table(tmp_path):
    chips = class_chips(tmp_path / "chips", n=12)
    src = [{"kind": "chips", "name": "toy", "path": str(chips), "phrase": "a {cls} target"}]
    make_captions(src, tmp_path / "captions.csv", val_fraction=0.25)
    return tmp_path / "captions.csv"


def cfg_for(table, **kw) -> ClipTrainConfig:
    d = {"pairs": str(table), "model": tiny_model(32), "img_size": 32, "batch_size": 9, "lr": 5e-3, "warmup_steps": 1,
         "epochs": 3, "augment": False, "seed": 0}
    return ClipTrainConfig.from_dict({**d, **kw})


def full_loss(cfg, model, card) -> float:
    """The contrastive loss of all training pairs in one batch (eval mode)."""
    from open_clip.loss import ClipLoss

    from engine.clip import clip_model

    data = PairData(read_table(cfg.pairs).subset("train"), card, clip_model(model, card).tokenizer)
    model.eval()
    with torch.no_grad():
        return float(contrastive_step(model, ClipLoss(), data.x.float(), data.caption_id, data.tokens)[0])


def step_losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_training_lowers_the_loss_and_writes_a_zeroshot_package(tmp_path, table):
    from engine.clip import load_clip

    cfg = cfg_for(table, max_steps=6)
    model, card = start_model(cfg)  # the same seeded start as train_clip's
    before = full_loss(cfg, model, card)
    r = train_clip(cfg, tmp_path / "clip.pkg")
    clip = load_clip(r["package"])
    after = full_loss(cfg, clip.model, clip.card)
    assert after < before - 0.1, (before, after)
    assert clip.card.task == "zeroshot" and clip.card.input["units"] == "db"
    prov = clip.card.provenance
    assert prov["steps"] == 6 and prov["train_rows"] == 27 and prov["val_rows"] == 9
    assert set(prov["metrics"]["validation"]["zeroshot"]["toy"]) >= {"top1", "top5", "mean_per_class"}
    assert (Path(r["package"]) / "metrics.csv").is_file()
    with pytest.raises(SarmaeError, match="exists"):
        train_clip(cfg, tmp_path / "clip.pkg")
    # --init: training goes on from the package's weights, card and tokenizer
    again, card2 = start_model(cfg_for(table, init=r["package"], max_steps=1))
    assert card2.name == clip.card.name
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), clip.model.state_dict().values()))
    r2 = train_clip(cfg_for(table, init=r["package"], max_steps=1), tmp_path / "more.pkg")
    assert load_clip(r2["package"]).card.provenance["start"] == r["package"]
    from engine.errors import PackageError

    other, _ = encoder_package(tmp_path / "embed.pkg", 1)
    with pytest.raises(PackageError, match="not a CLIP"):
        start_model(cfg_for(table, init=str(other)))


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_losses(tmp_path, table):
    ref = train_clip(cfg_for(table, augment=True), tmp_path / "ref.pkg")
    assert ref["steps"] == 9
    part = train_clip(cfg_for(table, augment=True, max_steps=4), tmp_path / "part.pkg")
    assert part["steps"] == 4
    with pytest.raises(SarmaeError, match="different settings"):
        train_clip(cfg_for(table, augment=True, lr=1e-2), tmp_path / "part.pkg", resume=True)
    train_clip(cfg_for(table, augment=True), tmp_path / "part.pkg", resume=True)
    a, b = step_losses(tmp_path / "ref.pkg.run"), step_losses(tmp_path / "part.pkg.run")
    assert [s for s, _ in b] == list(range(1, 10))
    assert np.allclose([v for _, v in a], [v for _, v in b], rtol=0, atol=1e-5)


def test_bad_settings_are_refused_before_training(tmp_path, table):
    with pytest.raises(ClipConfigError, match="one start"):
        cfg_for(table, init="a.pkg", encoder="b.pkg")
    with pytest.raises(ClipConfigError, match="unknown CLIP training options"):
        ClipTrainConfig.from_dict({"pairs": "x.csv", "learning_rate": 1})
    with pytest.raises(SarmaeError, match="make no batch"):
        train_clip(cfg_for(table, batch_size=64), tmp_path / "p.pkg")
    with pytest.raises(SarmaeError, match="nothing to resume"):
        train_clip(cfg_for(table), tmp_path / "q.pkg", resume=True)


@pytest.mark.slow
def test_cli_captions_finetune_evaluate(tmp_path):
    chips = class_chips(tmp_path / "chips", n=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "engine.cli", *a], env=env, cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True)
    r = run("captions", "--class-folders", str(chips), "-o", str(tmp_path / "c.csv"), "--val-fraction", "0.25")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("finetune", "--task", "clip", "--pairs", str(tmp_path / "c.csv"), "-o", str(tmp_path / "m.pkg"),
            "--clip-config", json.dumps(tiny_model(32)), "--img-size", "32", "--batch-size", "6", "--max-steps", "2",
            "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("evaluate", str(tmp_path / "m.pkg"), "--pairs", str(tmp_path / "c.csv"), "--baselines",
            "--chips", str(chips), "--report", str(tmp_path / "z.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["chips"]["n"] == 24 and out["pairs"]["rows"] == 6
    assert {"image_to_text_r5", "text_to_image_r5", "mean_r10"} <= set(out["pairs"]["retrieval"])
    assert "logistic_regression_on_image_embedding" in out["pairs"]["baselines"]["chips"]
    assert (tmp_path / "z.png").is_file()


def encoder_package(dest: Path, in_chans: int) -> Path:
    from engine.models import create_model
    from engine.package import default_input, new_card, save_package

    torch.manual_seed(1)
    enc = create_model("vit_tiny_patch16", in_chans=in_chans, img_size=32, depth=2)
    with torch.no_grad():  # a trained encoder has a patch bias, cls token and norms far from their init
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    arch = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict()}
    card = new_card("tiny-encoder", "embed", arch, default_input(in_chans, "db"), [], {})
    save_package(enc.state_dict(), card, dest)
    return dest, enc


@pytest.mark.parametrize("bands", [["VV"], ["VV", "VH"]])
def test_sarmae_encoder_is_the_image_tower_exactly(tmp_path, table, bands):
    from training.clip.sarmae_tower import tower_features

    pkg, enc = encoder_package(tmp_path / "enc.pkg", len(bands))
    model, card = start_model(cfg_for(table, encoder=str(pkg), bands=bands, model={}))
    assert card.input["bands"] == bands and card.provenance["image_tower"]["tensors"] == 5 + 2 * 12
    x = torch.randn(3, len(bands), 32, 32)
    x3 = x.repeat(1, 3, 1, 1) if len(bands) == 1 else torch.cat([x, x.mean(1, keepdim=True)], dim=1)
    enc.eval()
    model.eval()
    with torch.no_grad():
        want = enc.forward_features(x)[:, 0]
        got = tower_features(model, x3)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    r = train_clip(cfg_for(table, encoder=str(pkg), bands=bands, model={}, max_steps=1), tmp_path / "c.pkg")
    from engine.clip import load_clip

    assert load_clip(r["package"]).card.architecture.extra["clip"]["config"]["vision_cfg"]["no_ln_pre"] is True


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, table):
    """torchrun: ClipLoss gathers every rank's features, so two ranks of 4 pairs train as one of 8
    (a ViT tower: a ResNet's BatchNorm would see 4-pair statistics)."""
    from engine.clip import TINY_CONFIG

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = ["finetune", "--task", "clip", "--pairs", str(table), "--clip-config", json.dumps(TINY_CONFIG),
              "--img-size", "32", "--batch-size", "8", "--epochs", "2", "--lr", "0.005", "-q"]
    one = subprocess.run([sys.executable, "-m", "engine.cli", *common, "-o", str(tmp_path / "one.pkg")], env=env,
                         cwd=REPO, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "engine.cli"]
    two = subprocess.run([*torchrun, *common, "-o", str(tmp_path / "two.pkg")], env=env, cwd=REPO,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = step_losses(tmp_path / "one.pkg.run"), step_losses(tmp_path / "two.pkg.run")
    assert len(a) == len(b) == 6
    assert np.allclose([v for _, v in a], [v for _, v in b], rtol=1e-4, atol=1e-5), (a, b)


def test_caption_loss_treats_rows_with_one_caption_as_positives_of_each_other():
    import math

    import torch
    from open_clip.loss import ClipLoss

    from training.clip.train import caption_loss

    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    inverse = torch.tensor([0, 0, 1, 1])  # two images per caption, each image on its caption
    img = txt[inverse].clone()
    scale = torch.tensor(100.0)
    # image -> text: nothing left to learn (the 2 distinct captions); text -> image: log 2, the floor of two
    # equally good positives. ClipLoss makes the duplicated caption a negative: log 2 on both sides.
    assert caption_loss(img, txt, inverse, scale).item() == pytest.approx(math.log(2) / 2, abs=1e-4)
    assert ClipLoss()(img, txt[inverse], scale).item() == pytest.approx(math.log(2), abs=1e-4)
    swapped = txt[torch.tensor([1, 1, 0, 0])]
    assert caption_loss(swapped, txt, inverse, scale) > 10
