"""One exception tree for the engine; every message says what, which file, and what to do."""

from __future__ import annotations


class SarmaeError(Exception):
    """Base class of every error the engine raises on purpose (the CLI prints these plainly)."""


class PackageError(SarmaeError):
    """A model package is missing, malformed, or its weights do not match model.json."""


class ConversionError(SarmaeError):
    """A checkpoint cannot be converted into a model package."""


class ModelConfigError(SarmaeError, ValueError):
    """An architecture name or model option is unknown or inconsistent."""


class RasterInputError(SarmaeError, OSError):
    """An input raster is missing, unreadable, or does not meet the model's input contract."""


class NoValidDataError(RasterInputError):
    """Every pixel (or window) of the processed region is nodata: there is nothing to run on."""


class OutputError(SarmaeError, OSError):
    """An output cannot be written (exists, not writable, same as the input, disk full)."""


class CancelledError(SarmaeError):
    """The run was cancelled by the user; nothing partial is left on disk."""


class TerminatedError(KeyboardInterrupt):
    """SIGTERM (``timeout``, a scheduler, systemd) turned into an exception by the CLI: handled like
    Ctrl-C, so that partial outputs are removed on the way out (exit status 143)."""


def terminate_like_interrupt(func, *args):
    """``func(*args)`` with SIGTERM raising ``TerminatedError`` (once: a second SIGTERM during the
    clean-up is ignored); the previous handler is put back afterwards (the CLI called in-process)."""
    import signal
    import threading

    def terminated(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise TerminatedError("terminated")

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return func(*args)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return func(*args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def missing_dependency(module: str, extra: str = "") -> SarmaeError:
    """An error for a heavy dependency that is not importable, with the install hint."""
    hint = f"pip install 'sarmae[{extra}]'" if extra else "make setup (or pip install -e .)"
    return SarmaeError(
        f"The Python module '{module}' is not installed in this environment. Install it with: {hint}"
    )
