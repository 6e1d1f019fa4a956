"""The plugin's client of the engine worker (``python -m engine.serve``), standard library only.

The plugin never imports torch, rasterio or the engine (DESIGN.md): it starts the worker as a
child process with a configured Python interpreter and speaks the JSON-lines protocol (version 1)
with it. A reader thread routes events to the request that asked for them. If the worker dies
(crash, out of memory, killed), the request in flight fails with a readable ``EngineError``
carrying the tail of the worker's stderr, and the next request starts a fresh worker.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1
HELLO_TIMEOUT_S = 120.0  # first start may import torch from a cold disk


class EngineError(RuntimeError):
    """The engine refused a request, failed, or died; ``message`` is meant for the user."""

    def __init__(self, message: str, kind: str = "failed", cancelled: bool = False, details: str = ""):
        super().__init__(message)
        self.kind, self.cancelled, self.details = kind, cancelled, details


def default_python() -> str:
    """The interpreter that runs the engine: $SARMAE_PYTHON, the path recorded at packaging time
    (engine.json inside the plugin), the repository's .venv beside a development checkout, else
    'python3'."""
    if os.environ.get("SARMAE_PYTHON"):
        return os.environ["SARMAE_PYTHON"]
    here = Path(__file__).resolve().parent
    recorded = here / "engine.json"
    if recorded.is_file():
        try:
            py = json.loads(recorded.read_text()).get("python")
            if py and Path(py).exists():
                return py
        except (OSError, ValueError):
            pass
    dev = here.parent / ".venv" / "bin" / "python"
    return str(dev) if dev.exists() else "python3"


def engine_cwd(python: str) -> str | None:
    """The repository folder of a development venv (so ``-m engine.serve`` finds the package)."""
    p = Path(python).resolve()
    for parent in p.parents:
        if (parent / "engine" / "serve.py").is_file():
            return str(parent)
    return None


class EngineClient:
    """One engine worker process; thread-safe; restarts the worker when it has died."""

    def __init__(self, python: str | None = None, extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.python = python or default_python()
        self.extra_args = tuple(extra_args)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.hello: dict = {}
        self._ids = itertools.count(1)
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self.restarts = 0
        self.last_death: str = ""
        self._dirty: set[str] = set()  # output folders of runs whose worker died: cleaned by the next worker

    # ---- process ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> dict:
        """Start the worker (if needed) and return its hello message."""
        with self._lock:
            if self.alive:
                return self.hello
            if self.proc is not None:
                self.restarts += 1
                self._close_pipes()  # the dead worker's stdin
            cmd = [self.python, "-m", "engine.serve", *self.extra_args]
            env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
            env.pop("PYTHONHOME", None)  # QGIS's own Python settings must not leak into the engine's
            env.pop("PYTHONPATH", None)
            try:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
                                             cwd=engine_cwd(self.python))
            except OSError as e:
                raise EngineError(f"cannot start the engine with '{self.python}' ({e.strerror}). Set the engine's "
                                  "Python interpreter in SARMAE > Settings", "start") from e
            self._stderr.clear()
            threading.Thread(target=self._drain_stderr, args=(self.proc,), daemon=True).start()
            hello_q: queue.Queue = queue.Queue()
            self._queues["__hello__"] = hello_q
            threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True).start()
        try:
            hello = hello_q.get(timeout=HELLO_TIMEOUT_S)
        except queue.Empty:
            self.kill()
            raise EngineError(f"the engine did not start within {HELLO_TIMEOUT_S:.0f} s. {self.stderr_tail()}", "start") from None
        if hello.get("event") != "hello":
            raise EngineError(f"the engine failed to start. {self.stderr_tail()}", "start")
        if hello.get("protocol") != PROTOCOL_VERSION:
            self.kill()
            raise EngineError(f"the engine speaks protocol {hello.get('protocol')}, this plugin speaks "
                              f"{PROTOCOL_VERSION}: update the plugin or the engine so they match", "protocol")
        self.hello = hello
        return hello

    def _drain_stderr(self, proc: subprocess.Popen) -> None:
        with proc.stderr:  # closed at the end of the stream: no unclosed file left
            for line in proc.stderr:
                self._stderr.append(line.rstrip())

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        with proc.stdout:  # closed at the end of the stream: no unclosed file left
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                key = "__hello__" if msg.get("event") == "hello" else msg.get("id")
                q = self._queues.get(key) if key is not None else None
                if q is not None:
                    q.put(msg)
        proc.wait()
        self.last_death = f"exit code {proc.returncode}"
        for q in list(self._queues.values()):  # wake every waiter: the worker is gone
            q.put({"event": "died", "returncode": proc.returncode})

    def stderr_tail(self, n: int = 8) -> str:
        tail = [s for s in list(self._stderr)[-n:] if s.strip()]
        return ("Engine log: " + " | ".join(tail)) if tail else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        """Close our ends of the worker's pipes once it has exited (no ResourceWarning left behind).
        stdout/stderr are closed by their reader threads when they reach the end of the stream."""
        proc = self.proc
        if proc is None or proc.poll() is None:
            return
        try:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        except OSError:  # a broken pipe on flush: the worker is gone anyway
            pass

    def shutdown(self, timeout: float = 30.0) -> None:
        """Ask the worker to exit (it cancels any run and cleans up), kill it if it does not."""
        if not self.alive:
            return
        try:
            self._send({"id": "shutdown", "type": "shutdown"})
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired, EngineError):
            self.kill()
        self._close_pipes()

    # ---- requests --------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError, AttributeError) as e:
            raise EngineError(f"the engine is not running ({e}). {self.stderr_tail()}", "died") from e

    def request(self, rtype: str, on_event: Callable[[dict], None] | None = None,
                is_cancelled: Callable[[], bool] | None = None, timeout: float | None = None, **fields) -> Any:
        """Send one request and wait for its result; progress/log events go to ``on_event``."""
        self.start()
        if self._dirty and rtype != "clean":
            self._clean_dirty(on_event)
        rid = f"r{next(self._ids)}"
        q: queue.Queue = queue.Queue()
        self._queues[rid] = q
        cancel_sent = False
        t0 = time.monotonic()
        try:
            self._send({"id": rid, "type": rtype, **fields})
            while True:
                if is_cancelled is not None and is_cancelled() and not cancel_sent:
                    self._send({"id": f"{rid}-cancel", "type": "cancel", "target": rid})
                    cancel_sent = True
                if timeout is not None and time.monotonic() - t0 > timeout:
                    raise EngineError(f"the engine did not answer '{rtype}' within {timeout:.0f} s", "timeout")
                try:
                    msg = q.get(timeout=0.2)
                except queue.Empty:
                    continue
                ev = msg.get("event")
                if ev == "result":
                    return msg.get("result")
                if ev == "error":
                    err = msg.get("error") or {}
                    raise EngineError(err.get("message", "the engine reported an error"), err.get("code", "failed"),
                                      bool(err.get("cancelled")), err.get("traceback", ""))
                if ev == "died":
                    if fields.get("output"):
                        self._dirty.add(os.path.dirname(os.path.abspath(str(fields["output"]))))
                    raise EngineError(f"the engine stopped unexpectedly ({self.last_death}) while running '{rtype}'. "
                                      f"It will be restarted for the next request. {self.stderr_tail()}", "died")
                if on_event is not None:
                    on_event(msg)
        finally:
            self._queues.pop(rid, None)

    def _clean_dirty(self, on_event: Callable[[dict], None] | None) -> None:
        """Ask the new worker to remove the hidden temporaries the dead one left in its runs' folders."""
        while self._dirty:
            folder = self._dirty.pop()
            try:
                removed = self.request("clean", folder=folder, timeout=60).get("removed", [])
            except EngineError:
                continue  # an older engine without 'clean': its next run into the folder removes them
            if removed and on_event is not None:
                on_event({"event": "log", "message": f"removed {len(removed)} temporary file(s) left in {folder} "
                                                     "by the engine that stopped"})

    def info(self) -> dict:
        return self.request("info", timeout=120)

    def model_info(self, package: str) -> dict:
        return self.request("model_info", package=package, timeout=120)

    def run_inference(self, inputs: list[str], output: str, model: str, options: dict | None = None,
                      on_progress: Callable[[float, str], None] | None = None,
                      is_cancelled: Callable[[], bool] | None = None) -> dict:
        """Run ``sarmae infer`` in the worker; returns the result record (outputs, statistics, ...)."""

        def on_event(msg: dict) -> None:
            if on_progress is None:
                return
            if msg.get("event") == "progress":
                on_progress(float(msg.get("fraction", 0.0)), msg.get("message", ""))
            elif msg.get("event") == "log":
                on_progress(-1.0, msg.get("message", ""))

        return self.request("run", on_event, is_cancelled, task="infer", inputs=list(inputs), output=output,
                            model=model, options=options or {})
