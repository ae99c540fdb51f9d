"""A ``--ray local`` cluster goes away with its driver: SIGKILL the CLI mid-training, then look for its processes.

The driver runs in a session of its own, so the cluster's processes are found two ways, neither of which can see
another test's cluster: the driver's descendants recorded just before the kill (pid and start time), and a sweep
of that session for Ray's processes started later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.studies import tiny_spec
from tests.workers import REPO, harness_env, wait_for

AFTER_KILL_S = 10.0
RAY_NAMES = ("ray::", "raylet", "gcs_server", f"{os.sep}ray{os.sep}")


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` (psutil keeps each one's start time: a reused pid is not mistaken for it)."""
    return psutil.Process(pid).children(recursive=True)


def task_started(driver: subprocess.Popen) -> bool:
    """The driver ended (the test fails on it), or a cell's task process runs under it."""
    if driver.poll() is not None:
        return True
    for child in descendants(driver.pid):
        try:
            if child.cmdline()[:1] == ["ray::cell_task"]:
                return True
        except (psutil.Error, IndexError):
            continue
    return False


def in_session(session: int) -> list[psutil.Process]:
    """Ray's processes (by name or command line) whose session is ``session``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(process.pid) == session and any(
                name in " ".join(process.info["cmdline"] or []) for name in RAY_NAMES
            ):
                found.append(process)
        except OSError:
            continue
    return found


def still_running(processes: list[psutil.Process]) -> list[str]:
    """Those of ``processes`` still running (a zombie has ended; it waits for its parent to reap it)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(f"{process.pid} {' '.join(process.cmdline()).strip()[:100]}")
        except psutil.Error:
            continue
    return running


def left_at(deadline: float, cluster: list[psutil.Process], session: int) -> list[str]:
    """What still runs of ``cluster`` and of Ray's processes in ``session`` at ``deadline`` (``time.monotonic``); []
    as soon as nothing does: gone is final, no Ray process is left to start another."""
    while (running := still_running(cluster + in_session(session))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return running


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()  # psutil refuses a pid that now names another process
        except psutil.Error:
            continue


@pytest.mark.slow
def test_a_sigkilled_local_driver_s_cluster_is_gone_10_s_later(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, "orphans", ["switch"], [0], budget={"tokens": 40_000 * 128})  # far longer than the test
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    command = [sys.executable, "-m", "harness", "run-study", str(spec), "--no-progress", "--ray", "local"]
    command += ["--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck")]
    log = tmp_path / "driver.log"
    with log.open("wb") as out:
        driver = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=harness_env(RAY_USAGE_STATS_ENABLED="0"),
            cwd=REPO,
            start_new_session=True,
        )
    cluster: list[psutil.Process] = []
    try:
        wait_for(lambda: task_started(driver), 300, "a cell's task to start", 0.2)
        assert driver.poll() is None, log.read_text()[-3000:]
        cluster = descendants(driver.pid)
        assert len(cluster) >= 5, cluster  # the head's processes, the agents, the task (and the watchdog)
        driver.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert driver.wait(timeout=30) == -signal.SIGKILL
        assert left_at(killed + AFTER_KILL_S, cluster, driver.pid) == [], log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        kill_all(cluster + in_session(driver.pid))  # whatever outlived a failed test
