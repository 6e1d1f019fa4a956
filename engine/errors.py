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


class OptionError(SarmaeError, ValueError):
    """A run option has the wrong type or is out of range (or its window needs more memory than there is)."""


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


def describe_system_error(e: BaseException) -> str | None:
    """A sentence for an error the system raised on bad input or a full / locked machine (a file
    missing or unreadable, no permission, disk full, out of memory), naming the file and what to
    do; None for anything else (a bug: the caller shows its traceback)."""
    import errno

    if isinstance(e, MemoryError):
        return ("out of memory: the run needs more memory than this machine has free; use a smaller --window "
                "or --batch-size, or close other programs")
    if not isinstance(e, OSError) or isinstance(e, SarmaeError):
        return None
    name = e.filename if e.filename is not None else "a file"
    if isinstance(e, FileNotFoundError):
        return f"{name}: no such file or folder; check the path"
    if isinstance(e, PermissionError):
        return f"{name}: permission denied; choose a file or folder you may read (inputs) or write (outputs)"
    if isinstance(e, IsADirectoryError):
        return f"{name} is a folder; give a file"
    if isinstance(e, NotADirectoryError):
        return f"{name}: a part of the path is a file, not a folder; check the path"
    if e.errno == errno.ENOSPC:
        return f"disk full while writing {name}; free some space or write to another disk"
    if e.errno in (errno.EROFS, errno.EACCES):
        return f"{name}: the file system is read-only or locked; write to another folder"
    if e.errno is not None and e.strerror:
        return f"{name}: {e.strerror} (errno {e.errno}); check the file and the disk"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{msg[:300]}; check the file named there (it may be damaged or not what it seems)"
