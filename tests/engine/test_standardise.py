"""Per-window standardisation in dB (the input contract's ``standardise``): the engine applies it to
every window, so a classifier's answer does not depend on the acquisition's gain; cards that use it
are written as format_version 3 and refused for tasks that stitch windows."""

from __future__ import annotations

import json
from pathlib import Path

import fiona
import numpy as np
import pytest
import torch
from helpers.rasters import speckle, write_raster

from engine.errors import PackageError
from engine.inference import InferenceOptions, run_inference
from engine.package import load_package
from engine.radiometry import Radiometry, standardise_windows

IQR = {"per": "window", "centre": "median", "spread": "iqr"}


def contract(units: str, standardise: dict | None = IQR, clip=None) -> dict:
    clip = clip or {"db": [-35.0, 10.0], "uint8": [0.0, 255.0], "amplitude": [0.0, 1.0],
                    "linear_power": [0.0, 1.0]}[units]
    c = {"bands": ["VV"], "units": units, "clip": clip, "mean": [0.5], "std": [0.5], "nodata": "mask"}
    return {**c, "standardise": standardise} if standardise else c


def normalised(values01: np.ndarray) -> np.ndarray:
    """[0, 1]-scaled values -> the contract's mean 0.5 / std 0.5 input."""
    return ((values01 - 0.5) / 0.5).astype(np.float32)


@pytest.mark.parametrize("units,gain", [("db", 4.0), ("uint8", 10 ** (3 / 20)), ("amplitude", 10 ** (-3 / 20)),
                                        ("linear_power", 10 ** (3 / 10))])
def test_a_gain_leaves_the_standardised_input_unchanged(units, gain):
    rng = np.random.default_rng(0)
    if units == "db":
        v = (-20 + 3 * rng.standard_normal((3, 1, 24, 24)) + 35) / 45  # dB inside the clip range, [0, 1]-scaled
        shifted = v + gain / 45  # +4 dB
    else:
        v = rng.gamma(4.0, 0.04, (3, 1, 24, 24)).clip(0.01, 0.45)  # above the log floor, below saturation
        shifted = (v * gain).clip(0, 1)
    c = contract(units)
    a, b = standardise_windows(normalised(v), c), standardise_windows(normalised(shifted), c)
    assert a.shape == v.shape and a.dtype == np.float32
    assert np.abs(a - b).max() < 1e-3
    # the plain contract (what the engine fed before) moves with the gain
    assert np.abs(normalised(v) - normalised(shifted)).mean() > 0.01
    # each window: median 0, interquartile range 1
    q25, med, q75 = np.percentile(a.reshape(3, -1), [25, 50, 75], axis=1)
    assert np.allclose(med, 0, atol=1e-5) and np.allclose(q75 - q25, 1, atol=1e-3)


def test_statistics_come_from_valid_pixels_and_invalid_ones_are_zero():
    rng = np.random.default_rng(1)
    v = rng.uniform(0.2, 0.4, (1, 16, 16))
    v[:, :4] = 1.0  # saturated rows that are nodata
    valid = np.ones((16, 16), bool)
    valid[:4] = False
    c = contract("uint8")
    out = standardise_windows(normalised(v), c, valid)
    assert out.shape == (1, 16, 16) and np.all(out[:, :4] == 0)
    assert np.median(out[:, valid]) == pytest.approx(0, abs=1e-5)  # the nodata rows did not move the median
    none = standardise_windows(normalised(v), c, np.zeros((16, 16), bool))
    assert np.all(none == 0)


def test_a_fixed_spread_keeps_contrast():
    v = np.linspace(0.1, 0.9, 64, dtype=np.float32).reshape(1, 8, 8)
    out = standardise_windows(normalised(v), contract("db", {"per": "window", "spread": 10.0}))
    # dB contract: 45 dB span, so 0.8 of the range is 36 dB = 3.6 spreads of 10 dB
    assert float(out.max() - out.min()) == pytest.approx(3.6, abs=1e-4)


def test_radiometry_applies_the_contract_per_window():
    x = np.clip(10 * np.log10(speckle((1, 20, 20), seed=3)), -30, 0)  # dB, inside the clip range with +3 dB
    valid = np.ones((20, 20), bool)
    plain = Radiometry(contract("db", None), "db", ["VV"])
    std = Radiometry(contract("db"), "db", ["VV"])
    assert np.abs(plain.apply(x, valid) - plain.apply(x + 3, valid)).mean() > 0.05
    assert np.abs(std.apply(x, valid) - std.apply(x + 3, valid)).max() < 1e-3
    assert "minus its median" in std.describe() and "minus" not in plain.describe()
    with pytest.raises(PackageError, match="'per' must be 'window'"):
        Radiometry(contract("db", {"per": "scene"}), "db", ["VV"])


