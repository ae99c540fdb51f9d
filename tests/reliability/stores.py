"""What the reliability cases read back from a study's MLflow store (and a tuning study's Optuna storage)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

ROLE, CELL = "harness.role", "harness.cell"
OPEN = ("RUNNING", "SCHEDULED")  # a run some process still claims (SCHEDULED: created by the driver, never opened)
COMPARED = ("final_val_loss", "test_loss", "best_val_ppl", "train_tokens")  # deterministic on CPU


def _client(database: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{database}")


def study_runs(database: Path, study: str, deleted: bool = False) -> list[Any]:
    """Every active run of the study's experiment (``deleted``: deleted ones too); none when there is no store yet
    (never creates one)."""
    if not database.is_file() or database.stat().st_size == 0:
        return []
    client = _client(database)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return []
    from mlflow.entities import ViewType

    view, found, token = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY, [], None
    while True:
        page = client.search_runs([experiment.experiment_id], "", view, max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def describe(run: Any) -> str:
    tags = run.data.tags
    what = tags.get(CELL) or tags.get("optuna.trial_number") or tags.get(ROLE, "?")
    return f"{tags.get(ROLE, '?')} run {what} {run.info.status}"


def open_runs(database: Path, study: str) -> list[str]:
    """The runs left RUNNING or SCHEDULED, described."""
    return [describe(r) for r in study_runs(database, study) if r.info.status in OPEN]


def repeated_steps(database: Path, run: Any) -> list[str]:
    """The run's metrics logged twice at some step."""
    client, repeated = _client(database), []
    for key in run.data.metrics:
        steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
        twice = sorted(step for step, n in steps.items() if n > 1)
        if twice:
            repeated.append(f"{describe(run)}: {key} logged twice at step(s) {twice[:5]}")
    return repeated


def figures(database: Path, study: str) -> dict[str, dict[str, float | None]]:
    """Each FINISHED trial run's compared figures, by cell."""
    return {
        r.data.tags[CELL]: {k: r.data.metrics.get(k) for k in COMPARED}
        for r in study_runs(database, study)
        if r.data.tags.get(ROLE) == "trial" and r.info.status == "FINISHED"
    }


def study_problems(database: Path, study: str, cells: list[str], reference: dict[str, dict] | None) -> list[str]:
    """After a run that should have completed the study: no open run, one FINISHED trial run per cell, no step
    logged twice, the compared figures equal to ``reference`` (an uninterrupted run's; None: not compared)."""
    runs = study_runs(database, study)
    problems = [f"{describe(r)} left open" for r in runs if r.info.status in OPEN]
    trials = [r for r in runs if r.data.tags.get(ROLE) == "trial"]
    for cell in cells:
        mine = [r.info.status for r in trials if r.data.tags.get(CELL) == cell]
        if mine != ["FINISHED"]:
            problems.append(f"cell {cell}: trial runs {mine or 'none'}, expected one FINISHED")
    problems += [
        f"trial run of unknown cell {r.data.tags.get(CELL)}" for r in trials if r.data.tags.get(CELL) not in cells
    ]
    for run in trials:
        problems += repeated_steps(database, run)
    if reference is not None and not problems:
        got = figures(database, study)
        for cell in cells:
            diff = {k: (got[cell][k], v) for k, v in reference[cell].items() if got[cell][k] != v}
            if diff:
                problems.append(f"cell {cell}: figures differ from the uninterrupted run (got, want): {diff}")
    return problems


def state(database: Path, study: str) -> str:
    """A study's runs in a few words: the parent's status, the trial runs FINISHED, the runs left open."""
    runs = study_runs(database, study)
    if not runs:
        return "no runs yet"
    parents = [r.info.status for r in runs if r.data.tags.get(ROLE) in ("study", "tune")]
    trials = [r for r in runs if r.data.tags.get(ROLE) in ("trial", "tune-trial")]
    finished = sum(r.info.status == "FINISHED" for r in trials)
    left = [describe(r) for r in runs if r.info.status in OPEN]
    return f"parent {','.join(parents) or 'none'}, {finished}/{len(trials)} trial runs FINISHED, open: {left or 'none'}"


def tune_problems(database: Path, storage: str, study: str, n_trials: int) -> list[str]:
    """After a tuning run that should have completed: ``n_trials`` COMPLETE Optuna trials, none RUNNING or WAITING,
    no MLflow run left open, no step logged twice."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    states = Counter(t.state.name for t in optuna.load_study(study_name=study, storage=storage).get_trials())
    problems = []
    if states["COMPLETE"] != n_trials:
        problems.append(f"{states['COMPLETE']} COMPLETE Optuna trials, expected {n_trials} ({dict(states)})")
    problems += [f"{states[s]} Optuna trial(s) {s}" for s in ("RUNNING", "WAITING") if states[s]]
    runs = study_runs(database, study)
    problems += [f"{describe(r)} left open" for r in runs if r.info.status in OPEN]
    for run in runs:
        problems += repeated_steps(database, run)
    return problems
