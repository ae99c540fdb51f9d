"""One machine without Ray: the study lock, Slurm-style ``--cell N`` and SIGTERM (no RUNNING run left)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.lock import study_lock
from harness.runs import finish_study_run, shared_run
from harness.tags import HEALTH
from harness.tracking import TrackingStore
from tests.studies import run_study, tiny_config, tiny_spec, trial_runs, write_spec
from tests.workers import start_worker, wait_for


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


def test_cell_n_of_a_sequential_study_keeps_its_number_as_cells_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An array task that starts after others finished runs the cell it was given (the numbering once shrank with
    every finished cell of the round, so a late task ran another cell); a cell no round needs yet runs nothing."""
    config = tiny_config("rounds", ["baseline", "dense"])
    config["matrix"]["seeds"] = {"initial": [1, 2], "max": 3}
    spec, uri = write_spec(tmp_path / "rounds.yaml", config), f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run-study", str(spec), "--list-cells", "--tracking-uri", uri]) == 0
    *listed, total = capsys.readouterr().out.splitlines()
    assert total == "at most 6 trials in study 'rounds' (4 needed by the current round, marked *)"
    keys = [line.split()[1] for line in listed]
    assert keys == [f"{v}/seed={s}" for s in (1, 2, 3) for v in ("baseline", "dense")]
    assert all(line.endswith(" *") == (index < 4) for index, line in enumerate(listed))
    assert run_study(tmp_path, spec, uri, "--cell", "4") == 0  # seed 3 while the first round runs: not needed
    assert "--cell 4 (baseline/seed=3): not needed by the study's current round" in capsys.readouterr().out
    client = MlflowClient(uri)
    for index in (3, 2, 1, 0):  # each task finds the ones before it finished
        assert run_study(tmp_path, spec, uri, "--cell", str(index)) == 0
        for _, run in trial_runs(uri, "rounds").iterrows():  # 1,500 tiny tokens stall; the plan needs results
            client.set_tag(run["run_id"], HEALTH, "ok")
    ran = trial_runs(uri, "rounds")
    assert sorted(ran["tags.harness.cell"]) == sorted(keys[:4]) and set(ran["status"]) == {"FINISHED"}


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
    same = runs["w"][metrics].sort_index().equals(runs["c"][metrics].sort_index())  # == on CPU; NaN where absent
    assert same, (runs["w"][metrics].sort_index(), runs["c"][metrics].sort_index())


@pytest.mark.slow
def test_sigterm_leaves_no_running_run(tmp_path: Path) -> None:
    long = {"tokens": 20_000 * 128}  # lands mid-trial
    spec = tiny_spec(tmp_path, "term", ["dense", "baseline"], [0], budget=long)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    log = tmp_path / "worker.log"
    args = ["--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"), "--workers", "1"]  # in process
    worker = start_worker(spec, log, *args)
    wait_for(lambda: any((tmp_path / "ck" / "term").glob("*.pt")), 300, "the first checkpoint", 0.2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()  # 143: stopped by the signal
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("term").experiment_id])
    trials = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    assert len(trials) == 1 and {r.info.status for r in trials} == {"KILLED"}  # the running one; the next never began


def test_a_parent_run_created_while_another_process_looks_is_never_deleted_under_it(tmp_path: Path) -> None:
    """The race two array tasks had on one embedded store, replayed step by step: A looks (no parent yet); B
    creates its parent run and looks (only its own); A creates one too, its clock a millisecond behind, sees both,
    keeps the older (its own) and deleted B's, which B goes on using. Now B waits for A's turn to end."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    store_a, store_b = TrackingStore(uri), TrackingStore(uri)
    experiment_id = store_a.experiment_id("race")
    query, tags, ids = "tags.`harness.role` = 'study'", {"harness.role": "study"}, {}
    a_looked, b_looked, a_done, b_seen = threading.Event(), threading.Event(), threading.Event(), []
    real_a_runs, real_b_runs, real_create = store_a.runs, store_b.runs, store_a.client.create_run

    def a_runs(*args: str) -> list:
        found = real_a_runs(*args)
        if not a_looked.is_set():
            a_looked.set()
            b_looked.wait(timeout=2)  # B creates and looks now, if it can get in
        return found

    def a_create(*args: object, **kwargs: object) -> object:
        start = {"start_time": b_seen[0].info.start_time - 1} if b_seen else {}
        return real_create(*args, **kwargs, **start)

    def b_runs(*args: str) -> list:
        found = real_b_runs(*args)
        if found and not b_looked.is_set():
            b_seen.extend(found)
            b_looked.set()
            a_done.wait(timeout=2)  # A's turn, if it can get in
        return found

    def task_a() -> None:
        ids["a"] = shared_run(store_a, experiment_id, query, "race", tags)
        a_done.set()

    store_a.runs, store_a.client.create_run, store_b.runs = a_runs, a_create, b_runs
    threading.Thread(target=task_a).start()
    assert a_looked.wait(timeout=60)
    ids["b"] = shared_run(store_b, experiment_id, query, "race", tags)
    assert a_done.wait(timeout=60)
    everything = store_a.client.search_runs([experiment_id], run_view_type=ViewType.ALL)  # deleted ones too
    assert ids["a"] == ids["b"] and [r.info.run_id for r in everything] == [ids["b"]]


@pytest.mark.slow
def test_array_tasks_started_together_on_a_fresh_store_share_one_parent_run(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, "array", ["baseline", "switch", "dense"], [0])
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    common = ("--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"))
    logs = [tmp_path / f"task{index}.log" for index in range(3)]
    tasks = [start_worker(spec, log, *common, "--cell", str(index)) for index, log in enumerate(logs)]
    assert [task.wait(timeout=300) for task in tasks] == [0, 0, 0], [log.read_text() for log in logs]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("array").experiment_id], run_view_type=ViewType.ALL)
    parents = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["harness.cell"] for r in trials) == ["baseline/seed=0", "dense/seed=0", "switch/seed=0"]
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert parents[0].data.metrics["trials_finished"] == 3
    finish_study_run(TrackingStore(uri), parents[0].info.run_id, "FINISHED")  # two tasks both saw the last cell end
    assert [m.value for m in client.get_metric_history(parents[0].info.run_id, "trials_finished")] == [3]
