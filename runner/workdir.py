"""Temp files for downloads, cleaned up even after a crash.

Each daemon works in its own subdirectory and holds an exclusive ``flock`` on a
lock file inside it for as long as it lives.  The kernel drops the lock when the
process dies however it dies, so the next daemon to start can tell a dead
daemon's leftovers (lock free) from a live neighbour's (lock held) and removes
only the former.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from types import TracebackType

from runner.errors import RunnerError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
PREFIX = "daemon-"
NEW_DIR_GRACE_S = 60.0


def _try_lock(lock_path: Path) -> int | None:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _is_stale(entry: Path, now: float) -> bool:
    lock_path = entry / LOCK_NAME
    if not lock_path.exists():
        # A daemon creates its directory a moment before locking it: give it time.
        return now - entry.stat().st_mtime > NEW_DIR_GRACE_S
    fd = _try_lock(lock_path)
    if fd is None:
        return False  # a live daemon holds it
    os.close(fd)
    return True


def remove_stale(root: Path, *, now: float | None = None) -> int:
    """Delete the directories of daemons that are no longer running."""
    now = time.time() if now is None else now
    removed = 0
    for entry in root.glob(f"{PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and _is_stale(entry, now):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


class Workdir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock_fd: int | None = None

    def __enter__(self) -> Workdir:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            stale = remove_stale(self.root)
            self.path.mkdir()
        except OSError as exc:
            raise RunnerError(f"cannot use workdir {self.root}: {exc.strerror}") from None
        if stale:
            log.info("removed temp files of %d dead daemon(s) from %s", stale, self.root)
        self._lock_fd = _try_lock(self.path / LOCK_NAME)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def temp_path(self, job_id: int) -> Path:
        return self.path / f"job-{job_id}-{uuid.uuid4().hex[:8]}.part"

    @staticmethod
    def remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
