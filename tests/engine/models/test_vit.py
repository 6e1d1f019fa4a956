"""ViT encoder: channels, sizes, position-embedding interpolation, intermediate layers, heads."""

import numpy as np
import pytest
import torch

from engine.models import (
    VisionTransformer,
    ViTConfig,
    build_from_architecture,
    create_model,
    list_models,
)
from engine.models.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed
from engine.models.vit import default_dense_indices


def small_cfg(**kw):
    base = dict(img_size=32, patch_size=8, in_chans=2, embed_dim=32, depth=4, num_heads=2)
    base.update(kw)
    return ViTConfig(**base)


@pytest.mark.parametrize("c", [1, 2, 3])
def test_any_channel_count(c):
    m = VisionTransformer(small_cfg(in_chans=c))
    assert m.forward_features(torch.randn(2, c, 32, 32)).shape == (2, 17, 32)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, c + 1, 32, 32))


def test_named_sizes():
    for name, (d, depth, heads) in {"vit_tiny_patch16": (192, 12, 3), "vit_small_patch16": (384, 12, 6)}.items():
        m = create_model(name, in_chans=1, img_size=32)
        assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (d, depth, heads)
    assert {"vit_base_patch16", "vit_large_patch16", "mae_vit_base_patch16"} <= set(list_models())


def test_sincos_table_matches_formula():
    t = get_2d_sincos_pos_embed(8, (2, 3), cls_token=True)
    assert t.shape == (7, 8) and np.all(t[0] == 0)
    # token (row 1, col 2): first half encodes the column with omega = [1, 1e-2]
    assert np.allclose(t[1 + 1 * 3 + 2, :4], [np.sin(2), np.sin(2e-2), np.cos(2), np.cos(2e-2)], atol=1e-6)


def test_pos_embed_interpolation_identity_and_new_grid():
    table = torch.from_numpy(get_2d_sincos_pos_embed(16, 4, cls_token=True)).unsqueeze(0)
    assert resample_pos_embed(table, (4, 4)) is table
    out = resample_pos_embed(table, (6, 2))
    assert out.shape == (1, 13, 16) and torch.equal(out[:, 0], table[:, 0])


def test_encoder_runs_at_other_sizes():
    m = VisionTransformer(small_cfg())
    assert m.forward_patch_tokens(torch.randn(1, 2, 48, 64)).shape == (1, 32, 6, 8)


def test_intermediate_layers_order_and_last_norm():
    m = VisionTransformer(small_cfg()).eval()
    x = torch.randn(1, 2, 32, 32)
    maps = m.get_intermediate_layers(x, (1, 3, 3))
    assert len(maps) == 3 and torch.equal(maps[1], maps[2])
    last = m.forward_patch_tokens(x)
    assert torch.allclose(maps[2], last, atol=1e-6)


def test_dense_indices():
    assert default_dense_indices(12) == (3, 5, 7, 11)
    assert default_dense_indices(24) == (5, 11, 17, 23)
    assert default_dense_indices(2) == (0, 0, 0, 1)


@pytest.mark.parametrize("task,n", [("classify", 4), ("segment", 3), ("detect", 2), ("embed", 0), ("reconstruct", 0)])
def test_task_models_forward(task, n):
    arch = {"encoder": small_cfg(img_size=64).to_dict(), "decoder": {"embed_dim": 16, "depth": 1, "num_heads": 2},
            "head": {"channels": 32} if task == "segment" else ({"fpn_channels": 32} if task == "detect" else {})}
    m = build_from_architecture(arch, task, n).eval()
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        y = m(x)
    if task == "classify":
        assert y.shape == (2, 4)
    elif task == "segment":
        assert y.shape == (2, 3, 64, 64)
    elif task == "detect":
        assert len(y) == 2 and set(y[0]) == {"boxes", "labels", "scores"}
    assert hasattr(m, "encoder") or task in ("embed", "reconstruct")


def test_segmenter_aux_and_detector_training_losses():
    arch = {"encoder": small_cfg(img_size=64).to_dict(), "head": {"channels": 32}}
    seg = build_from_architecture(arch, "segment", 2).train()
    logits, aux = seg(torch.randn(2, 2, 64, 64), return_aux=True)
    assert logits.shape == aux.shape == (2, 2, 64, 64)
    det = build_from_architecture({"encoder": arch["encoder"], "head": {"fpn_channels": 32}}, "detect", 1).train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 24.0]]), "labels": torch.tensor([1])}] * 2
    losses = det(torch.randn(2, 2, 64, 64), targets)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    sum(losses.values()).backward()


