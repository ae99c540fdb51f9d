"""A real tiny sequential study: seeds come in rounds, a clearly worse variant stops early, the study run records
the decisions, a rerun runs nothing again, and the report has its "Sequential design" section.

The tiny data is too small for any model to leave the unigram plateau, so every trial is flagged stalled, and a
stalled trial counts as no seed; the test counts them (the health rule is not what it checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import harness.rounds
from harness.cli import main
from harness.tags import SEQUENTIAL_DECISION, SEQUENTIAL_SAVED
from tests.studies import run_study, tiny_config, with_keys, write_spec

STUDY = "rounds"


def sequential_spec(folder: Path) -> Path:
    spec = tiny_config(STUDY, ["dense"], budget={"tokens": 4000})
    spec = with_keys(spec, {"variants.small.preset": "dense", "overrides.small.model.d_model": 4})  # far too small
    spec["matrix"] = {"variants": ["dense", "small"], "seeds": {"initial": [1, 2], "max": 5}}
    spec["report"] = {"equivalence_margin": 0.001}  # tiny data: the gap is under 1%; outside a 0.1% margin
    return write_spec(folder / f"{STUDY}.yaml", spec)


def cells(uri: str) -> list[str]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    return sorted(
        run.data.tags["harness.cell"] for run in client.search_runs([experiment], "tags.`harness.role` = 'trial'")
    )


@pytest.mark.slow
def test_a_clearly_worse_variant_stops_early_and_a_rerun_runs_nothing_again(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness.rounds, "UNTRAINED", frozenset())
    spec = sequential_spec(tmp_path)
    assert main(["run-study", str(spec), "--dry-run"]) == 0
    assert "look  seeds" in capsys.readouterr().out
    assert main(["run-study", str(spec), "--list-cells", "--tracking-uri", tracking_uri]) == 0
    assert "4 trials" in capsys.readouterr().out  # the first round: seeds 1 and 2 of both variants
    assert run_study(tmp_path, spec, tracking_uri) == 0
    ran = cells(tracking_uri)
    parent = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name(STUDY).experiment_id], "tags.`harness.role` = 'study'"
    )[0]
    decision = parent.data.tags[SEQUENTIAL_DECISION]
    assert decision.startswith("small:worse@"), decision
    stopped_at = int(decision.split("@")[1])
    assert stopped_at < 5 and len(ran) == 2 * stopped_at  # no seed ran after the decision
    assert int(parent.data.tags[SEQUENTIAL_SAVED]) == 10 - len(ran)
    assert parent.info.status == "FINISHED"
    capsys.readouterr()
    assert run_study(tmp_path, spec, tracking_uri) == 0  # a rerun: the decision stands, nothing runs
    assert "0 finished" in capsys.readouterr().out and cells(tracking_uri) == ran
    out = tmp_path / "report"
    assert main(["report", STUDY, "--tracking-uri", tracking_uri, "--out", str(out), "--no-log"]) == 0
    assert "## Sequential design" in (out / "report.md").read_text()
