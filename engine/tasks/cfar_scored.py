"""CFAR proposals scored by a learned chip classifier (``detect.cfar_scored``): a detector that
learns on a CPU in a minute or two.

CFAR (``engine.cfar``, settings chosen on the training area for coverage, every object kept)
proposes objects; a small CNN (``engine.models.chip_scorer``) looks at the chip around each
(``engine.cfar.chips``: normalised log intensity, plus the box's size) and returns the probability
that it is a target; boxes are thresholded and NMS'd outside the network (numpy), so the scorer
runs from the package's model.onnx through onnxruntime (no torch) or from its weights through torch. ``training.finetune.cfar_scored`` trains it
(``sarmae finetune --task detect --method cfar_scored``). Its package::

    {"task": "detect", "architecture": {"name": "cfar_scored", "cfar": {CfarConfig settings},
     "head": {ChipScorerConfig}, "cfar_scored": {"score_threshold": p, "format": 2}}, "input": {...},
     "classes": [one class],
     "output": "boxes", "weights": {...}, "onnx": {"fp32": {...}}}

("format" 2: the scorer also has a box branch, ``head.regress``; format 1, no key: scores only,
the proposal's box kept). It writes the same GeoPackage layer as ``detect.cfar`` (the box, refined
by the box branch when there is one; CFAR ratio, pixels, area and length of the proposal's detected
pixels; score = the scorer's probability). Run options as ``detect.cfar``, plus
``backend`` (auto: onnxruntime when the package has a model.onnx, else torch) and ``threads``.
"""

from __future__ import annotations

import numpy as np

from ..cfar.objects import CfarObjects, nms
from ..errors import PackageError, SarmaeError
from ..types import InferenceOptions
from .cfar import CfarTask

BATCH = 256  # chips per forward pass
KEEP_IOU = 0.7  # a refined box this close to its proposal keeps the proposal's box (``refine_boxes``)
FORMAT = 2  # architecture.cfar_scored.format: 1 (no key) scores only; 2 adds the box branch (head.regress)


def probabilities(out: np.ndarray) -> np.ndarray:
    """Scorer outputs (n, 1) logits -> (n,) probabilities."""
    return 1.0 / (1.0 + np.exp(-np.asarray(out, np.float64).reshape(-1)))


def rescore(objects: CfarObjects, probs: np.ndarray, threshold: float, nms_iou: float) -> CfarObjects:
    """The objects scored by the scorer's probabilities, those at ``threshold`` or above, NMS at
    ``nms_iou`` among them (in their order)."""
    o = CfarObjects(objects.boxes, probs, objects.ratios, objects.pixels, objects.lengths, objects.centre_rows)
    o = o.take(probs >= threshold)
    return o.take(np.sort(nms(o.boxes, o.scores, nms_iou))) if len(o) else o


def refine_boxes(boxes: np.ndarray, deltas: np.ndarray, sides: np.ndarray, width: int, height: int,
                 keep_iou: float = KEEP_IOU) -> np.ndarray:
    """(n, 4) proposal boxes -> (n, 4) boxes moved by the scorer's ``deltas`` and clipped to the
    raster, where the move is large: a refined box overlapping its proposal by ``keep_iou`` or more
    is dropped for the proposal (CFAR's box is exact to the pixel around what it detected; the
    branch sees the chip resampled, at 1.5 px per sample or coarser, so its small moves are mostly
    noise; its large ones cut sidelobes, complete pieces and split merged boxes)."""
    from ..models.chip_scorer import apply_deltas

    b = apply_deltas(boxes, deltas, sides)
    b = np.clip(b, 0.0, np.array([width, height, width, height], np.float64))
    small = pairwise_iou(b, boxes) >= keep_iou
    b[small] = boxes[small]
    return b


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each box of ``a`` with the box of ``b`` in the same row (n, 4 each)."""
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


class ProposalScorer:
    """Scores proposals with a package's chip scorer (onnxruntime or torch); ``run_cfar``'s ``refine``."""

    def __init__(self, package, options: InferenceOptions, threshold: float):
        from ..models.chip_scorer import ChipScorerConfig

        self.head = ChipScorerConfig.from_dict(package.card.architecture.head)
        self.threshold, self.nms_iou, self.given = threshold, options.nms_iou, bool(options.input_units)
        self.proposals = self.kept = 0
        want = options.backend or "auto"
        if want == "onnxruntime" and not package.has_onnx:
            raise SarmaeError(f"{package.path}: the package has no model.onnx for --backend onnxruntime; use "
                              "--backend torch, or retrain it (fine-tuning writes model.onnx)")
        if want not in ("auto", "torch", "onnxruntime"):
            raise SarmaeError(f"--backend {want}: the CFAR chip scorer runs with auto, torch or onnxruntime")
        self.kind = "onnxruntime" if want == "onnxruntime" or (want == "auto" and package.has_onnx) else "torch"
        if self.kind == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            if options.threads:
                so.intra_op_num_threads = int(options.threads)
            model = package.onnx_model()
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                                providers=["CPUExecutionProvider"])
            self.version = ort.__version__
        else:
            import torch

            if options.threads:
                torch.set_num_threads(int(options.threads))
            self.model = package.model
            self.version = torch.__version__

    def run(self, chips: np.ndarray, geometry: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, 1, S, S), (n, 3) -> (n, 1) float32 logits and, with a box branch, (n, 4) deltas
        (else None), in batches."""
        names = ["scores", "deltas"] if self.head.regress else ["scores"]
        outs: list[list[np.ndarray]] = [[np.zeros((0, 1), np.float32)], [np.zeros((0, 4), np.float32)]]
        for i in range(0, len(chips), BATCH):
            c, g = chips[i:i + BATCH], geometry[i:i + BATCH]
            if self.kind == "onnxruntime":
                got = self.session.run(names, {"chips": c, "geometry": g})
            else:
                import torch

                with torch.no_grad():
                    got = self.model(torch.from_numpy(c), torch.from_numpy(g))
                got = [t.numpy() for t in (got if isinstance(got, tuple) else (got,))]
            for k, o in enumerate(got):
                outs[k].append(o)
        return np.concatenate(outs[0]), (np.concatenate(outs[1]) if self.head.regress else None)

    def __call__(self, raster, units: str, objects: CfarObjects, source: str) -> CfarObjects:
        from ..cfar.chips import chip_geometry, chip_sides, scorer_chips

        self.proposals += len(objects)
        if not len(objects):
            return objects
        sides = chip_sides(objects.boxes)
        chips = scorer_chips(raster, units, objects.boxes, self.head, source, self.given)
        logits, deltas = self.run(chips, chip_geometry(objects.boxes, sides))
        if deltas is not None:  # the box branch moves each proposal's box (clipped to the raster)
            b = refine_boxes(objects.boxes, deltas, sides, raster.width, raster.height)
            objects = CfarObjects(b, objects.scores, objects.ratios, objects.pixels, objects.lengths,
                                  (b[:, 1] + b[:, 3]) / 2)
        kept = rescore(objects, probabilities(logits), self.threshold, self.nms_iou)
        self.kept += len(kept)
        return kept

    def describe(self) -> str:
        return f"{self.kind} {self.version}"

    def statistics(self) -> dict:
        return {"proposals": self.proposals, "kept": self.kept, "backend": self.describe(),
                "score_threshold": self.threshold}


