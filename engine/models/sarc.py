"""SARC projection head: SAR visible tokens -> optical-teacher token space (SARMAE_SPEC 3)."""

from __future__ import annotations

import torch
import torch.nn as nn


class SARCProjectionHead(nn.Module):
    """Linear(D, D) -> ReLU -> Linear(D, Dt) -> LayerNorm(Dt); weights N(0, 0.01), zero bias.

    Indices 0, 2, 3 match the reference checkpoint's ``sar_alignment_ffn.{0,2,3}`` names.
    """

    def __init__(self, dim: int, teacher_dim: int = 768):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, teacher_dim), nn.LayerNorm(teacher_dim)
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, K, D) -> (N, K, Dt)."""
        return self.net(tokens)


def sarc_loss(student: torch.Tensor, teacher: torch.Tensor, paired: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over paired samples and tokens of 1 - cos(student, teacher), eps 1e-6.

    student, teacher: (N, K, Dt); paired: (N,) bool (None = all paired). Returns 0 (with a graph)
    when no sample is paired, so unpaired batches contribute only the MAE loss.
    """
    cos = nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-6)  # (N, K)
    per_sample = (1.0 - cos).mean(dim=1)
    if paired is None:
        return per_sample.mean()
    paired = paired.to(per_sample.device, torch.bool)
    if not paired.any():
        return per_sample.sum() * 0.0
    return per_sample[paired].mean()
