"""The one builder of tiny study specs (studies/tiny.yaml renamed and resized), and helpers for tests that run
tiny real studies in-process through the CLI."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "studies" / "tiny.yaml"
GOOD_LR, BAD_LR = 1.0e-2, 1.0e-7  # the ends of the tune spec's learning-rate range


def tiny_config(
    name: str, variants: Sequence[str], seeds: Sequence[int] = (0,), overrides: dict | None = None, **base: dict
) -> dict[str, Any]:
    """studies/tiny.yaml under another name and matrix, 1,500 tokens, one thread, ``base`` sections merged in,
    ``overrides``.

    One thread: the tests start harness processes side by side on few cores, and two processes of two threads each
    on two cores ran a tiny study 14x slower than one thread each (250 s against 18 s: OpenMP's threads spin while
    they wait for a descheduled one); one process alone runs it as fast on one thread as on two.
    """
    spec = yaml.safe_load(TINY.read_text())
    spec["name"] = name
    spec["matrix"] = {"variants": list(variants), "seeds": list(seeds)}
    spec["base"]["budget"]["tokens"] = 1500
    spec["base"].setdefault("train", {})["threads"] = 1
    for section, values in base.items():
        spec["base"].setdefault(section, {}).update(values)
    if overrides:
        spec["overrides"] = overrides
    return spec


def with_keys(spec: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with each dotted key of ``changes`` set (missing sections created)."""
    spec = copy.deepcopy(spec)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def tiny_spec(
    folder: Path,
    name: str,
    variants: Sequence[str],
    seeds: Sequence[int] = (0,),
    overrides: dict | None = None,
    **base: dict,
) -> Path:
    """``tiny_config(...)`` written to ``folder/<name>.yaml``."""
    return write_spec(folder / f"{name}.yaml", tiny_config(name, variants, seeds, overrides, **base))


def tune_config(name: str, tune: dict[str, Any] | None = None, tokens: int = 1500) -> dict[str, Any]:
    """The tiny spec with a hybrid tune section (softmax top-k router, so top_k can vary); ``tune`` replaces keys."""
    overrides = {"hybrid": {"moe": {"router": "softmax_topk"}}}
    spec = tiny_config(name, ["hybrid"], overrides=overrides, budget={"tokens": tokens, "eval_every_steps": 2})
    spec["tune"] = {
        "variant": "hybrid",
        "n_trials": 3,
        "space": {
            "moe.lora_rank": {"type": "int", "low": 1, "high": 8, "log": True},
            "moe.top_k": {"type": "int", "low": 1, "high": 2},
            "moe.aux_loss_coef": {"type": "float", "low": 1.0e-4, "high": 0.1, "log": True},
            "optim.lr": {"type": "float", "low": BAD_LR, "high": GOOD_LR, "log": True},
        },
        "pruner": "median",
        "pruner_startup_trials": 2,
        "pruner_warmup_steps": 2,
        "seeds": [3, 4],
        "heartbeat_interval_s": 1,
        "grace_period_s": 3,
        **(tune or {}),
    }
    return spec


def tune_spec(folder: Path, name: str, tune: dict[str, Any] | None = None, tokens: int = 1500) -> Path:
    """``tune_config(...)`` written to ``folder/<name>.yaml``."""
    return write_spec(folder / f"{name}.yaml", tune_config(name, tune, tokens))


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
