"""SIGTERM (a scheduler's stop) on a study whose cells run on Ray ends as Ctrl-C does (issue 34): Ray's driver
handler, which prints a native stack dump and aborts, must not be the one that answers it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.studies import tiny_spec
from tests.workers import REPO, harness_env, wait_for

LONG = {"tokens": 40_000 * 128}  # far longer than the test: the signal always lands mid-cell
INTERRUPTED = "harness: interrupted; rerun the same command to resume"


def training(uri: str, study: str, driver: subprocess.Popen) -> bool:
    """The driver ended (the test fails on it), or a cell's run is RUNNING and has logged a metric."""
    if driver.poll() is not None:
        return True
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return False  # not yet created: opening a client here would create it
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return False
    runs = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'")
    return any(run.info.status == "RUNNING" and run.data.metrics for run in runs)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "args"), [("at-once", ["--workers", "2"]), ("local", ["--ray", "local"])])
def test_sigterm_mid_cell_on_ray_exits_like_ctrl_c(tmp_path: Path, name: str, args: list[str]) -> None:
    spec = tiny_spec(tmp_path, name, ["dense", "switch"], [0], budget=LONG)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    command = [sys.executable, "-m", "harness", "run-study", str(spec), "--no-progress", *args]
    command += ["--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck")]
    env = harness_env(RAY_USAGE_STATS_ENABLED="0")
    driver = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True
    )
    try:
        wait_for(lambda: training(uri, name, driver), 300, "a cell to train", 0.5)
        assert driver.poll() is None, driver.communicate()
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.count(INTERRUPTED) == 1 and "Traceback" not in err, err[-3000:]
    assert "SIGTERM received" not in err and "PC: @" not in err, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert {run.info.status for run in runs} <= {"KILLED", "FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    assert "KILLED" in {run.info.status for run in runs}
