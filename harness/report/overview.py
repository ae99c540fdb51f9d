"""What ran and whether it trained: the report's header, Training health, tuning, the figure sections and the
failed trials. Each section is a function returning blocks.

Training health shows the trainer's verdicts (tags ``harness.health`` / ``harness.health.evidence``, see
harness/health.py); runs from before those checks have none and read "unknown". A saturated, stalled or unstable
trial did not train as intended, so it is left out of every ranking and test and listed there with its reason. A
trial whose routing collapsed did train: it stays in, and every ranking or test that includes it says so
(:func:`flag_note`, beside each of them).
"""

from __future__ import annotations

import math
from datetime import datetime

import optuna
import pandas as pd

from harness.health import BUDGET_SHARES
from harness.report.blocks import (
    MISSING,
    Block,
    Bullets,
    Figure,
    Heading,
    Image,
    Para,
    Table,
    fmt,
    fmt_count,
    fmt_duration,
)
from harness.report.gather import StudyData, health_of, is_pruned, variant_key
from harness.tags import COMMAND, HEALTH, HEALTH_EVIDENCE


def _unique(runs: pd.DataFrame, column: str) -> list[str]:
    return sorted({str(v) for v in runs[column].dropna()}) if column in runs else []


def _data_line(runs: pd.DataFrame) -> str:
    """Dataset, split sizes and vocabulary, as the first trial recorded them."""
    first = runs.iloc[0]
    data_name = first.get("params.data.name") or "–"
    splits = [
        f"{s} {fmt_count(float(first[f'tags.data.{s}_tokens']))}"
        for s in ("train", "validation", "test")
        if f"tags.data.{s}_tokens" in runs and pd.notna(first.get(f"tags.data.{s}_tokens"))
    ]
    vocab = first.get("tags.data.vocab_size")
    vocab_text = fmt_count(float(vocab)) if vocab is not None and pd.notna(vocab) else "not recorded"
    settings = ", ".join(
        f"{k.removeprefix('params.data.')} {first[k]}"
        for k in ("params.data.min_freq", "params.data.max_vocab")
        if k in runs and pd.notna(first.get(k))
    )
    return (
        f"**Data:** {data_name}; split sizes (tokens): {', '.join(splits) or 'not recorded'}; vocabulary "
        f"{vocab_text}" + (f" ({settings})" if settings else "")
    )


def _matrix_line(data: StudyData) -> str:
    runs = data.runs
    variants = sorted(runs["tags.variant"].dropna().unique(), key=variant_key)
    seeds = sorted(runs["tags.seed"].dropna().unique(), key=lambda s: int(s) if s.lstrip("-").isdigit() else 0)
    budget = runs.iloc[0].get("params.budget.tokens")
    if len(data.backbones) > 1:
        backbones = f" × backbones {', '.join(data.backbones)}"
    else:
        backbones = f"; backbone {data.backbones[0]}"
    tokens = (
        f"; budget {fmt_count(float(budget))} training tokens per trial"
        if budget not in (None, "None") and pd.notna(budget)
        else ""
    )
    return f"**Matrix:** variants {', '.join(variants)} × seeds {', '.join(seeds)}{backbones}{tokens}"


def _trials_line(runs: pd.DataFrame) -> str:
    status = runs["status"].value_counts().to_dict()
    pruned = int(is_pruned(runs).sum())
    return (
        f"**Trials:** {len(runs)} — finished {status.get('FINISHED', 0)}, failed {status.get('FAILED', 0)}, "
        f"pruned {pruned}, killed/interrupted {status.get('KILLED', 0) - pruned}, running {status.get('RUNNING', 0)}"
    )


