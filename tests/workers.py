"""Helpers for tests that run the harness as separate worker processes (as on N machines)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def harness_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def start_worker(spec: Path, log: Path, *args: str, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "harness", "run-study", str(spec), "--no-progress", *args]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=harness_env(**env), cwd=REPO)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_server(backend: str, log: Path, port: int, *options: str) -> Iterator[str]:
    """A real ``mlflow server`` on loopback over ``backend``; its URL while the block runs, stopped after."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, *options]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # No job runner: its seven queue consumers (MLflow's GenAI jobs, which the harness never submits) would take
    # the cores the test's study runs on.
    env = harness_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with log.open("ab") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url) or server.poll() is not None, 180, "mlflow server /health", 0.5)
        assert server.poll() is None, log.read_text()[-3000:]
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
