"""Similarity search on an embedding raster: cosine similarity to a query point or polygon.

The embedding raster (``sarmae infer`` with an ``embed`` model) holds one D-dimensional feature
per patch. The query vector is the feature at a point, or the mean feature of the cells inside a
polygon (map coordinates of the raster's CRS, or pixel coordinates of the ORIGINAL raster when it
has no CRS). The output is a float32 GeoTIFF on the embedding grid, computed strip by strip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import RasterInputError
from .publish import Publication
from .writers import GeoTiffWriter, check_output

STRIP = 256  # embedding rows per read


def _query_vector(src, geometry) -> tuple[np.ndarray, int]:
    """Mean unit feature of the cells a point/polygon (shapely, in the raster's CRS) covers."""
    from rasterio.features import geometry_mask
    from rasterio.windows import Window, from_bounds

    if geometry.geom_type == "Point":
        row, col = src.index(geometry.x, geometry.y)
        if not (0 <= row < src.height and 0 <= col < src.width):
            raise RasterInputError(f"the query point ({geometry.x:.6g}, {geometry.y:.6g}) lies outside the embedding "
                                   f"raster {src.name}; pick a point on the scene (in its CRS {src.crs})")
        v = src.read(window=Window(col, row, 1, 1)).reshape(-1).astype(np.float64)
        if np.isnan(v).any():
            raise RasterInputError(f"the query point falls on nodata in {src.name}; pick a point with data")
        return v / (np.linalg.norm(v) + 1e-12), 1
    win = from_bounds(*geometry.bounds, transform=src.transform).round_offsets().round_lengths()
    win = win.intersection(Window(0, 0, src.width, src.height))
    win = Window(win.col_off, win.row_off, max(1, win.width), max(1, win.height))
    data = src.read(window=win).astype(np.float64)  # (D, h, w)
    inside = ~geometry_mask([geometry], (int(win.height), int(win.width)), src.window_transform(win), all_touched=True)
    vecs = data[:, inside].T
    vecs = vecs[~np.isnan(vecs).any(axis=1)]
    if not len(vecs):
        raise RasterInputError(f"the query polygon covers no valid embedding cell of {src.name}; "
                               "draw it over the scene, in the raster's CRS")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
    q = vecs.mean(axis=0)
    return q / (np.linalg.norm(q) + 1e-12), len(vecs)


def run_similarity(embedding: str | os.PathLike, output: str | os.PathLike, query, overwrite: bool = False,
                   cog: bool = False) -> dict:
    """Cosine-similarity raster of every embedding cell to ``query``.

    Args:
        embedding: an embedding GeoTIFF written by the embed task.
        output: the similarity GeoTIFF to write (float32, -1..1, NaN where nodata).
        query: a shapely Point/Polygon, WKT text, or an (x, y) tuple in the raster's CRS.
    """
    import rasterio
    from shapely import wkt
    from shapely.geometry import Point

    src_path = Path(embedding)
    if not src_path.is_file():
        raise RasterInputError(f"{embedding}: embedding raster not found; run 'sarmae infer' with an embed model first")
    out = check_output(output, [str(src_path)], overwrite)
    if isinstance(query, str):
        query = wkt.loads(query)
    elif isinstance(query, (tuple, list)):
        query = Point(*query)
    with rasterio.open(src_path) as src:
        if src.tags().get("SARMAE_TASK") != "embed":
            raise RasterInputError(f"{embedding} is not a sarmae embedding raster (no SARMAE_TASK=embed tag); "
                                   "run 'sarmae infer' with an embed model to make one")
        q, n = _query_vector(src, query)
        tags = {**src.tags(), "SARMAE_TASK": "similarity", "SARMAE_QUERY": query.wkt[:500]}
        kwargs = {"crs": src.crs, "transform": src.transform} if not src.gcps[0] else {"gcps": src.gcps[0], "gcp_crs": src.gcps[1]}
        with (Publication([out], overwrite=overwrite),  # locked, published like run_inference's outputs
              GeoTiffWriter(out, width=src.width, height=src.height, count=1, dtype="float32", nodata=float("nan"),
                            descriptions=["cosine similarity"], tags=tags, cog=cog, **kwargs) as dst):
            from rasterio.windows import Window

            for r in range(0, src.height, STRIP):
                h = min(STRIP, src.height - r)
                f = src.read(window=Window(0, r, src.width, h)).astype(np.float32)  # (D, h, W)
                norm = np.linalg.norm(f, axis=0)
                sim = np.einsum("dhw,d->hw", f, q.astype(np.float32)) / np.maximum(norm, 1e-12)
                dst.write_rows(r, sim.astype(np.float32))
    return {"output": str(out), "query_cells": n}
