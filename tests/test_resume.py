"""A study killed with SIGKILL mid-trial resumes, on rerun, into the same run with identical results."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.metric_names import TRAIN_LOSS, VAL_LOSS, VAL_SUBSET_LOSS
from tests.studies import tiny_spec
from tests.workers import start_worker, wait_for


def trial_runs(uri: str, study: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'")


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_sigkilled_study_resumes_from_its_checkpoint_to_identical_results(tmp_path: Path) -> None:
    # 80 steps; a checkpoint every 6 (on logging steps); dropout on so the RNG state matters.
    budget = {"tokens": 80 * 128, "checkpoint_every_steps": 6, "eval_every_steps": 10}
    spec = tiny_spec(tmp_path, "resume", ["baseline"], [0], budget=budget)
    text = spec.read_text().replace("dropout: 0.0", "dropout: 0.3")
    spec.write_text(text)
    killed_uri = f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}"
    whole_uri = f"sqlite:///{tmp_path / 'whole' / 'mlflow.db'}"
    log = tmp_path / "worker.log"

    ck_dir = tmp_path / "ck-killed"
    uninterrupted = start_worker(spec, log, "--tracking-uri", whole_uri, "--checkpoint-dir", str(tmp_path / "ck"))
    worker = start_worker(spec, log, "--tracking-uri", killed_uri, "--checkpoint-dir", str(ck_dir))
    checkpoint = ck_dir / "resume" / "baseline-seed=0.pt"
    wait_for(lambda: checkpoint.is_file() or worker.poll() is not None, 300, "a checkpoint")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL, log.read_text()
    saved_step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < saved_step < 80
    (run,) = trial_runs(killed_uri, "resume")
    assert run.info.status == "RUNNING"  # killed: nothing got to close it

    rerun = start_worker(spec, log, "--tracking-uri", killed_uri, "--checkpoint-dir", str(ck_dir))
    assert rerun.wait(timeout=400) == 0, log.read_text()
    assert uninterrupted.wait(timeout=400) == 0, log.read_text()
    assert "resuming its interrupted run" in log.read_text()
    assert not checkpoint.exists()

    (resumed,) = trial_runs(killed_uri, "resume")  # the same run, not a second one
    (whole,) = trial_runs(whole_uri, "resume")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    for key in ["final_val_loss", "test_loss", "best_val_subset_ppl", "train_tokens"]:
        assert resumed.data.metrics[key] == whole.data.metrics[key], key
    for key in [TRAIN_LOSS, VAL_SUBSET_LOSS, VAL_LOSS, "aux_loss", "lr"]:  # every step once, equal values
        assert history(killed_uri, resumed.info.run_id, key) == history(whole_uri, whole.info.run_id, key), key
    assert len(history(killed_uri, resumed.info.run_id, TRAIN_LOSS)) == 80 // 2
