"""CFAR detector settings (``CfarConfig``) and their resolution to pixels on one raster's grid.

Windows are square in ground units: ``guard`` and ``background`` are the FULL SIDES of the guard
window (centred on the cell under test, left out of the statistics) and of the background window
(the statistics come from the ring between the two). In metres they become an odd number of pixels
per axis with the raster's pixel spacing (rows with the row spacing, columns with the column one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.errors import SarmaeError


class CfarConfigError(SarmaeError, ValueError):
    """A CFAR setting is out of range or inconsistent; the message says which and what to do."""


@dataclass
class CfarConfig:
    """Settings of the CFAR ship detector (one comment per field)."""

    method: str = "ca"  # "ca": cell-averaging (mean of the ring), "os": order statistic (rank of the ring)
    pfa: float | None = 1e-6  # false-alarm probability per pixel on homogeneous clutter, in (0, 1)
    k_sigma: float | None = None  # instead of pfa: detect x > mean + k * std of the ring (CA only)
    enl: float = 1.0  # equivalent number of looks of the clutter: 1 = single-look (exponential), >1 gamma
    guard: float = 7.0  # full side of the guard window (excluded around the cell under test)
    background: float = 41.0  # full side of the background window (ring = background minus guard)
    window_units: str = "px"  # "px" or "m" for guard, background, min/max area and max length
    pixel_spacing_m: float | None = None  # ground spacing for rasters without georeferencing (metres)
    os_rank: float = 0.75  # OS: the rank of the ring statistic as a fraction of its cells (Rohling: 3/4)
    os_stride: int = 0  # OS: ring sampled every n px (0: auto, about a third of the guard; 1: exact)
    min_background: float = 0.5  # least fraction of valid ring cells (nodata, land) to test a pixel
    merge_gap: float | None = None  # detections this far apart (px, or m) are one object (None: 2 px)
    min_area: float = 2.0  # smallest object kept (pixels, or m^2 with window_units "m")
    max_area: float | None = None  # largest object kept (None: no limit)
    max_length: float | None = None  # longest object kept, major axis (None: no limit)
    input_units: str | None = None  # units of the raster (None: detected): linear_power | amplitude | db | uint8
    display_units: str = "amplitude"  # what 8-bit display values stand for: "amplitude" or "linear_power"
    water_mask: str | None = None  # raster on the same grid: boxes only where it is water
    water_values: list[float] = field(default_factory=lambda: [1.0])  # mask values that mean water
    class_name: str = "target"  # class written with every box
    score_threshold: float = 0.0  # keep boxes with at least this score (0: every box at the pfa)
    nms_iou: float = 0.5  # boxes overlapping more than this across strips are merged (best score kept)
    levels_db: list[float] = field(default_factory=list)  # proposals: + objects above threshold x 10^(L/10), L > 0, and merge 0
    block_rows: int = 512  # rows of the raster processed at once (memory ~ width x (rows + 2 margins))
    threads: int = 2  # strips processed at once

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse out-of-range or inconsistent settings, naming the field and what to do."""
        def bad(msg: str) -> CfarConfigError:
            return CfarConfigError(f"CFAR setting {msg}")

        if self.method not in ("ca", "os"):
            raise bad(f"method={self.method!r} is unknown: use 'ca' (cell averaging) or 'os' (order statistic)")
        if (self.pfa is None) == (self.k_sigma is None):
            raise bad("pfa / k_sigma: give exactly one of them (a false-alarm probability or a k-sigma factor)")
        if self.pfa is not None and not 0.0 < float(self.pfa) < 1.0:
            raise bad(f"pfa={self.pfa} is outside (0, 1): a false-alarm probability such as 1e-6 is needed")
        if self.k_sigma is not None and (self.method != "ca" or not float(self.k_sigma) > 0):
            raise bad(f"k_sigma={self.k_sigma} needs method 'ca' and a value > 0 (e.g. 5)")
        if not self.enl > 0:
            raise bad(f"enl={self.enl} must be > 0 (1 for single-look data)")
        if self.window_units not in ("px", "m"):
            raise bad(f"window_units={self.window_units!r} is unknown: use 'px' or 'm'")
        if not 0 < self.guard < self.background:
            raise bad(f"guard={self.guard:g} / background={self.background:g}: the guard window must be > 0 and "
                      "smaller than the background window (e.g. guard 7, background 41)")
        if not 0.0 < self.os_rank < 1.0:
            raise bad(f"os_rank={self.os_rank} must lie in (0, 1) (0.75 is the classic choice)")
        if self.os_stride < 0 or self.block_rows < 16 or self.threads < 1:
            raise bad("os_stride >= 0, block_rows >= 16 and threads >= 1 are needed")
        if not 0.0 < self.min_background <= 1.0:
            raise bad(f"min_background={self.min_background} must lie in (0, 1]")
        if self.display_units not in ("amplitude", "linear_power"):
            raise bad(f"display_units={self.display_units!r}: 8-bit values are read as 'amplitude' or 'linear_power'")
        if not 0.0 <= self.score_threshold < 1.0 or not 0.0 < self.nms_iou <= 1.0:
            raise bad("score_threshold must lie in [0, 1) and nms_iou in (0, 1]")
        if self.merge_gap is not None and not self.merge_gap >= 0:
            raise bad(f"merge_gap={self.merge_gap} must be >= 0 (0: only touching pixels form one object)")
        if any(not (isinstance(v, (int, float)) and 0 < v <= 60) for v in self.levels_db):
            raise bad(f"levels_db={self.levels_db}: each level is dB above the detection threshold, in (0, 60]")
        if self.pixel_spacing_m is not None and not self.pixel_spacing_m > 0:
            raise bad(f"pixel_spacing_m={self.pixel_spacing_m} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CfarConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise CfarConfigError(f"unknown CFAR settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def resolve(self, spacing: tuple[float, float] | None, source: str = "the raster") -> CfarPixels:
        """The settings in pixels on a grid of ``spacing`` = (row, column) metres per pixel (None: not
        georeferenced in metres; then ``pixel_spacing_m`` stands in, and without it windows in metres
        are refused). Object lengths are then measured in metres, else in pixels."""
        if spacing is None and self.pixel_spacing_m is not None:
            spacing = (float(self.pixel_spacing_m), float(self.pixel_spacing_m))
        if self.window_units == "m" and spacing is None:
            raise CfarConfigError(
                f"{source} has no georeferencing in metres, so CFAR windows given in metres cannot be converted "
                "to pixels: give the pixel spacing (pixel_spacing_m) or the windows in pixels (window_units 'px')")
        sy, sx = spacing if self.window_units == "m" else (1.0, 1.0)

        def half(side: float, step: float) -> int:  # a side in units -> an odd side in px -> half-width
            return max(0, int(math.ceil(side / step - 1e-9)) // 2)

        g, b = (half(self.guard, sy), half(self.guard, sx)), (half(self.background, sy), half(self.background, sx))
        if b[0] <= g[0] or b[1] <= g[1]:
            raise CfarConfigError(f"CFAR windows guard {self.guard:g} / background {self.background:g} "
                                  f"{self.window_units} leave no ring on {source}'s {sy:g} x {sx:g} m pixels: "
                                  "make the background window larger")
        px_area = sy * sx
        gap = 2.0 if self.merge_gap is None else self.merge_gap / max(sy, sx)  # in px
        merge = int(gap + 1e-9) // 2  # pieces <= 2 r px apart touch once grown by r
        max_length = self.max_length
        if max_length is not None and self.window_units == "px" and spacing is not None:
            max_length *= math.sqrt(spacing[0] * spacing[1])  # lengths are measured in metres
        return CfarPixels(guard=g, background=b, min_area=max(1.0, self.min_area / px_area),
                          max_area=None if self.max_area is None else self.max_area / px_area,
                          max_length=max_length, spacing=spacing or (1.0, 1.0), metres=spacing is not None,
                          merge=merge)


@dataclass(frozen=True)
class CfarPixels:
    """CFAR windows and size limits in pixels: half-widths (rows, cols); a window side is 2h + 1."""

    guard: tuple[int, int]
    background: tuple[int, int]
    min_area: float
    max_area: float | None
    max_length: float | None  # major axis, in metres when ``metres`` else pixels
    spacing: tuple[float, float] = (1.0, 1.0)  # (row, col) metres per pixel, or (1, 1) in pixel units
    metres: bool = False  # lengths and areas are measured in metres (else pixels)
    merge: int = 1  # detections are grown by this many px (a square) to group them into objects

    @property
    def ring_cells(self) -> int:
        """Cells of the ring (background window minus guard window) with no nodata."""
        (gy, gx), (by, bx) = self.guard, self.background
        return (2 * by + 1) * (2 * bx + 1) - (2 * gy + 1) * (2 * gx + 1)
