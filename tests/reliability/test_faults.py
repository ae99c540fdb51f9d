"""Faults of the machine, not of the input: a disk that fills while a checkpoint is written (a real tmpfs, filled
mid-study), and a ``--ray local`` driver SIGKILLed mid-study (every process of its cluster gone 10 s later)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.reliability import stores
from tests.reliability.processes import RUN_TIMEOUT_S, Watched, sqlite_uri
from tests.studies import tiny_spec

pytestmark = pytest.mark.reliability

STUDY = "faults"
TMPFS_SIZE = "64m"  # room for the tiny cells' checkpoints (the check before training passes), filled mid-study
RAY_KILLS = 3
RAY_GONE_S = 10.0


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its file system is full: the filler file."""
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
    for run in stores.study_runs(database, STUDY):
        if run.data.tags.get(stores.CELL) == cell:
            return run.info.status, run.data.tags.get("harness.error", "")
    return None, ""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of ``TMPFS_SIZE`` at ``tmp_path/ck``, unmounted after the test."""
    mount = tmp_path / "ck"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_disk_filled_mid_save_fails_that_cell_in_one_line_and_the_next_cell_trains(
    small_disk: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Once the first cell has checkpointed, fill the checkpoint folder's disk: that cell fails in one line naming the
    path, leaving no temporary file; with the space freed, the next cell trains to the end."""
    database = tmp_path / "mlruns" / "mlflow.db"
    spec = tiny_spec(tmp_path, STUDY, ["baseline", "dense"], budget={"tokens": 60_000, "checkpoint_every_steps": 4})
    args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(database), "--checkpoint-dir", str(small_disk)]
    watched = Watched([*args, "--no-progress"], tmp_path, cli_env, tmp_path / "run.log")
    first = small_disk / STUDY / "baseline-seed=0.pt"
    assert watched.wait_until(first.is_file, RUN_TIMEOUT_S), "the first cell never checkpointed"
    filler = fill(small_disk)
    failed = watched.wait_until(lambda: cell_status(database, "baseline/seed=0")[0] == "FAILED", RUN_TIMEOUT_S)
    filler.unlink()
    code = watched.wait(RUN_TIMEOUT_S)
    _, error = cell_status(database, "baseline/seed=0")
    assert failed and error == f"CheckpointWriteError: no space left on device writing {first}", error
    assert not list(small_disk.rglob("*.tmp"))
    assert cell_status(database, "dense/seed=0")[0] == "FINISHED"
    assert code == 1, f"exit code {code} (1: a trial failed)"


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def command_line(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


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


@pytest.mark.parametrize("attempt", range(RAY_KILLS), ids=[f"ray-driver-sigkill-{i}" for i in range(RAY_KILLS)])
def test_a_sigkilled_ray_local_driver_s_cluster_is_gone_10_s_later(
    attempt: int, tmp_path: Path, cli_env: dict[str, str], record_property: Callable[[str, object], None]
) -> None:
    """SIGKILL a ``--ray local`` driver once a cell's task trains: every process of its cluster (the driver's
    descendants just before the kill) must be gone within ``RAY_GONE_S``."""
    spec = tiny_spec(tmp_path, STUDY, ["switch"], budget={"tokens": 5_000_000})  # far longer than the case
    args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(tmp_path / "mlruns" / "mlflow.db"), "--ray", "local"]
    watched = Watched([*args, "--checkpoint-dir", str(tmp_path / "ck")], tmp_path, cli_env, tmp_path / "run.log")

    def task_trains() -> bool:
        return any(command_line(p)[:1] == ["ray::cell_task"] for p in descendants(watched.process.pid))

    cluster: list[psutil.Process] = []
    try:
        assert watched.wait_until(task_trains, RUN_TIMEOUT_S, interval=0.2), watched.text()[-300:]
        cluster = descendants(watched.process.pid)
        watched.send(signal.SIGKILL)
        killed = time.monotonic()
        while running(cluster) and time.monotonic() - killed < RAY_GONE_S:
            time.sleep(0.05)
        gone_s, left = time.monotonic() - killed, running(cluster)
        record_property("the killed driver's cluster gone after", f"{gone_s:.1f} s" if not left else "never")
        watched.wait(30)
    finally:
        for process in running(cluster):  # whatever outlived a failed case
            process.kill()
    assert not left, f"still running {RAY_GONE_S:.0f} s after: {', '.join(p.name() for p in left)}"
