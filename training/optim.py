"""AdamW parameter groups and the per-iteration warm-up + half-cosine schedule."""

from __future__ import annotations

import math

import torch


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases / norms / 1-D params / position & token
    embeddings without weight decay (MAE's rule)."""
    decay, no_decay = [], []
    seen = set()
    for module in modules:
        skip = set(getattr(module, "no_weight_decay", lambda: set())())
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim <= 1 or name.endswith(".bias") or name in skip or "token" in name or "pos_embed" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up to base_lr over warmup_steps, then half-cosine from base_lr to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
