"""CLIP packages (engine.clip): the card, open_clip model, input scaling, prompts and `sarmae init --clip`."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from engine.clip import (
    TINY_CONFIG,
    PromptError,
    build_clip,
    clip_card,
    load_clip,
    prepare_images,
    save_clip_package,
    text_embeddings,
)
from engine.errors import ModelConfigError, PackageError


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    card = clip_card("tiny-clip", config=TINY_CONFIG, provenance={"training": "none: unit tests"})
    model = build_clip(card).eval()
    path = save_clip_package(model, card, tmp_path_factory.mktemp("clip") / "pkg")
    return model, path


def test_package_round_trip_gives_open_clip_embeddings(tiny_clip):
    import open_clip

    model, path = tiny_clip
    clip = load_clip(path)
    card = json.loads((path / "model.json").read_text())
    assert card["task"] == "zeroshot" and card["architecture"]["clip"]["config"] == TINY_CONFIG
    assert card["architecture"]["encoder"] == {"in_chans": 3, "img_size": 32, "patch_size": 16, "embed_dim": 64,
                                               "depth": 1, "num_heads": 2}
    assert len(card["weights"]["sha256"]) == 64
    x = torch.randn(2, 3, 32, 32)
    tokens = open_clip.tokenize(["ships at sea", "flooded fields"])
    with torch.no_grad():
        ref_img = model.encode_image(x, normalize=True)
        ref_txt = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(clip.encode_images(x), ref_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(clip.encode_text(["ships at sea", "flooded fields"]), ref_txt, atol=1e-6, rtol=0)
    assert clip.templates == ["this is an SAR image of {} ."] and clip.embed_dim == 32


def test_sarclip_scaling_per_band_with_the_mean_as_third_channel():
    card = clip_card("s", config=TINY_CONFIG, source="sarclip", bands=["VV", "VH"])
    vv = np.array([[-25.0, -12.5], [0.0, 10.0]], np.float32)
    vh = np.array([[-32.5, -20.0], [-7.5, np.nan]], np.float32)
    t = prepare_images(np.stack([np.kron(vv, np.ones((16, 16))), np.kron(vh, np.ones((16, 16)))]), card)
    assert t.shape == (1, 3, 32, 32)
    got = t[0, :, ::16, ::16].numpy()
    want_vv = np.clip((vv + 25) / 25, 0, 1) * 2 - 1
    want_vh = np.clip((np.nan_to_num(vh) + 32.5) / 25, 0, 1) * 2 - 1
    np.testing.assert_allclose(got[0, :, :], np.where(np.isnan(vh), 0, want_vv), atol=1e-6)  # nodata -> 0
    np.testing.assert_allclose(got[1][~np.isnan(vh)], want_vh[~np.isnan(vh)], atol=1e-6)
    mean = ((want_vv + 1) / 2 + (want_vh + 1) / 2) / 2 * 2 - 1
    np.testing.assert_allclose(got[2][~np.isnan(vh)], mean[~np.isnan(vh)], atol=1e-6)


def test_single_band_and_sarvlm_scaling():
    one = clip_card("s1", config=TINY_CONFIG, source="sarclip", bands=["HH"])
    x = np.full((1, 32, 32), -10.0, np.float32)
    t = prepare_images(x, one)
    np.testing.assert_allclose(t.numpy(), ((-10 + 25) / 30) * 2 - 1, atol=1e-6)  # (x + 25) / 30 in all 3 channels
    vlm = clip_card("v", config=TINY_CONFIG, source="sarvlm")
    assert vlm.input.stretch == "minmax" and vlm.input.channels == ["VV"] * 3
    x = np.linspace(-30, -5, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
    t = prepare_images(x, vlm)[0].numpy()
    mean, std = np.array(vlm.input.mean)[:, None, None], np.array(vlm.input.std)[:, None, None]
    y = t * std + mean  # back to the 8-bit stretch in [0, 1]
    assert y.min() == pytest.approx(0, abs=1e-6) and y.max() == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(y * 255, np.round(y * 255), atol=1e-3)  # 8-bit levels


def test_images_of_another_size_are_resized_and_bands_must_fit():
    card = clip_card("s", config=TINY_CONFIG)
    assert prepare_images(np.zeros((3, 2, 50, 70), np.float32) - 10, card).shape == (3, 3, 32, 32)
    with pytest.raises(Exception, match=r"chip\.tif.*2 band\(s\) \(VV\+VH\)"):
        prepare_images(np.zeros((1, 32, 32), np.float32), card, where="chip.tif")


def test_text_embeddings_are_the_normalised_mean_over_templates(tiny_clip):
    clip = load_clip(tiny_clip[1])
    temps = ["a SAR image of {}.", "a radar image of {}."]
    k = text_embeddings(clip, ["water", "urban", "forest"], temps)
    assert k.shape == (3, 32)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(3))
    per = clip.encode_text([t.format("urban") for t in temps])
    ref = per.mean(0) / per.mean(0).norm()
    torch.testing.assert_close(k[1], ref, atol=1e-6, rtol=0)
    assert not torch.allclose(k[0], k[1])


def test_bad_prompts_are_refused_with_what_to_do(tiny_clip, caplog):
    clip = load_clip(tiny_clip[1])
    with pytest.raises(PromptError, match="given more than once: Water, water"):
        text_embeddings(clip, ["water", "urban", "Water"])
    with pytest.raises(PromptError, match="non-empty class name"):
        text_embeddings(clip, ["water", " "])
    with pytest.raises(PromptError, match="exactly one"):
        text_embeddings(clip, ["water"], ["a SAR image"])
    with pytest.raises(PromptError, match="empty phrase"):
        clip.encode_text(["  "])
    with caplog.at_level(logging.WARNING, logger="sarmae.clip"):
        e = clip.encode_text(["ship " * 100])
    assert e.shape == (1, 32) and "truncated to its first 75 tokens" in caplog.text


def test_open_clip_model_names_and_refusals():
    b32 = clip_card("b32", "ViT-B-32")
    assert b32.architecture.encoder.patch_size == 32 and b32.input_size == (224, 224)
    rn = clip_card("rn", "RN50-quickgelu", source="sarvlm")
    assert rn.architecture.encoder.depth == 16 and rn.architecture.extra["clip"]["config"]["quick_gelu"] is True
    with pytest.raises(ModelConfigError, match="unknown open_clip architecture 'ViT-Q-99'"):
        clip_card("x", "ViT-Q-99")
    with pytest.raises(ModelConfigError, match="only plain open_clip CLIP"):
        clip_card("x", "coca_ViT-B-32")
    with pytest.raises(ModelConfigError, match="1 to 3 distinct bands"):
        clip_card("x", config=TINY_CONFIG, bands=["VV", "VV"])


def test_card_without_templates_is_refused(tiny_clip, tmp_path):
    import shutil

    from engine.package import read_card

    pkg = shutil.copytree(tiny_clip[1], tmp_path / "pkg")
    d = json.loads((pkg / "model.json").read_text())
    d["architecture"]["clip"]["templates"] = ["no placeholder"]
    (pkg / "model.json").write_text(json.dumps(d))
    with pytest.raises(PackageError, match=r"model\.json.*templates.*one \{\}"):
        read_card(pkg)


def test_cli_init_clip_writes_a_package(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "tiny.pkg"
    assert main(["init", "--clip", "custom", "--clip-config", json.dumps(TINY_CONFIG), "--bands", "VV",
                 "--output", str(out)]) == 0
    assert "zeroshot CLIP custom" in capsys.readouterr().out
    clip = load_clip(out)
    assert clip.card.input.channels == ["VV", "VV", "VV"]
    assert main(["info", str(out), "--verify"]) == 0
    assert "templates:" in capsys.readouterr().out
    assert main(["init", "--clip", "custom", "--clip-config", "{not json", "--output", str(tmp_path / "x")]) == 2
    assert "--clip-config" in capsys.readouterr().err
