"""Output locks, temporary-file naming and the removal of stale temporaries (``engine.publish``).

A run locks each output path with ``.<name>.lock`` beside it, held by ``flock`` (an exclusive
create where there is no ``flock``): the kernel drops the lock when the process dies, so the file a
killed run leaves behind is taken over by the next run. Temporary files are named
``.<stem>.<8 hex>.tmp<suffix>`` (``temp_sibling``); those of dead runs are recognised by that name.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from .errors import OutputError

TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.[0-9a-f]{8}\.tmp(?:\.cog)?(?P<suffix>\.[A-Za-z0-9]+)"
                     r"(?:\.aux\.xml|-journal|-wal|-shm)?$")
LOCK_RE = re.compile(r"^\.(?P<name>.+)\.lock$")


def temp_sibling(path: Path, suffix: str | None = None) -> Path:
    """A hidden temporary file beside ``path`` (same filesystem, so the final rename is atomic);
    its name (``.<stem>.<8 hex>.tmp<suffix>``) is what ``clean_stale_temporaries`` recognises."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{suffix or path.suffix}")


def remove_temporary(tmp: Path) -> None:
    """``tmp`` and the side files GDAL (``.aux.xml``) and SQLite (journal, WAL) may have made."""
    for side in ("", ".aux.xml", "-journal", "-wal", "-shm"):
        Path(str(tmp) + side).unlink(missing_ok=True)



def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


class OutputLock:
    """An exclusive lock on one output path for this process (``.<name>.lock``, ``flock``-ed)."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.fd: int | None = None
        self.took_over: int | None = None  # the dead process whose lock file this one reused

    def acquire(self) -> int | None:
        """Take the lock; returns None when held, else the pid of the live process holding it (-1:
        unknown). A lock file that cannot be written (a full disk) raises ``OSError`` (its file removed)."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): an exclusive create, a dead holder's file taken over
            return self._acquire_excl()
        return self._acquire_flock(fcntl)

    def _acquire_flock(self, fcntl) -> int | None:
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                return holder or -1
            except BaseException:
                os.close(fd)
                raise
            same = False
            try:
                try:  # the file may have been removed by its last holder between open and flock
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                self.took_over = _read_pid(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except BaseException:
                if same:  # held by this process: its file can go
                    self.path.unlink(missing_ok=True)
                os.close(fd)
                raise
            self.fd = fd
            return None
        raise OutputError(f"{self.path}: cannot take the output lock (the file keeps changing)")

    def _acquire_excl(self) -> int | None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _read_pid_file(self.path)
                if pid and _alive(pid):
                    return pid
                self.took_over = pid
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return None
        return -1

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_by_live_run(output: Path) -> bool:
    lock = OutputLock(output)
    try:
        if lock.acquire() is not None:
            return True
    except OSError:  # cannot tell (no room for a lock file): leave its files alone
        return True
    lock.release()
    return False


def clean_stale_temporaries(folder: Path, before: float, own: list[Path] = ()) -> list[Path]:
    """Remove the temporary files of our naming (``temp_sibling``) in ``folder`` that are older than
    ``before`` (a time) and whose output no live run holds (``own``: this run's outputs, whose older
    temporaries are stale), and the lock files no process holds; returns what was removed."""
    own_names = {p.name for p in own}
    removed = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: not e.name.endswith(".lock"))  # locks first
    except OSError:
        return removed
    for entry in entries:
        m = TEMP_RE.match(entry.name)
        lock = LOCK_RE.match(entry.name)
        if not (m or lock) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if entry.stat().st_mtime >= before:
                continue
        except FileNotFoundError:
            continue
        if lock:  # taking and releasing a lock no one holds removes its file
            if lock["name"] not in own_names and not _held_by_live_run(Path(folder) / lock["name"]):
                removed.append(Path(entry.path))
            continue
        output = Path(folder) / (m["stem"] + m["suffix"])
        if output.name not in own_names and _held_by_live_run(output):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return removed
