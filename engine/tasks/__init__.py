"""Task sinks: what happens to model outputs (stitching, post-processing, writing) per task."""

from __future__ import annotations


def make_sink(ctx):
    """The sink for the package's task (segment, detect, classify, embed, reconstruct)."""
    task = ctx.card.task
    if task == "segment":
        from .segment import SegmentSink as Sink
    elif task == "detect":
        from .detect import DetectSink as Sink
    elif task == "classify":
        from .classify import ClassifySink as Sink
    elif task == "embed":
        from .embed import EmbedSink as Sink
    elif task == "reconstruct":
        from .reconstruct import ReconstructSink as Sink
    else:  # validate_card already refuses other tasks
        raise ValueError(f"no inference for task '{task}'")
    return Sink(ctx)
