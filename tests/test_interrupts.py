"""Interruptions (issue 13): a signal sent from inside the process at a named stage, and SIGKILL/SIGTERM/SIGINT
at random moments; afterwards no trial run is RUNNING, a rerun completes, nothing is logged twice and the
final figures equal an uninterrupted run's."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import harness.cells
import harness.tracking
from harness.metric_names import TRAIN_LOSS, VAL_LOSS, VAL_SUBSET_LOSS
from harness.tracking import TrackingStore
from tests.conftest import harness_environment
from tests.studies import run_study, tiny_spec
from tests.workers import harness_env, start_worker

COMPARED = ("final_val_loss", "test_loss", "best_val_ppl", "train_tokens")  # deterministic on CPU
HISTORIES = (TRAIN_LOSS, VAL_LOSS, VAL_SUBSET_LOSS, "lr")


@pytest.fixture(autouse=True)
def restore_signal_handlers() -> Iterator[None]:
    """The CLI routes SIGINT/SIGTERM to its flag in this process; give pytest its own handlers back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def two_trials(folder: Path, name: str) -> Path:
    return tiny_spec(folder, name, ["baseline", "switch"], [0], budget={"checkpoint_every_steps": 4})


def trial_runs(uri: str, study: str) -> dict[str, object]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    return {r.data.tags["harness.cell"]: r for r in client.search_runs([experiment.experiment_id], "")
            if r.data.tags.get("harness.role") == "trial"}  # fmt: skip


def assert_clean(uri: str, study: str) -> dict[str, dict[str, object]]:
    """No trial run RUNNING, no metric step logged twice; each trial's compared figures and histories."""
    client, figures = MlflowClient(uri), {}
    for cell, run in trial_runs(uri, study).items():
        assert run.info.status != "RUNNING", cell
        histories = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
        for key, points in histories.items():
            steps = [m.step for m in points]
            assert len(steps) == len(set(steps)), f"{cell}: {key} logged twice at some step: {steps}"
        assert run.info.status != "FINISHED" or histories.get(TRAIN_LOSS), f"{cell}: no {TRAIN_LOSS} curve"
        figures[cell] = {
            "status": run.info.status,
            **{k: run.data.metrics.get(k) for k in COMPARED},
            **{k: sorted((m.step, m.value) for m in histories.get(k, [])) for k in HISTORIES},
        }
    return figures


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, shared_cache: Path
) -> dict[str, dict[str, object]]:
    """The two-trial study, uninterrupted (on the tiny data: this runs before the per-test environment)."""
    folder = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with harness_environment(tiny_data, shared_cache):
        assert run_study(folder, two_trials(folder, "intr"), uri) == 0
    return assert_clean(uri, "intr")


def interrupt_then_rerun(
    tmp_path: Path, uri: str, patch: pytest.MonkeyPatch, target: object, name: str, fault: object, code: int
) -> dict[str, object]:
    """Run the two-trial study with ``target.name`` replaced by ``fault`` (exit ``code``), then rerun it
    unpatched to the end; the trial runs as the interrupted run left them."""
    spec, real = two_trials(tmp_path, "intr"), getattr(target, name)
    patch.setattr(target, name, fault)
    assert run_study(tmp_path, spec, uri) == code
    runs = trial_runs(uri, "intr")
    patch.setattr(target, name, real)
    assert run_study(tmp_path, spec, uri) == 0
    return runs


def test_sigterm_mid_training_kills_the_run_and_the_rerun_matches(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, reference: dict
) -> None:
    real_train = harness.cells.train

    def signalled_at_step_6(config, corpus, sink, **kwargs):  # noqa: ANN001, ANN003, ANN202
        class Signalling:
            def log_metrics(self, metrics: dict[str, float], step: int) -> None:
                sink.log_metrics(metrics, step)
                if step == 6 and config.variant == "switch":
                    os.kill(os.getpid(), signal.SIGTERM)  # handled as a flag: the trainer stops at its next step

            def sync(self) -> None:
                sink.sync()

        return real_train(config, corpus, Signalling(), **kwargs)

    runs = interrupt_then_rerun(
        tmp_path, tracking_uri, monkeypatch, harness.cells, "train", signalled_at_step_6, 128 + signal.SIGTERM
    )
    assert runs["switch/seed=0"].info.status == "KILLED"
    assert "SIGTERM" in runs["switch/seed=0"].data.tags["harness.error"]
    assert runs["baseline/seed=0"].info.status == "FINISHED"
    assert assert_clean(tracking_uri, "intr") == reference