def test_sarc_head_and_loss():
    from engine.models import SARCProjectionHead, sarc_loss

    head = SARCProjectionHead(32, 48)
    s = head(torch.randn(3, 5, 32))
    assert s.shape == (3, 5, 48)
    t = torch.randn(3, 5, 48)
    assert torch.isclose(sarc_loss(t, t), torch.tensor(0.0), atol=1e-5)
    assert torch.isclose(sarc_loss(t, -t), torch.tensor(2.0), atol=1e-5)
    paired = torch.tensor([True, False, False])
    both = torch.cat([t[:1], -t[1:]])
    assert torch.isclose(sarc_loss(both, t, paired), torch.tensor(0.0), atol=1e-5)
    assert sarc_loss(s, t, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_detector_head_sizes_default_and_legacy():
    """New packages record the CPU-sized head; a head dict without the new fields (packages written
    before them) builds torchvision's sizes, so their weights still fit."""
    from engine.models.heads import DetHeadConfig, ViTDetector

    enc = small_cfg(img_size=64).to_dict()
    det = build_from_architecture({"encoder": enc, "head": DetHeadConfig().to_dict()}, "detect", 2)
    heads = det.detector.roi_heads
    assert heads.box_head.fc6.weight.shape == (256, 128 * 7 * 7)
    assert heads.box_predictor.cls_score.out_features == 3  # 2 classes + background
    assert heads.fg_bg_sampler.batch_size_per_image == 128
    legacy = build_from_architecture({"encoder": enc, "head": {"anchor_sizes": [4, 8, 16, 32, 64]}}, "detect", 2)
    lh = legacy.detector.roi_heads
    assert lh.box_head.fc6.weight.shape == (1024, 256 * 7 * 7) and lh.fg_bg_sampler.batch_size_per_image == 512
    assert legacy.cfg.anchor_sizes == (4, 8, 16, 32, 64)
    # a legacy state dict loads into a legacy-built detector with every key matched
    again = ViTDetector(legacy.encoder, 2, DetHeadConfig.from_dict(legacy.cfg.to_dict()))
    assert not again.load_state_dict(legacy.state_dict()).missing_keys


def test_classifier_block_pooling():
    """pool 'blocks': mean and max of the patch tokens of the last blocks (the last after the final
    norm), concatenated; the card's head settings rebuild it; an unknown pooling is refused."""
    from engine.errors import ModelConfigError

    enc = small_cfg(img_size=64).to_dict()
    m = build_from_architecture({"encoder": enc, "head": {"pool": "blocks", "blocks": 2}}, "classify", 3).eval()
    x = torch.randn(2, 2, 64, 64)
    d = m.encoder.embed_dim
    with torch.no_grad():
        f = m.forward_features(x)
        maps = m.encoder.get_intermediate_layers(x, (len(m.encoder.blocks) - 2, len(m.encoder.blocks) - 1))
    assert f.shape == (2, 4 * d) and m(x).shape == (2, 3)
    want = torch.cat([torch.cat([t.flatten(2).mean(2), t.flatten(2).amax(2)], 1) for t in maps], 1)
    assert torch.allclose(f, want, atol=1e-5)
    assert build_from_architecture({"encoder": enc, "head": {}}, "classify", 3).forward_features(x).shape == (2, d)
    with pytest.raises(ModelConfigError, match="unknown classifier pooling 'max'"):
        build_from_architecture({"encoder": enc, "head": {"pool": "max"}}, "classify", 3)


def test_classifier_views_average_the_dihedral_views():
    """views 8: the pooled feature is the mean over the chip's 8 flips / rotations, so the answer does
    not change when the chip is flipped or turned; ``dihedral`` is torch.rot90 of the (flipped) chip
    written with flips and transposes; other view counts are refused."""
    from engine.errors import ModelConfigError
    from engine.models.heads import dihedral

    x = torch.randn(2, 2, 64, 64)
    for k in range(8):
        assert torch.equal(dihedral(x, k), torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, (-2, -1)))
    assert len({dihedral(x, k)[0, 0].flatten()[:5].sum().item() for k in range(8)}) == 8  # 8 distinct views
    enc = small_cfg(img_size=64).to_dict()
    torch.manual_seed(0)
    m = build_from_architecture({"encoder": enc, "head": {"pool": "blocks", "blocks": 2, "views": 8}}, "classify", 3)
    m.eval()
    torch.nn.init.normal_(m.head.weight)
    with torch.no_grad():
        f = m.forward_features(x)
        want = torch.stack([m.view_features(dihedral(x, k)) for k in range(8)]).mean(0)
        assert torch.allclose(f, want, atol=1e-5)
        turned = m(torch.rot90(x, 1, (-2, -1)))
        assert torch.allclose(m(x), turned, atol=1e-4) and torch.allclose(m(x), m(x.flip(-2)), atol=1e-4)
        m.views = 1  # one view: the answer moves with the chip's orientation (the views are not alike)
        assert not torch.allclose(m(x), m(torch.rot90(x, 1, (-2, -1))), atol=1e-3)
    for bad in (2, 0, True):
        with pytest.raises(ModelConfigError, match="views must be one of 1, 8"):
            build_from_architecture({"encoder": enc, "head": {"views": bad}}, "classify", 3)
