"""Reference labels on a raster's pixel grid, read exactly as fine-tuning reads them: what
``sarmae evaluate`` compares a model with, and what the baseline rows are fitted on."""

from __future__ import annotations

import numpy as np


def reference_raster(raster: str, label_raster: str, names: list[str], opts) -> tuple[np.ndarray, list[str]]:
    """The label raster on ``raster``'s grid, read as fine-tuning reads it (``finetune.labels.
    read_class_map``: same grid, reprojected when both have a CRS, refused when they cannot be
    aligned): model class index, 255 where unlabelled; plus unknown class names."""
    from engine.reader import SarRaster

    from .finetune.labels import read_class_map

    with SarRaster.open(raster, opts.bands, opts.complex_mode) as r:
        lab = read_class_map(label_raster, r, [])
    ref = np.full(lab.shape, 255, np.uint8)
    unknown: set[str] = set()
    for v in np.unique(lab[lab >= 0]):
        name = f"class_{v}"
        # a label raster holds indices: match by index when names are generic, else by 'class_<v>'
        idx = names.index(name) if name in names else (int(v) if int(v) < len(names) else None)
        if idx is None:
            unknown.add(name)
        else:
            ref[lab == v] = idx
    return ref, sorted(unknown)


def vector_reference(rasters: list[str], labels: str, class_field: str, names: list[str],
                   opts) -> tuple[list[tuple[list, list[int]]], dict[str, int], list[str], list[str]]:
    """The polygons of ``labels`` in each raster's pixel space, read exactly as fine-tuning reads them
    (``finetune.labels.vector_labels``: invalid geometries repaired or skipped and counted, reprojected
    to the raster's CRS, GCPs, or pixel coordinates without georeferencing; refused when they lie
    outside every raster), classes matched to the model's by name: per raster (polygons, model class
    index), features per unknown class, notes, warnings."""
    import contextlib

    from engine.reader import SarRaster

    from .finetune.labels import vector_labels

    notes: list[str] = []
    warns: list[str] = []
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(SarRaster.open(r, opts.bands, opts.complex_mode)) for r in rasters]
        shapes, _, unknown = vector_labels(labels, class_field, names, None, opened, notes, warns)
    return shapes, unknown, notes, warns
