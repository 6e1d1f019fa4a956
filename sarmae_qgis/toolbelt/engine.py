"""The plugin's one engine worker, and the engine's command line for what the worker lacks.

:func:`get_client` returns a shared :class:`~sarmae_qgis.engine_client.EngineClient`, created
lazily with the interpreter from the settings and replaced when that setting changes;
:func:`shutdown_client` stops it (plugin unload). The worker runs one job at a time, so
:func:`exclusive_run` serialises the plugin's runs (dialog tasks, Processing algorithms in batch
mode) instead of letting the second one fail with ``busy``.

:func:`run_cli` runs ``python -m engine.cli ...`` (e.g. ``export``, ``convert``) with the same
interpreter, streaming its output lines and killing it on cancel.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

from ..engine_client import EngineClient, EngineError, engine_cwd
from . import settings

_client: EngineClient | None = None
_client_lock = threading.Lock()
_run_lock = threading.Lock()


def get_client(python: str | None = None) -> EngineClient:
    """The shared engine client for ``python`` (default: the configured interpreter).

    The worker process itself starts on the first request. A client for another interpreter is
    shut down and replaced.
    """
    global _client
    python = python or settings.engine_python()
    with _client_lock:
        if _client is not None and _client.python != python:
            old, _client = _client, None
            threading.Thread(target=old.shutdown, daemon=True).start()  # do not block the caller
        if _client is None:
            _client = EngineClient(python=python)
        return _client


def current_client() -> EngineClient | None:
    """The shared client if one was created (never creates one)."""
    return _client


def shutdown_client(timeout: float = 10.0) -> None:
    """Stop the shared worker (it cancels any run and removes its partial outputs)."""
    global _client
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        client.shutdown(timeout=timeout)


@contextlib.contextmanager
def exclusive_run(is_cancelled: Callable[[], bool] | None = None,
                  on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the plugin's run slot; wait for another run to finish (cancellable while waiting)."""
    told = False
    while not _run_lock.acquire(timeout=0.2):
        if is_cancelled is not None and is_cancelled():
            raise EngineError("cancelled by the user before the engine was free; nothing was written",
                              "cancelled", cancelled=True)
        if not told and on_wait is not None:
            on_wait()
            told = True
    try:
        yield
    finally:
        _run_lock.release()


def cli_command(args: list[str], python: str | None = None) -> tuple[list[str], dict, str | None]:
    """(argv, environment, working folder) to run ``python -m engine.cli *args``."""
    python = python or settings.engine_python()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONHOME", None)  # QGIS's own Python settings must not leak into the engine's
    env.pop("PYTHONPATH", None)
    return [python, "-m", "engine.cli", *args], env, engine_cwd(python)


def run_cli(args: list[str], on_line: Callable[[str], None] | None = None,
            is_cancelled: Callable[[], bool] | None = None, python: str | None = None) -> str:
    """Run the engine's command line; return its output, raise :class:`EngineError` on failure.

    Output lines (stdout and stderr merged) go to ``on_line`` as they come. On cancel the process
    is killed (the engine writes packages to a temporary sibling and renames on success, so a
    killed command leaves nothing under the final name).
    """
    argv, env, cwd = cli_command(args, python)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, bufsize=1, env=env, cwd=cwd)
    except OSError as e:
        raise EngineError(f"cannot start the engine with '{argv[0]}' ({e.strerror}). Set the engine's Python "
                          "interpreter in SARMAE > Settings", "start") from e
    lines: list[str] = []

    def read() -> None:
        with proc.stdout:  # closed at the end of the stream: no ResourceWarning
            for line in proc.stdout:
                line = line.rstrip()
                lines.append(line)
                if on_line is not None and line:
                    on_line(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        if is_cancelled is not None and is_cancelled():
            proc.kill()
            proc.wait()
            reader.join(5)
            raise EngineError(f"'sarmae {args[0]}' cancelled by the user", "cancelled", cancelled=True)
        time.sleep(0.1)
    reader.join(10)
    output = "\n".join(lines)
    if proc.returncode != 0:
        tail = " | ".join(s for s in lines[-6:] if s.strip())
        raise EngineError(f"'sarmae {args[0]}' failed (exit code {proc.returncode}): {tail}", "failed")
    return output