class CfarScoredTask(CfarTask):
    name = "detect"
    method = "cfar_scored"
    needs_weights = True  # the chip scorer's weights (and model.onnx)
    needs_encoder = False  # a small CNN of its own (architecture.head), no ViT encoder

    def build_model(self, card):
        from ..models.chip_scorer import ChipScorer, ChipScorerConfig

        return ChipScorer(ChipScorerConfig.from_dict(card.architecture.head))

    def check_card(self, card) -> list[str]:
        problems = super().check_card(card)
        if not isinstance(card.architecture.head, dict) or not isinstance(card.architecture.head.get("chip"), int):
            problems.append("'architecture.head' (the chip scorer's size: chip, width, geometry) is missing; "
                            "train the package again with 'sarmae finetune --task detect --method cfar_scored'")
        own = card.architecture.extra.get("cfar_scored")
        t = own.get("score_threshold") if isinstance(own, dict) else None
        fmt = own.get("format", 1) if isinstance(own, dict) else 1
        if fmt not in range(1, FORMAT + 1):
            problems.append(f"'architecture.cfar_scored.format' is {fmt!r}, but this sarmae reads formats 1 to {FORMAT}: "
                            "update sarmae, or train the package again with this version")
        elif isinstance(card.architecture.head, dict) and card.architecture.head.get("regress") and fmt < 2:
            problems.append("'architecture.head.regress' (a box branch) needs 'architecture.cfar_scored.format' 2; "
                            "train the package again with 'sarmae finetune --task detect --method cfar_scored'")
        if not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            problems.append(f"'architecture.cfar_scored.score_threshold' must be a probability in [0, 1) (found "
                            f"{t!r}); train the package again, or set it (0.5 is the scorer's even odds)")
        return problems

    def summary(self, card) -> list[str]:
        h = card.architecture.head
        return super().summary(card)[:2] + [
            f"scorer:        small CNN on {h['chip']}x{h['chip']} chips around each CFAR proposal (width "
            f"{h.get('width')}{'; boxes refined by its box branch' if h.get('regress') else ''}); "
            f"score threshold {self.score_threshold(card, InferenceOptions()):g}"]

    def score_threshold(self, card, options: InferenceOptions) -> float:
        """The probability a box needs: the run's ``score_threshold``, else the package's (chosen in training)."""
        if options.score_threshold is not None:
            return float(options.score_threshold)
        return float(card.architecture.extra["cfar_scored"]["score_threshold"])

    def cfar_threshold(self, card, options: InferenceOptions) -> float:
        return 0.0  # every CFAR object is a proposal; the scorer's probability decides

    def scorer(self, package, options: InferenceOptions, say) -> ProposalScorer:
        s = ProposalScorer(package, options, self.score_threshold(package.card, options))
        say(f"chip scorer: {s.describe()}, score threshold {s.threshold:g}")
        return s


def cfar_scored_card(cfar: dict, head: dict, class_name: str, threshold: float, name: str,
                     provenance: dict | None = None):
    """The card of a CFAR + chip scorer detector (save it with its weights via ``save_package``)."""
    from ..cfar import CfarConfig
    from ..package import default_classes, new_card

    cfg = CfarConfig.from_dict({**cfar, "class_name": class_name, "score_threshold": 0.0})
    if not 0.0 <= threshold < 1.0:
        raise PackageError(f"score threshold {threshold} must lie in [0, 1)")
    # the method's own settings under its name (as every method's card, which the plugin reads)
    own = {"score_threshold": float(threshold), "format": FORMAT}
    arch = {"name": "cfar_scored", "cfar": cfg.to_dict(), "head": dict(head), "cfar_scored": own}
    # what the scorer sees: 10 log10(power) minus each chip's median, / 10 (engine.cfar.chips)
    inp = {"bands": ["band 1"], "units": "db", "clip": [-30.0, 60.0], "mean": [0.0], "std": [10.0], "nodata": "mask",
           "pixel_spacing_m": None, "chip": "dB minus the chip's median (engine.cfar.chips)"}
    return new_card(name, "detect", arch, inp, default_classes([class_name]), provenance)
