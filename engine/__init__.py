"""sarmae engine: SARMAE models, SAR raster IO, radiometry, tiled inference, model packages.

The engine never imports qgis, PyQt or ``training`` (see DESIGN.md, "The one rule").
Heavy dependencies (torch, rasterio, onnxruntime) are imported lazily by the modules that need
them, so that ``sarmae --help`` answers at once.
"""

__version__ = "0.1.0"
