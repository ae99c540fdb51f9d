"""``harness tune`` on real Optuna storages (SQLite, PostgreSQL) into a real MLflow store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.cli import main
from harness.config import load_spec
from harness.tracking import TrackingStore
from harness.tune.attrs import INTERRUPTED_ATTR, RUN_ID_ATTR, SURPLUS_ATTR
from harness.tune.budget import counted
from tests.conftest import harness_environment
from tests.studies import BAD_LR, GOOD_LR, tune_spec

REPO = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def worker(spec: Path, storage: str, uri: str, n_trials: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "harness", "tune", str(spec), "--storage", storage, "--tracking-uri", uri]
    command += ["--n-trials", str(n_trials), "--no-progress"]
    return subprocess.Popen(command, env=env(), cwd=spec.parent, stdout=log.open("w"), stderr=subprocess.STDOUT)


def mlflow_runs(uri: str, study: str, role: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id], f"tags.`harness.role` = '{role}'")


# --- one process, embedded SQLite storage, through the CLI ------------------------------------


@pytest.fixture(scope="module")
def local_tune(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, shared_cache: Path) -> dict[str, Any]:
    """4 trials: two good and one hopeless learning rate enqueued first, then one from TPE."""
    tmp_path = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    spec = tune_spec(tmp_path, "tl", {"n_trials": 4})
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna' / 'tl.db'}"  # the default location
    (tmp_path / "mlruns" / "optuna").mkdir(parents=True)
    study = optuna.create_study(storage=storage, study_name="tl")
    fixed = {"moe.lora_rank": 4, "moe.top_k": 2, "moe.aux_loss_coef": 0.01}
    for lr in (GOOD_LR, GOOD_LR * 0.5, BAD_LR):
        study.enqueue_trial({**fixed, "optim.lr": lr})
    with harness_environment(tiny_data, shared_cache) as patch:
        patch.chdir(tmp_path)
        code = main(["tune", str(spec), "--tracking-uri", uri, "--no-progress", "--report"])
    assert code == 0
    return {"uri": uri, "storage": storage, "spec": spec, "tmp": tmp_path, "data": tiny_data}


@pytest.mark.slow
def test_local_tune_runs_the_trials_into_one_parent_and_nested_mlflow_runs(local_tune: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="tl", storage=local_tune["storage"])
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    parents = mlflow_runs(local_tune["uri"], "tl", "tune")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["optuna.study_name"] == "tl"
    assert parent.data.tags["optuna.storage"] == local_tune["storage"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_val_ppl"] == pytest.approx(study.best_value)
    children = {r.info.run_id: r for r in mlflow_runs(local_tune["uri"], "tl", "tune-trial")}
    assert len(children) == 4
    for trial in trials:
        run = children[trial.user_attrs[RUN_ID_ATTR]]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["optuna.trial_number"] == str(trial.number)
        assert tags["optuna.state"] == trial.state.name
        assert float(tags["optuna.param.optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        assert run.data.params["optim.lr"] == str(trial.params["optim.lr"])
        assert run.data.params["moe.router"] == "softmax_topk" and run.data.params["moe.expert"] == "lora"
        assert run.data.params["seed"] == "3"  # the first of tune.seeds
        if trial.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert run.data.metrics["final_val_ppl"] == pytest.approx(trial.value)


@pytest.mark.slow
def test_tune_report_flag_renders_the_optuna_figures(local_tune: dict[str, Any]) -> None:
    folder = local_tune["tmp"] / "reports" / "tl"
    markdown = (folder / "report.md").read_text()
    for figure in ("tuning_history.png", "tuning_importances.png"):
        assert (folder / figure).is_file() and figure in markdown
    assert (folder / "report.pdf").stat().st_size > 0


@pytest.mark.slow
def test_pruning_stops_the_hopeless_trial_early(local_tune: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="tl", storage=local_tune["storage"])
    bad = study.get_trials()[2]
    assert bad.params["optim.lr"] == BAD_LR
    assert bad.state == TrialState.PRUNED  # fails if the trainer's eval hook never asks should_prune
    good_steps = max(study.get_trials()[0].intermediate_values)
    assert max(bad.intermediate_values) < good_steps
    run = MlflowClient(local_tune["uri"]).get_run(bad.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "PRUNED" and "pruned at step" in run.data.tags["harness.pruned"]
    assert "final_val_ppl" not in run.data.metrics


@pytest.mark.slow
def test_the_exported_best_spec_runs_across_the_tune_seeds(local_tune: dict[str, Any]) -> None:
    exported = local_tune["tmp"] / "mlruns" / "optuna" / "tl-best.yaml"
    spec = load_spec(exported)
    study = optuna.load_study(study_name="tl", storage=local_tune["storage"])
    assert spec.name == "tl-best" and spec.tune is None
    assert spec.matrix.variants == ["hybrid"] and spec.matrix.seeds == [3, 4]
    moe = spec.overrides["hybrid"]["moe"]
    assert moe["lora_rank"] == study.best_params["moe.lora_rank"] and moe["router"] == "softmax_topk"
    uri = local_tune["uri"]
    assert main(["run-study", str(exported), "--dry-run"]) == 0
    checkpoints = str(local_tune["tmp"] / "ck")
    args = ["--tracking-uri", uri, "--no-progress", "--checkpoint-dir", checkpoints]
    assert main(["run-study", str(exported), *args]) == 0
    runs = mlflow_runs(uri, "tl-best", "trial")
    assert sorted(r.data.tags["seed"] for r in runs) == ["3", "4"]
    assert {r.data.params["optim.lr"] for r in runs} == {str(study.best_params["optim.lr"])}


@pytest.mark.slow
def test_rerunning_with_more_trials_extends_the_same_study_and_parent_run(
    local_tune: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Runs after the tests above: it adds a fifth trial to the shared study.)"""
    monkeypatch.setenv("MOE_HARNESS_DATA", str(local_tune["data"]))
    monkeypatch.chdir(local_tune["tmp"])
    parent = mlflow_runs(local_tune["uri"], "tl", "tune")[0].info.run_id
    args = ["tune", str(local_tune["spec"]), "--tracking-uri", local_tune["uri"], "--no-progress"]
    assert main([*args, "--n-trials", "5"]) == 0
    trials = optuna.load_study(study_name="tl", storage=local_tune["storage"]).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert [r.info.run_id for r in mlflow_runs(local_tune["uri"], "tl", "tune")] == [parent]
    children = mlflow_runs(local_tune["uri"], "tl", "tune-trial")
    assert len(children) == 5 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    assert main(args) == 0  # n_trials (4) already reached: nothing runs, the best is reported again
    assert len(optuna.load_study(study_name="tl", storage=local_tune["storage"]).get_trials()) == 5
    steps = [m.step for m in MlflowClient(local_tune["uri"]).get_metric_history(parent, "best_val_ppl")]
    assert len(steps) == len(set(steps)), f"best_val_ppl logged twice at a step: {steps}"  # the probe's kill/tune-3