def _classifier(dest: Path, standardise: dict | None) -> Path:
    """A 2-block ViT-Tiny classifier on one dB band whose head separates windows (the random
    initialisation's near-zero head does not)."""
    from engine.models import build_from_architecture, create_model
    from engine.package import default_classes, default_input, new_card, save_package

    torch.manual_seed(0)
    enc = create_model("vit_tiny_patch16", in_chans=1, img_size=32, depth=2)
    arch = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict()}
    model = build_from_architecture(arch, "classify", 2)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    inp = {**default_input(1, "db", ["VV"]), **({"standardise": standardise} if standardise else {})}
    card = new_card("tiny-std", "classify", arch, inp, default_classes(["a", "b"]), {"training": "unit test"})
    return save_package(model.state_dict(), card, dest)


def _probabilities(tmp_path: Path, pkg: Path, raster: Path, backend: str = "auto") -> np.ndarray:
    out = tmp_path / f"{raster.stem}_{pkg.name}_{backend}.gpkg"
    res = run_inference(str(raster), out, str(pkg), InferenceOptions(threads=1, input_units="db", backend=backend))
    with fiona.open(res.outputs["grid"]) as f:
        return np.array([[p["properties"]["p_a"], p["properties"]["p_b"]] for p in f])


def test_a_standardised_classifier_answers_the_same_at_another_gain(tmp_path):
    base = 10 * np.log10(speckle((1, 64, 96), seed=5, mean_power=0.02))  # about -20 dB, 6 windows
    base[:, :, :32] += 6  # windows of different brightness and texture
    base[:, 32:, 32:64] = 10 * np.log10(speckle((1, 32, 32), seed=6, mean_power=0.02) ** 2 * 50)
    base = np.clip(base, -33, 2)  # +4 dB stays inside the contract's -35..10 dB (clipping is not a gain)
    a = write_raster(tmp_path / "a.tif", base.astype(np.float32), descriptions=["VV"])
    b = write_raster(tmp_path / "b.tif", (base + 4).astype(np.float32), descriptions=["VV"])  # +4 dB calibration
    std = _classifier(tmp_path / "std", IQR)
    plain = _classifier(tmp_path / "plain", None)
    assert json.loads((std / "model.json").read_text())["format_version"] == 3
    assert json.loads((plain / "model.json").read_text())["format_version"] == 2
    pa, pb = _probabilities(tmp_path, std, a), _probabilities(tmp_path, std, b)
    assert pa.shape == (6, 2) and np.abs(pa - pb).max() < 1e-3
    assert pa[:, 0].std() > 1e-3  # the windows do get different answers
    qa, qb = _probabilities(tmp_path, plain, a), _probabilities(tmp_path, plain, b)
    assert np.abs(qa - qb).max() > 10 * np.abs(pa - pb).max() + 1e-3  # without it, the gain moves the answer


def test_cards_with_standardise(tmp_path):
    std = _classifier(tmp_path / "std", IQR)
    assert load_package(std).card.input["standardise"] == IQR
    d = json.loads((std / "model.json").read_text())
    d["task"], d["output"] = "segment", "logits"
    d["architecture"]["head"] = {"channels": 32}
    (std / "model.json").write_text(json.dumps(d))
    with pytest.raises(PackageError, match="'input.standardise' \\(per window\\) is for classify"):
        load_package(std)
    d["task"], d["input"]["standardise"] = "classify", {"per": "window", "spread": -1}
    del d["architecture"]["head"]
    (std / "model.json").write_text(json.dumps(d))
    with pytest.raises(PackageError, match="'spread' must be 'iqr' or a positive number"):
        load_package(std)


