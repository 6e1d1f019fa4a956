"""DataConfig: defaults, validation with actionable messages, from_dict refusing unknown keys."""

from pathlib import Path

import pytest
import yaml

from training.data import DataConfig, DataError

CONFIGS = Path(__file__).resolve().parents[3] / "training" / "configs"


def test_defaults_and_round_trip():
    cfg = DataConfig(paths="chips/")
    assert cfg.paths == ["chips/"] and cfg.img_size == 224 and cfg.clip_db == (-35.0, 10.0)
    again = DataConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(cfg.to_dict()["clip_db"], list)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(DataError, match="unknown data setting.*img_szie.*known settings"):
        DataConfig.from_dict({"img_szie": 128})


@pytest.mark.parametrize("field, value, words", [
    ("resize", "stretch", "resize must be one of resize, crop"),
    ("clip_db", (10.0, -35.0), "low < high"),
    ("paired_ratio", 1.5, "paired_ratio must be in"),
    ("in_chans", 0, "in_chans must be an integer"),
    ("units", "furlongs", "unknown input units"),
    ("units", "uint8", "not a calibrated unit"),
])
def test_bad_values_are_refused_with_the_field_named(field, value, words):
    with pytest.raises(DataError, match=words):
        DataConfig(**{field: value})


def test_units_spellings_are_normalised():
    assert DataConfig(units="dB").units == "db"
    assert DataConfig(units="intensity").units == "linear_power"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_data_sections_load(preset):
    section = yaml.safe_load((CONFIGS / preset).read_text()).get("data", {})
    cfg = DataConfig.from_dict(section)
    assert cfg.img_size == section.get("img_size", 224)