def _compute_line(runs: pd.DataFrame) -> str:
    """Training time, and the trial runs' durations summed: from each cell's start to its end (set-up, evaluation
    and logging in; a resumed trial's includes its interruption; queue time never, since runs start with their
    cell). Cells that ran side by side overlap, so the sum can exceed the study's own wall time."""
    train_time = runs["metrics.train_time_s"].sum() if "metrics.train_time_s" in runs else math.nan
    ended = runs["end_time"].fillna(runs["start_time"])
    durations = (ended - runs["start_time"]).dt.total_seconds().sum()
    return (
        f"**Total compute time:** {fmt_duration(train_time)} of training (sum of train_time_s); "
        f"{fmt_duration(durations)} summed over the trial runs' durations (each from its cell's start to its end, "
        f"evaluation and logging included)"
    )


def _provenance_line(data: StudyData) -> str:
    """One commit and one command make a result; anything else says so."""
    commits, command = data.commits, data.tag(COMMAND) or "not recorded"
    if len(commits) == 1 and not commits[0].endswith("-dirty"):
        return f"**Made at commit** {commits[0]} **by** `{command}`"
    found = ", ".join(commits) or "not recorded"
    return (
        f"**Not the result of one commit:** its trials ran at {found} (a committed result comes from an empty "
        f"store at one clean commit by one command); last command `{command}`"
    )


def status_note(data: StudyData, open_variants: list[str]) -> list[Block]:
    """An unfinished study says so first: what is still open, and that nothing open is decided."""
    if data.complete and not open_variants:
        return []
    status = "no study run" if data.parent is None else f"the study run is {data.parent.info.status}"
    seeds = data.runs[data.runs["status"].isin(["FINISHED", "FAILED"])]["tags.seed"].nunique()
    still = f"comparisons still open: {', '.join(open_variants)}" if open_variants else "cells still to run"
    return [
        Para(
            f"**Incomplete study:** {status}, after trials at {seeds} seed(s); {still}. An open question is not "
            "decided: the tables below state only what the design has decided so far. Rerun the study's command "
            "to go on."
        )
    ]


def header(data: StudyData, generated: datetime) -> list[Block]:
    runs = data.runs
    parent = f", parent run `{data.parent.info.run_id}`)" if data.parent is not None else ")"
    items = [
        f"**Study:** {data.name} (MLflow experiment {data.experiment_id}{parent}",
        f"**Generated:** {generated:%Y-%m-%d %H:%M} UTC",
        _provenance_line(data),
        f"**Device(s):** {', '.join(_unique(runs, 'tags.device')) or 'not recorded'}",
        _data_line(runs),
        _matrix_line(data),
        _trials_line(runs),
        _compute_line(runs),
    ]
    return [Heading(f"Study report: {data.name}", 1), Bullets(items)]


def _failure_reason(run: pd.Series, pruned: bool) -> str:
    reason = run.get("tags.harness.pruned") if pruned else run.get("tags.harness.error")
    return str(reason) if reason is not None and pd.notna(reason) else "no error recorded"


def failures(data: StudyData) -> list[Block]:
    failed = data.failed
    blocks: list[Block] = [Heading("Failed trials")]
    if failed.empty:
        blocks.append(Para(f"None: all {len(data.runs)} trials finished."))
        return blocks
    pruned = is_pruned(failed)
    n_pruned = int(pruned.sum())
    blocks.append(
        Para(
            f"{len(failed)} of {len(data.runs)} trials did not finish ({n_pruned} pruned by the tuner, "
            f"{len(failed) - n_pruned} failed or interrupted); they are left out of the tables and statistics above."
        )
    )
    rows = [
        [
            str(r["tags.harness.cell"] or r["tags.variant"]),
            "PRUNED" if pruned[i] else str(r["status"]),
            _failure_reason(r, bool(pruned[i])),
        ]
        for i, r in failed.iterrows()
    ]
    blocks.append(Table(["Trial", "Status", "Error"], rows))
    return blocks


def _trial(run: pd.Series, several: bool) -> str:
    where = f" ({run['tags.backbone']})" if several else ""
    return f"{run['tags.variant']} seed {run['tags.seed']}{where}"


def _number(run: pd.Series, metric: str, digits: int) -> str:
    """A summary metric, or a param of that name (a data constant; runs before 2026-12-06 logged it a metric)."""
    value = run.get(f"metrics.{metric}")
    if value is None or pd.isna(value):
        value = run.get(f"params.{metric}")
    return fmt(float(value), digits) if value is not None and pd.notna(value) else MISSING


