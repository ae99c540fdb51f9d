"""Helpers for tests that run tiny real studies in-process through the CLI."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]


def tiny_spec(
    folder: Path, name: str, variants: list[str], seeds: list[int], overrides: dict | None = None, **base: dict
) -> Path:
    """studies/tiny.yaml under another name and matrix, 1,500 tokens, with ``base`` sections and ``overrides``."""
    spec = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    spec["name"] = name
    spec["matrix"] = {"variants": variants, "seeds": seeds}
    spec["base"]["budget"]["tokens"] = 1500
    for section, values in base.items():
        spec["base"].setdefault(section, {}).update(values)
    if overrides:
        spec["overrides"] = overrides
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_study(folder: Path, spec: Path, uri: str, *extra: str) -> int:
    args = ["run-study", str(spec), "--tracking-uri", uri, "--no-progress", "--checkpoint-dir", str(folder / "ck")]
    return main([*args, *extra])


def trial_runs(uri: str, study: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[study], filter_string="tags.`harness.role` = 'trial'")


def runs_by_variant(uri: str, study: str) -> dict[str, Run]:
    """A study's trial runs (MLflow ``Run`` objects) keyed by variant: for studies with one seed."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    found = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'")
    return {run.data.tags["variant"]: run for run in found}
