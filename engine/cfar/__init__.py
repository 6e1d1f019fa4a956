"""CFAR ship detection: a detector with no weights, on linear power (see ``statistics`` for the maths).

``CfarConfig`` (settings) -> ``detect_array`` (one array in memory) or ``run_cfar`` (a raster, by
strips of rows, to a GeoPackage).
"""

from .config import CfarConfig, CfarConfigError, CfarPixels
from .objects import CfarObjects, detect_array, nms, score_of
from .statistics import ca_factor, cfar_map, os_factor

__all__ = ["CfarConfig", "CfarConfigError", "CfarPixels", "CfarObjects", "detect_array", "nms", "score_of",
           "ca_factor", "cfar_map", "os_factor"]
