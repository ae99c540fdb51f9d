"""Helpers for tests that run the harness as separate worker processes (as on N machines)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def study_spec(folder: Path, name: str, variants: list[str], seeds: list[int], **budget: int) -> Path:
    """studies/tiny.yaml under another name, matrix and budget."""
    spec = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    spec["name"] = name
    spec["matrix"] = {"variants": variants, "seeds": seeds}
    spec["base"]["budget"].update(budget)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


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
