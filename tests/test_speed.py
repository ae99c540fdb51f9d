"""The paired speed measurement behind "faster": every variant timed interleaved in one process, the ratio's interval
from the per-round ratios, and what a study run records."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from harness.config import SpeedConfig, load_spec, resolve_trial
from harness.data import load_corpus
from harness.speed import ARTIFACT, measure_speed, time_ratio
from tests.studies import run_study, tiny_config, tiny_spec, with_keys, write_spec


def test_the_time_ratio_is_the_geometric_mean_of_the_rounds_with_its_t_interval() -> None:
    record = {"seconds_per_mtok": {"a": [10.0, 11.0, 10.5, 9.8], "b": [8.0, 9.2, 8.1, 8.0]}}
    logs = np.log(record["seconds_per_mtok"]["b"]) - np.log(record["seconds_per_mtok"]["a"])
    found = time_ratio(record, "b", "a", 0.98)
    half = stats.t.isf(0.01, 3) * logs.std(ddof=1) / 2
    assert found.ratio == pytest.approx(math.exp(logs.mean())) and found.rounds == 4
    assert (found.interval.low, found.interval.high) == pytest.approx(
        (math.exp(logs.mean() - half), math.exp(logs.mean() + half))
    )
    assert time_ratio(record, "c", "a", 0.98) is None  # not measured
    same = time_ratio({"seconds_per_mtok": {"a": [1.0, 2.0], "b": [2.0, 4.0]}}, "b", "a", 0.98)
    assert same.ratio == pytest.approx(2.0) and not same.interval.bounded  # no spread: decides nothing


def test_every_variant_is_timed_in_each_round(tmp_path: Path) -> None:
    spec = load_spec(tiny_spec(tmp_path, "speed", ["baseline", "dense", "plain"], [1]))
    configs = {v: resolve_trial(spec, v, 1) for v in spec.matrix.variants}
    record = measure_speed(configs, load_corpus(configs["baseline"].data), SpeedConfig(rounds=3, steps=2, warmup=1))
    assert set(record.seconds_per_mtok) == {"baseline", "dense", "plain"}
    assert all(len(times) == 3 and min(times) > 0 for times in record.seconds_per_mtok.values())
    assert (record.rounds, record.steps, record.warmup) == (3, 2, 1) and record.device == "cpu"


def test_a_finished_study_records_its_speed_measurement_once(tmp_path: Path, tracking_uri: str) -> None:
    config = with_keys(tiny_config("timed", ["baseline", "plain"], [1]), {"design.speed": {"rounds": 3, "steps": 2}})
    spec = write_spec(tmp_path / "timed.yaml", config)
    assert run_study(tmp_path, spec, tracking_uri) == 0
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("timed").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`harness.role` = 'study'")
    assert [a.path for a in client.list_artifacts(parent.info.run_id) if a.path == ARTIFACT] == [ARTIFACT]
    record = client.download_artifacts(parent.info.run_id, ARTIFACT, str(tmp_path))
    assert '"rounds": 3' in Path(record).read_text()
