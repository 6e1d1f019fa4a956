"""`sarmae convert --clip`: SARCLIP safetensors and SARVLM epoch_N.pt checkpoints into zeroshot packages."""

from __future__ import annotations

import json

import pytest
import torch

from engine.cli import main
from engine.clip import TINY_CONFIG, build_clip, clip_card, load_clip
from engine.clip.convert import convert_clip_checkpoint
from engine.errors import ConversionError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random open_clip model saved as SARCLIP does (safetensors) and as SARVLM does (DDP epoch_N.pt)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    model = build_clip(clip_card("t", config=TINY_CONFIG)).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "vit_tiny_model.safetensors"))
    torch.save({"epoch": 3, "name": "sarvlm", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]}}, d / "epoch_3.pt")
    (d / "configs").mkdir()
    (d / "configs" / "sarmae-tiny-test.json").write_text(json.dumps(TINY_CONFIG))
    return d


@pytest.mark.parametrize("fname, fmt", [("vit_tiny_model.safetensors", "sarclip"), ("epoch_3.pt", "sarvlm")])
def test_both_formats_convert_fully_and_embed_as_open_clip(tiny, tmp_path, capsys, fname, fmt):
    import open_clip

    out = tmp_path / "pkg"
    assert main(["convert", str(tiny / fname), "--clip", "custom", "--clip-config", json.dumps(TINY_CONFIG),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    n = len(build_clip(clip_card("t", config=TINY_CONFIG)).state_dict())
    assert f"loaded {n} / {n} tensors (100.0 %), missing 0, unexpected 0" in printed
    clip = load_clip(out)
    assert clip.card.architecture.extra["clip"]["source"] == fmt
    assert clip.card.provenance["checkpoint_format"].lower().startswith(fmt)
    # open_clip itself, reading the same file with its own loader
    open_clip.add_model_config(tiny / "configs")
    ref = open_clip.create_model("sarmae-tiny-test", pretrained=str(tiny / fname)).eval()
    x = torch.randn(3, 3, 32, 32)
    phrases = ["ships at sea", "a flooded field", "urban area"]
    with torch.no_grad():
        want_img = ref.encode_image(x, normalize=True)
        want_txt = ref.encode_text(open_clip.get_tokenizer("sarmae-tiny-test")(phrases), normalize=True)
    torch.testing.assert_close(clip.encode_images(x), want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip.encode_text(phrases), want_txt, atol=1e-5, rtol=0)


def test_a_checkpoint_of_another_model_is_refused_naming_the_file(tiny, tmp_path):
    bigger = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "width": 128, "head_width": 64},
              "text_cfg": {**TINY_CONFIG["text_cfg"], "width": 64, "heads": 2}}
    with pytest.raises(ConversionError, match=r"vit_tiny_model\.safetensors: fills only .* at least 90 %"):
        convert_clip_checkpoint(tiny / "vit_tiny_model.safetensors", tmp_path / "p", "custom", bigger)
    assert not (tmp_path / "p").exists()


def test_files_that_are_no_clip_checkpoint_are_refused(tmp_path, capsys):
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(4, 2, 16, 16)}}, tmp_path / "mae.pth")
    assert main(["convert", str(tmp_path / "mae.pth"), "--clip", "ViT-B-32", "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "mae.pth: matches neither checkpoint format" in err and "SARCLIP safetensors" in err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match=r"junk\.safetensors: not a readable safetensors file"):
        convert_clip_checkpoint(tmp_path / "junk.safetensors", tmp_path / "p", "ViT-B-32")
    with pytest.raises(Exception, match="unknown open_clip architecture 'ViT-Nope'"):
        torch.save({"state_dict": {"visual.proj": torch.zeros(1), "token_embedding.weight": torch.zeros(1)}},
                   tmp_path / "epoch_1.pt")
        convert_clip_checkpoint(tmp_path / "epoch_1.pt", tmp_path / "p", "ViT-Nope")
