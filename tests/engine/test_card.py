"""Typed model cards (engine.card): format_version 1 cards still load, cards of this version round
trip, typed fields are validated, and a model that outputs probabilities is not softmaxed twice."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio

from engine.card import FORMAT_VERSION, Architecture, EncoderSpec, InputContract, ModelCard
from engine.errors import PackageError
from engine.package import load_package, read_card


def _copy(tiny_package, tmp_path, task="segment"):
    dest = tmp_path / f"{task}.pkg"
    shutil.copytree(tiny_package(task), dest)
    return dest


def _edit(pkg, fn):
    path = pkg / "model.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_a_version_1_card_still_loads(tiny_package, tmp_path):
    pkg = _copy(tiny_package, tmp_path)

    def to_v1(d):  # what sarmae wrote before format_version 2: no "output"
        d["format_version"] = 1
        del d["output"]

    _edit(pkg, to_v1)
    card = load_package(pkg).card
    assert card.format_version == 1 and card.output == "logits"  # the task's default
    assert isinstance(card.architecture, Architecture) and isinstance(card.architecture.encoder, EncoderSpec)
    assert isinstance(card.input, InputContract) and card.input.units == "db" and card.input.clip == [-35.0, 10.0]
    # written back as version 2, the oldest that holds it (3 with input.standardise, 4 with its smooth: test_standardise)
    assert card.to_dict()["format_version"] == 2 < FORMAT_VERSION == 5 and card.to_dict()["output"] == "logits"


def test_a_card_of_this_version_round_trips(tiny_package):
    pkg = tiny_package("segment")
    raw = json.loads((pkg / "model.json").read_text())
    assert raw["format_version"] == 2 and raw["output"] == "logits"
    card = read_card(pkg)
    assert card.to_dict() == raw
    enc = card.architecture.encoder
    assert (enc.in_chans, enc.patch_size, enc.embed_dim, enc.depth) == (2, 16, 192, 2)
    assert card.input_size == (32, 32) and card.patch_size == 16 and card.in_chans == 2
    # the records still read as the JSON objects (what training and build_from_architecture take)
    assert card.input == raw["input"] and dict(card.architecture["encoder"]) == raw["architecture"]["encoder"]
    assert card.architecture["head"] == {"channels": 32} and "decoder" not in card.architecture


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(output="softmax"), "'output' must say what the model returns, one of logits, probabilities"),
    (lambda d: d["architecture"]["encoder"].update(patch_size="16"), "encoder.patch_size' must be a positive integer"),
    (lambda d: d["architecture"].update(head=[1]), "'architecture.head' must be an object"),
    (lambda d: d["input"].update(clip=[5, 1]), "'input.clip' must be \\[low, high\\]"),
    # a network needs its encoder and input contract (only a task without one, CFAR, goes without)
    (lambda d: d["architecture"].pop("encoder"), "'architecture.encoder' is missing"),
    (lambda d: d.pop("input"), "'input' is missing"),
    (lambda d: d["weights"].pop("sha256"), "'weights.sha256' must be a 64-character hex digest"),
])
def test_typed_fields_are_validated(tiny_package, tmp_path, mutate, message):
    pkg = _copy(tiny_package, tmp_path)
    _edit(pkg, mutate)
    with pytest.raises(PackageError, match=message) as e:
        read_card(pkg)
    assert str(pkg / "model.json") in str(e.value)


def test_a_card_built_in_code_is_checked():
    with pytest.raises(PackageError, match="model card 'x'.*input.units"):
        ModelCard(name="x", task="embed", input={"bands": ["VV"], "units": "furlongs", "clip": [0, 1],
                                                 "mean": [0.5], "std": [0.5]},
                  architecture={"name": "n", "encoder": {"in_chans": 1, "img_size": 32, "patch_size": 16,
                                                         "embed_dim": 8, "depth": 1, "num_heads": 1}})


def test_probabilities_are_not_softmaxed_twice(tiny_package, tmp_path):
    """A model that returns probabilities (a model.onnx made elsewhere), declared so in its card,
    gives the same classes and confidences as the logits model it came from; declared as logits,
    the confidence of two classes could never pass 0.73 (softmax of values in [0, 1])."""
    from helpers.rasters import speckle, write_raster

    from engine.backends import TorchBackend
    from engine.inference import InferenceOptions, run_inference
    from engine.tasks.base import softmax

    logits_pkg = tiny_package("segment")
    probs_pkg = _copy(tiny_package, tmp_path)
    _edit(probs_pkg, lambda d: d.update(output="probabilities"))
    src = write_raster(tmp_path / "in.tif", (10 * np.log10(speckle((2, 64, 80), seed=3))).astype(np.float32))

    class Sharpened:  # the random network made confident (logits x 10), optionally ending in a softmax
        name = "sharpened"

        def __init__(self, pkg, probabilities: bool):
            self.inner = TorchBackend(load_package(pkg).model, "segment", "cpu")
            self.probabilities = probabilities

        def run(self, x):
            y = 10 * self.inner.run(x)
            return softmax(y, axis=1) if self.probabilities else y

        def describe(self):
            return "torch x 10" + (" + softmax" if self.probabilities else "")

    opts = InferenceOptions(overlap=0.0, device="cpu")
    ref = run_inference(str(src), tmp_path / "ref.tif", logits_pkg, opts, backend=Sharpened(logits_pkg, False))
    got = run_inference(str(src), tmp_path / "got.tif", probs_pkg, opts, backend=Sharpened(probs_pkg, True))
    with rasterio.open(ref.outputs["confidence"]) as a, rasterio.open(got.outputs["confidence"]) as b:
        ca, cb = a.read(1), b.read(1)
    with rasterio.open(ref.outputs["class"]) as a, rasterio.open(got.outputs["class"]) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    np.testing.assert_allclose(cb, ca, atol=1e-5)
    assert ca.max() > 0.9  # confident somewhere: a double softmax would stay below 0.73
