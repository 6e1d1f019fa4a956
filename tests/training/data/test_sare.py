"""SARE statistics (SARMAE_SPEC 2): Gamma keeps the mean with variance 1/L, log-normal has the
stated sigma, gray channels share one field and polarisations get independent ones."""

import math

import pytest
import torch

from training.data.sare import SAREConfig, apply_sare


def const(n=8, c=1, size=128, value=0.5):
    return torch.full((n, c, size, size), value)


def test_probability_clean_about_half_and_sigma_range():
    g = torch.Generator().manual_seed(0)
    _, sigma = apply_sare(const(n=4000, size=4), SAREConfig(), g)
    assert abs((sigma == 0).float().mean().item() - 0.5) < 0.03
    assert sigma.max().item() <= 0.7
    nz = sigma[sigma > 0]
    assert abs(nz.mean().item() - 0.35) < 0.02  # U(0, 0.7)


def test_lognormal_factor_has_the_stated_sigma():
    g = torch.Generator().manual_seed(1)
    cfg = SAREConfig(p_clean=0.0, sigma_max=0.3)
    x = const(n=64, size=64, value=0.01)  # small values: the clamp at 1 never bites
    y, sigma = apply_sare(x, cfg, g)
    for i in range(64):
        if sigma[i] > 0.1:
            logf = torch.log(y[i] / x[i])
            assert abs(logf.std().item() - sigma[i].item()) < 0.02 * max(1.0, sigma[i].item() * 10)
            assert abs(logf.mean().item()) < 0.02  # no mean correction: E[log factor] = 0


@pytest.mark.parametrize("looks", [1.0, 4.0, 16.0])
def test_gamma_mode_keeps_mean_and_variance_one_over_l(looks):
    g = torch.Generator().manual_seed(2)
    x = const(n=16, size=128, value=0.02)
    y, _ = apply_sare(x, SAREConfig(mode="gamma", p_clean=0.0, looks=looks), g)
    ratio = y / x
    assert torch.allclose(ratio.mean(dim=(1, 2, 3)), torch.ones(16), atol=1e-4)  # mean preserved
    assert abs(ratio.var().item() - 1 / looks) < 0.06 / looks


def test_gamma_mode_equivalent_looks_from_sigma():
    g = torch.Generator().manual_seed(3)
    x = const(n=200, size=64, value=0.02)
    y, sigma = apply_sare(x, SAREConfig(mode="gamma", p_clean=0.0), g)
    for i in range(0, 200, 10):
        s = sigma[i].item()
        if s > 0.2:
            looks = 1 / (math.exp(s * s) - 1)
            assert abs((y[i] / x[i]).var().item() - 1 / looks) < 0.15 / looks


def test_reference_small_sigma_uses_mean_preserving_gamma():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(400, 1, 32, 32) * 0.5 + 0.1
    y, sigma = apply_sare(x, SAREConfig(p_clean=0.0, sigma_max=0.05), g)
    assert (sigma <= 0.05).all()
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-4)


def test_gray_replicated_shares_field_polarisations_independent():
    g = torch.Generator().manual_seed(5)
    gray = const(n=6, c=3, size=32, value=0.2)
    y, sigma = apply_sare(gray, SAREConfig(p_clean=0.0), g)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])
    pol = torch.stack([torch.full((32, 32), 0.2), torch.full((32, 32), 0.05)]).expand(6, 2, 32, 32).contiguous()
    y2, s2 = apply_sare(pol, SAREConfig(p_clean=0.0), g)
    for i in range(6):
        if s2[i] > 0.1:
            r0, r1 = torch.log(y2[i, 0] / 0.2), torch.log(y2[i, 1] / 0.05)
            corr = torch.corrcoef(torch.stack([r0.flatten(), r1.flatten()]))[0, 1]
            assert abs(corr.item()) < 0.1


def test_clamped_disabled_and_reproducible():
    x = torch.rand(8, 2, 16, 16)
    y, _ = apply_sare(x, SAREConfig(p_clean=0.0), torch.Generator().manual_seed(7))
    assert y.min() >= 1e-8 and y.max() <= 1.0
    y2, _ = apply_sare(x, SAREConfig(p_clean=0.0), torch.Generator().manual_seed(7))
    assert torch.equal(y, y2)
    same, sigma = apply_sare(x, SAREConfig(enabled=False))
    assert same is x and (sigma == 0).all()
