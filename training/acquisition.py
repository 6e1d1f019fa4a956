"""Simulated changes of acquisition, for evaluating and training classifiers that must hold on
another sensor, angle or processing chain than the one their labels came from.

A second MSTAR collection, or chips from another sensor, differ from the training chips in ways a
held-out part of the same collection does not show: the calibration or display gain, the 8-bit
stretch (contrast), the speckle (another look count or a fresh realisation), the resolution, and a
little pose and framing. Each ``Shift`` applies one of these to model input (``(N, C, H, W)``
normalised by a package's input contract, BEFORE ``model_input`` standardises it), in the
contract's physical terms:

- ``gain``: +-dB (``finetune.common.apply_gain``: dB contracts shift, amplitude and 8-bit values
  scale by 10^(g/20), linear power by 10^(g/10));
- ``gamma``: another display stretch, the [0, 1]-scaled value to the power ``gamma`` (8-bit chips
  from another processor; a monotonic change of contrast for calibrated data);
- ``speckle``: fresh speckle, the intensity multiplied by unit-mean gamma noise of ``looks`` looks;
- ``zoom``: resampled by ``scale`` about the centre, back to the chip size (a finer or coarser
  resolution: the target looks larger or smaller), bilinear, edges reflected;
- ``pose``: rotated by +-``degrees`` and translated by up to ``pixels`` px (random per chip).

Afterwards values are clipped to the contract's range and, for 8-bit contracts, rounded to the 256
levels a real 8-bit chip has. Random parts are seeded, so every model of a table sees the same
shifted chips. ``DEFAULT_SHIFTS`` is the evaluation set the recipes print as columns
(``training/recipes/eval_mstar.py``); ``acquisition_jitter`` draws random shifts of the same kinds
for training (an augmentation). A model trained with ``acquisition_jitter`` has seen shifts of the
kinds the table simulates, so its shifted columns measure robustness to these simulations; a real
second acquisition may differ in other ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shift:
    """One simulated change of acquisition: ``kind`` (gain, gamma, speckle, zoom, pose) and its value
    (dB, exponent, looks, scale, degrees; ``pixels`` for pose)."""

    kind: str
    value: float
    pixels: float = 0.0

    @property
    def name(self) -> str:
        return {"gain": f"gain {self.value:+g} dB", "gamma": f"gamma {self.value:g}",
                "speckle": f"speckle L={self.value:g}", "zoom": f"zoom {self.value:g}x",
                "pose": f"rot {self.value:g} deg + {self.pixels:g} px"}[self.kind]


KINDS = ("gain", "gamma", "speckle", "zoom", "pose")
DEFAULT_SHIFTS = (Shift("gain", -3.0), Shift("gain", 3.0), Shift("gamma", 0.7), Shift("gamma", 1.4),
                  Shift("speckle", 4.0), Shift("speckle", 1.0), Shift("zoom", 0.8), Shift("zoom", 1.25),
                  Shift("pose", 10.0, 6.0))


def parse_shift(text: str) -> Shift:
    """'gain:-3', 'gamma:0.7', 'speckle:4', 'zoom:1.25', 'pose:10:6' -> Shift (a ValueError saying the forms)."""
    parts = text.split(":")
    try:
        if parts[0] not in KINDS or len(parts) != (3 if parts[0] == "pose" else 2):
            raise ValueError
        return Shift(parts[0], float(parts[1]), float(parts[2]) if parts[0] == "pose" else 0.0)
    except ValueError:
        raise ValueError(f"acquisition shift '{text}': use gain:DB, gamma:EXPONENT, speckle:LOOKS, zoom:SCALE or "
                         "pose:DEGREES:PIXELS") from None


def _scaled(x: torch.Tensor, contract: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    mean = torch.tensor(contract["mean"][:c], dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(contract["std"][:c], dtype=torch.float32).view(1, c, 1, 1)
    return (x.float() * std + mean).clamp(0.0, 1.0), mean, std


def _intensity_factor(v: torch.Tensor, factor: torch.Tensor, contract: dict) -> torch.Tensor:
    """[0, 1]-scaled values ``v`` with their intensity multiplied by ``factor`` (same shape or broadcast)."""
    units = contract.get("units", "db")
    if units == "db":
        lo, hi = contract["clip"]
        return v + 10.0 * torch.log10(factor.clamp_min(1e-6)) / (hi - lo)
    return v * (factor if units == "linear_power" else factor.sqrt())


def _finish(v: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, contract: dict) -> torch.Tensor:
    v = v.clamp(0.0, 1.0)
    if contract.get("units") == "uint8":
        v = torch.round(v * 255.0) / 255.0  # another acquisition's chips are 8-bit too
    return (v - mean) / std


def _warp(v: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Per chip: zoom by ``scale`` about the centre, rotate by ``angle`` (radians), translate by
    ``shift_px`` (N, 2) px; bilinear, reflected edges."""
    n, _, h, w = v.shape
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2], theta[:, 1, 2] = -2 * shift_px[:, 0] / w, -2 * shift_px[:, 1] / h
    grid = F.affine_grid(theta, list(v.shape), align_corners=False)
    return F.grid_sample(v, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def apply_shift(x: torch.Tensor, contract: dict, shift: Shift, seed: int = 0) -> torch.Tensor:
    """``x`` (N, C, H, W, normalised model input) as another acquisition would give it (module docstring)."""
    from .finetune.common import apply_gain

    if shift.kind not in KINDS:
        raise ValueError(f"unknown acquisition shift '{shift.kind}'; known: {', '.join(KINDS)}")
    gen = torch.Generator().manual_seed(seed)
    v, mean, std = _scaled(x, contract)
    n = len(v)
    if shift.kind == "gain":
        v, _, _ = _scaled(apply_gain(x.float(), contract, shift.value), contract)
    elif shift.kind == "gamma":
        v = v.clamp_min(0.0) ** shift.value
    elif shift.kind == "speckle":
        noise = torch._standard_gamma(torch.full(v.shape, float(shift.value)), generator=gen) / shift.value
        v = _intensity_factor(v, noise, contract)
    elif shift.kind == "zoom":
        v = _warp(v, torch.full((n,), float(shift.value)), torch.zeros(n), torch.zeros(n, 2))
    else:  # pose: a random sign of rotation and a random direction of translation per chip
        sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        ang = sign * math.radians(shift.value)
        phi = torch.rand(n, generator=gen) * 2 * math.pi
        v = _warp(v, torch.ones(n), ang, shift.pixels * torch.stack([torch.cos(phi), torch.sin(phi)], 1))
    return _finish(v, mean, std, contract)


def shifted_sets(x: torch.Tensor, contract: dict, shifts=DEFAULT_SHIFTS, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"clean": x, shift name: apply_shift(x, ...)} for every shift (the same seed for each)."""
    return {"clean": x, **{s.name: apply_shift(x, contract, s, seed) for s in shifts}}


def acquisition_jitter(x: torch.Tensor, contract: dict, gain_db: float = 2.0, gamma: float = 1.3,
                       looks: tuple[float, float] = (2.0, 16.0), zoom: float = 1.15, degrees: float = 10.0,
                       pixels: float = 4.0, warp: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random change of acquisition per training chip (augmentation): a gain uniform in +-``gain_db``
    dB, a stretch exponent log-uniform in [1/``gamma``, ``gamma``], fresh speckle on half the chips
    (looks log-uniform in ``looks``), and on a share ``warp`` of the chips a zoom log-uniform in
    [1/``zoom``, ``zoom``], a rotation within +-``degrees`` and a translation within +-``pixels`` px.
    Same input and output as ``apply_shift``. The resampling (bilinear) also smooths the speckle, to
    which the MSTAR classifiers are very sensitive (``recipes/probe_resampling.py``): with ``warp`` 1
    every training chip was smoothed and the quick ViT fell from 74.5 to 24.8 % on unshifted test chips
    (README, "Measured"), hence half by default."""
    g = generator
    v, mean, std = _scaled(x, contract)
    n = len(v)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    if gain_db:
        v = _intensity_factor(v, (10 ** (u(-gain_db, gain_db) / 10)).view(n, 1, 1, 1), contract)
    if gamma and gamma != 1.0:
        v = v.clamp(0.0, 1.0) ** torch.exp(u(-math.log(gamma), math.log(gamma))).view(n, 1, 1, 1)
    if looks:
        lk = torch.exp(u(math.log(looks[0]), math.log(looks[1]))).view(n, 1, 1, 1)
        noise = torch._standard_gamma(lk.expand(v.shape).contiguous(), generator=g) / lk
        fresh = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1)
        v = torch.where(fresh, _intensity_factor(v.clamp(0.0, 1.0), noise, contract), v)
    if warp and (zoom or degrees or pixels):
        z = torch.exp(u(-math.log(zoom), math.log(zoom))) if zoom and zoom != 1.0 else torch.ones(n)
        ang = u(-math.radians(degrees), math.radians(degrees)) if degrees else torch.zeros(n)
        sh = torch.stack([u(-pixels, pixels), u(-pixels, pixels)], 1) if pixels else torch.zeros(n, 2)
        moved = (torch.rand(n, generator=g) < warp).view(n, 1, 1, 1)
        v = torch.where(moved, _warp(v.clamp(0.0, 1.0), z, ang, sh), v)
    return _finish(v, mean, std, contract)


def accuracy_table(probs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """{set name: accuracy} from each set's (N, K) class probabilities or logits (the sets of
    ``shifted_sets``), and "shift mean": the mean over the shifted sets (every set but "clean")."""
    out = {name: float((np.asarray(p).argmax(1) == labels).mean()) for name, p in probs.items()}
    shifted = [v for k, v in out.items() if k != "clean"]
    if shifted:
        out["shift mean"] = float(np.mean(shifted))
    return out