def test_a_signal_while_the_trial_run_is_created_leaves_no_running_ghost(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, reference: dict
) -> None:
    real_open = harness.cells.open_trial_run

    def open_then_signal(*args, **kwargs) -> str:  # noqa: ANN002, ANN003
        run_id = real_open(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return run_id

    runs = interrupt_then_rerun(
        tmp_path, tracking_uri, monkeypatch, harness.cells, "open_trial_run", open_then_signal, 128 + signal.SIGINT
    )
    assert [run.info.status for run in runs.values()] == ["KILLED"]
    assert assert_clean(tracking_uri, "intr") == reference


def test_an_interrupted_final_save_does_not_log_the_summary_twice(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, reference: dict
) -> None:
    real_log_artifact = MlflowClient.log_artifact

    def interrupted_once(self, run_id: str, local_path: str, *args) -> None:  # noqa: ANN001, ANN002
        if not local_path.endswith("utilisation.csv"):
            return real_log_artifact(self, run_id, local_path, *args)
        monkeypatch.setattr(MlflowClient, "log_artifact", real_log_artifact)
        raise KeyboardInterrupt  # after the summary batch, before the tables and the FINISHED status

    runs = interrupt_then_rerun(
        tmp_path, tracking_uri, monkeypatch, MlflowClient, "log_artifact", interrupted_once, 130
    )
    # A cell's run is created when the cell starts: the first cell's save was interrupted, the other never started.
    assert [run.info.status for run in runs.values()] == ["KILLED"]
    assert ["final_val_loss" in run.data.metrics for run in runs.values()].count(True) == 1
    assert assert_clean(tracking_uri, "intr") == reference  # every summary metric exactly once


def test_an_interrupted_store_creation_leaves_no_store(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = harness.tracking.build_mlflow_store

    def built_then_interrupted(url: str) -> None:
        real_build(url)  # the whole store, aside; interrupted before it is moved into place
        raise KeyboardInterrupt

    spec = tiny_spec(tmp_path, "fresh", ["dense"], [0])
    monkeypatch.setattr(harness.tracking, "build_mlflow_store", built_then_interrupted)
    assert run_study(tmp_path, spec, tracking_uri) == 130
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    assert not database.exists()
    monkeypatch.setattr(harness.tracking, "build_mlflow_store", real_build)
    assert run_study(tmp_path, spec, tracking_uri) == 0
    assert not list(database.parent.glob("*.partial"))  # the interrupted attempt's file is cleaned up
    assert {run.info.status for run in trial_runs(tracking_uri, "fresh").values()} == {"FINISHED"}


@pytest.mark.slow
def test_processes_starting_together_on_a_fresh_store_all_work(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    probe = (
        "import sys; from harness.tracking import TrackingStore; from harness.tune.storage import open_storage; "
        "from harness.config import TuneConfig; s = TrackingStore(sys.argv[1]); print(s.experiment_id('together')); "
        "space = {'optim.lr': {'type': 'float', 'low': 0.1, 'high': 1}}; "
        "open_storage(sys.argv[2], TuneConfig(space=space, n_trials=1))"
    )
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna' / 't.db'}"
    command = [sys.executable, "-c", probe, uri, storage]
    workers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=harness_env())
        for _ in range(3)
    ]
    results = [(w.wait(timeout=300), *w.communicate()) for w in workers]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert len({out.strip() for _, out, _ in results}) == 1  # one experiment, the same for all
    TrackingStore(uri)  # and the store opens afterwards


@pytest.mark.slow
def test_random_interruptions_then_a_rerun_complete_the_study_as_if_uninterrupted(
    tmp_path: Path, reference: dict
) -> None:
    """SIGKILL/SIGTERM/SIGINT at a random moment of a first run on a fresh store (import, store creation,
    training, final save), then a rerun; seeded, so a failure reproduces."""
    rng = random.Random(13)
    for round_ in range(int(os.environ.get("HARNESS_INTERRUPT_ROUNDS", "3"))):  # more rounds: a longer probe
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        spec, uri = two_trials(folder, "intr"), f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
        signum = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)[round_ % 3]
        worker = start_worker(spec, folder / "log", "--tracking-uri", uri, "--checkpoint-dir", str(folder / "ck"))
        try:
            worker.wait(timeout=rng.uniform(2.0, 14.0))
        except subprocess.TimeoutExpired:
            worker.send_signal(signum)
        code = worker.wait(timeout=120)
        log = (folder / "log").read_text()
        assert code in (0, -signum, 128 + signum), log  # -signum: before the handler (nothing written yet)
        assert "Traceback" not in log, log
        assert run_study(folder, spec, uri) == 0, log
        assert assert_clean(uri, "intr") == reference, f"round {round_}: {signum!r} after {log[-300:]}"
