"""Fixtures of the data tests: a folder of tiny gray chips and a small config."""

from __future__ import annotations

from pathlib import Path

import pytest
from chipgen import make_chip_folder

from training.data import DataConfig


@pytest.fixture
def chip_folder(tmp_path: Path) -> Path:
    """Six 32x32 gray PNG chips in two class folders."""
    return make_chip_folder(tmp_path / "chips")


@pytest.fixture
def cfg() -> DataConfig:
    """32 px, one channel."""
    return DataConfig(img_size=32, in_chans=1)
