"""The model card (``model.json``) as typed records: the contract between training, the engine and
the plugin (DESIGN.md, "Model packages").

model.json, format_version 2 to 5 (version 1 cards, without ``output``, still load; a card is
written as version 3 only when its input has ``standardise`` (or another field of ``NEEDS_V3``), as
version 4 only when that standardisation also smooths (``smooth``), as version 5 only when a
classifier's head averages views (``architecture.head.views`` 8), so that an older sarmae refuses it
instead of running the model otherwise than it was trained and chosen)::

    {"format": "sarmae-model", "format_version": 2,
     "name": str, "task": a registered task (engine.tasks: embed, reconstruct, classify, segment, detect, ...),
     "architecture": {"name": str, "encoder": {in_chans, img_size, patch_size, embed_dim, depth, num_heads,
                      ...other ViTConfig fields}, "decoder": {...} (reconstruct), "head": {...} (class tasks;
                      classify: "pool", "blocks", "views": 1 | 8, format_version 5 with 8: engine.models.heads)},
     "classes": [{"name": str, "colour": "#rrggbb"}, ...],
     "input": {"bands": [str], "units": "linear_power"|"amplitude"|"db"|"uint8",
               "clip": [lo, hi], "mean": [..], "std": [..], "nodata": "mask", "pixel_spacing_m": float|null,
               "standardise": {"per": "window", "centre": "median", "spread": "iqr" | dB, "smooth": px} (optional,
               classify only, format_version 3, with "smooth" 4: engine.radiometry.standardise_windows)},
     "output": what the model (and its model.onnx) returns: "logits" | "probabilities" (classify, segment),
               "features" (embed), "image" (reconstruct), "boxes" (detect); v1 cards: the task's default,
     "provenance": {...free-form: data, epochs, metrics, date, code version...},
     "weights": {"file": "weights.safetensors", "sha256": hex, "format": "safetensors"},
     "onnx": {"fp32": {"file": "model.onnx", "sha256": hex},            # optional: the ONNX files,
              "int8": {"file": "model.int8.onnx", "sha256": hex, "method": str, "gate": {...}}},
     "files": {name: sha256 hex}}                                      # optional: every other file of the
                                                                         # package (vocabularies, curves, ...)

A task (or a task's method, e.g. ``detect`` + ``cfar``) without a network (``Task.needs_weights``
False) has no ``architecture.encoder``, may have no ``input``, and has ``"weights": {}``; its settings
sit in the architecture under the method's name (``"architecture": {"name": "cfar", "cfar": {...}}``).

``ModelCard.architecture`` (``Architecture``, with ``.encoder`` an ``EncoderSpec``) and
``ModelCard.input`` (``InputContract``) are dataclasses with typed fields; they also read as the
JSON objects they came from (``card.input["units"]``, ``dict(card.architecture["encoder"])``),
which is what ``engine.models.build_from_architecture`` and the training code take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PackageError

FORMAT = "sarmae-model"
FORMAT_VERSION = 5  # 2: "output" says what the model returns (logits or probabilities, ...); 3: input.standardise;
# 4: input.standardise.smooth (a Gaussian low-pass of the standardised window: an older engine would skip it);
# 5: architecture.head.views (a classifier averaging the chip's 8 dihedral views: an older engine would run one)
# input-contract fields an older engine would ignore and so feed the model wrongly scaled input: cards
# with any of them are written as version 3, which such an engine refuses
NEEDS_V3 = ("standardise", "channels", "band_clip", "stretch")
UNITS = ("linear_power", "amplitude", "db", "uint8")
MAX_SMOOTH_PX = 8.0  # input.standardise.smooth: the largest Gaussian sigma (px) a card may ask for
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
# Default clip ranges per unit (what [0, 1] spans before mean/std): wide enough for land, water
# and bright targets in calibrated backscatter; a package overrides them with its training data's.
DEFAULT_CLIP = {"db": [-35.0, 10.0], "linear_power": [0.0, 1.0], "amplitude": [0.0, 1.0], "uint8": [0.0, 255.0]}


class _Record(Mapping):
    """A typed record that also reads as the JSON object it came from (keys = its fields, except
    ``extra``, whose keys it carries through unchanged; optional fields that are None are absent)."""

    _optional: tuple[str, ...] = ()

    def _items(self) -> Iterator[tuple[str, Any]]:
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.name in self._optional:
                continue
            yield f.name, v
        yield from self.extra.items()

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items():
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items())

    def __len__(self) -> int:
        return sum(1 for _ in self._items())

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.to_dict() if isinstance(v, _Record) else v) for k, v in self._items()}


@dataclass(eq=False)
class EncoderSpec(_Record):
    """The ViT encoder (``engine.models.vit.ViTConfig``); fields the engine reads are typed."""

    in_chans: int
    img_size: int | list[int]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    extra: dict[str, Any] = field(default_factory=dict)  # other ViTConfig fields (mlp_ratio, drop_path_rate, ...)

    @property
    def input_size(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @classmethod
    def parse(cls, d: Any, problems: list[str]) -> EncoderSpec | None:
        if not isinstance(d, Mapping):
            problems.append("'architecture.encoder' is missing")
            return None
        missing = [k for k in ("in_chans", "img_size", "patch_size", "embed_dim", "depth", "num_heads") if k not in d]
        problems += [f"'architecture.encoder.{k}' is missing" for k in missing]
        ints = [k for k in ("in_chans", "patch_size", "embed_dim", "depth", "num_heads")
                if k in d and not (isinstance(d[k], int) and d[k] > 0)]
        problems += [f"'architecture.encoder.{k}' must be a positive integer (found {d[k]!r})" for k in ints]
        if missing or ints:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: d[k] for k in known if k in d}, extra={k: v for k, v in d.items() if k not in known})


@dataclass(eq=False)
class Architecture(_Record):
    """How to build the model: a named constructor, its encoder, and the task's decoder or head (a
    method without a network, e.g. CFAR: no encoder, its settings in ``extra``)."""

    name: str
    encoder: EncoderSpec | None
    decoder: dict | None = None  # MAE decoder (reconstruct)
    head: dict | None = None  # task head (classify, segment, detect)
    extra: dict[str, Any] = field(default_factory=dict)
    _optional = ("encoder", "decoder", "head")

    @classmethod
    def parse(cls, d: Any, problems: list[str], needs_encoder: bool = True) -> Architecture | None:
        if not isinstance(d, Mapping):
            problems.append("'architecture' is missing or not an object")
            return None
        enc = EncoderSpec.parse(d.get("encoder"), problems) if needs_encoder or d.get("encoder") is not None else None
        for k in ("decoder", "head"):
            if d.get(k) is not None and not isinstance(d[k], Mapping):
                problems.append(f"'architecture.{k}' must be an object")
        if (enc is None and needs_encoder) or any(d.get(k) is not None and not isinstance(d[k], Mapping) for k in ("decoder", "head")):
            return None
        return cls(name=str(d.get("name", "custom")), encoder=enc,
                   decoder=None if d.get("decoder") is None else dict(d["decoder"]),
                   head=None if d.get("head") is None else dict(d["head"]),
                   extra={k: v for k, v in d.items() if k not in ("name", "encoder", "decoder", "head")})


@dataclass(eq=False)
class InputContract(_Record):
    """What the model expects: bands in order, units, and the clip/mean/std that scale them.

    Optional (a CLIP package, ``engine.clip``): ``band_clip`` one [lo, hi] per band instead of
    ``clip``; ``stretch`` "minmax": each window's bands min-max stretched to 8-bit levels after the
    clip; ``channels`` the model's input channels, each a band name or "mean" (the mean of the
    scaled bands), e.g. ["VV", "VH", "mean"]; ``mean``/``std`` then have one entry per channel."""

    bands: list[str]
    units: str
    clip: list[float]
    mean: list[float]
    std: list[float]
    nodata: str = "mask"
    pixel_spacing_m: float | None = None
    channels: list[str] | None = None
    band_clip: list[list[float]] | None = None
    stretch: str | None = None
    standardise: dict | None = None  # per-window standardisation in dB (engine.radiometry.standardise_windows)
    display_db: list[float] | None = None  # a dB model that reads 8-bit display rasters: 0..255 stand for [lo, hi] dB
    extra: dict[str, Any] = field(default_factory=dict)
    _optional = ("channels", "band_clip", "stretch", "standardise", "display_db")

    @classmethod
    def parse(cls, d: Any, in_chans: int | None, problems: list[str]) -> InputContract | None:
        if not isinstance(d, Mapping):
            problems.append("'input' is missing or not an object")
            return None
        n0 = len(problems)
        if d.get("units") not in UNITS:
            problems.append(f"'input.units' must be one of {', '.join(UNITS)} (found {d.get('units')!r})")
        channels = d.get("channels")
        for k in ("bands", "mean", "std") if channels is None else ("channels", "mean", "std"):
            v = d.get(k)
            if not isinstance(v, list) or (in_chans is not None and len(v) != in_chans):
                problems.append(f"'input.{k}' must be a list with one entry per input channel ({in_chans})")
        problems += _derived_problems(d)
        clip = d.get("clip")
        if not (isinstance(clip, list) and len(clip) == 2 and all(isinstance(c, (int, float)) for c in clip)
                and clip[0] < clip[1]):
            problems.append(f"'input.clip' must be [low, high] with low < high (found {clip!r})")
        if isinstance(d.get("std"), list) and any(not isinstance(s, (int, float)) or s <= 0 for s in d["std"]):
            problems.append("'input.std' values must be positive numbers")
        if d.get("standardise") is not None:
            bad = check_standardise(d["standardise"])
            if bad:
                problems.append(f"'input.standardise' {bad}")
        if len(problems) > n0:
            return None
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: d[k] for k in known if k in d}, extra={k: v for k, v in d.items() if k not in known})


def _derived_problems(d: Mapping) -> list[str]:
    """What is wrong with the optional ``channels``, ``band_clip`` and ``stretch`` of an input contract."""
    bands, problems = d.get("bands"), []
    if not (isinstance(bands, list) and bands):
        return ["'input.bands' must be a non-empty list of band names"]
    ch = d.get("channels")
    if ch is not None and not (isinstance(ch, list) and all(c in bands or c == "mean" for c in ch)):
        problems.append(f"'input.channels' must list band names of 'input.bands' or \"mean\" (found {ch!r})")
    bc = d.get("band_clip")
    if bc is not None and not (isinstance(bc, list) and len(bc) == len(bands) and all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(c, (int, float)) for c in r) and r[0] < r[1]
            for r in bc)):
        problems.append(f"'input.band_clip' must hold one [low, high] (low < high) per band (found {bc!r})")
    if d.get("stretch") not in (None, "minmax"):
        problems.append(f"'input.stretch' must be \"minmax\" or absent (found {d.get('stretch')!r})")
    dd = d.get("display_db")
    if dd is not None and not (d.get("units") == "db" and isinstance(dd, list) and len(dd) == 2 and all(
            isinstance(c, (int, float)) for c in dd) and dd[0] < dd[1]):
        problems.append(f"'input.display_db' must be [low, high] dB (low < high) of a dB model (found {dd!r})")
    return problems


def check_standardise(spec: Any) -> str | None:
    """None when ``spec`` (the contract's ``standardise``) is valid, else what is wrong with it."""
    if not isinstance(spec, dict):
        return f"must be an object such as {{'per': 'window', 'centre': 'median', 'spread': 'iqr'}} (found {spec!r})"
    if spec.get("per") != "window":
        return (f"'per' must be 'window' (found {spec.get('per')!r}); per-scene statistics are not implemented, "
                "so only packages that label whole windows (classify) standardise their input")
    if spec.get("centre", "median") != "median":
        return f"'centre' must be 'median' (found {spec.get('centre')!r})"
    spread = spec.get("spread", "iqr")
    if spread != "iqr" and not (isinstance(spread, (int, float)) and not isinstance(spread, bool) and spread > 0):
        return f"'spread' must be 'iqr' or a positive number of dB (found {spread!r})"
    smooth = spec.get("smooth", 0)
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not 0 <= smooth <= MAX_SMOOTH_PX:
        return f"'smooth' must be a Gaussian sigma in pixels from 0 to {MAX_SMOOTH_PX:g} (found {smooth!r})"
    unknown = sorted(set(spec) - {"per", "centre", "spread", "smooth"})
    if unknown:
        return f"has unknown field(s) {', '.join(map(repr, unknown))} (this sarmae knows per, centre, spread, smooth)"
    return None


def default_input(in_chans: int, units: str = "db", bands: list[str] | None = None) -> dict:
    """The SARMAE input contract: clip to a unit range, scale to [0, 1], mean 0.5 / std 0.5."""
    if units not in UNITS:
        raise PackageError(f"unknown input units '{units}'; use one of {', '.join(UNITS)}")
    if bands is None:
        bands = ["VV", "VH"][:in_chans] if in_chans <= 2 else [f"band{i + 1}" for i in range(in_chans)]
    return {"bands": list(bands), "units": units, "clip": list(DEFAULT_CLIP[units]),
            "mean": [0.5] * in_chans, "std": [0.5] * in_chans, "nodata": "mask", "pixel_spacing_m": None}


def default_classes(names: list[str]) -> list[dict]:
    return [{"name": n, "colour": PALETTE[i % len(PALETTE)]} for i, n in enumerate(names)]


@dataclass
class ModelCard:
    """The parsed model.json. ``architecture`` and ``input`` given as plain dicts are parsed (and
    checked) into their typed records; ``output`` None means the task's default."""

    name: str
    task: str
    architecture: Architecture
    input: InputContract | None  # None only for a task without a network (CFAR)
    classes: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    output: str | None = None
    onnx: dict = field(default_factory=dict)  # precision (fp32, int8) -> {"file", "sha256", ...}: the ONNX files
    files: dict = field(default_factory=dict)  # every other file of the package (vocabularies, ...) -> sha256
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        from .tasks import get_task

        problems: list[str] = []
        arch = self.architecture
        method = arch.name if isinstance(arch, Architecture) else arch.get("name") if isinstance(arch, Mapping) else None
        task = get_task(self.task, method if isinstance(method, str) else None)
        if not isinstance(self.architecture, Architecture):
            self.architecture = Architecture.parse(self.architecture, problems, task.needs_weights and task.needs_encoder)
        if not isinstance(self.input, InputContract) and (self.input is not None or task.needs_weights):
            enc = self.architecture.encoder if self.architecture is not None else None
            self.input = InputContract.parse(self.input, enc.in_chans if enc is not None else None, problems)
        if self.output is None:
            self.output = task.outputs[0]
        if self.input is not None and self.input.standardise is not None and task.name != "classify":
            problems.append(f"'input.standardise' (per window) is for classify models, which label whole windows; a "
                            f"'{task.name}' model would see each window with its own statistics (seams between "
                            "windows). Retrain it without standardisation")
        if not problems:
            problems += task.check_card(self)
        if problems:
            raise PackageError(f"model card '{self.name}': " + "; ".join(problems))

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    @property
    def in_chans(self) -> int:
        enc = self.architecture.encoder
        return enc.in_chans if enc is not None else len(self.input.bands) if self.input is not None else 1

    def _encoder(self) -> EncoderSpec:
        if self.architecture.encoder is None:
            raise PackageError(f"model '{self.name}' ({self.task}, {self.architecture.name}) has no network: "
                               "it has no input size, patch size or weights")
        return self.architecture.encoder

    @property
    def input_size(self) -> tuple[int, int]:
        return self._encoder().input_size

    @property
    def patch_size(self) -> int:
        return self._encoder().patch_size

    def to_dict(self) -> dict:
        """The model.json object, written as the oldest format version that holds it (3 with any of
        ``NEEDS_V3`` in the input contract, 4 when its standardisation smooths, 5 when its head averages
        views, else 2)."""
        inp = self.input
        version = 3 if inp is not None and any(getattr(inp, k) is not None for k in NEEDS_V3) else 2
        if inp is not None and inp.standardise is not None and inp.standardise.get("smooth"):
            version = 4
        if (self.architecture.head or {}).get("views", 1) != 1:
            version = 5
        d = {"format": FORMAT, "format_version": version, "name": self.name, "task": self.task,
             "architecture": self.architecture.to_dict(), "classes": [dict(c) for c in self.classes],
             "input": None if self.input is None else self.input.to_dict(), "output": self.output,
             "provenance": self.provenance, "weights": self.weights, **({"onnx": self.onnx} if self.onnx else {}),
             **({"files": self.files} if self.files else {})}
        return {k: v for k, v in d.items() if not (k == "input" and v is None)}


def validate_card(d: Any, where: str) -> ModelCard:
    """Check a parsed model.json (format_version 1 to 5); every problem is listed with its file."""
    from .tasks import TASKS, TaskRegistryError, get_task, task_names

    if not isinstance(d, dict):
        raise PackageError(f"{where}: model.json must hold a JSON object, found {type(d).__name__}")
    problems: list[str] = []
    if d.get("format") != FORMAT:
        problems.append(f"'format' must be '{FORMAT}' (found {d.get('format')!r})")
    fv = d.get("format_version")
    if not isinstance(fv, int) or fv < 1:
        problems.append(f"'format_version' must be a positive integer (found {fv!r})")
    elif fv > FORMAT_VERSION:
        problems.append(f"format_version {fv} is newer than this sarmae understands ({FORMAT_VERSION}): upgrade sarmae")
    for key, typ in (("name", str), ("task", str), ("architecture", dict), ("weights", dict)):
        if not isinstance(d.get(key), typ):
            problems.append(f"'{key}' is missing or not a {typ.__name__}")
    if problems:
        raise PackageError(f"{where}: invalid model.json: " + "; ".join(problems))
    task = None
    if d["task"] not in TASKS:
        problems.append(f"'task' must be one of {', '.join(task_names())} (found '{d['task']}'); other tasks come "
                        "from packages with 'sarmae.tasks' entry points")
    else:
        method = d["architecture"].get("name")
        try:
            task = get_task(d["task"], method if isinstance(method, str) else None)
        except TaskRegistryError as e:
            problems.append(str(e))
    network = task is None or task.needs_weights  # no network (CFAR): no encoder, input optional
    encoder = network and (task is None or task.needs_encoder)  # a network of its own (cfar_scored): no encoder
    arch = Architecture.parse(d["architecture"], problems, needs_encoder=encoder)
    inp = None
    if network or d.get("input") is not None:
        inp = InputContract.parse(d.get("input"), arch.encoder.in_chans if arch and arch.encoder else None, problems)
    classes = d.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in classes):
        problems.append("'classes' must be a list of {\"name\": ..., \"colour\": \"#rrggbb\"}")
    elif task is not None and task.needs_classes and not classes:
        problems.append(f"task '{task.name}' needs at least one class in 'classes'")
    elif len({c["name"] for c in classes}) != len(classes):
        problems.append("class names in 'classes' must be unique")
    output = d.get("output")
    if fv >= 2 and task is not None and output not in task.outputs:
        problems.append(f"'output' must say what the model returns, one of {', '.join(task.outputs)} for task "
                        f"'{task.name}' (found {output!r})")
    w = d["weights"]
    if task is not None and task.needs_weights and (not isinstance(w.get("sha256"), str) or len(w["sha256"]) != 64):
        problems.append("'weights.sha256' must be a 64-character hex digest")
    onnx = d.get("onnx", {})
    problems += _onnx_problems(onnx)
    files = d.get("files", {})
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                                            for k, v in files.items())):
        problems.append("'files' must be an object {file name: 64-character hex sha256}")
    if problems:
        raise PackageError(f"{where}: invalid model.json: " + "; ".join(problems))
    try:
        return ModelCard(name=d["name"], task=task.name, architecture=arch, input=inp, classes=classes,
                         provenance=d.get("provenance", {}), weights=w, output=output, onnx=onnx, files=files, format=d["format"],
                         format_version=fv)
    except PackageError as e:  # the task's own checks of the card (e.g. CFAR's settings)
        raise PackageError(f"{where}: invalid model.json: {e}") from e


