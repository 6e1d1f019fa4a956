"""MAE core: patchify round trips, masking, encoder on visible tokens only, loss on masked only."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.models import (
    DecoderConfig,
    MaskedAutoencoderViT,
    ViTConfig,
    create_model,
    masking_indices,
    patchify,
    random_masking,
    unpatchify,
)


def tiny_mae(in_chans=2, img=(32, 48), **dec):
    cfg = ViTConfig(img_size=img, patch_size=8, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2)
    return MaskedAutoencoderViT(cfg, DecoderConfig(embed_dim=16, depth=1, num_heads=2, **dec))


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 4), gh=st.integers(1, 5), gw=st.integers(1, 5), p=st.sampled_from([2, 4, 16]))
def test_patchify_round_trip_any_channels_and_non_square(c, gh, gw, p):
    x = torch.randn(2, c, gh * p, gw * p)
    patches = patchify(x, p)
    assert patches.shape == (2, gh * gw, p * p * c)
    assert torch.equal(unpatchify(patches, p, (gh, gw), c), x)


def test_patchify_layout_is_row_major_and_channel_last():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(x, 2)
    # patch 1 = rows 0-1, cols 2-3; first element = channel 0 at (0, 2), then channel 1 at (0, 2)
    assert patches[0, 1, 0].item() == x[0, 0, 0, 2].item()
    assert patches[0, 1, 1].item() == x[0, 1, 0, 2].item()


@pytest.mark.parametrize("length", [16, 49, 196, 197])
def test_masking_keeps_round_quarter(length):
    x = torch.randn(5, length, 8)
    kept, mask, ids_restore, ids_keep = random_masking(x, 0.75)
    k = round(length * 0.25)
    assert kept.shape == (5, k, 8)
    assert (mask.sum(1) == length - k).all()
    # kept tokens are exactly the unmasked positions, and ids_restore inverts the shuffle
    for i in range(5):
        assert set(ids_keep[i].tolist()) == set((mask[i] == 0).nonzero().flatten().tolist())
        assert torch.equal(kept[i], x[i, ids_keep[i]])


def test_masking_differs_per_sample():
    _, mask, _, _ = random_masking(torch.randn(8, 64, 4), 0.75, torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in mask}) > 1


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_both_stems_mask_with_the_same_indices_for_a_seed(stem):
    """``masking_indices`` is ``random_masking``'s draw, and both stems' encoders use it: a seed
    gives the same mask, restore and keep indices, bitwise."""
    want = masking_indices(3, 16, 0.75, torch.Generator().manual_seed(7))
    _, *got = random_masking(torch.randn(3, 16, 4), 0.75, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    m = create_model(f"mae_vit_tiny_{stem}8", decoder={"embed_dim": 16, "depth": 1, "num_heads": 2},
                     img_size=32, depth=1)
    _, *enc = m.forward_encoder(torch.randn(3, 3, 32, 32), 0.75, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(want, enc[:3]))


@pytest.mark.parametrize("c", [1, 2, 3])
def test_encoder_blocks_see_visible_tokens_only(c):
    m = tiny_mae(in_chans=c)
    seen = []
    for blk in m.blocks:
        blk.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    out = m(torch.randn(3, c, 32, 48), mask_ratio=0.75)
    total = (32 // 8) * (48 // 8)
    assert seen == [1 + round(total * 0.25)] * len(m.blocks)
    assert out.pred.shape == (3, total, 8 * 8 * c)
    assert out.latent.shape[1] == 1 + round(total * 0.25)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_ignores_visible_patches(norm_pix):
    torch.manual_seed(0)
    m = tiny_mae(norm_pix_loss=norm_pix)
    x = torch.randn(2, 2, 32, 48)
    g = torch.Generator().manual_seed(1)
    out = m(x, mask_ratio=0.5, generator=g)
    # change the target only where patches are visible: the loss must not move
    target = m.patchify(x.clone())
    visible = out.mask == 0
    target[visible] += 10.0
    tgt_img = m.unpatchify(target, out.grid)
    loss2 = m.forward_loss(tgt_img, out.pred, out.mask)
    assert torch.allclose(out.loss, loss2, atol=1e-6)
    # and changing a masked patch does move it
    target[~visible] = torch.randn_like(target[~visible])
    assert not torch.allclose(out.loss, m.forward_loss(m.unpatchify(target, out.grid), out.pred, out.mask))


def test_separate_target_and_gradients():
    m = tiny_mae()
    x = torch.rand(2, 2, 32, 48)
    noisy = x * torch.exp(0.3 * torch.randn_like(x))
    out = m(noisy, target=x)
    out.loss.backward()
    assert m.patch_embed.proj.weight.grad is not None
    assert m.decoder_pred.weight.grad is not None
    assert not m.pos_embed.requires_grad


def test_reconstruct_keeps_visible_patches():
    m = tiny_mae().eval()
    x = torch.randn(1, 2, 32, 48)
    g = torch.Generator().manual_seed(3)
    rec = m.reconstruct(x, mask_ratio=0.75, generator=g)
    assert rec.shape == x.shape
    g = torch.Generator().manual_seed(3)
    out = m(x, mask_ratio=0.75, generator=g)
    vis = (out.mask[0] == 0)
    assert torch.allclose(m.patchify(rec)[0, vis], m.patchify(x)[0, vis])


def test_mae_runs_on_another_input_size():
    m = tiny_mae(img=(32, 32))
    out = m(torch.randn(1, 2, 64, 32))
    assert out.pred.shape == (1, 8 * 4, 8 * 8 * 2)
