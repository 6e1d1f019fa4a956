"""The light segmentation head (engine/models/seg_light.py) and the registry's head kinds."""

from __future__ import annotations

import pytest
import torch

from engine.errors import ModelConfigError
from engine.models import build_from_architecture, create_model
from engine.models.seg_light import LightSegmenter, pixel_feature_count, pixel_features


@pytest.mark.parametrize("c", [1, 2, 3])
def test_pixel_features_count_and_values(c):
    x = torch.randn(2, c, 20, 24)
    f = pixel_features(x)
    assert f.shape == (2, pixel_feature_count(c), 20, 24)
    assert torch.equal(f[:, :c], x)  # the bands come first
    const = pixel_features(torch.full((1, c, 9, 9), 3.0))
    means = [c + 2 * c * s + j for s in range(3) for j in range(c)]  # per scale: C means, then C stds
    stds = [m + c for m in means]
    assert torch.allclose(const[:, means], torch.full_like(const[:, means], 3.0))
    assert float(const[:, stds].max()) < 1e-2  # no texture in a constant image
    if c == 2:
        assert torch.allclose(f[:, -1], x[:, 0] - x[:, 1])  # VV - VH (a ratio in dB)


def test_light_segmenter_shapes_split_and_registry():
    enc = create_model("vit_tiny_patch16", in_chans=2, img_size=32, depth=2)
    m = LightSegmenter(enc, 3).eval()
    x = torch.randn(2, 2, 32, 32)
    out = m(x)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(m.decode(m.features(x), x), out)  # the quick mode's split is the same model
    logits, aux = m(x, return_aux=True)
    assert aux is None and torch.allclose(logits, out)
    arch = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict(), "head": {"kind": "light", "hidden": 16}}
    built = build_from_architecture(arch, "segment", 3)
    assert isinstance(built, LightSegmenter) and built.cls.in_channels == 16
    built.load_state_dict(built.state_dict())
    # old packages (no kind) build the UPerNet segmenter; unknown kinds are refused with the known ones
    assert type(build_from_architecture({**arch, "head": {"channels": 32}}, "segment", 3)).__name__ == "ViTSegmenter"
    with pytest.raises(ModelConfigError, match="unknown segmentation head 'fcn'; known: upernet, light"):
        build_from_architecture({**arch, "head": {"kind": "fcn"}}, "segment", 3)
    with pytest.raises(ModelConfigError, match="odd"):
        build_from_architecture({**arch, "head": {"kind": "light", "scales": [4]}}, "segment", 3)


def test_pixel_standardisation_is_fitted_and_saved():
    enc = create_model("vit_tiny_patch16", in_chans=1, img_size=32, depth=2)
    m = LightSegmenter(enc, 2)
    x = 5 + 2 * torch.randn(4, 1, 32, 32)
    m.fit_pixel_standardisation(x)
    assert float(m.pixel_mean[0, 0]) == pytest.approx(5.0, abs=0.1) and float(m.pixel_std[0, 0]) == pytest.approx(2.0, abs=0.1)
    assert "pixel_mean" in m.state_dict() and "pixel_std" in m.state_dict()


@pytest.mark.parametrize("s", [1, 3, 7, 15])
def test_box_mean_equals_average_pooling_without_padding(s):
    import torch.nn.functional as F

    from engine.models.seg_light import box_mean

    z = torch.randn(2, 3, 37, 41)
    ref = F.avg_pool2d(z, s, stride=1, padding=s // 2, count_include_pad=False)
    assert torch.allclose(box_mean(z, s), ref, atol=1e-5)


def test_light_segmenter_exports_to_onnx(tmp_path):
    import numpy as np

    from engine.backends import OnnxBackend, TorchBackend, export_onnx

    enc = create_model("vit_tiny_patch16", in_chans=2, img_size=32, depth=2)
    m = LightSegmenter(enc, 3).eval()
    blob = export_onnx(m, "segment", 2, (32, 32), "{}")
    x = np.random.default_rng(0).standard_normal((2, 2, 32, 32)).astype(np.float32)
    diff = np.abs(TorchBackend(m, "segment", "cpu").run(x) - OnnxBackend(blob, "segment", "cpu").run(x)).max()
    assert diff < 1e-4