ONNX_PRECISIONS = ("fp32", "int8")


def _onnx_problems(onnx: Any) -> list[str]:
    """What is wrong with the card's optional ``onnx`` object (the ONNX files and their sha256)."""
    if not isinstance(onnx, dict):
        return ["'onnx' must be an object {precision: {\"file\": ..., \"sha256\": ...}}"]
    problems = []
    for prec, rec in onnx.items():
        if prec not in ONNX_PRECISIONS:
            problems.append(f"'onnx.{prec}': unknown precision (known: {', '.join(ONNX_PRECISIONS)})")
        elif not (isinstance(rec, dict) and isinstance(rec.get("file"), str) and isinstance(rec.get("sha256"), str)
                  and len(rec["sha256"]) == 64):
            problems.append(f"'onnx.{prec}' must hold 'file' and a 64-character hex 'sha256'")
    return problems


def describe(card: ModelCard) -> str:
    """A human-readable model card for ``sarmae info``."""
    import json

    from .tasks import task_for

    enc = card.architecture.encoder
    inp = card.input
    lines = [f"name:          {card.name}", f"task:          {card.task}"]
    if enc is not None:
        lines.append(f"architecture:  {card.architecture.name} (width {enc.embed_dim}, depth {enc.depth}, "
                     f"heads {enc.num_heads}, patch {enc.patch_size}, input {card.input_size[0]}x{card.input_size[1]})")
    else:
        lines.append(f"method:        {card.architecture.name} ("
                     + ("a network of its own, no encoder)" if card.weights.get("sha256") else "no network, no weights)"))
    if inp is not None:
        clip = (", ".join(f"{b} {r[0]}..{r[1]}" for b, r in zip(inp.bands, inp.band_clip, strict=True))
                if inp.band_clip else f"{inp.clip[0]}..{inp.clip[1]}")
        derived = (f" from bands {'+'.join(inp.bands)} (channels {'+'.join(inp.channels)})" if inp.channels
                   else f" {'+'.join(inp.bands)}")
        lines.append(f"input:         {card.in_chans} channel(s){derived}, units {inp.units}, clip {clip}"
                     + (f", {inp.stretch} stretch per window" if inp.stretch else "")
                     + f", mean {inp.mean}, std {inp.std}")
    lines += task_for(card).summary(card)
    lines.append(f"output:        {card.output}")
    if card.classes:
        lines.append("classes:       " + ", ".join(f"{c['name']} ({c.get('colour', '-')})" for c in card.classes))
    for k, v in card.provenance.items():
        lines.append(f"{k + ':':<15}{json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if card.weights.get("sha256"):
        lines.append(f"weights:       {card.weights.get('file')} sha256 {card.weights['sha256'][:16]}...")
    for prec, rec in card.onnx.items():
        gate = rec.get("gate")
        lines.append(f"{'onnx ' + prec + ':':<15}{rec['file']} sha256 {rec['sha256'][:16]}..."
                     + (f"; {gate['metric']} with fp32 {gate['value']:.4f} on {gate['windows']} window(s)"
                        + (" (forced below the gate)" if gate.get("forced") else "") if gate else ""))
    return "\n".join(lines)
