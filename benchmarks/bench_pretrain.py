"""Pretraining speed (ratios measured in one run; not a timed test).

  masking:  training images/s with mask ratio 0.75 / the same model with the encoder on all
            tokens (mask ratio 0): target >= 2.5 (proves the encoder skips masked tokens)
  absolute: ViT-Tiny images/s on this machine (forward + backward + AdamW step)

Usage: python benchmarks/bench_pretrain.py [--arch vit_tiny_patch16] [--img 224] [--batch 16]
       [--decoder-depth 8] [--decoder-dim 512] [--steps 6]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import ROOT  # noqa: F401  (puts the repo on sys.path)

from engine.models import DecoderConfig, MaskedAutoencoderViT
from engine.models.registry import encoder_config


class EncoderOnAllTokens(MaskedAutoencoderViT):
    """The same MAE, but the encoder runs on ALL tokens (masked ones included, as MAE's
    'encoder w/ [M]' ablation); the kept tokens are then handed to the same decoder and loss."""

    def forward_encoder(self, imgs, mask_ratio, generator=None, noise=None):
        from engine.models.mae import random_masking

        tokens, grid = self.embed(imgs)
        _, mask, ids_restore, ids_keep = random_masking(tokens, mask_ratio, generator, noise)
        x, _ = self.run_blocks(self.prepend_cls(tokens))  # 1 + L tokens through every block
        x = self.norm(x)
        kept = torch.gather(x[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], kept], 1), mask, ids_restore, ids_keep, grid


def images_per_s(model, batch: torch.Tensor, mask_ratio: float, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = model(batch, mask_ratio=mask_ratio).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_tiny_patch16")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--decoder-depth", type=int, default=8)
    ap.add_argument("--decoder-dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    torch.manual_seed(0)
    size = a.arch.split("_")[1]
    enc = encoder_config(size, img_size=a.img, in_chans=a.in_chans)
    dec = DecoderConfig(embed_dim=a.decoder_dim, depth=a.decoder_depth, num_heads=max(1, a.decoder_dim // 32))
    model = MaskedAutoencoderViT(enc, dec)
    baseline = EncoderOnAllTokens(enc, dec)
    baseline.load_state_dict(model.state_dict())
    x = torch.rand(a.batch, a.in_chans, a.img, a.img) * 2 - 1
    masked = images_per_s(model, x, 0.75, a.steps)
    full = images_per_s(baseline, x, 0.75, a.steps)
    print(f"pretraining {a.arch} {a.img}px, decoder {a.decoder_dim}d{a.decoder_depth}b, batch {a.batch}, "
          f"{torch.get_num_threads()} threads: mask 0.75 {masked:.1f} img/s, encoder on all tokens {full:.1f} img/s "
          f"-> ratio {masked / full:.2f} (target >= 2.5)")


if __name__ == "__main__":
    main()
