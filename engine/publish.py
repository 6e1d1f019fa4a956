"""Publishing outputs: temporary file -> checked writes -> verified -> lock-checked rename.

Every output of the engine appears under its final name only once it is complete and has been read
back. One run's outputs belong to one ``Publication`` (``run_inference`` opens it):

- locks: each output path is locked for the run by ``.<name>.lock`` beside it, held with ``flock``
  (the kernel drops it when the process dies, so the file a killed run leaves is simply taken
  over); a second run on a locked path is refused unless ``overwrite``;
- stale temporaries: hidden ``.<stem>.<8 hex>.tmp<suffix>`` files (``temp_sibling``) and their
  GDAL / SQLite side files in an output folder, older than the run and of an output no live run
  holds, are removed when a run starts there, and the run says so;
- free space: each writer ``reserve``-s an estimate of its file's size before writing anything;
  a run whose outputs do not fit is refused at once;
- GDAL errors: ``gdal_errors`` turns the CE_Failure errors GDAL signals during a write or a close
  into an exception (libtiff's "No space left on device" is otherwise only printed);
- verification: the closed temporary file is re-opened and read (``verify_raster``: header and
  blocks, every block of a small file; ``verify_gpkg``: SQLite's quick_check and the feature count);
- ``publish``: fsync, then the final name is created by a hard link (which fails if a file appeared
  there during the run: it is not replaced without ``overwrite``) or replaced (``overwrite``), and
  the folder is fsynced.

A failure anywhere removes the temporary file, keeps any earlier output and raises ``OutputError``
("disk full while writing X (needed about N MB, M MB free)" when the disk filled up).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .output_locks import OutputLock, clean_stale_temporaries, remove_temporary, temp_sibling

MB = 1 << 20
# deflate on model outputs, measured on sen1floods11 (random and trained models): class rasters
# ~0.1 of their raw size, confidences and probabilities ~0.7; the estimate stays below both so that
# the up-front check refuses only runs that cannot fit (a write that still fills the disk is caught)
COMPRESSED_FRACTION = {"int": 0.1, "float": 0.6}
FULL_VERIFY_BYTES = 64 * MB  # rasters up to this size (uncompressed) are read back entirely
SAMPLE_BLOCKS = 32  # else the first, the last and this many random blocks
_estimates: dict[Path, int] = {}  # path -> the size reserved for it by a writer outside a run
_current: contextvars.ContextVar[Publication | None] = contextvars.ContextVar("sarmae_publication", default=None)


# ---------------------------------------------------------------------------- free space
def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def raster_estimate(width: int, height: int, count: int, itemsize: int, floating: bool = True) -> int:
    """The bytes a compressed raster of this size is expected to take on disk (at least)."""
    fraction = COMPRESSED_FRACTION["float" if floating else "int"]
    return int(width * height * count * itemsize * fraction) + 16 * 1024


def is_disk_full(e: BaseException | str, folder: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e) or "Disk quota" in str(e):
        return True
    try:
        return free_bytes(folder) < MB
    except OSError:
        return False


def disk_error(path: Path, e: BaseException) -> OutputError:
    """The ``OutputError`` for a failed write of ``path``: "disk full while writing ..." when it is."""
    if isinstance(e, OutputError):
        return e
    folder = Path(path).parent
    if is_disk_full(e, folder):
        pub = _current.get()
        needed = pub.needed(folder) if pub is not None else _estimates.get(Path(path), 0)
        try:
            free = free_bytes(folder)
        except OSError:
            free = 0
        sizes = (f"needed about {_size(needed)}, " if needed > 0 else "") + f"{_size(free)} free"
        return OutputError(f"disk full while writing {path} ({sizes}); "
                           "nothing was published and any earlier output was kept. Free space or choose another "
                           "output folder")
    return OutputError(f"{path}: writing failed ({str(e)[:300]}); nothing was written and any earlier "
                       "output was kept")


def _size(n: int) -> str:
    """Bytes for a message: KB below 1 MB (a small file's estimate does not read as 0.00 MB)."""
    return f"{max(n, 0) / 1024:.0f} KB" if n < MB else f"{_mb(n)} MB"


def _mb(n: int) -> str:
    return f"{n / MB:.2f}" if n < MB else f"{n / MB:.1f}" if n < 10 * MB else f"{n / MB:.0f}"


# ---------------------------------------------------------------------------- GDAL errors
_GDAL_LOGGERS = ("rasterio._env", "rasterio._err")
_FAILURE = "GDAL signalled an error"
_capture_lock = threading.Lock()
_captures = 0
_saved_levels: dict[str, tuple[int, int]] = {}  # logger -> (its own level, its effective level)


class _Capture(logging.Filter):
    """Collects the GDAL failures rasterio logs from one thread; drops the INFO records that are
    only enabled while capturing (so they are not printed)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.failures: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread:
            text = record.getMessage()
            if (text.startswith(_FAILURE) and _is_io_failure(record)) or "No space left" in text:
                self.failures.append(text)
        return record.levelno >= _saved_levels.get(record.name, (0, logging.WARNING))[1]


_IO_WORDS = re.compile(r"no space|quota|write error|writ\w* failed|cannot write|short write|i/o error|seek|flush|"
                       r"directory|read failed|readblock failed|writeblock failed|sqlite|disk", re.IGNORECASE)


def _is_io_failure(record: logging.LogRecord) -> bool:
    """A CE_Failure that means the file is not what was written: out of memory, file I/O, or an
    AppDefined error of libtiff / SQLite about writing, seeking or the directory (GDAL also signals
    CE_Failure for values it clamps, e.g. to float16, and the write succeeds)."""
    args = record.args if isinstance(record.args, tuple) and len(record.args) == 2 else (None, record.getMessage())
    err_no, msg = args
    return err_no in (2, 3) or bool(_IO_WORDS.search(str(msg)))


@contextmanager
def gdal_errors(path: Path, action: str = "writing") -> Iterator[None]:
    """Run rasterio calls in an environment whose GDAL failures (CPLE_* errors) raise ``OutputError``
    (through ``disk_error``) once the block ends, instead of only being printed."""
    import rasterio
    import rasterio.env

    global _captures
    cap = _Capture()
    loggers = [logging.getLogger(n) for n in _GDAL_LOGGERS]
    with _capture_lock:
        if _captures == 0:
            for lg in loggers:
                _saved_levels[lg.name] = (lg.level, lg.getEffectiveLevel())
                lg.setLevel(min(logging.INFO, lg.getEffectiveLevel()))
        _captures += 1
        for lg in loggers:
            lg.addFilter(cap)
    try:
        # an environment routes GDAL's errors to rasterio's logger; a run holds one (cheaper than
        # one per block written: ~0.25 ms each)
        with contextlib.nullcontext() if rasterio.env.hasenv() else rasterio.Env():
            yield
    finally:
        with _capture_lock:
            for lg in loggers:
                lg.removeFilter(cap)
            _captures -= 1
            if _captures == 0:
                for lg in loggers:
                    lg.setLevel(_saved_levels.pop(lg.name, (logging.NOTSET, 0))[0])
    if cap.failures:
        raise disk_error(path, OSError(f"GDAL failed while {action} ({'; '.join(cap.failures[:3])})"))


# ---------------------------------------------------------------------------- verification
def verify_raster(tmp: Path, final: Path, *, width: int, height: int, count: int, dtype: str) -> None:
    """Fsync the closed temporary raster and read it back: its header must match what was written
    and every block (a sample of ``SAMPLE_BLOCKS`` for files above ``FULL_VERIFY_BYTES``) decode."""
    import random

    import numpy as np
    import rasterio

    try:
        fsync_path(tmp)  # on the disk first (a delayed write error shows here), so publishing is quick
        with gdal_errors(final, "reading back"), rasterio.open(tmp) as ds:
            got = (ds.width, ds.height, ds.count, ds.dtypes[0])
            if got != (width, height, count, dtype):
                raise OSError(f"the file reads back as {got}, not {(width, height, count, dtype)}")
            blocks = [w for _, w in ds.block_windows(1)]
            if width * height * count * np.dtype(dtype).itemsize > FULL_VERIFY_BYTES and len(blocks) > SAMPLE_BLOCKS:
                rng = random.Random(str(final))
                blocks = [blocks[0], blocks[-1], *rng.sample(blocks[1:-1], SAMPLE_BLOCKS)]
            for w in blocks:
                ds.read(window=w)
    except OutputError:
        raise
    except Exception as e:
        raise disk_error(final, OSError(f"the written file does not read back: {e}")) from e


def verify_gpkg(tmp: Path, final: Path, layer: str, features: int) -> None:
    """Fsync the closed temporary GeoPackage; SQLite's quick_check and its feature count."""
    import sqlite3

    import fiona

    try:
        fsync_path(tmp)
        con = sqlite3.connect(f"file:{tmp}?mode=ro", uri=True)
        try:
            check = con.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            con.close()
        if check != "ok":
            raise OSError(f"SQLite quick_check: {check}")
        with fiona.open(tmp, layer=layer) as src:
            n = len(src)
        if n != features:
            raise OSError(f"the layer '{layer}' reads back with {n} feature(s), {features} were written")
    except Exception as e:
        raise disk_error(final, OSError(f"the written GeoPackage does not read back: {e}")) from e


def verify_files(out: Path, files: dict[str, bytes], zip_prefix: str | None = None) -> None:
    """Fsync and read back the files written into the folder ``out`` (or the zip ``out``, members
    under ``zip_prefix``) and compare them with ``files`` (name -> bytes meant)."""
    import zipfile

    if zip_prefix is not None:
        fsync_path(out)
        with zipfile.ZipFile(out) as z:
            back = {name: z.read(zip_prefix + name) for name in files}
    else:
        back = {}
        for name in files:
            fsync_path(out / name)
            back[name] = (out / name).read_bytes()
    for name, data in files.items():
        if back[name] != data:
            raise OSError(f"{name} reads back different from what was written")


def fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # a folder cannot be opened on some systems (Windows): nothing to sync
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- publishing
def publish(tmp: Path, final: Path) -> Path:
    """Rename the complete, verified ``tmp`` to ``final`` (see the module docstring); a run's
    ``Publication`` applies its overwrite rule, outside a run an existing ``final`` is replaced
    (its caller checked it)."""
    pub = _current.get()
    return (pub or Publication([], overwrite=True)).publish(tmp, final)


def claim(path: Path) -> None:
    """Claim ``path`` for the current run's Publication, if one is open (``writers.check_output``)."""
    pub = _current.get()
    if pub is not None:
        pub.claim(path)


def reserve(path: Path, nbytes: int) -> None:
    """Count ``nbytes`` against the free space of ``path``'s filesystem for the current run."""
    pub = _current.get()
    if pub is None:  # a writer outside a run: its own estimate is what a disk-full message quotes
        if len(_estimates) > 256:
            _estimates.clear()
        _estimates[Path(path)] = int(nbytes)
    (pub or Publication([], overwrite=True)).reserve(path, nbytes)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """A small file (a JSON sidecar, a cache): temporary file, fsync, read back, then it replaces
    ``path`` (whatever the current run's overwrite rule: its caller decided)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if tmp.read_bytes() != data:
            raise OSError("the written file reads back different")
        return Publication([], overwrite=True).publish(tmp, path)
    except BaseException as e:
        remove_temporary(tmp)
        if isinstance(e, Exception):
            raise disk_error(path, e) from e
        raise


class Publication:
    """The outputs of one run: their locks, free-space budget and publishing (see the module).

    Outputs are claimed as they are checked (``claim``: ``writers.check_output`` claims every path
    it accepts while a Publication is open), or listed up front; each is locked, and the first one
    in a folder has the folder's stale temporaries removed. ``messages``: what it said.
    """

    def __init__(self, outputs: list[Path] = (), *, overwrite: bool, say: Callable[[str], None] | None = None):
        self.overwrite = overwrite
        self.messages: list[str] = []
        self._say = say
        self.started = time.time()
        self.outputs: list[Path] = []
        self.locks: list[OutputLock] = []
        self.cleaned: set[Path] = set()
        self.reserved: dict[int, int] = {}  # st_dev -> bytes
        self.free_at_start: dict[int, int] = {}  # st_dev -> free bytes at the first reservation
        self._token: contextvars.Token | None = None
        self._initial = [Path(p) for p in outputs]

    def say(self, message: str) -> None:
        self.messages.append(message)
        if self._say is not None:
            self._say(message)

    def __enter__(self) -> Publication:
        try:
            for out in self._initial:
                self.claim(out)
        except BaseException:
            self._release()
            raise
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        self._release()

    def claim(self, output: Path) -> None:
        """Lock ``output`` for this run (refused while a live run holds it, unless ``overwrite``)
        and, the first time in its folder, remove the folder's stale temporaries."""
        out = Path(output).absolute()
        if out in self.outputs:
            return
        self.outputs.append(out)
        lock = OutputLock(out)
        try:
            holder = lock.acquire()
        except OutputError:
            raise
        except OSError as e:  # e.g. no room left for the lock file
            raise disk_error(out, OSError(e.errno, f"cannot take the output lock {lock.path}: {e.strerror}")) from e
        if holder is not None:
            if not self.overwrite:
                raise OutputError(f"{out} is being written by another run (process {holder}); wait for it "
                                  "to finish, choose another output, or pass --overwrite to replace "
                                  "its result with this run's")
            self.say(f"{out.name}: another run (process {holder}) is writing it; --overwrite: the run "
                     "that finishes last is kept")
        else:
            if lock.took_over:
                self.say(f"{out.name}: took over the lock left by process {lock.took_over} (no longer running)")
            self.locks.append(lock)
        if out.parent not in self.cleaned:
            self.cleaned.add(out.parent)
            removed = clean_stale_temporaries(out.parent, self.started, own=[lk.output for lk in self.locks])
            if removed:
                self.say(f"removed {len(removed)} stale temporary file(s) of interrupted runs in {out.parent}: "
                         + ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))

    def _release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []

    def needed(self, folder: Path) -> int:
        try:
            return self.reserved.get(os.stat(folder).st_dev, 0)
        except OSError:
            return 0

    def reserve(self, path: Path, nbytes: int) -> None:
        folder = Path(path).parent
        dev = os.stat(folder).st_dev
        self.reserved[dev] = self.reserved.get(dev, 0) + int(nbytes)
        free = self.free_at_start.setdefault(dev, free_bytes(folder))  # what this run's files may take
        if self.reserved[dev] > free:
            raise OutputError(f"not enough free space for {path}: this run's outputs need about "
                              f"{_mb(self.reserved[dev])} MB, {_mb(free)} MB free in {folder}. Free space or choose "
                              "another output folder")

    def publish(self, tmp: Path, final: Path) -> Path:
        final = Path(final)
        try:
            fsync_path(tmp)
            if self.overwrite:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)  # fails if the name exists: never replaces a file that appeared
                except FileExistsError:
                    raise OutputError(f"{final} appeared while this run was writing it (another program or run "
                                      "wrote it); this run's result was not published. Pass --overwrite to "
                                      "replace it, or choose another output") from None
                except OSError as e:  # no hard links here (FAT, some network shares): check, then rename
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV, errno.ENOSYS):
                        raise
                    if os.path.lexists(final):
                        raise OutputError(f"{final} appeared while this run was writing it; this run's result "
                                          "was not published. Pass --overwrite to replace it") from None
                    os.replace(tmp, final)
                else:
                    os.unlink(tmp)
            fsync_path(final.parent, directory=True)
        except BaseException as e:
            remove_temporary(tmp)
            if isinstance(e, Exception):
                raise disk_error(final, e) from e
            raise
        return final
