"""The text side of a CLIP package: open_clip's BPE tokenizer, phrase checks, and the prompt
ensemble that turns class names into class embeddings.

A phrase longer than the context (77 tokens for CLIP) is truncated by open_clip (its last token
becomes the end-of-text token); here that is said with a warning naming the phrase. An empty phrase,
an empty or repeated class name, or a template without exactly one ``{}`` is refused.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SarmaeError

if TYPE_CHECKING:
    from ..card import ModelCard
    from .model import ClipModel

log = logging.getLogger("sarmae.clip")


class PromptError(SarmaeError, ValueError):
    """A phrase, a class list or a prompt template cannot be used."""


def make_tokenizer(card: ModelCard) -> Any:
    """open_clip's SimpleTokenizer (the BPE vocabulary shipped in its wheel; nothing is fetched),
    one per context length in this process (reading the vocabulary takes a few hundred ms)."""
    return _tokenizer(int(card.architecture.extra["clip"]["tokenizer"]["context_length"]))


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> Any:
    from .card import import_open_clip

    return import_open_clip().tokenizer.SimpleTokenizer(context_length=context_length)


def tokenize(tokenizer: Any, texts: Sequence[str], where: str = "the phrase") -> Any:
    """(N, context_length) token ids; an empty phrase is refused, an over-long one truncated with a warning."""
    texts = [str(t) for t in texts]
    ctx = tokenizer.context_length
    for t in texts:
        if not t.strip():
            raise PromptError(f"{where}: an empty phrase has no meaning to the text tower; type some words")
        n = len(tokenizer.encode(t)) + 2  # + start and end of text
        if n > ctx:
            log.warning("%s: '%s' is %d tokens, longer than the model's %d: truncated to its first %d tokens",
                        where, t[:60] + ("..." if len(t) > 60 else ""), n, ctx, ctx - 2)
    return tokenizer(texts)


def check_classes(class_names: Sequence[str], where: str = "--classes") -> list[str]:
    """Stripped class names; refuses an empty list, an empty name and names given twice."""
    names = [str(c).strip() for c in class_names]
    if not names or not all(names):
        raise PromptError(f"{where}: give at least one non-empty class name, e.g. \"water,urban,forest\" "
                          f"(found {list(class_names)!r})")
    lower = [n.lower() for n in names]
    twice = sorted({n for n, k in zip(names, lower, strict=True) if lower.count(k) > 1})
    if twice:
        raise PromptError(f"{where}: class names must differ (given more than once: {', '.join(twice)}); "
                          "each class needs its own name")
    return names


def check_templates(templates: Sequence[str], where: str = "--templates") -> list[str]:
    out = [str(t) for t in templates]
    bad = [t for t in out if t.count("{}") != 1]
    if not out or bad:
        raise PromptError(f"{where}: each prompt template needs exactly one {{}} where the class name goes, "
                          f"e.g. \"a SAR image of {{}}.\" (found {bad or out!r})")
    return out


def encode_phrases(clip: ClipModel, phrases: Sequence[str], where: str = "the phrase") -> Any:
    """(N, D) unit-norm text embeddings of ``phrases`` (no gradient)."""
    import torch

    tokens = tokenize(clip.tokenizer, phrases, where)
    device = next(clip.model.parameters()).device
    with torch.no_grad():
        return clip.model.encode_text(tokens.to(device), normalize=True).float()


def text_embeddings(clip: ClipModel, class_names: Sequence[str], templates: Sequence[str] | None = None) -> Any:
    """(K, D) unit-norm class embeddings: for each class, the mean of its templates' normalised
    embeddings, renormalised (the prompt ensemble); ``templates`` None: the package's."""
    import torch

    names = check_classes(class_names)
    temps = check_templates(clip.templates if templates is None else templates)
    prompts = [t.replace("{}", n) for n in names for t in temps]
    e = encode_phrases(clip, prompts, "a class prompt").reshape(len(names), len(temps), -1)
    e = e.mean(dim=1)
    return torch.nn.functional.normalize(e, dim=-1)
