"""The harness CLI as a real subprocess: run to its end, or watched as its output comes (to interrupt it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.workers import harness_env

RUN_TIMEOUT_S = 300.0  # far beyond an uninterrupted tiny run on a loaded 2-core machine
LIVE: set[subprocess.Popen] = set()  # the harness processes started here and not yet seen to end


def subprocess_env(**settings: str) -> dict[str, str]:
    """The harness's environment: this checkout and ``settings``, without the caller's tracking URI (every case
    names its own store)."""
    env = harness_env(**settings)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def sqlite_uri(database: Path) -> str:
    return f"sqlite:///{database}"


def spawn(command: list[str], cwd: Path, env: dict[str, str], **streams: Any) -> subprocess.Popen:
    """Start a process in its own session, so that a signal meant for pytest does not reach it too."""
    process = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, **streams)
    LIVE.add(process)
    return process


def stop_children() -> None:
    """SIGKILL the harness processes started here that are still running (a case ended early)."""
    for process in list(LIVE):
        if process.poll() is None:
            process.kill()
            process.wait()
        LIVE.discard(process)


def harness_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


@dataclass
class Finished:
    """A harness process that ran to its end (or was stopped at the timeout: ``code`` None)."""

    code: int | None
    stdout: str
    stderr: str
    seconds: float


def run_harness(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = RUN_TIMEOUT_S, as_user: int | None = None
) -> Finished:
    """Run ``harness ARGS`` to its end; ``as_user``: drop to that uid/gid first (``setpriv``, for root)."""
    command = harness_command(*args)
    if as_user is not None:
        command = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", *command]
    started = time.monotonic()
    process = spawn(command, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        code = None
    LIVE.discard(process)
    return Finished(code, out, err, time.monotonic() - started)


class Watched:
    """A harness process whose merged output is read as it comes (its progress lines trigger the interruptions)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        self.process = spawn(harness_command(*args), cwd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._chunks: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.log.open("w") as out:
            while chunk := self.process.stdout.read1(65536):  # type: ignore[attr-defined]
                text = chunk.decode("utf-8", "replace")
                self._chunks.append(text)
                out.write(text)

    def text(self) -> str:
        return "".join(self._chunks)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait_until(self, condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
        """True once ``condition`` holds; False when the process ended first or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.process.poll() is not None:
                return condition()
            time.sleep(interval)
        return False

    def send(self, signum: int) -> bool:
        """Send ``signum``; False when the process had already ended (nothing was delivered)."""
        if self.process.poll() is not None:
            return False
        try:
            os.kill(self.process.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None after SIGKILL-ing a process still alive at ``timeout``."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            code = None
        LIVE.discard(self.process)
        self._reader.join(timeout=10)
        return code


def one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else f"{flat[: limit - 3]}..."


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text