def _evidence(run: pd.Series) -> str:
    value = run.get(f"tags.{HEALTH_EVIDENCE}")
    return str(value) if value is not None and pd.notna(value) else MISSING


def health_table(data: StudyData) -> Table:
    several = len(data.backbones) > 1
    rows = [
        [
            _trial(run, several),
            health_of(run),
            *(_number(run, f"health_train_loss_{share}pct", 3) for share in BUDGET_SHARES),
            _number(run, "health_unigram_loss", 3),
            _number(run, "health_clip_fraction", 2),
            _number(run, "grad_norm_total", 3),
            _evidence(run),
        ]
        for _, run in data.finished.iterrows()
    ]
    return Table(
        [
            "Trial",
            "Health",
            *(f"Train loss {share}%" for share in BUDGET_SHARES),
            "Unigram loss",
            "Clip fraction",
            "Grad norm",
            "Evidence",
        ],
        rows,
        caption="Train loss p%: the mean train loss of the first logging window that ends past p% of the budget "
        "(a stall stays near the unigram loss, a slow start falls away from it). Unigram loss: the entropy of the "
        "training split's unigram distribution (a model that learnt only word frequencies). Clip fraction: share "
        "of steps whose gradient was clipped. Grad norm: the total gradient norm before clipping at the last "
        "logging step. unknown: the run predates the health checks.",
    )


def flagged_list(data: StudyData, runs: pd.DataFrame | None = None, flagged: pd.DataFrame | None = None) -> str:
    """'hybrid seed 1 (stalled), ...' for the ``flagged`` trials (default: every flagged one) among ``runs``."""
    flagged = data.flagged if flagged is None else flagged
    flagged = flagged if runs is None else flagged[flagged.index.isin(runs.index)]
    several = len(data.backbones) > 1
    return ", ".join(f"{_trial(run, several)} ({health_of(run)})" for _, run in flagged.iterrows())


def flag_note(data: StudyData, backbone: str, what: str) -> list[Block]:
    """The notes beside a ranking or test of ``backbone``: untrained trials left out, collapsed ones kept in."""
    runs = data.runs[data.runs["tags.backbone"] == backbone]
    left_out = flagged_list(data, runs, data.untrained)
    kept = flagged_list(data, runs, data.flagged.drop(data.untrained.index))
    notes = []
    if left_out:
        notes.append(Para(f"**Left out of {what}, flagged in Training health:** {left_out}. They did not train."))
    if kept:
        notes.append(Para(f"**Included in {what} with collapsed routing (Training health):** {kept}."))
    return notes


def health_section(data: StudyData, figures: list[Figure]) -> list[Block]:
    blocks: list[Block] = [Heading("Training health")]
    if data.finished.empty:
        return [*blocks, Para("No trial finished, so no training health was judged.")]
    flagged, untrained = flagged_list(data), flagged_list(data, flagged=data.untrained)
    if flagged:
        summary = f"Flagged: {flagged}. " + (
            f"Saturated, stalled or unstable trials ({untrained}) are left out of every ranking, table and test "
            "below: their numbers describe a failed optimisation, not the design. "
            if untrained
            else ""
        )
        summary += "Trials whose routing collapsed trained, and stay in with a note wherever they count."
    elif (data.finished[f"tags.{HEALTH}"].isna()).all():
        summary = "These runs predate the training-health checks: no verdict was recorded (health unknown)."
    else:
        summary = "No trial was flagged saturated, stalled, collapsed or unstable."
    return [*blocks, Para(summary), health_table(data), *figure_section(figures, "health")]


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


def figure_section(figures: list[Figure], key: str, title: str | None = None) -> list[Block]:
    """The figures made for section ``key``, under ``title`` when given; nothing when there are none."""
    chosen: list[Block] = [Image(f) for f in figures if f.section == key]
    return [Heading(title), *chosen] if chosen and title else chosen
