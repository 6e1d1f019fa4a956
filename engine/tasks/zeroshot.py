"""Zero-shot classification with a CLIP package: each window's image embedding against class names
typed at run time (``engine.clip``: the package, its tokenizer, prompt templates and input contract)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import PackageError
from .base import Task

if TYPE_CHECKING:
    from ..card import ModelCard
    from ..types import RunContext


class ZeroshotTask(Task):
    name = "zeroshot"
    outputs = ("embeddings",)  # the image tower's unit-norm embeddings (B, D)
    default_overlap = 0.0  # a grid of windows by default

    def build_model(self, card: ModelCard) -> Any:
        from ..clip import build_clip

        return build_clip(card)

    def forward(self, model: Any, x: Any, mask_ratio: float = 0.75) -> Any:
        return model.encode_image(x, normalize=True)

    def check_card(self, card: ModelCard) -> list[str]:
        from ..clip.card import card_problems

        return card_problems(card)

    def summary(self, card: ModelCard) -> list[str]:
        clip = card.architecture.extra["clip"]
        cfg = clip["config"]
        return [f"clip:          open_clip {clip.get('model_name') or 'custom config'}, embedding {cfg['embed_dim']}, "
                f"text context {clip['tokenizer']['context_length']} tokens, weights from {clip.get('source')}",
                "templates:     " + " | ".join(clip["templates"])]

    def make_sink(self, ctx: RunContext) -> Any:
        raise PackageError(f"{ctx.card.name}: zero-shot maps are not written yet by this sarmae")

    def merge(self, job: Any) -> Any:
        raise PackageError("zero-shot maps are not written yet by this sarmae")
