"""The hyperparameter-tuning section: the Optuna study's trial states and its best (or Pareto-optimal) trials."""

from __future__ import annotations

import optuna
import pandas as pd

from harness.report.blocks import Block, Heading, Para, Table
from harness.report.formatting import fmt
from harness.report.gather import StudyData


def tuning_only_note(data: StudyData) -> Para:
    return Para(
        f"This experiment holds only tuning trials ({len(data.runs)}), each with different hyperparameters, "
        "so there is no per-variant comparison over seeds and no significance test. Run `harness run-study` "
        "on the best configuration with several seeds for that."
    )


def tuning_summary(data: StudyData, study: optuna.Study | None) -> list[Block]:
    if study is None:
        return []
    trials = study.trials
    states = pd.Series([t.state.name.lower() for t in trials]).value_counts().to_dict()
    blocks: list[Block] = [Heading("Hyperparameter tuning")]
    blocks.append(
        Para(
            f"Optuna study `{study.study_name}` ({data.tag('optuna.storage')}): {len(trials)} trials ("
            + ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
            + "); directions "
            + ", ".join(d.name.lower() for d in study.directions)
            + "."
        )
    )
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        blocks.append(_best_trials(study))
    return blocks


def _best_trials(study: optuna.Study) -> Table:
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    best = study.best_trials
    rows = [
        [str(t.number)]
        + [fmt(v, 3) for v in t.values]
        + [", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())]
        for t in best[:10]
    ]
    caption = "Best trial" if len(best) == 1 else "Pareto-optimal trials (up to 10)"
    return Table(["Trial", *names, "Parameters"], rows, caption=caption)
