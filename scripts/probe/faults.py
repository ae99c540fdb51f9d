"""Faults of the machine, not of the input: a disk that fills while a checkpoint is written (a real tmpfs, filled
mid-study), and a ``--ray local`` driver SIGKILLed mid-study (its cluster must be gone 10 s later)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import store_checks
from common import RUN_TIMEOUT_S, CaseResult, Probe, Watched, sqlite_uri, tiny_spec, write_yaml

STUDY = "faults"
TMPFS_SIZE = "64m"  # room for the tiny cells' checkpoints (the check before training passes), filled mid-study
RAY_KILLS = 3
RAY_GONE_S = 10.0


def mount_tmpfs(point: Path, size: str) -> bool:
    point.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]).returncode == 0


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its file system is full; the filler file."""
    filler = folder / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(bytes(1 << 20))
                handle.flush()
        except OSError:
            pass
    return filler


def cell_status(database: Path, cell: str) -> tuple[str | None, str]:
    for run in store_checks.study_runs(database, STUDY):
        if run.data.tags.get(store_checks.CELL) == cell:
            return run.info.status, run.data.tags.get("harness.error", "")
    return None, ""


def full_disk_case(probe: Probe) -> CaseResult:
    """Fill the checkpoint folder's disk once the first cell has checkpointed: that cell fails in one line naming
    the path, leaves no temporary file, and (the space freed) the next cell trains to the end."""
    started, folder = time.monotonic(), probe.folder("faults", "disk-full-mid-save")
    ck, database = folder / "ck", folder / "mlruns" / "mlflow.db"
    if os.geteuid() != 0 or not mount_tmpfs(ck, TMPFS_SIZE):
        return CaseResult("faults", "disk-full-mid-save", False, "skipped: cannot mount a tmpfs", counted=False)
    try:
        spec = write_yaml(
            folder / "spec.yaml", tiny_spec(STUDY, ["baseline", "dense"], tokens=60_000, checkpoint_every_steps=4)
        )
        args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(database), "--checkpoint-dir", str(ck)]
        watched = Watched([*args, "--no-progress"], folder, probe.env(), folder / "run.log")
        first = ck / STUDY / "baseline-seed=0.pt"
        reached = watched.wait_until(first.is_file, RUN_TIMEOUT_S)
        filler = fill(ck)
        failed = watched.wait_until(lambda: cell_status(database, "baseline/seed=0")[0] == "FAILED", RUN_TIMEOUT_S)
        filler.unlink()
        code = watched.wait(RUN_TIMEOUT_S)
        status, error = cell_status(database, "baseline/seed=0")
        problems = [] if reached and failed else ["the first cell never checkpointed or never failed"]
        problems += [] if error == f"CheckpointWriteError: no space left on device writing {first}" else [error]
        problems += [f"left {p.name}" for p in ck.rglob("*.tmp")]
        problems += [] if cell_status(database, "dense/seed=0")[0] == "FINISHED" else ["the next cell did not finish"]
        problems += [] if code == 1 else [f"exit code {code} (1: a trial failed)"]
        detail = f"exit {code}; baseline {status}: {error}; dense {cell_status(database, 'dense/seed=0')[0]}"
    finally:
        subprocess.run(["umount", "-l", str(ck)], capture_output=True)
    result = CaseResult("faults", "disk-full-mid-save", not problems, "; ".join(problems), detail, folder=folder)
    result.seconds = time.monotonic() - started
    return result


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running as themselves (psutil checks the start time; a zombie has ended)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def ray_kill_case(probe: Probe, name: str) -> CaseResult:
    """SIGKILL a ``--ray local`` driver once a cell's task trains; every process of its cluster (its descendants
    just before the kill) must be gone within 10 s. Measures how long they took."""
    started, folder = time.monotonic(), probe.folder("faults", name)
    spec = write_yaml(folder / "spec.yaml", tiny_spec(STUDY, ["switch"], tokens=5_000_000))
    args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(folder / "mlruns" / "mlflow.db"), "--ray", "local"]
    watched = Watched([*args, "--checkpoint-dir", str(folder / "ck")], folder, probe.env(), folder / "run.log")

    def task_trains() -> bool:
        return any(p.info["cmdline"][:1] == ["ray::cell_task"] for p in descendants(watched.process.pid))

    cluster: list[psutil.Process] = []
    try:
        if not watched.wait_until(task_trains, RUN_TIMEOUT_S, interval=0.2):
            return CaseResult("faults", name, False, "the cell's task never started", watched.text()[-300:])
        cluster = descendants(watched.process.pid)
        watched.send(signal.SIGKILL)
        killed = time.monotonic()
        while running(cluster) and time.monotonic() - killed < RAY_GONE_S:
            time.sleep(0.05)
        gone_s, left = time.monotonic() - killed, running(cluster)
        watched.wait(30)
    finally:
        for process in running(cluster):  # whatever outlived a failed case
            process.kill()
    problems = [f"still running {RAY_GONE_S:.0f} s after: {', '.join(p.name() for p in left)}"] if left else []
    detail = f"{len(cluster)} processes of the cluster; the last gone {gone_s:.2f} s after the SIGKILL"
    result = CaseResult("faults", name, not problems, "; ".join(problems), detail, folder=folder)
    result.seconds = time.monotonic() - started
    return result


def descendants(pid: int) -> list[psutil.Process]:
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for process in found:
        try:
            process.info = {"cmdline": process.cmdline()}
        except psutil.Error:
            process.info = {"cmdline": []}
    return found


def run_faults(probe: Probe, report: Callable[[CaseResult], None]) -> list[CaseResult]:
    cases: list[tuple[str, Callable[[Probe], CaseResult]]] = [("disk-full-mid-save", full_disk_case)]
    cases += [
        (f"ray-driver-sigkill-{i}", lambda p, i=i: ray_kill_case(p, f"ray-driver-sigkill-{i}"))
        for i in range(RAY_KILLS)
    ]
    results = []
    for name, case in cases:
        if probe.wants(name):
            results.append(case(probe))
            report(results[-1])
    return results
