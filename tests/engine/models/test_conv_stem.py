"""The convolutional stem (vit.ConvStem) and the 8 px ViTs: leak-free under MAE masking, named in the
registry, described by model.json, exported to ONNX and run by the engine; plain ViTs unchanged."""

import json

import numpy as np
import pytest
import torch

from engine.errors import ModelConfigError, PackageError
from engine.models import VisionTransformer, ViTConfig, create_model, list_models
from engine.models.mae import random_masking
from engine.models.registry import arch_encoder_config

SMALL = dict(in_chans=1, img_size=32, depth=2)


@pytest.mark.parametrize("name", ["vit_tiny_conv16", "vit_tiny_conv8"])
def test_each_token_sees_only_its_own_patch(name):
    m = create_model(name, **{**SMALL, "img_size": 64})
    p = m.patch_size
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    tokens, (gh, gw) = m.embed(x)
    k = gw + 1  # the token at grid row 1, column 1
    (tokens[0, k] - m.pos_embed[0, 1 + k]).pow(2).sum().backward()
    touched = (x.grad[0, 0] != 0).nonzero()
    assert len(touched) > 0
    assert touched.min(0).values.tolist() == [p, p] and touched.max(0).values.tolist() == [2 * p - 1, 2 * p - 1]


def test_masked_pixels_cannot_change_what_the_mae_encoder_sees():
    mae = create_model("mae_vit_tiny_conv8", decoder={"embed_dim": 32, "depth": 1, "num_heads": 2}, **SMALL).eval()
    x = torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    latent, mask, *_ = mae.forward_encoder(x, 0.75, noise=noise)
    y = x.clone()
    for i in range(2):  # rewrite every masked patch of each image
        for t in mask[i].nonzero().flatten().tolist():
            r, c = divmod(t, 4)
            y[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 5.0 * torch.randn(1, 8, 8)
    latent2, mask2, *_ = mae.forward_encoder(y, 0.75, noise=noise)
    assert torch.equal(mask, mask2) and not torch.equal(x, y)
    assert torch.allclose(latent, latent2, atol=1e-6)
    # embedding only the visible patches gives what embedding all of them and masking gives
    tokens, _ = mae.embed(x)
    kept, mask3, _, ids_keep = random_masking(tokens, 0.75, noise=noise)
    x_full, _ = mae.run_blocks(mae.prepend_cls(kept))
    assert torch.equal(mask3, mask) and torch.allclose(mae.norm(x_full), latent, atol=1e-5)


def test_registry_names_and_model_json():
    assert {"vit_tiny_conv16", "mae_vit_base_conv16", "vit_small_patch8", "mae_vit_tiny_patch8"} <= set(list_models())
    c = arch_encoder_config("mae_vit_small_conv8")
    assert (c.embed_dim, c.patch_size, c.stem) == (384, 8, "conv")
    assert "stem" not in create_model("vit_tiny_patch16", **SMALL).cfg.to_dict()  # plain ViTs' model.json unchanged
    d = create_model("vit_tiny_conv16", **SMALL).cfg.to_dict()
    assert d["stem"] == "conv" and ViTConfig.from_dict(d).stem == "conv"
    with pytest.raises(ValueError, match="unknown encoder stem 'hex'"):
        ViTConfig.from_dict({**d, "stem": "hex"})
    with pytest.raises(ModelConfigError, match="vit_tiny_conv16"):
        create_model("vit_tiny_conv12")
    with pytest.raises(ValueError, match="power-of-two"):
        VisionTransformer(ViTConfig.from_dict({**d, "patch_size": 12, "img_size": 36}))


def _embed_package(dest, name="vit_tiny_conv8", in_chans=1):
    from engine.package import default_input, new_card, save_package

    torch.manual_seed(0)
    enc = create_model(name, **{**SMALL, "in_chans": in_chans})
    card = new_card("conv-stem", "embed", {"name": name, "encoder": enc.cfg.to_dict()}, default_input(in_chans), [],
                    {"training": "none: random initialisation (tests)"})
    return save_package(enc.state_dict(), card, dest), enc


def test_conv_stem_package_loads_exports_and_runs_in_the_engine(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    from engine.export import export_package
    from engine.inference import InferenceOptions, run_inference
    from engine.package import load_package

    _, enc = _embed_package(tmp_path / "enc.pkg")
    pkg = load_package(tmp_path / "enc.pkg")
    assert pkg.card.patch_size == 8 and pkg.model.cfg.stem == "conv"
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(pkg.model.eval()(x), enc.eval()(x))
    rep = export_package(tmp_path / "enc.pkg", log=lambda *_: None)
    assert rep.torch_diff is not None and rep.torch_diff < 1e-3
    scene = np.random.default_rng(0).gamma(1, 0.05, (64, 64)).astype(np.float32)
    tif = tmp_path / "scene.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=64, count=1, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(scene, 1)
    for backend in ("torch", "onnxruntime"):
        res = run_inference(str(tif), tmp_path / f"f_{backend}.tif", load_package(tmp_path / "enc.pkg"),
                            InferenceOptions(device="cpu", backend=backend, window=32, overlap=0.25))
        with rasterio.open(res.outputs["embedding"]) as src:
            assert src.res == (80.0, 80.0) and src.count == 192 and src.shape == (8, 8)  # a vector per 8 px token


def test_model_json_that_does_not_describe_the_stem_is_refused(tmp_path):
    from engine.package import load_package

    _embed_package(tmp_path / "enc.pkg")
    mj = tmp_path / "enc.pkg" / "model.json"
    d = json.loads(mj.read_text())
    d["architecture"]["encoder"]["in_chans"] = 2
    d["input"]["bands"], d["input"]["mean"], d["input"]["std"] = ["VV", "VH"], [0.5, 0.5], [0.5, 0.5]
    mj.write_text(json.dumps(d))
    with pytest.raises(PackageError, match="in_chans is 2 but the weights have 1"):
        load_package(tmp_path / "enc.pkg")