def test_smooth_low_passes_the_standardised_window_and_removes_fresh_speckle():
    """``smooth`` (px): a Gaussian of the standardised window (scipy, mirror edges); a chip with fresh
    speckle of one look moves much less than without it, a constant gain still not at all."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    scene = np.ones((2, 1, 32, 32)) * 0.05
    scene[:, :, 10:20, 12:22] = 0.3  # a bright target on clutter
    look = [(scene * rng.gamma(1.0, 1.0, scene.shape)).clip(0.01, 1.0) for _ in range(2)]  # two 1-look speckles
    plain, smooth = contract("amplitude"), contract("amplitude", {**IQR, "smooth": 1.5})
    a = standardise_windows(normalised(look[0]), smooth)
    ref = gaussian_filter(standardise_windows(normalised(look[0]), plain), (0, 0, 1.5, 1.5), mode="mirror",
                          truncate=3.0)
    assert a.shape == scene.shape and a.dtype == np.float32 and np.allclose(a, ref, atol=1e-6)
    d_plain = np.abs(standardise_windows(normalised(look[0]), plain)
                     - standardise_windows(normalised(look[1]), plain)).mean()
    d_smooth = np.abs(a - standardise_windows(normalised(look[1]), smooth)).mean()
    assert d_smooth < 0.5 * d_plain
    gained = standardise_windows(normalised(look[0] * 10 ** (-3 / 20)), smooth)  # inside floor and range
    assert np.abs(gained - a).max() < 1e-3


@pytest.mark.parametrize("smooth,match", [(-1, "'smooth' must be a Gaussian sigma"), (True, "'smooth' must be"),
                                          (99, "from 0 to 8"), ("2", "'smooth' must be")])
def test_bad_smooth_settings_are_refused(smooth, match):
    with pytest.raises(PackageError, match=match):
        standardise_windows(np.zeros((1, 8, 8), np.float32), contract("db", {**IQR, "smooth": smooth}))


def test_a_smoothing_card_is_version_4_and_unknown_fields_are_refused(tmp_path):
    spec = {**IQR, "smooth": 1.0}
    pkg = _classifier(tmp_path / "smooth", spec)
    d = json.loads((pkg / "model.json").read_text())
    assert d["format_version"] == 4 and load_package(pkg).card.input["standardise"] == spec
    d["input"]["standardise"] = {**IQR, "blur": 1}  # a field a later sarmae might add: refused, not skipped
    (pkg / "model.json").write_text(json.dumps(d))
    with pytest.raises(PackageError, match="unknown field\\(s\\) 'blur'"):
        load_package(pkg)


def test_a_smoothing_classifier_with_large_logits_exports_and_answers_alike_through_onnx(tmp_path):
    """A quick-mode head folded from logistic regression gives logits in the hundreds: the export's
    torch check is relative to that scale (an absolute 1e-4 refused a real MSTAR package over float32
    rounding), and onnxruntime gets the same low-passed input as torch."""
    from engine.export import export_package

    pkg = _classifier(tmp_path / "big", {**IQR, "smooth": 1.0})
    model = load_package(pkg).model
    with torch.no_grad():
        model.head.weight.mul_(300.0)
    from engine.package import save_package

    save_package(model.state_dict(), load_package(pkg).card, pkg, overwrite=True)
    export_package(pkg, log=lambda *a: None)
    assert "fp32" in load_package(pkg).card.onnx
    base = np.clip(10 * np.log10(speckle((1, 64, 96), seed=7, mean_power=0.02)), -33, 2).astype(np.float32)
    raster = write_raster(tmp_path / "r.tif", base, descriptions=["VV"])
    outs = {b: _probabilities(tmp_path, pkg, raster, b) for b in ("torch", "onnxruntime")}
    assert outs["torch"].shape == (6, 2) and np.abs(outs["torch"] - outs["onnxruntime"]).max() < 1e-3


def test_a_view_averaging_classifier_is_version_5_and_answers_alike_through_onnx(tmp_path):
    """A classifier averaging its 8 views (architecture.head.views 8) is written as format_version 5,
    so an older sarmae refuses it instead of running one view; it exports to ONNX (flips and
    transposes) and onnxruntime gives torch's answers."""
    from engine.export import export_package
    from engine.package import save_package

    pkg = _classifier(tmp_path / "views", {**IQR, "smooth": 1.0})
    card = load_package(pkg).card
    d = card.to_dict()
    d["architecture"]["head"] = {"views": 8}
    from engine.card import validate_card

    card8 = validate_card(d, "test")
    model = load_package(pkg).model
    save_package(model.state_dict(), card8, pkg, overwrite=True)
    written = json.loads((pkg / "model.json").read_text())
    assert written["format_version"] == 5 and written["architecture"]["head"] == {"views": 8}
    assert load_package(pkg).model.views == 8
    from engine.card import describe

    assert "the mean over 8 flips / rotations of each window" in describe(load_package(pkg).card)
    export_package(pkg, log=lambda *a: None)
    base = np.clip(10 * np.log10(speckle((1, 64, 96), seed=3, mean_power=0.02)), -33, 2).astype(np.float32)
    raster = write_raster(tmp_path / "r.tif", base, descriptions=["VV"])
    outs = {b: _probabilities(tmp_path, pkg, raster, b) for b in ("torch", "onnxruntime")}
    assert outs["torch"].shape == (6, 2) and np.abs(outs["torch"] - outs["onnxruntime"]).max() < 1e-3
    # the same windows turned by 90 degrees get the same answers (up to window order)
    turned = write_raster(tmp_path / "t.tif", np.ascontiguousarray(np.rot90(base, 1, (1, 2))), descriptions=["VV"])
    got = _probabilities(tmp_path, pkg, turned, "torch")
    assert np.allclose(np.sort(got[:, 0]), np.sort(outs["torch"][:, 0]), atol=1e-4)
