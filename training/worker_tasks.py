"""Run tasks ``training`` adds to the engine worker (``sarmae.worker_tasks`` entry points), so the
QGIS plugin can fine-tune and pretrain in the background through the same JSON-lines protocol.

Each is ``fn(params, progress, should_cancel) -> dict``; ``progress(fraction, message)`` with
fraction -1 for log lines. Cancellation stops after the current epoch/step (the time budget
mechanism), keeping nothing half-written.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.errors import CancelledError, SarmaeError

Progress = Callable[[float, str], None]


def finetune(params: dict, progress: Progress, should_cancel: Callable[[], bool]) -> dict:
    """params: kind (classify | segment | detect), output, encoder, and either chips (classify), or
    rasters + labels + class_field, or rasters + label_raster (segment, classify); optional classes,
    colours (one '#rrggbb' per class, in ``classes`` order, or {name: colour}), background,
    overwrite, and FinetuneConfig fields under "config" (epochs, max_minutes, shots, linear_probe,
    seed, bands, input_units, class_weights, max_chips, export_onnx, ...)."""
    from .finetune.common import progress_line
    from .finetune.config import FinetuneConfig

    task = params.get("task_name") or params.get("finetune_task") or params.get("kind")
    if task not in ("classify", "segment", "detect"):
        raise SarmaeError("finetune needs 'kind': classify, segment or detect")
    if not params.get("output"):
        raise SarmaeError("finetune needs 'output': the model package to write")
    conf = dict(params.get("config") or {})
    conf.update(task=task, encoder=params.get("encoder") or "")
    cfg = FinetuneConfig.from_dict(conf)

    def on_epoch(row: dict) -> None:
        if should_cancel():
            raise CancelledError("fine-tuning cancelled by the user; no package was written")
        progress((row["epoch"] + 1) / row["epochs"], progress_line(row))

    overwrite = bool(params.get("overwrite"))
    rasters = params.get("rasters") or []
    kw = dict(classes=params.get("classes"), colours=params.get("colours"), overwrite=overwrite)
    if task == "classify" and params.get("chips") and not rasters:
        from .finetune.classify import finetune_classifier

        return _done(finetune_classifier(params["chips"], params["output"], cfg, on_epoch, **kw))
    if not rasters:
        raise SarmaeError(f"{task} fine-tuning needs 'rasters' with 'labels' + 'class_field' or 'label_raster'"
                          + (", or 'chips': a folder with one sub-folder per class" if task == "classify" else ""))
    kw.update(labels=params.get("labels"), class_field=params.get("class_field"), progress=on_epoch)
    if task == "segment":
        from .finetune.segment import finetune_segmenter

        result = finetune_segmenter(rasters, params["output"], cfg, label_raster=params.get("label_raster"),
                                    background=params.get("background"), **kw)
    elif task == "classify":
        from .finetune.classify import finetune_classifier

        result = finetune_classifier(None, params["output"], cfg, rasters=rasters, label_raster=params.get("label_raster"),
                                     background=params.get("background"), **kw)
    else:
        from .finetune.detect import finetune_detector

        result = finetune_detector(rasters, params["output"], cfg, **kw)
    return _done(result)


def _done(result: dict) -> dict:
    result.pop("history", None)
    return result


def pretrain(params: dict, progress: Progress, should_cancel: Callable[[], bool]) -> dict:
    """params: config (preset or YAML), overrides (list of section.key=value), resume."""
    from .config import load_config
    from .pretrain import pretrain as run

    cfg = load_config(params.get("config") or "cpu_vit_tiny", list(params.get("overrides") or []))

    def on_step(row: dict) -> None:
        if should_cancel():
            raise CancelledError("pretraining cancelled by the user; resume it later with resume=true")
        progress(row["step"] / row["total_steps"], f"epoch {row['epoch']} step {row['step']}: loss {row['loss']:.4f}")

    return run(cfg, resume=bool(params.get("resume")), progress=on_step) or {}
