"""Similarity search in the background: embed a raster once (cached), then cosine similarity to a
query point or polygon, added as a styled layer.

:class:`EmbeddingSource` names what is embedded (a raster file, an ``embed`` model package, the
bands); :func:`embedding_source` builds one from a QGIS layer and a package path and refuses
what the engine would refuse (no layer, a layer that is not a file, no or unreadable package, a
package of another task, a channel mismatch). :class:`SimilarityTask` then, in :meth:`run` (a
background thread, no QGIS layer touched):

1. finds the cached embedding of (raster file + its size and mtime, package path + weights sha256
   + mtime, bands) under ``<output folder>/similarity/<layer>_<key>/embedding.tif``, or computes
   it with the engine's ``embed`` task (``infer``) -- the engine writes it under a temporary name
   and renames it on success, so a file there is always complete;
2. runs the engine's ``similarity`` task for the query (``[x, y]`` or WKT in the raster's CRS);

and in :meth:`finished` (main thread) adds the similarity raster on top of the layer-tree group
"SARMAE similarity", styled with the Viridis ramp up to 1. Failures go to the message bar and
the log, never into Qt.

:func:`request_similarity` is the one place that builds the engine's ``similarity`` run request;
the Processing algorithm uses it too.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qgis.core import Qgis, QgsApplication, QgsProject, QgsRasterBandStats, QgsRasterLayer, QgsTask

from ..engine_client import EngineClient, EngineError
from ..errors import ModelCardError, RequestError, SarmaePluginError
from ..model_cards import check_channels, read_card, resolve_package
from ..results import insert_group
from ..styling import mark_output, style_unit_interval
from ..toolbelt import log, messages, settings
from ..toolbelt.engine import exclusive_run, get_client
from ..toolbelt.layers import band_names, raster_file
from .run_task import RunRequest, slug

GROUP_NAME = "SARMAE similarity"
EMBED_TASKS = ("embed",)  # the engine embeds with encoder packages only (task "embed")
EMBEDDING_FILE = "embedding.tif"
EMBED_SHARE = 0.9  # share of the progress bar for the embedding (when it is computed)

Query = tuple[float, float] | str  # (x, y) or WKT, in the raster layer's CRS


def request_similarity(client: EngineClient, embedding: str, output: str, query, on_event=None,
                       is_cancelled: Callable[[], bool] | None = None) -> dict:
    """Run the engine's ``similarity`` task (DESIGN.md, worker protocol): cosine similarity of every
    cell of ``embedding`` to ``query`` ([x, y] or WKT in the raster's CRS), written to ``output``
    (replaced if it exists). Returns ``{"output", "query_cells"}``; raises :class:`EngineError`."""
    if not isinstance(query, str):
        query = [float(query[0]), float(query[1])]
    return client.request("run", on_event, is_cancelled, task="similarity", embedding=str(embedding),
                          output=str(output), query=query, overwrite=True)


@dataclass(frozen=True)
class EmbeddingSource:
    """What is embedded: one raster file with one ``embed`` package (already validated)."""

    layer_name: str
    raster_path: str
    model_path: str
    model_name: str
    output_folder: str  # the cache folder of this (raster, model) lives under <output_folder>/similarity
    bands: tuple[str, ...] | None = None  # model-order bands by number or name; None: all, file order
    batch_size: int = 4
    device: str = "auto"
    backend: str = "auto"

    def cache_key(self) -> str:
        """Changes when the raster file, the package (path, weights, re-export) or the bands change."""
        raster = Path(self.raster_path).resolve()
        st = raster.stat()
        model = resolve_package(self.model_path).resolve()
        card_file = model / "model.json" if model.is_dir() else model
        try:
            sha = str((read_card(model).raw.get("weights") or {}).get("sha256", ""))
        except SarmaePluginError:
            sha = ""
        parts = [str(raster), st.st_size, st.st_mtime_ns, str(model), sha,
                 card_file.stat().st_mtime_ns if card_file.exists() else 0, list(self.bands or [])]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def cache_dir(self) -> Path:
        return Path(self.output_folder).expanduser() / "similarity" / f"{slug(self.layer_name)}_{self.cache_key()}"

    def embed_request(self, cache_dir: Path) -> RunRequest:
        """The engine run that writes ``cache_dir/embedding.tif`` (and its PCA preview beside it)."""
        return RunRequest(run_name=Path(EMBEDDING_FILE).stem, layer_name=self.layer_name,
                          raster_path=self.raster_path, model_path=self.model_path, model_name=self.model_name,
                          task="embed", output_dir=str(cache_dir), bands=self.bands, batch_size=self.batch_size,
                          device=self.device, backend=self.backend)


def embedding_source(layer, model_path: str | None, output_folder: str | Path | None = None,
                     bands: list[str] | tuple[str, ...] | None = None) -> EmbeddingSource:
    """Validate a raster layer + embed package; :class:`RequestError` says what to fix.

    ``bands`` None: all bands when their count matches the model, else the model's band names when
    the layer names them all (e.g. VV,VH of a VV/VH/angle stack)."""
    if layer is None:
        raise RequestError("Choose a raster layer to search in (add a SAR raster to the project first).")
    try:
        path = raster_file(layer)
    except SarmaePluginError as e:
        raise RequestError(str(e)) from e
    if not model_path:
        raise RequestError("Choose an embed model package (an encoder package, task 'embed'): install one into "
                           "the models folder (SARMAE > Settings) or use Browse….")
    try:
        card = read_card(model_path)
    except ModelCardError as e:
        raise RequestError(str(e)) from e
    if card.task not in EMBED_TASKS:
        raise RequestError(f"model '{card.name}' ({card.path}) is a {card.task} model: similarity search needs an "
                           "embed (encoder) package, as written by 'sarmae convert' or pretraining; choose one.")
    names = band_names(layer)
    if bands is None and len(names) != card.in_chans:
        upper = [n.upper() for n in names]
        if all(b.upper() in upper for b in card.bands):
            bands = list(card.bands)
    bands = list(bands) if bands else None
    try:
        check_channels(card, names, bands, layer.name())
    except SarmaePluginError as e:
        raise RequestError(str(e)) from e
    s = settings.load()
    folder = Path(output_folder).expanduser() if output_folder else settings.output_folder(s)
    return EmbeddingSource(layer_name=layer.name(), raster_path=path, model_path=card.path, model_name=card.name,
                           output_folder=str(folder), bands=tuple(bands) if bands else None,
                           batch_size=s.batch_size, device=s.device, backend=s.backend)


@dataclass(frozen=True)
class SimilarityRequest:
    source: EmbeddingSource
    query: Query  # (x, y) or WKT in the raster layer's CRS
    label: str  # layer name, e.g. "similarity @ 500800, 4499520"


@dataclass
class _Stats:
    embed_runs: int = 0  # how many times an embedding was computed (tests, diagnostics)
    cache_hits: int = 0
    running: list = field(default_factory=list)  # tasks kept alive until they finish


STATS = _Stats()


def start_task(task: SimilarityTask) -> SimilarityTask:
    """Queue ``task`` in QGIS's task manager and keep it alive until it finishes."""
    STATS.running = [t for t in STATS.running if not t.is_done] + [task]
    QgsApplication.taskManager().addTask(task)
    return task


class SimilarityTask(QgsTask):
    """Embedding (cached) + similarity for one query; adds the styled similarity layer when done."""

    def __init__(self, request: SimilarityRequest, project: QgsProject | None = None, message_bar=None,
                 client_factory: Callable[[], EngineClient] = get_client):
        super().__init__(f"SARMAE: {request.label} on {request.source.layer_name}", QgsTask.CanCancel)
        self.request = request
        self.project = project
        self.message_bar = message_bar
        self.client_factory = client_factory
        self.embedding_path: str = ""
        self.embedded = False  # True when this task computed the embedding (False: cache hit)
        self.output: str = ""
        self.result: dict | None = None
        self.error: Exception | None = None
        self.layer: QgsRasterLayer | None = None
        self.is_done = False
        self.seconds = 0.0

    # ---- background thread ----------------------------------------------------------------------
    def _embed_progress(self, fraction: float, message: str) -> None:
        if fraction < 0:
            log.info(f"similarity embedding of {self.request.source.layer_name}: {message}")
        else:
            self.setProgress(100.0 * EMBED_SHARE * min(1.0, fraction))

    def run(self) -> bool:
        """Embed (unless cached) and compare, through the engine worker (no QGIS objects touched)."""
        src = self.request.source
        t0 = time.monotonic()
        try:
            cache = src.cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            embedding = cache / EMBEDDING_FILE
            self.embedding_path = str(embedding)
            output = cache / f"similarity_{time.strftime('%Y%m%d-%H%M%S')}_{time.monotonic_ns() % 10**6:06d}.tif"
            with exclusive_run(self.isCanceled):  # the whole pair: a second click waits, then hits the cache
                client = self.client_factory()
                if embedding.is_file():
                    STATS.cache_hits += 1
                    log.info(f"similarity: cached embedding {embedding}")
                else:
                    req = src.embed_request(cache)
                    client.run_inference([req.raster_path], req.output_path, req.model_path, req.options(),
                                         on_progress=self._embed_progress, is_cancelled=self.isCanceled)
                    STATS.embed_runs += 1
                    self.embedded = True
                if self.isCanceled():
                    raise EngineError("cancelled by the user", "cancelled", cancelled=True)
                self.result = request_similarity(client, str(embedding), str(output), self.request.query,
                                                 is_cancelled=self.isCanceled)
            self.output = str(self.result.get("output") or output)
        except Exception as e:  # EngineError, OSError, a bug: reported in finished(), never raised into QGIS
            self.error = e
            return False
        self.seconds = time.monotonic() - t0
        self.setProgress(100.0)
        return True

    # ---- main thread ----------------------------------------------------------------------------
    def finished(self, result: bool) -> None:  # noqa: FBT001  # QgsTask API
        self.is_done = True
        try:
            self._finish(result)
        except Exception as e:  # a broken output or a bug must not take QGIS down
            self.error = e
            log.critical(f"{self.request.label}: could not load the result ({e}); see {self.output or 'the log'}")
            self._message("similarity failed", f"could not load the result: {e}", Qgis.Critical)

    def _finish(self, result: bool) -> None:  # noqa: FBT001
        label = self.request.label
        if result and self.output:
            self.layer = add_similarity_layer(self.output, label, self.project or QgsProject.instance(),
                                              self.request.source.layer_name)
            cells = (self.result or {}).get("query_cells")
            how = "embedding computed" if self.embedded else "cached embedding"
            text = f"{label} on {self.request.source.layer_name}: {cells} query cell(s), {how}, {self.seconds:.1f} s"
            log.info(f"{text} -> {self.output}")
            self._message("similarity done", text, Qgis.Success)
        elif (isinstance(self.error, EngineError) and self.error.cancelled) or (self.error is None and self.isCanceled()):
            self._message("similarity", "cancelled; nothing was added", Qgis.Info)
        else:
            text = str(self.error) if self.error is not None else "the similarity search failed"
            if isinstance(self.error, EngineError) and self.error.kind == "start" and "Settings" not in text:
                text += " -- set the engine's Python interpreter in Raster > SARMAE > Settings"
            log.critical(f"{label} failed: {text}")
            self._message("similarity failed", text, Qgis.Critical)

    def _message(self, title: str, text: str, level) -> None:
        if messages.push(self.message_bar, f"SARMAE: {title}", text, level, 10) is None:
            self.message_bar = None  # gone (e.g. with its dialog): the log has the message


def ramp_minimum(layer: QgsRasterLayer) -> float:
    """Where the colour ramp starts: the raster's minimum rounded down to 0.1 (at least -1), so that
    the ramp spans what is there up to 1 (identical); 0 when the raster is (almost) constant."""
    stats = layer.dataProvider().bandStatistics(1, QgsRasterBandStats.Min | QgsRasterBandStats.Max)
    lo = float(stats.minimumValue)
    if not (-1.0 <= lo < 0.99):  # NaN, an empty raster, or every cell identical
        return 0.0
    return max(-1.0, math.floor(lo * 10.0) / 10.0)


def add_similarity_layer(path: str, name: str, project: QgsProject, source_name: str = "") -> QgsRasterLayer:
    """Load ``path`` as ``name`` on top of the group "SARMAE similarity" (created right above the
    searched raster when missing), translucent, styled with the Viridis ramp from :func:`ramp_minimum`
    to 1."""
    layer = QgsRasterLayer(path, name, "gdal")
    if not layer.isValid():
        raise EngineError(f"the similarity raster {path} cannot be read by QGIS", "failed")
    style_unit_interval(layer, minimum=ramp_minimum(layer), maximum=1.0)
    mark_output(layer, "similarity")  # translucent: the image stays readable
    root = project.layerTreeRoot()
    group = root.findGroup(GROUP_NAME)
    if group is None:  # right above the searched raster (label layers stay on top)
        sources = project.mapLayersByName(source_name) if source_name else []
        group = insert_group(project, GROUP_NAME, sources[0].id() if sources else None)
    project.addMapLayer(layer, False)
    group.insertLayer(0, layer)
    return layer
