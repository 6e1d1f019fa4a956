"""SARE: speckle-aware representation enhancement (SARMAE_SPEC section 2).

Applied per sample to images scaled to [0, 1], before normalisation and masking; the model
reconstructs the CLEAN image from the noised one.

Modes:
- ``reference`` (the reference code, default): with probability ``p_clean`` the sample stays
  clean; otherwise sigma ~ U(0, sigma_max). sigma > 0.05: log-normal multiplicative noise
  ``x * exp(sigma * N(0, 1))`` per pixel (no mean correction); sigma <= 0.05: Gamma speckle
  ``x * n``, n ~ Gamma(L, rate L) with L = 1 / (2 sigma)^2, then rescaled to keep the image mean.
- ``gamma`` (the paper's wording): Gamma speckle ``x * n``, n ~ Gamma(L, rate L) (mean 1,
  variance 1/L), mean preserved, with L either fixed (``looks``) or the equivalent looks of the
  drawn sigma, L = 1 / (exp(sigma^2) - 1) (the log-normal branch's variance).
Both clamp to [1e-8, 1]. Channels that are identical (gray replicated to 3 channels) share one
noise field; distinct channels (polarisations) get independent fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOGNORMAL_MIN_SIGMA = 0.05  # reference code: below this sigma the Gamma branch is used


@dataclass
class SAREConfig:
    enabled: bool = True  # False: plain MAE (no noise)
    mode: str = "reference"  # reference | gamma
    p_clean: float = 0.5  # probability that a sample stays clean
    sigma_max: float = 0.7  # sigma ~ U(0, sigma_max)
    looks: float | None = None  # gamma mode: fixed number of looks (None: from sigma)


def _noise_fields(n: int, c: int, h: int, w: int, shared: torch.Tensor, gen, device) -> torch.Tensor:
    """Standard-normal fields (N, C, H, W); samples flagged ``shared`` reuse channel 0's field."""
    z = torch.randn(n, c, h, w, generator=gen, device=device)
    if shared.any():
        z[shared] = z[shared][:, :1].expand(-1, c, -1, -1)
    return z


def _gamma(shape_l: torch.Tensor, like: torch.Tensor, shared: torch.Tensor, gen) -> torch.Tensor:
    """n ~ Gamma(L, rate L) per pixel (mean 1, variance 1/L), L broadcast from (N, 1, 1, 1);
    samples flagged ``shared`` reuse channel 0's field."""
    conc = shape_l.expand_as(like).contiguous()
    n = torch._standard_gamma(conc, generator=gen) / conc  # Gamma(L, 1) / L = Gamma(L, rate L)
    if shared.any():
        n[shared] = n[shared][:, :1].expand(-1, like.shape[1], -1, -1)
    return n


def identical_channels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N,) True where every channel equals channel 0 (gray replicated)."""
    if x.shape[1] == 1:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return (x == x[:, :1]).flatten(1).all(dim=1)


def apply_sare(x: torch.Tensor, cfg: SAREConfig, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise a batch of clean images in [0, 1].

    Args:
        x: (N, C, H, W) clean images in [0, 1].
        cfg: SARE settings.
        generator: RNG for reproducible noise.

    Returns:
        (noised images (N, C, H, W) in [1e-8, 1], sigma per sample (N,) with 0 = left clean).
    """
    n = x.shape[0]
    device = x.device
    if not cfg.enabled:
        return x, torch.zeros(n, device=device)
    gen = generator
    clean = torch.rand(n, generator=gen, device=device) < cfg.p_clean
    sigma = torch.rand(n, generator=gen, device=device) * cfg.sigma_max
    sigma = torch.where(clean, torch.zeros_like(sigma), sigma)
    shared = identical_channels(x)
    out = x.clone()
    s4 = sigma.view(n, 1, 1, 1)
    if cfg.mode == "reference":
        logn = ~clean & (sigma > LOGNORMAL_MIN_SIGMA)
        gam = ~clean & (sigma > 0) & (sigma <= LOGNORMAL_MIN_SIGMA)
        z = _noise_fields(n, x.shape[1], x.shape[2], x.shape[3], shared, gen, device)
        out = torch.where(logn.view(n, 1, 1, 1), x * torch.exp(s4 * z), out)
        if gam.any():
            looks = 1.0 / (2.0 * s4.clamp_min(1e-6)) ** 2
            g = _gamma(looks, x, shared, gen)
            speckled = x * g
            ratio = x.mean(dim=(1, 2, 3), keepdim=True) / speckled.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            out = torch.where(gam.view(n, 1, 1, 1), speckled * ratio, out)
    elif cfg.mode == "gamma":
        noisy = ~clean & (sigma > 0)
        if noisy.any():
            if cfg.looks:
                looks = torch.full_like(s4, float(cfg.looks))
            else:
                looks = 1.0 / torch.expm1(s4.clamp_min(1e-3) ** 2)
            g = _gamma(looks, x, shared, gen)
            speckled = x * g
            ratio = x.mean(dim=(1, 2, 3), keepdim=True) / speckled.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            out = torch.where(noisy.view(n, 1, 1, 1), speckled * ratio, out)
    else:
        raise ValueError(f"unknown SARE mode '{cfg.mode}'; use reference or gamma")
    return out.clamp(1e-8, 1.0), sigma
