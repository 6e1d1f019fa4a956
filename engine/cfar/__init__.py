"""CFAR ship detection: a detector with no weights, on linear power (see ``statistics`` for the maths).

``CfarConfig`` (settings) -> ``detect_array`` (one array in memory) or ``run_cfar`` (a raster, by
strips of rows, to a GeoPackage).
"""

from .config import CfarConfig, CfarConfigError

# only the settings here: reading a CFAR card (``sarmae info``, the worker's model_info) must not pull
# in scipy; the detector lives in ``statistics`` / ``order`` / ``objects`` / ``scene``
__all__ = ["CfarConfig", "CfarConfigError"]
