"""A trial that diverges, runs out of memory (CUDA's or CPU's plain RuntimeError) or hits bad data fails alone;
the study goes on and exits 1. A failing store still ends the run; a torn tokeniser cache is rebuilt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import harness.cells
from harness.cli import main
from harness.config import DataConfig
from harness.data import batchify, load_corpus
from harness.metric_names import TRAIN_LOSS
from harness.runs import TrialRun
from harness.tracking import TrackingStore
from tests.studies import runs_by_variant, tiny_spec


def test_failed_trials_are_contained_recorded_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = {"dense": {"optim": {"name": "sgd", "lr": 1.0e6, "grad_clip": None}}}  # diverges: NaN/inf loss
    variants = ["baseline", "switch", "lora", "hybrid", "dense"]
    spec_path = tiny_spec(tmp_path, "faults", variants, [0], overrides, budget={"tokens": 24 * 128})

    real_train = harness.cells.train

    def train_running_out_of_memory(config, corpus, sink, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if config.variant == "lora":  # data that fails at run time (what is knowable before is refused up front)
            batchify(corpus.validation[:3], 100_000)
        if config.variant == "hybrid":  # on CPU torch reports a failed allocation as a plain RuntimeError
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")
        if config.variant != "switch":
            return real_train(config, corpus, sink, **kwargs)

        class Exhausting:
            def log_metrics(self, metrics: dict[str, float], step: int) -> None:
                sink.log_metrics(metrics, step)
                if step >= 8:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            def sync(self) -> None:
                sink.sync()

        return real_train(config, corpus, Exhausting(), **kwargs)

    monkeypatch.setattr(harness.cells, "train", train_running_out_of_memory)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = ["run-study", str(spec_path), "--tracking-uri", uri, "--no-progress", "--checkpoint-dir", str(tmp_path)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "1 finished, 0 already done, 4 failed" in out
    for key in ["dense/seed=0", "hybrid/seed=0", "lora/seed=0", "switch/seed=0"]:
        assert f"FAILED {key}: " in out

    client, runs = MlflowClient(uri), runs_by_variant(uri, "faults")
    assert runs["baseline"].info.status == "FINISHED"
    errors = {v: runs[v].data.tags.get("harness.error", "") for v in ("dense", "hybrid", "lora", "switch")}
    assert {v: runs[v].info.status for v in errors} == {v: "FAILED" for v in errors}
    assert errors["dense"].startswith("NonFiniteLoss: non-finite training loss at step")
    assert errors["lora"].startswith("DataError: ") and "too short for batch size 100000" in errors["lora"]
    assert errors["switch"].startswith("OutOfMemoryError: CUDA out of memory")
    assert (
        errors["hybrid"] == "RuntimeError: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"
    )
    partial = client.get_metric_history(runs["switch"].info.run_id, TRAIN_LOSS)
    assert [m.step for m in partial] == [2, 4, 6, 8]  # what was logged before the failure is kept
    assert "final_val_loss" not in runs["switch"].data.metrics

    # A rerun does not repeat failed trials unless asked to, and still says some failed.
    assert main(args) == 1
    assert "0 finished, 1 already done, 4 failed" in capsys.readouterr().out
    monkeypatch.setattr(harness.cells, "train", real_train)
    assert main([*args, "--retry-failed"]) == 1  # dense fails again; switch, hybrid and lora now finish
    assert "3 finished, 1 already done, 1 failed" in capsys.readouterr().out
    experiment_id = runs["switch"].info.experiment_id
    runs_after = client.search_runs([experiment_id], "tags.`harness.role` = 'trial'")  # a list: a second run would show
    assert len(runs_after) == 5  # retried into the same runs
    switch = next(r for r in runs_after if r.data.tags["variant"] == "switch")
    assert switch.info.status == "FINISHED" and switch.info.run_id == runs["switch"].info.run_id
    assert "harness.error" not in switch.data.tags


class BrokenSink:
    """A metric sink whose background logging failed (a full disk): flushing it raises that error."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_logging_error_does_not_leave_the_run_running(tmp_path: Path, error: BaseException, status: str) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = TrackingStore(uri)
    run_id = store.client.create_run(store.experiment_id("broken")).info.run_id
    how = TrialRun(BrokenSink(store.client, run_id)).fail(error)  # type: ignore[arg-type]
    assert how.status == status
    assert store.client.get_run(run_id).info.status == status


@pytest.mark.parametrize("torn", [b"", b"PK\x03\x04 torn", b"not a zip file at all"])
def test_a_torn_tokeniser_cache_is_a_miss_and_is_rebuilt(private_cache: Path, torn: bytes) -> None:
    config = DataConfig()
    first = load_corpus(config)
    (cached,) = private_cache.glob("*.npz")
    cached.write_bytes(torn)  # an interrupted or foreign write
    again = load_corpus(config)
    assert torch.equal(again.train, first.train) and again.vocab == first.vocab
    with np.load(cached) as saved:  # rebuilt whole
        assert set(saved.files) == {"vocab", "train", "validation", "test"}
