"""How many cells run at once: the rule (``harness.engine.parallel``) and a real study run both ways, whose cells
agree bit for bit (same thread count)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import harness.engine.parallel as parallel
from harness.cli import main
from harness.config import load_spec
from harness.matrix import expand
from tests.studies import run_study, tiny_spec, trial_runs


def rule(tmp_path: Path, workers: int | None = None, **base: dict) -> parallel.CellsAtOnce:
    spec = load_spec(tiny_spec(tmp_path, "rule", ["baseline", "dense", "plain"], [1, 2], **base))
    return parallel.cells_at_once(spec, expand(spec), workers, lambda data: 100_000)  # training tokens per epoch


def test_pinned_threads_leave_cores_for_more_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    long = {"tokens": 300_000}
    assert rule(tmp_path, train={"threads": 1}, budget=long) == parallel.CellsAtOnce(4, 1, "4 cores, train.threads = 1")
    assert rule(tmp_path, train={"threads": 2}, budget=long).cells == 2
    assert rule(tmp_path, train={"threads": 4}, budget=long).cells == 1  # one cell takes every core
    assert rule(tmp_path, train={"threads": None}, budget=long).cells == 1  # threads unset: a cell uses every core
    assert rule(tmp_path, train={"threads": 1}, budget={"tokens": 10_000}).cells == 1  # shorter than Ray's start-up
    assert rule(tmp_path, workers=2) == parallel.CellsAtOnce(2, 2, "--workers")
    assert rule(tmp_path, workers=1).cells == 1
    epochs = {"tokens": None, "epochs": 1.0}  # 6 cells x 1 epoch x 100,000 tokens: long enough
    assert rule(tmp_path, train={"threads": 1}, budget=epochs).cells == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rule(tmp_path, train={"threads": 1}, budget=long).cells == 1  # one GPU: one cell at a time


def test_bad_workers_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_spec(tmp_path, "bad", ["dense"])
    assert main(["run-study", str(spec), "--workers", "0", "--tracking-uri", f"sqlite:///{tmp_path}/s.db"]) == 2
    assert "--workers must be between 1 and this machine's" in capsys.readouterr().err
    too_many = str(parallel.cores() + 1)  # more cells at once than cores: each only slower
    assert main(["run-study", str(spec), "--workers", too_many, "--tracking-uri", f"sqlite:///{tmp_path}/s.db"]) == 2
    assert f"cores, got {too_many}" in capsys.readouterr().err
    assert main(["run-study", str(spec), "--workers", "2", "--ray", "local"]) == 2
    assert "--workers sets how many cells run at once" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")  # on Ray, not about a cluster's life
def test_cells_at_once_give_the_same_results_as_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(parallel, "MIN_TOKENS", 0)  # the tiny study is far shorter than the rule's threshold
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    spec = tiny_spec(tmp_path, "both", ["baseline", "dense", "plain"], [1], train={"threads": 1})
    together, alone = (f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("together", "alone"))
    assert run_study(tmp_path / "together", spec, together) == 0
    assert "2 cells at once on a local Ray cluster, 1 thread(s) each" in capsys.readouterr().out
    assert run_study(tmp_path / "alone", spec, alone, "--workers", "1") == 0
    assert "cells at once" not in capsys.readouterr().out
    runs = {uri: trial_runs(uri, "both").set_index("tags.harness.cell").sort_index() for uri in (together, alone)}
    metrics = [c for c in runs[alone].columns if c.startswith("metrics.") and ("loss" in c or "ppl" in c)]
    assert runs[together][metrics].equals(runs[alone][metrics])  # == on CPU at the same thread count


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")  # on Ray, not about a cluster's life
def test_every_cell_runs_and_records_the_threads_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ray worker that ran a cell before keeps its threads; each cell must run with (and record) --workers' own."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    spec = tiny_spec(tmp_path, "threads", ["baseline", "dense", "plain"], [1], train={"threads": 2})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_study(tmp_path, spec, uri, "--workers", "2") == 0
    assert "2 cells at once on a local Ray cluster, 1 thread(s) each" in capsys.readouterr().out
    runs = trial_runs(uri, "threads")
    assert runs["params.train.threads"].tolist() == ["1"] * 3
    assert runs["tags.device"].str.endswith(" x1 threads").all(), runs["tags.device"].tolist()
