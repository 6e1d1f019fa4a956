"""CFAR proposals scored by a learned chip classifier (``detect.cfar_scored``): a detector that
learns on a CPU in a minute or two.

CFAR (``engine.cfar``, settings chosen on the training area for coverage, every object kept)
proposes objects; a small CNN (``engine.models.chip_scorer``) looks at the chip around each
(``engine.cfar.chips``: normalised log intensity, plus the box's size) and returns the probability
that it is a target; boxes are thresholded and NMS'd outside the network (numpy), so the scorer
runs from the package's model.onnx through onnxruntime (no torch) or from its weights through torch. ``training.finetune.cfar_scored`` trains it
(``sarmae finetune --task detect --method cfar_scored``). Its package::

    {"task": "detect", "architecture": {"name": "cfar_scored", "cfar": {CfarConfig settings},
     "head": {ChipScorerConfig}, "cfar_scored": {"score_threshold": p}}, "input": {...}, "classes": [one class],
     "output": "boxes", "weights": {...}, "onnx": {"fp32": {...}}}

It writes the same GeoPackage layer as ``detect.cfar`` (the proposal's box, CFAR ratio, pixels,
area and length; score = the scorer's probability). Run options as ``detect.cfar``, plus
``backend`` (auto: onnxruntime when the package has a model.onnx, else torch) and ``threads``.
"""

from __future__ import annotations

import numpy as np

from ..cfar.objects import CfarObjects, nms
from ..errors import PackageError, SarmaeError
from ..types import InferenceOptions
from .cfar import CfarTask

BATCH = 256  # chips per forward pass


def probabilities(out: np.ndarray) -> np.ndarray:
    """Scorer outputs (n, 1) logits -> (n,) probabilities."""
    return 1.0 / (1.0 + np.exp(-np.asarray(out, np.float64).reshape(-1)))


def rescore(objects: CfarObjects, probs: np.ndarray, threshold: float, nms_iou: float) -> CfarObjects:
    """The objects scored by the scorer's probabilities, those at ``threshold`` or above, NMS at
    ``nms_iou`` among them (in their order)."""
    o = CfarObjects(objects.boxes, probs, objects.ratios, objects.pixels, objects.lengths, objects.centre_rows)
    o = o.take(probs >= threshold)
    return o.take(np.sort(nms(o.boxes, o.scores, nms_iou))) if len(o) else o


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

    def run(self, chips: np.ndarray, geometry: np.ndarray) -> np.ndarray:
        """(n, 1, S, S), (n, 3) -> (n, 1) float32 logits, in batches."""
        outs = [np.zeros((0, 1), np.float32)]
        for i in range(0, len(chips), BATCH):
            c, g = chips[i:i + BATCH], geometry[i:i + BATCH]
            if self.kind == "onnxruntime":
                outs.append(self.session.run(["scores"], {"chips": c, "geometry": g})[0])
            else:
                import torch

                with torch.no_grad():
                    outs.append(self.model(torch.from_numpy(c), torch.from_numpy(g)).numpy())
        return np.concatenate(outs)

    def __call__(self, raster, units: str, objects: CfarObjects, source: str) -> CfarObjects:
        from ..cfar.chips import chip_geometry, chip_sides, read_chips

        self.proposals += len(objects)
        if not len(objects):
            return objects
        sides = chip_sides(objects.boxes)
        chips = read_chips(raster, units, objects.boxes, self.head.chip, source, self.given)
        probs = probabilities(self.run(chips, chip_geometry(objects.boxes, sides)))
        kept = rescore(objects, probs, self.threshold, self.nms_iou)
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
        if not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            problems.append(f"'architecture.cfar_scored.score_threshold' must be a probability in [0, 1) (found "
                            f"{t!r}); train the package again, or set it (0.5 is the scorer's even odds)")
        return problems

    def summary(self, card) -> list[str]:
        h = card.architecture.head
        return super().summary(card)[:2] + [
            f"scorer:        small CNN on {h['chip']}x{h['chip']} chips around each CFAR proposal (width "
            f"{h.get('width')}); score threshold {self.score_threshold(card, InferenceOptions()):g}"]

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
    arch = {"name": "cfar_scored", "cfar": cfg.to_dict(), "head": dict(head),
            "cfar_scored": {"score_threshold": float(threshold)}}
    # what the scorer sees: 10 log10(power) minus each chip's median, / 10 (engine.cfar.chips)
    inp = {"bands": ["band 1"], "units": "db", "clip": [-30.0, 60.0], "mean": [0.0], "std": [10.0], "nodata": "mask",
           "pixel_spacing_m": None, "chip": "dB minus the chip's median (engine.cfar.chips)"}
    return new_card(name, "detect", arch, inp, default_classes([class_name]), provenance)
