"""Model packages: round trip (folder and zip), tampered weights and malformed cards refused."""

import json
import zipfile

import pytest
import torch

from engine.errors import PackageError
from engine.models import build_from_architecture, create_model
from engine.package import (
    default_classes,
    default_input,
    load_package,
    new_card,
    read_card,
    read_extra_files,
    save_package,
)


def make_package(path, task="segment", classes=("water", "land"), in_chans=2):
    enc = create_model("vit_tiny_patch16", in_chans=in_chans, img_size=32, depth=2)
    arch = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict(), "head": {"channels": 32}}
    cls = default_classes(list(classes)) if task in ("classify", "segment", "detect") else []
    model = build_from_architecture(arch, task, len(cls))
    card = new_card("test", task, arch, default_input(in_chans), cls, {"note": "unit test"})
    save_package(model.state_dict(), card, path)
    return model


@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"pkg{suffix}"
    model = make_package(path)
    pkg = load_package(path)
    assert pkg.card.task == "segment" and pkg.card.class_names == ["water", "land"]
    assert pkg.card.in_chans == 2 and pkg.card.input_size == (32, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, pkg.model.state_dict()[k]), k
    x = torch.randn(1, 2, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), pkg.model(x))


def test_no_pickle_in_package(tmp_path):
    make_package(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["model.json", "weights.safetensors"]
    assert (tmp_path / "p" / "weights.safetensors").read_bytes()[8:9] == b"{"  # safetensors header


def test_tampered_weights_refused(tmp_path):
    make_package(tmp_path / "p")
    w = tmp_path / "p" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="do not match model.json.*re-copy or re-export"):
        load_package(tmp_path / "p")


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("task"), "'task' is missing"),
        (lambda d: d.update(task="paint"), "'task' must be one of"),
        (lambda d: d.update(format_version=99), "newer than this sarmae"),
        (lambda d: d["input"].update(units="furlongs"), "input.units"),
        (lambda d: d["input"].update(mean=[0.5]), "input.mean"),
        (lambda d: d.update(classes=[]), "needs at least one class"),
        (lambda d: d["architecture"]["encoder"].pop("in_chans"), "encoder.in_chans"),
    ],
)
def test_malformed_card_refused(tmp_path, mutate, message):
    make_package(tmp_path / "p")
    card = tmp_path / "p" / "model.json"
    d = json.loads(card.read_text())
    mutate(d)
    card.write_text(json.dumps(d))
    with pytest.raises(PackageError, match=message) as e:
        read_card(tmp_path / "p")
    assert "model.json" in str(e.value)


def test_not_json_and_missing(tmp_path):
    make_package(tmp_path / "p")
    (tmp_path / "p" / "model.json").write_text("{not json")
    with pytest.raises(PackageError, match="malformed JSON"):
        read_card(tmp_path / "p")
    with pytest.raises(PackageError, match="not found"):
        read_card(tmp_path / "nothing")
    (tmp_path / "text.zip").write_text("hello")
    with pytest.raises(PackageError, match="not a model package"):
        read_card(tmp_path / "text.zip")
    (tmp_path / "p2").mkdir()
    with pytest.raises(PackageError, match="model.json is missing"):
        read_card(tmp_path / "p2")


def test_existing_output_kept_without_overwrite(tmp_path):
    make_package(tmp_path / "p")
    before = (tmp_path / "p" / "weights.safetensors").read_bytes()
    with pytest.raises(PackageError, match="already exists"):
        make_package(tmp_path / "p", task="classify")
    assert (tmp_path / "p" / "weights.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_zip_layout(tmp_path):
    make_package(tmp_path / "m.zip", task="embed")
    names = zipfile.ZipFile(tmp_path / "m.zip").namelist()
    assert sorted(names) == ["m/model.json", "m/weights.safetensors"]
    assert load_package(tmp_path / "m.zip").card.task == "embed"


@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_read_extra_files_lists_all_but_what_save_package_regenerates(tmp_path, suffix):
    enc = create_model("vit_tiny_patch16", in_chans=2, img_size=32, depth=2)
    arch = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict()}
    card = new_card("test", "embed", arch, default_input(2), [], {"note": "unit test"})
    extra = {"training_curves.png": b"\x89PNG curves", "confusion_matrix.png": b"\x89PNG cm", "notes/readme.txt": b"hi"}
    path = save_package(build_from_architecture(arch, "embed", 0).state_dict(), card, tmp_path / f"p{suffix}",
                        onnx_bytes=identity_onnx(), extra_files=extra)
    assert read_extra_files(path) == extra


def identity_onnx() -> bytes:
    """A tiny valid ONNX model (save_package reads the opset of what it stores)."""
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_read_extra_files_refuses_a_name_outside_the_package(tmp_path):
    make_package(tmp_path / "m.zip", task="embed")
    with zipfile.ZipFile(tmp_path / "m.zip", "a") as z:
        z.writestr("m/../evil.txt", b"x")
    with pytest.raises(PackageError, match=r"m\.zip: the package holds a file named '\.\./evil\.txt', outside"):
        read_extra_files(tmp_path / "m.zip")
