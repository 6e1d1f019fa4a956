"""The engine worker (``sarmae serve``): JSON-lines requests on stdin, events on stdout.

The QGIS plugin starts this process and talks to it through ``engine.protocol`` (docs/protocol.md).
The main thread reads stdin; a run executes on a worker thread so that ``cancel`` and ``info`` are
still answered while it works. One run at a time: a second one is refused with ``busy`` and the
client queues it. Loaded packages and the backends built for them stay in an LRU cache between
requests. stdout carries protocol lines only (one lock, one flush per line); logs go to stderr.
Nothing a request does can kill the worker: every failure becomes an ``error`` event.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from . import protocol as P
from .errors import CancelledError

log = logging.getLogger("sarmae.serve")
PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress events per second (the last one, fraction 1, always)
JOIN_TIMEOUT_S = 60.0  # how long shutdown waits for a cancelled run to clean up its partial outputs


@dataclass
class CachedModel:
    """A loaded package and the backends built for it, keyed by (kind, device, batch, threads, window)."""

    key: tuple[str, int, str]  # (resolved path, mtime_ns of model.json or the zip, weights sha256)
    package: Any  # engine.package.LoadedPackage
    backends: dict[tuple, Any] = field(default_factory=dict)


def extension_tasks() -> dict:
    """Run tasks other packages contribute through the ``sarmae.worker_tasks`` entry points
    (``training`` adds finetune and pretrain): name -> fn(params, progress, should_cancel) -> dict.
    The engine never imports those packages by name."""
    from importlib.metadata import entry_points

    tasks = {}
    for ep in entry_points(group="sarmae.worker_tasks"):
        try:
            tasks[ep.name] = ep.load()
        except ImportError as e:  # a broken extension must not break the worker
            log.warning("worker task %s unavailable: %s", ep.name, e)
    return tasks


class ModelCache:
    """LRU cache of loaded packages (``size`` entries); a package changed on disk is a new key."""

    def __init__(self, size: int = 2):
        self.size = max(1, size)
        self._entries: OrderedDict[tuple, CachedModel] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key_for(path: str) -> tuple[str, int, str]:
        from .package import CARD, read_card

        p = Path(path).expanduser().resolve()
        card = read_card(p)  # validates model.json; raises PackageError with the reason
        stamp = p / CARD if p.is_dir() else p
        return (str(p), stamp.stat().st_mtime_ns, card.weights.get("sha256", ""))  # "": no weights (CFAR)

    def package(self, path: str) -> tuple[CachedModel, bool]:
        """(entry, True when it was already loaded)."""
        from .package import load_package

        key = self.key_for(path)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry, True
        entry = CachedModel(key, load_package(key[0], lazy=True))  # slow part outside the lock; the torch
        # model is built when a torch backend first needs it
        with self._lock:
            for stale in [k for k in self._entries if k[0] == key[0]]:  # older versions of this package
                del self._entries[stale]
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry, False

    def backend(self, entry: CachedModel, opts: Any, size: int, say) -> tuple[Any, bool]:
        """The backend for these options, built once per (kind, device, batch, threads, window, precision)."""
        from .backends import make_backend
        from .tasks import task_for

        bkey = (opts.backend, opts.device, opts.batch_size, opts.threads, size, opts.mask_ratio, opts.precision)
        with self._lock:
            if bkey in entry.backends:
                return entry.backends[bkey], True
        backend = make_backend(task_for(entry.package.card), entry.package, opts, size, log=say)
        with self._lock:
            # a torch backend moves the package's (shared) model to its device: drop the others
            device = getattr(backend, "device", None)
            for k in [k for k, b in entry.backends.items() if getattr(b, "device", device) != device]:
                del entry.backends[k]
            entry.backends[bkey] = backend
        return backend, False

    def describe(self) -> list[dict[str, Any]]:
        """The loaded models, most recently used first."""
        with self._lock:
            return [{"path": e.key[0], "name": e.package.card.name, "task": e.package.card.task,
                     "sha256": e.key[2], "backends": [b.describe() for b in e.backends.values()]}
                    for e in reversed(self._entries.values())]


class Worker:
    """Request dispatch, the active run and the stdout writer of one worker process."""

    def __init__(self, stdout: TextIO, cache_size: int = 2):
        self.out = stdout
        self.cache = ModelCache(cache_size)
        self.closed = False  # stdout is gone (the client died): stop
        self._out_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._run_id: str | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, message: dict[str, Any]) -> None:
        """Write one protocol line and flush; a broken pipe marks the worker closed and cancels the run."""
        line = P.encode(message) + "\n"
        with self._out_lock:
            if self.closed:
                return
            try:
                self.out.write(line)
                self.out.flush()
            except (OSError, ValueError):
                self.closed = True
                self._cancel.set()

    def handle_line(self, line: str) -> bool:
        """Serve one request line; False when the worker should exit (shutdown)."""
        rid = None
        try:
            req = P.parse_request(line)
            rid = req.id
            return self.dispatch(req)
        except Exception as e:  # never die on a request
            self.send(error_event(getattr(e, "request_id", None) or rid, e))
            return True

    def dispatch(self, req: P.Request) -> bool:
        if req.type == P.INFO:
            self.send(P.result(req.id, engine_info(self.cache, self._run_id)))
        elif req.type == P.MODEL_INFO:
            self.send(P.result(req.id, model_info(req.get("package"), bool(req.get("verify", False)))))
        elif req.type == P.RUN:
            self.start_run(req)
        elif req.type == P.CANCEL:
            self.send(P.result(req.id, {"target": req.get("target"), "cancelled": self.cancel(req.get("target"))}))
        elif req.type == P.CLEAN:
            self.send(P.result(req.id, clean_folder(req.get("folder"), self._run_id is not None)))
        elif req.type == P.SHUTDOWN:
            self.stop()
            self.send(P.result(req.id, {"shutdown": True}))
            return False
        return True

    def start_run(self, req: P.Request) -> None:
        from .inference import InferenceOptions

        task = req.get("task")
        if task == P.INFER:
            opts = InferenceOptions.from_dict(req.get("options") or {})  # bad options: an error, not busy
        else:
            opts = None
            if task != P.SIMILARITY and task not in extension_tasks():
                known = ", ".join([*P.RUN_TASKS, *extension_tasks()])
                raise P.ProtocolError(f"unknown run task {task!r}; this engine knows: {known}", req.id)
        with self._state_lock:
            if self._run_id is not None:
                raise P.BusyError(f"busy: run '{self._run_id}' is still active; queue '{req.id}' and send it "
                                  "again after that run's result (or cancel it)")
            self._run_id, self._cancel = req.id, threading.Event()
            self._thread = threading.Thread(target=self._run, args=(req, opts, self._cancel),
                                            name=f"sarmae-run-{req.id}", daemon=True)
            self._thread.start()

    def _run(self, req: P.Request, opts: Any, cancel: threading.Event) -> None:
        rid, last = req.id, [0.0]

        def progress(fraction: float, message: str) -> None:
            if fraction < 0:
                self.send(P.log(rid, message))
                return
            now = time.monotonic()
            if fraction >= 1.0 or now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                self.send(P.progress(rid, round(float(fraction), 4), message))

        try:
            if req.get("task") == P.INFER:
                event = self._run_infer(req, opts, progress, cancel)
            else:
                event = P.result(rid, self._run_other(req, progress, cancel))
        except Exception as e:
            event = error_event(rid, e)
        with self._state_lock:  # free before the last event: the client may send the next run at once
            self._run_id, self._thread = None, None
        self.send(event)

    def _run_infer(self, req: P.Request, opts: Any, progress, cancel: threading.Event) -> dict:
        from .inference import run_inference
        from .tasks import task_for

        t0 = time.perf_counter()
        entry, pkg_hit = self.cache.package(req.get("model"))
        card = entry.package.card
        progress(-1.0, f"model {card.name}: " + ("already loaded (cache hit)" if pkg_hit else
                                                  f"loaded in {time.perf_counter() - t0:.2f} s"))
        backend, be_hit = None, None  # a task that reads the raster itself (CFAR) has no backend
        if task_for(card).windowed:
            from .options import check_window

            size = check_window(opts, card, 0)  # before the backend allocates a batch (the raster: later)
            backend, be_hit = self.cache.backend(entry, opts, size, lambda m: progress(-1.0, m))
        if cancel.is_set():  # cancelled while the model was loading
            raise CancelledError("cancelled by the user; no output was written")
        res = run_inference(req.get("inputs"), req.get("output"), entry.package, opts, progress,
                            cancel.is_set, backend=backend)
        return P.result(req.id, res.to_dict(), cache={"package": "hit" if pkg_hit else "miss",
                                                      "backend": "none" if be_hit is None else "hit" if be_hit else "miss"})

    def _run_other(self, req: P.Request, progress, cancel: threading.Event) -> dict:
        """Similarity (built in) or a task another package registered (fine-tuning, pretraining)."""
        task = req.get("task")
        params = {k: v for k, v in req.params.items() if k != "task"}
        if task == P.SIMILARITY:
            from .similarity import run_similarity

            missing = [k for k in ("embedding", "output", "query") if k not in params]
            if missing:
                raise P.ProtocolError(f"'similarity' run is missing {', '.join(missing)}", req.id)
            query = params["query"]
            query = tuple(query) if isinstance(query, list) else query
            return run_similarity(params["embedding"], params["output"], query, overwrite=bool(params.get("overwrite")))
        return extension_tasks()[task](params, progress, cancel.is_set)

    def cancel(self, target: str) -> bool:
        """Ask the active run ``target`` to stop; False when no such run is active (already finished)."""
        with self._state_lock:
            if self._run_id == target:
                self._cancel.set()
            return self._run_id == target

    def stop(self) -> None:
        """Cancel any active run and wait for it to remove its partial outputs."""
        with self._state_lock:
            thread = self._thread
            self._cancel.set()
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)


def clean_folder(folder: str, busy: bool) -> dict[str, Any]:
    """``clean``: remove the stale temporaries (our naming, older than now, no live run holding their
    output) in ``folder``, e.g. those of a run whose worker was killed; nothing while a run is active."""
    from .output_locks import clean_stale_temporaries

    if busy:
        return {"folder": folder, "removed": [], "skipped": "a run is active"}
    removed = clean_stale_temporaries(Path(folder), time.time()) if Path(folder).is_dir() else []
    return {"folder": folder, "removed": [str(p) for p in removed]}


def error_event(rid: str | None, e: BaseException) -> dict[str, Any]:
    """The error event for ``e``; unexpected exceptions are also logged to stderr in full."""
    event = P.error_from_exception(rid, e)
    if event["error"]["code"] == P.INTERNAL:
        log.error("unexpected error in request %s", rid, exc_info=e)
    return event


def engine_info(cache: ModelCache, active_run: str | None = None) -> dict[str, Any]:
    """Versions, devices and loaded models of this worker (the ``info`` result)."""
    import importlib
    import platform

    versions: dict[str, str | None] = {}
    for name in ("numpy", "torch", "onnxruntime", "rasterio"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # not installed or broken: reported as null
            versions[name] = None
    versions["gdal"] = getattr(sys.modules.get("rasterio"), "__gdal_version__", None)
    devices: list[dict[str, Any]] = [{"name": "cpu", "available": True,
                                      "description": platform.processor() or platform.machine()}]
    try:
        import torch

        devices[0]["threads"] = torch.get_num_threads()
        cuda = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())
                if torch.cuda.is_available()]
        devices += [{"name": f"cuda:{i}", "available": True, "description": p.name,
                     "memory_gb": round(p.total_memory / 2**30, 1)} for i, p in enumerate(cuda)]
        devices += [] if cuda else [{"name": "cuda", "available": False}]
        mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
        devices.append({"name": "mps", "available": bool(mps)})
    except Exception as e:  # torch missing or broken: CPU through onnxruntime only
        devices[0]["note"] = f"torch unavailable ({e})"
    return {"engine_version": __version__, "protocol": P.PROTOCOL_VERSION, "pid": os.getpid(),
            "python": platform.python_version(), "python_executable": sys.executable,
            "platform": platform.platform(), "versions": versions, "devices": devices,
            "gpu_usable": any(d["available"] for d in devices[1:]), "loaded_models": cache.describe(),
            "cache_size": cache.size, "active_run": active_run}


def model_info(package: str, verify: bool = False) -> dict[str, Any]:
    """The validated model card of a package (``verify``: also every file it uses against its sha256,
    as ``sarmae info --verify``: ``package.verify_package``)."""
    from .card import describe
    from .package import ONNX, _Source, read_card, verify_package

    path = Path(package).expanduser().resolve()
    card = read_card(path)
    checked = verify_package(path, card) if verify else {}
    return {"path": str(path), "card": card.to_dict(), "summary": describe(card),
            "has_onnx": ONNX in set(_Source(path).names()), "verified": verify, "files": checked}


def serve_forever(stdin: TextIO, stdout: TextIO, cache_size: int = 2) -> int:
    """Serve requests from ``stdin`` until shutdown or EOF; returns the exit code (0)."""
    worker = Worker(stdout, cache_size)
    worker.send(P.hello(__version__, os.getpid()))
    try:
        while not worker.closed:
            line = stdin.readline()
            if not line:
                log.info("stdin closed: exiting")
                break
            if line.strip() and not worker.handle_line(line):
                break
    finally:  # EOF, shutdown, SIGTERM, Ctrl-C: a running job removes its partial outputs first
        worker.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``sarmae serve [--cache-size N] [--log-level LEVEL]``: run the worker on this process's stdio."""
    parser = argparse.ArgumentParser(prog="sarmae serve", description="Run the engine worker: JSON-lines "
                                     "requests on stdin, events on stdout (see docs/protocol.md).")
    parser.add_argument("--cache-size", type=int, default=2, help="models kept loaded (default: %(default)s)")
    parser.add_argument("--log-level", default="WARNING", help="stderr log level (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s sarmae-serve %(levelname)s %(name)s: %(message)s")
    # stdout is the protocol channel: give it a private descriptor and point fd 1 (and print) at
    # stderr, so a stray print in a library (Python or C) can never corrupt the stream
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", newline="\n")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # clean up like shutdown
    try:
        return serve_forever(stdin, out, args.cache_size)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
