"""Converting official SARMAE / MAE checkpoints (SARMAE_SPEC 6) safely and completely."""

import argparse
import os

import pytest
import torch

from engine.convert import convert_checkpoint, infer_architecture
from engine.errors import ConversionError
from engine.models import create_model
from engine.models.sarc import SARCProjectionHead
from engine.package import load_package

TINY = dict(img_size=64, depth=2)  # ViT-Tiny width/heads, 2 blocks to stay small


def official_checkpoint(path, prefix="sar_encoder.", with_teacher=True, args=True):
    """A checkpoint laid out like the released SARMAE one (keys, extra entries, pickled args)."""
    mae = create_model("mae_vit_tiny_patch16", in_chans=3, decoder={"embed_dim": 64, "depth": 1, "num_heads": 2}, **TINY)
    model = {f"{prefix}{k}": v for k, v in mae.state_dict().items()}
    if with_teacher:
        teacher = create_model("vit_tiny_patch16", in_chans=3, **TINY)
        model.update({f"optical_encoder.{k}": v for k, v in teacher.state_dict().items()})
        model.update({f"sar_alignment_ffn.{k[4:]}": v for k, v in SARCProjectionHead(192, 192).state_dict().items()})
    ckpt = {"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299, "scaler": {"scale": 65536.0}}
    if args:
        ckpt["args"] = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, lr=1e-4)
    torch.save(ckpt, path)
    return mae


@pytest.mark.parametrize("prefix", ["sar_encoder.", "module.sar_encoder.", "module.", "encoder.", ""])
def test_convert_all_prefixes_load_every_encoder_tensor(tmp_path, prefix):
    mae = official_checkpoint(tmp_path / "c.pth", prefix, with_teacher=prefix == "sar_encoder.")
    report = convert_checkpoint(tmp_path / "c.pth", tmp_path / "pkg", units="db")
    assert report.fraction == 1.0 and not report.missing
    assert report.prefix == prefix
    pkg = load_package(tmp_path / "pkg")
    assert pkg.card.task == "embed" and pkg.card.architecture["name"] == "custom"  # depth 2 is not a named size
    sd = pkg.model.state_dict()
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    assert torch.equal(sd["blocks.1.mlp.fc2.weight"], mae.state_dict()["blocks.1.mlp.fc2.weight"])
    assert pkg.card.provenance["epoch"] == 299
    assert pkg.card.provenance["source_args"]["mask_ratio"] == 0.75


def test_convert_reconstruct_keeps_decoder(tmp_path):
    mae = official_checkpoint(tmp_path / "c.pth")
    report = convert_checkpoint(tmp_path / "c.pth", tmp_path / "rec", task="reconstruct")
    assert report.fraction == 1.0
    pkg = load_package(tmp_path / "rec")
    assert torch.equal(pkg.model.state_dict()["decoder_pred.weight"], mae.state_dict()["decoder_pred.weight"])
    assert pkg.card.architecture["decoder"] == {"embed_dim": 64, "depth": 1, "num_heads": 2, "norm_pix_loss": False}


def test_convert_adapts_channels_and_size(tmp_path):
    mae = official_checkpoint(tmp_path / "c.pth")
    report = convert_checkpoint(tmp_path / "c.pth", tmp_path / "pkg", in_chans=1, img_size=128)
    assert report.fraction == 1.0 and len(report.adapted) == 2
    pkg = load_package(tmp_path / "pkg")
    w3 = mae.state_dict()["patch_embed.proj.weight"]
    w1 = pkg.model.state_dict()["patch_embed.proj.weight"]
    assert torch.allclose(w1[:, 0], w3.sum(1), atol=1e-6)  # gray replicated x3 gives the same response
    assert pkg.card.input_size == (128, 128)


def test_vit_base_shapes_without_weights():
    d, n = 768, 196
    shapes = {"patch_embed.proj.weight": (d, 3, 16, 16), "pos_embed": (1, n + 1, d), "cls_token": (1, 1, d),
              "blocks.0.attn.qkv.bias": (3 * d,), "blocks.0.mlp.fc1.weight": (4 * d, d),
              "decoder_embed.weight": (512, d)}
    shapes.update({f"blocks.{i}.norm1.weight": (d,) for i in range(12)})
    shapes.update({f"decoder_blocks.{i}.norm1.weight": (512,) for i in range(8)})
    arch = infer_architecture(shapes, with_decoder=True)
    assert arch["name"] == "mae_vit_base_patch16"
    assert arch["encoder"] | {} == arch["encoder"]
    e = arch["encoder"]
    assert (e["embed_dim"], e["depth"], e["num_heads"], e["img_size"], e["in_chans"]) == (768, 12, 12, [224, 224], 3)
    assert arch["decoder"] == {"embed_dim": 512, "depth": 8, "num_heads": 16, "norm_pix_loss": False}
    with pytest.raises(ConversionError, match="expects width 1024"):
        infer_architecture(shapes, arch="vit_large_patch16")


@pytest.mark.parametrize("name", ["vit_tiny_conv16", "vit_tiny_conv8", "vit_tiny_patch8"])
def test_a_checkpoint_without_its_config_converts_to_its_registered_arch(tmp_path, name):
    """Stem and patch read from the state dict (a conv stem's proj is 2x2 over the last conv's width)."""
    vit = create_model(name, in_chans=2, img_size=32)
    torch.save({"model": vit.state_dict()}, tmp_path / "c.pth")
    report = convert_checkpoint(tmp_path / "c.pth", tmp_path / "pkg")
    assert report.fraction == 1.0 and not report.missing
    pkg = load_package(tmp_path / "pkg")
    assert pkg.card.architecture["name"] == name
    e = pkg.card.architecture["encoder"]
    assert (e.get("stem", "patch"), e["patch_size"], e["in_chans"], e["img_size"]) == (
        vit.cfg.stem, vit.cfg.patch_size, 2, [32, 32])
    assert all(torch.equal(v, pkg.model.state_dict()[k]) for k, v in vit.state_dict().items())


def test_refuses_mostly_unmatched_checkpoint(tmp_path):
    mae = create_model("vit_tiny_patch16", in_chans=3, **TINY)
    sd = {k: v for k, v in mae.state_dict().items() if k.startswith(("patch_embed", "pos_embed", "cls_token"))}
    sd["blocks.0.norm1.weight"] = mae.state_dict()["blocks.0.norm1.weight"]
    sd["blocks.1.norm1.weight"] = mae.state_dict()["blocks.1.norm1.weight"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(ConversionError, match="refused: only .* model tensors"):
        convert_checkpoint(tmp_path / "partial.pth", tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARKER}",))


EVIL_MARKER = ""


def test_malicious_pickle_executes_nothing(tmp_path):
    global EVIL_MARKER
    EVIL_MARKER = str(tmp_path / "pwned")
    official_checkpoint(tmp_path / "c.pth")
    ckpt = torch.load(tmp_path / "c.pth", weights_only=False)
    ckpt["payload"] = Evil()
    torch.save(ckpt, tmp_path / "evil.pth")
    with pytest.raises(ConversionError, match="refused: loading this checkpoint would need to run code"):
        convert_checkpoint(tmp_path / "evil.pth", tmp_path / "pkg")
    assert not os.path.exists(EVIL_MARKER)
    assert not (tmp_path / "pkg").exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pth").write_text("hello")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint|refused"):
        convert_checkpoint(tmp_path / "x.pth", tmp_path / "pkg")
    with pytest.raises(ConversionError, match="not found"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "pkg")
