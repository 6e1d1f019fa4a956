"""Test-wide settings: headless Qt for pytest-qgis, a bounded GDAL cache, paths to shared data."""

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("GDAL_CACHEMAX", "256")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real SAR samples in ../shared/data (tests that need them skip when it is absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real SAR samples not found at {SHARED_DATA}")
    return SHARED_DATA
