"""What a tuning study found: the best trial (or Pareto front), as lines and as a study spec to confirm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from harness.config import StudySpec, resolve_trial, set_dotted
from harness.tune.attrs import RUN_ID_ATTR
from harness.tune.objective import short


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial, or the Pareto front sorted by validation perplexity."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.values[0])


def export_spec(spec: StudySpec, trial: FrozenTrial, path: Path) -> Path:
    """A study spec that runs the trial's parameters with every seed of ``tune.seeds``."""
    tune = spec.tune
    assert tune is not None
    overrides = {k: dict(v) for k, v in spec.overrides.items()}
    variant_tree: dict[str, Any] = overrides.get(tune.variant, {})
    for key, value in trial.params.items():
        variant_tree = set_dotted(variant_tree, key, value)
    overrides[tune.variant] = variant_tree
    values = ", ".join(f"{n}={v:.4g}" for n, v in zip(tune.objectives, trial.values, strict=True))
    exported = {
        "name": f"{spec.name}-best",
        "description": f"Best config of tuning study '{spec.name}' (trial {trial.number}: {values}), across seeds.",
        "base": spec.base,
        "matrix": {"variants": [tune.variant], "seeds": list(tune.seeds)},
        "overrides": overrides,
    }
    # The exported spec must load exactly as run-study will load it.
    StudySpec.model_validate(exported)
    resolve_trial(StudySpec.model_validate(exported), tune.variant, tune.seeds[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by 'harness tune' from study '{spec.name}'. Confirm with: harness run-study {path}\n"
    path.write_text(header + yaml.safe_dump(exported, sort_keys=False))
    return path


def summary_lines(spec: StudySpec, study: optuna.Study, best: list[FrozenTrial], exported: Path | None) -> list[str]:
    tune = spec.tune
    assert tune is not None
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL") if s in states)
    lines = [f"tuning study '{study.study_name}': {len(states)} trials ({counts})"]
    if not best:
        return [*lines, "no trial completed: nothing to export"]
    lines.append("Pareto front (val_ppl, time_per_mtok):" if len(best) > 1 else "best config:")
    for trial in best:
        values = ", ".join(f"{n}={v:.4g}" for n, v in zip(tune.objectives, trial.values, strict=True))
        params = " ".join(f"{k}={short(v)}" for k, v in trial.params.items())
        lines.append(f"  trial {trial.number}: {values}  {params}  (mlflow run {trial.user_attrs.get(RUN_ID_ATTR)})")
    if exported is not None:
        lines.append(f"wrote {exported}: confirm across seeds {tune.seeds} with 'harness run-study {exported}'")
    return lines
