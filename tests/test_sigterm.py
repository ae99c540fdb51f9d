"""SIGTERM (a scheduler's stop) on a study whose cells run on Ray ends as Ctrl-C does (issue 34): Ray's driver
handler, which prints a native stack dump and aborts, must not be the one that answers it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.studies import tiny_spec, tune_spec
from tests.workers import harness_env, wait_for

LONG = {"tokens": 40_000 * 128}  # far longer than the test: the signal always lands mid-cell
INTERRUPTED = "harness: interrupted; rerun the same command to resume"


def training(uri: str, study: str, driver: subprocess.Popen) -> bool:
    """The driver ended (the test fails on it), or a run is RUNNING and has logged a metric (a cell, a trial)."""
    if driver.poll() is not None:
        return True
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return False  # not yet created: opening a client here would create it
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return False
    return any(
        run.info.status == "RUNNING" and run.data.metrics for run in client.search_runs([experiment.experiment_id])
    )


def sigterm_mid_training(tmp_path: Path, study: str, args: list[str]) -> None:
    """Run ``harness ARGS`` on its own store, SIGTERM it once a cell or trial trains: it ends as Ctrl-C does."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    command = [sys.executable, "-m", "harness", *args, "--no-progress", "--tracking-uri", uri]
    env = harness_env(RAY_USAGE_STATS_ENABLED="0")
    driver = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        wait_for(lambda: training(uri, study, driver), 300, "a cell or trial to train", 0.5)
        assert driver.poll() is None, driver.communicate()
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.count(INTERRUPTED) == 1 and "Traceback" not in err, err[-3000:]
    assert "SIGTERM received" not in err and "PC: @" not in err, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    assert {run.info.status for run in runs} <= {"KILLED", "FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    assert "KILLED" in {run.info.status for run in runs}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "args"), [("at-once", ["--workers", "2"]), ("local", ["--ray", "local"])])
def test_sigterm_mid_cell_on_ray_exits_like_ctrl_c(tmp_path: Path, name: str, args: list[str]) -> None:
    spec = tiny_spec(tmp_path, name, ["dense", "switch"], [0], budget=LONG)
    sigterm_mid_training(tmp_path, name, ["run-study", str(spec), "--checkpoint-dir", str(tmp_path / "ck"), *args])


@pytest.mark.slow
def test_sigterm_mid_trial_of_a_tune_on_ray_exits_like_ctrl_c(tmp_path: Path) -> None:
    spec = tune_spec(tmp_path, "tuned", {"n_trials": 1}, tokens=LONG["tokens"])
    sigterm_mid_training(
        tmp_path, "tuned", ["tune", str(spec), "--ray", "local", "--storage", f"sqlite:///{tmp_path / 'o.db'}"]
    )
