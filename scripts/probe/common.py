"""Shared parts of the reliability probe: paths, tiny specs and data, the harness CLI as a subprocess, digests."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DATA_ENV = "MOE_HARNESS_DATA"
TINY_LINES = {"train": 600, "validation": 120, "test": 120}  # as tests/conftest.py: seconds per trial
NOBODY = 65534
RUN_TIMEOUT_S = 300.0  # an uninterrupted tiny run or rerun takes 10-40 s on the loaded 2-core box


@dataclass
class CaseResult:
    """One probe case: passed, failed (with why) or not counted (skipped, inconclusive)."""

    part: str
    name: str
    passed: bool
    reason: str = ""
    detail: str = ""
    counted: bool = True  # False: skipped (e.g. root without setpriv) or inconclusive (the signal never landed)
    seconds: float = 0.0
    folder: Path | None = None
    exit_code: int | None = None  # the interrupted process's (signal cases)

    @property
    def verdict(self) -> str:
        if not self.counted:
            return "SKIP"
        return "PASS" if self.passed else "FAIL"


@dataclass
class Probe:
    """The probe's settings and shared resources: work folder, tiny data, RNG seed, where to keep failures."""

    work: Path
    seed: int
    keep: Path | None
    match: str | None = None
    data: Path = field(init=False)
    cache: Path = field(init=False)
    home: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data = self.work / "data"
        self.cache = self.work / "cache"
        self.home = self.work / "home"

    def env(self, **extra: str) -> dict[str, str]:
        """The harness's environment: this checkout on PYTHONPATH, the tiny data, a probe-local cache."""
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
        env |= {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        env |= {DATA_ENV: str(self.data), "MOE_HARNESS_CACHE": str(self.cache), "HOME": str(self.home)}
        return env | extra

    def wants(self, name: str) -> bool:
        return self.match is None or any(part in name for part in self.match.split(","))

    def folder(self, part: str, name: str) -> Path:
        path = self.work / part / name
        path.mkdir(parents=True)
        return path

    def keep_failure(self, result: CaseResult) -> None:
        """Copy a failing case's folder under ``--keep`` (the work folder itself is removed at the end)."""
        if self.keep is None or result.passed or result.folder is None or not result.folder.exists():
            return
        target = self.keep / result.part / result.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(result.folder, target, symlinks=True)


def make_tiny_data(source: Path, target: Path) -> Path:
    """The first lines of each WikiText-2 split in the same parquet layout (as the test suite's ``tiny_data``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = target / "wikitext-2-v1"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n_lines in TINY_LINES.items():
        name = f"{split}-00000-of-00001.parquet"
        table = pq.read_table(source / "wikitext-2-v1" / name).slice(0, n_lines)
        pq.write_table(pa.table({"text": table.column("text")}), folder / name)
    return target


def tiny_spec(name: str, variants: list[str], tokens: int = 1500, **budget: int) -> dict[str, Any]:
    """studies/tiny.yaml under another name and matrix (seed 0), ``tokens`` training tokens."""
    spec = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    spec["name"] = name
    spec["matrix"] = {"variants": variants, "seeds": [0]}
    spec["base"]["budget"].update(tokens=tokens, **budget)
    return spec


def tune_spec(name: str, n_trials: int) -> dict[str, Any]:
    """The tiny spec with a hybrid tune section: no pruner, so every trial that runs ends COMPLETE."""
    spec = tiny_spec(name, ["hybrid"], tokens=1000)
    spec["overrides"] = {"hybrid": {"moe": {"router": "softmax_topk"}}}
    spec["tune"] = {
        "variant": "hybrid",
        "n_trials": n_trials,
        "space": {
            "moe.lora_rank": {"type": "int", "low": 1, "high": 8, "log": True},
            "optim.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
        },
        "pruner": "none",
        "seeds": [0],
        "heartbeat_interval_s": 1,
        "grace_period_s": 3,
    }
    return spec


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sqlite_uri(database: Path) -> str:
    return f"sqlite:///{database}"


LIVE: set[subprocess.Popen] = set()  # the harness processes this probe started and has not seen end


def spawn(command: list[str], cwd: Path, env: dict[str, str], **streams: Any) -> subprocess.Popen:
    """Start a harness process in its own session (a signal meant for the probe does not reach it)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, **streams)
    LIVE.add(process)
    return process


def stop_children() -> None:
    """SIGKILL the harness processes this probe started that are still running (the probe is stopping)."""
    for process in list(LIVE):
        if process.poll() is None:
            process.kill()
            process.wait()
        LIVE.discard(process)


def harness_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


@dataclass
class Finished:
    """A harness process that ran to its end (or was stopped at ``timeout``: ``code`` None)."""

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
    """A harness process whose merged output is read as it comes (progress lines are the probe's triggers)."""

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


def digest(folder: Path) -> dict[str, str]:
    """Every path under ``folder``: a file's sha256, or 'dir' / 'link' (what a case must leave as it found)."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "link"
        elif path.is_dir():
            found[key] = "dir"
        elif path.is_file():
            try:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as error:
                found[key] = f"unreadable: {error.strerror}"
    return found


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What differs between two digests: created, removed and changed paths."""
    created = [f"+{p}" for p in after if p not in before]
    removed = [f"-{p}" for p in before if p not in after]
    changed = [f"~{p}" for p in before if p in after and before[p] != after[p]]
    return created + removed + changed


def chown_tree(folder: Path, uid: int) -> None:
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)


def one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else f"{flat[: limit - 3]}..."


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text