# --- several workers on one PostgreSQL storage -------------------------------------------------


def prepare_tracking(tmp_path: Path, study: str) -> str:
    """Create the MLflow SQLite store and experiment first: concurrent first use races in migrations."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    TrackingStore(uri).experiment_id(study)
    return uri


@pytest.mark.slow
def test_two_workers_on_postgres_run_the_requested_trials_in_total(tmp_path: Path, postgres_db: str) -> None:
    spec = tune_spec(tmp_path, "tw", {"pruner": "none", "heartbeat_interval_s": 5, "grace_period_s": 60})
    uri = prepare_tracking(tmp_path, "tw")
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    workers = [worker(spec, postgres_db, uri, 4, log) for log in logs]
    for process, log in zip(workers, logs, strict=True):
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    trials = optuna.load_study(study_name="tw", storage=postgres_db).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    real = [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR)]
    assert len(real) == 4 and all(t.state == TrialState.COMPLETE for t in real)
    runs = mlflow_runs(uri, "tw", "tune-trial")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == sorted(t.number for t in real)
    assert len(mlflow_runs(uri, "tw", "tune")) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {mlflow_runs(uri, "tw", "tune")[0].info.run_id}
    assert "postgresql" in mlflow_runs(uri, "tw", "tune")[0].data.tags["optuna.storage"]


@pytest.mark.slow
def test_a_killed_workers_trial_is_marked_failed_and_retried(tmp_path: Path, postgres_db: str) -> None:
    # A grace period longer than a worker's start-up: the survivor usually finds the dead trial still
    # "running", has no new trial to start, and must wait for it to go stale rather than exit.
    settings = {"pruner": "none", "heartbeat_interval_s": 2, "grace_period_s": 8}
    # The victim's trial is long, so it is surely still training when killed; the survivor (same study,
    # same search space) runs the retried trial on a short budget.
    long_spec = tune_spec(tmp_path / "victim", "tk", settings, tokens=400_000)
    spec = tune_spec(tmp_path, "tk", settings, tokens=1500)
    uri = prepare_tracking(tmp_path, "tk")
    victim = worker(long_spec, postgres_db, uri, 1, tmp_path / "victim.log")
    deadline = time.time() + 300
    try:
        while True:  # wait until the victim is training trial 0 (its MLflow run exists)
            assert time.time() < deadline and victim.poll() is None, (tmp_path / "victim.log").read_text()[-3000:]
            try:
                trials = optuna.load_study(study_name="tk", storage=postgres_db).get_trials()
            except KeyError:
                trials = []
            if trials and trials[0].state == TrialState.RUNNING and RUN_ID_ATTR in trials[0].user_attrs:
                break
            time.sleep(0.5)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    killed = trials[0]
    # The survivor counts the dead trial as running until its heartbeat goes stale, then retries it.
    survivor = worker(spec, postgres_db, uri, 1, tmp_path / "survivor.log")
    assert survivor.wait(timeout=600) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    trials = optuna.load_study(study_name="tk", storage=postgres_db).get_trials()
    assert "trial 0: its worker stopped beating" in (tmp_path / "survivor.log").read_text()
    assert trials[0].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert retries[0].user_attrs[RUN_ID_ATTR] != killed.user_attrs[RUN_ID_ATTR]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] and counted(trials) == 1
    client = MlflowClient(uri)
    dead = client.get_run(killed.user_attrs[RUN_ID_ATTR])
    assert dead.info.status == "FAILED" and dead.data.tags["optuna.state"] == "FAIL"
    assert client.get_run(retries[0].user_attrs[RUN_ID_ATTR]).data.tags["optuna.retried_from"] == "0"


# --- the shared budget and bad input -------------------------------------------------------------


def test_budget_counts_running_and_waiting_but_not_retried_surplus_or_interrupted_trials() -> None:
    study = optuna.create_study()
    add = study.add_trial
    add(optuna.create_trial(state=TrialState.COMPLETE, value=1.0))  # 0
    add(optuna.create_trial(state=TrialState.FAIL))  # 1: its worker died, retried as 4
    add(optuna.create_trial(state=TrialState.PRUNED, value=None, intermediate_values={1: 2.0}))  # 2
    add(optuna.create_trial(state=TrialState.FAIL, user_attrs={SURPLUS_ATTR: True}))  # 3: surplus
    add(optuna.create_trial(state=TrialState.WAITING, system_attrs={"failed_trial": 1, "retry_history": [1]}))  # 4
    add(optuna.create_trial(state=TrialState.FAIL))  # 5: diverged, not retried: counts
    add(optuna.create_trial(state=TrialState.FAIL, user_attrs={INTERRUPTED_ATTR: True}))  # 6: Ctrl-C
    trials = study.get_trials()
    assert counted(trials) == 4
    assert counted(trials, below=4) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"space": {"moe.lora_rnk": {"type": "int", "low": 1, "high": 8}}}, "unknown key 'moe.lora_rnk'"),
        ({"space": {"moe.top_k": {"type": "int", "low": 1, "high": 9}}}, "moe.top_k=9 exceeds moe.n_experts=4"),
        ({"space": {"moe.aux_loss_coef": {"type": "float", "low": 0, "high": 1, "log": True}}}, "low > 0"),
        ({"space": {"moe.lora_rank": {"type": "int", "low": 1.5, "high": 8}}}, "integer bounds"),
        ({"space": {}}, "tune.space"),
        ({"n_trials": None}, "tune.n_trials or tune.timeout_s"),
        ({"heartbeat_interval_s": 5, "grace_period_s": 5}, "must exceed tune.heartbeat_interval_s"),
        ({"objectives": ["time_per_mtok"]}, "must start with val_ppl"),
        ({"variant": "dense"}, "no MoE layer to tune"),
        ({"variant": "baseline"}, "tune.space.moe.lora_rank has no effect on variant 'baseline' (moe.expert = mlp"),
        ({"pruner": "asha"}, "tune.pruner"),
    ],
)
def test_bad_tune_specs_are_rejected_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str
) -> None:
    spec = tune_spec(tmp_path, "bad", change)
    raw = yaml.safe_load(spec.read_text())
    if change.get("space") is not None:
        raw["tune"]["space"] = change["space"]
    raw["tune"] = {k: v for k, v in raw["tune"].items() if v is not None}
    spec.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(spec), "--tracking-uri", f"sqlite:///{tmp_path / 'ml.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "ml.db").exists()


def test_switch_router_cannot_tune_top_k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tune_spec(tmp_path, "sw")
    raw = yaml.safe_load(spec.read_text())
    raw["overrides"] = {}
    spec.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(spec)]) == 2
    assert "moe.router=switch routes top-1" in capsys.readouterr().err


def test_a_spec_without_tune_section_and_a_bad_storage_are_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tune", str(REPO / "studies" / "tiny.yaml")]) == 2
    assert "no 'tune' section" in capsys.readouterr().err
    spec = tune_spec(tmp_path, "st")
    assert main(["tune", str(spec), "--storage", "not-a-url", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "is not a database URL" in capsys.readouterr().err
