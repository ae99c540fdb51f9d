"""One machine without Ray: the study lock, Slurm-style ``--cell N`` and SIGTERM (no RUNNING run left)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.engine.lock import study_lock
from tests.studies import run_study, tiny_spec, trial_runs
from tests.workers import start_worker, study_spec, wait_for


def test_a_second_invocation_of_the_study_is_refused_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_spec(tmp_path, "locked", ["dense"], [0])
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with study_lock(tmp_path / "mlruns" / "locked.lock"):  # what the first invocation holds while it runs
        assert run_study(tmp_path, spec, uri) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"already running in process {os.getpid()}" in err, err
    assert trial_runs(uri, "locked").empty  # the second invocation ran nothing
    assert run_study(tmp_path, spec, uri) == 0  # the lock is gone with its holder


def test_cell_n_for_every_n_gives_the_same_store_as_one_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tiny_spec(tmp_path, "slurm", ["baseline", "dense"], [0, 1])
    assert main(["run-study", str(spec), "--list-cells"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["0", "baseline/seed=0"] and listed[-1] == "4 trials in study 'slurm'"
    whole, cells = (f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("whole", "cells"))
    assert run_study(tmp_path / "whole", spec, whole) == 0
    for index in range(4):
        assert run_study(tmp_path / "cells", spec, cells, "--cell", str(index)) == 0
    assert run_study(tmp_path / "cells", spec, cells, "--cell", "4") == 2  # out of range: one line, nothing run
    assert "--cell 4: study 'slurm' has cells 0..3" in capsys.readouterr().err
    runs = {name: trial_runs(uri, "slurm").set_index("tags.harness.cell") for name, uri in [("w", whole), ("c", cells)]}
    assert sorted(runs["w"].index) == sorted(runs["c"].index) and len(runs["c"]) == 4
    assert set(runs["c"]["status"]) == {"FINISHED"}
    metrics = [c for c in runs["w"].columns if c.startswith("metrics.") and "loss" in c]
    assert (runs["w"][metrics].sort_index() == runs["c"][metrics].sort_index()).all().all()  # == on CPU


@pytest.mark.slow
def test_sigterm_leaves_no_running_run(tmp_path: Path) -> None:
    spec = study_spec(tmp_path, "term", ["dense", "baseline"], [0], tokens=20_000 * 128)  # long: lands mid-trial
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    log = tmp_path / "worker.log"
    worker = start_worker(spec, log, "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"))
    wait_for(lambda: any((tmp_path / "ck" / "term").glob("*.pt")), 300, "the first checkpoint", 0.2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()  # 143: stopped by the signal
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("term").experiment_id])
    trials = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"KILLED"}  # the running one and the scheduled one
