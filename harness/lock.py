"""The study lock: two invocations of one study on one machine never both run.

A ``fcntl.flock`` on a file beside the store; the holder writes its PID into the file so the second
invocation can name it. Hand-written (20 lines) because ``filelock`` does not report the holder.
The kernel drops the lock when the holder dies, even by SIGKILL, so a stale lock cannot block a rerun.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.config import HarnessError
from harness.urls import sqlite_path


def lock_path(tracking_uri: str, checkpoint_dir: Path, name: str) -> Path:
    """Beside the embedded store's database; for a tracking server, in the checkpoint folder."""
    database = sqlite_path(tracking_uri)
    folder = checkpoint_dir if database is None else database.parent
    return folder / f"{name}.lock"


class StudyLocked(HarnessError):
    """Another process on this machine runs the study."""


@contextmanager
def study_lock(path: Path) -> Iterator[None]:
    """Hold ``path`` for the block, or raise :class:`StudyLocked` naming the process that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StudyLocked(f"{path}: the study is already running in process {holder}; wait or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
