"""What the pretraining data is and how it reaches the model: ``DataConfig`` and ``DataError``.

``paths`` mixes two kinds of input, told apart by what is on disk:

- a folder: a chip folder, searched recursively for PNG/JPEG/TIFF chips (``chips.py``);
- a file: a large raster, from which random ``img_size`` windows are sampled (``windows.py``).

Entries may be glob patterns (``data/opera/*_VV.tif``); each match is classified as above.
``pairs`` names a JSON index of SAR/optical pairs (``pairs.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.errors import SarmaeError

RESIZE_MODES = ("resize", "crop")


class DataError(SarmaeError, ValueError):
    """Training data that cannot be used: missing, unreadable, or inconsistent (says which files)."""


@dataclass
class DataConfig:
    """Where the pretraining chips come from and how they are scaled to [0, 1] (see ``scaling.py``)."""

    paths: list[str] = field(default_factory=list)  # chip folders and/or large rasters (globs allowed), mixed
    pairs: str | None = None  # paired SAR/optical index JSON ({"paired": [...], "unpaired": [...]})
    img_size: int = 224  # side of the square images the model sees
    in_chans: int = 1  # SAR channels the model takes (1 single pol, 2 VV+VH, 3 reference layout)
    resize: str = "resize"  # resize | crop: how chips of other sizes reach img_size (crop: random, padded if smaller)
    units: str | None = None  # float/16-bit data: units of the values ('db', 'linear_power', 'amplitude'); None = auto
    clip_db: tuple[float, float] = (-35.0, 10.0)  # calibrated data -> dB -> clipped to this range -> [0, 1]
    windows_per_raster: int = 256  # random windows sampled per large raster per epoch
    max_nodata: float = 0.5  # skip raster windows with a larger fraction of nodata pixels than this
    paired_ratio: float = 0.7  # fraction of each epoch drawn from paired samples (when there are pairs)
    max_bad_fraction: float = 0.05  # unreadable files are skipped and counted; more than this fraction -> error
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    acquisition: float = 0.0  # share of samples given a random simulated change of acquisition before SARE
    # (training.acquisition.acquisition_jitter: gain, stretch, fresh speckle, half of them resampled); 0: off
    seed: int = 0  # seeds the epoch order, random windows and random crops

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.paths = [str(p) for p in self.paths]
        self.clip_db = tuple(float(v) for v in self.clip_db)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Check every field; raise DataError naming the field, the value and what is allowed."""
        problems = []
        if not isinstance(self.img_size, int) or self.img_size < 8:
            problems.append(f"img_size must be an integer >= 8, not {self.img_size!r}")
        if not isinstance(self.in_chans, int) or self.in_chans < 1:
            problems.append(f"in_chans must be an integer >= 1, not {self.in_chans!r}")
        if self.resize not in RESIZE_MODES:
            problems.append(f"resize must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}")
        if self.units is not None:
            from engine.errors import RasterInputError
            from engine.radiometry import normalise_units

            try:
                self.units = normalise_units(self.units)
            except RasterInputError as e:
                problems.append(str(e))
            if self.units == "uint8":
                problems.append("units 'uint8' is not a calibrated unit: 8-bit chips are always scaled "
                                "by 1/255; give 'db', 'linear_power' or 'amplitude', or leave it unset")
        if len(self.clip_db) != 2 or not self.clip_db[0] < self.clip_db[1]:
            problems.append(f"clip_db must be (low, high) with low < high, not {self.clip_db!r}")
        if not isinstance(self.windows_per_raster, int) or self.windows_per_raster < 1:
            problems.append(f"windows_per_raster must be an integer >= 1, not {self.windows_per_raster!r}")
        for name in ("max_nodata", "paired_ratio", "max_bad_fraction", "acquisition"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                problems.append(f"{name} must be in [0, 1], not {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            problems.append(f"num_workers must be an integer >= 0, not {self.num_workers!r}")
        if problems:
            raise DataError("invalid data settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a plain dict (YAML ``data:`` section plus overrides); unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"unknown data setting(s) {', '.join(unknown)}; "
                            f"known settings: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for the resolved config saved next to the checkpoints."""
        out = dataclasses.asdict(self)
        out["clip_db"] = list(self.clip_db)
        return out
