"""What ran: the report's header (commit, devices, data, matrix, trial states, compute) and the failed trials."""

from __future__ import annotations

import math
from datetime import datetime

import pandas as pd

from harness.report.blocks import Block, Bullets, Heading, Para, Table
from harness.report.formatting import fmt_count, fmt_duration
from harness.report.gather import StudyData, is_pruned, variant_key


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
    train_time = runs["metrics.train_time_s"].sum() if "metrics.train_time_s" in runs else math.nan
    ended = runs["end_time"].fillna(runs["start_time"])
    wall = (ended - runs["start_time"]).dt.total_seconds().sum()
    return (
        f"**Total compute time:** {fmt_duration(train_time)} of training (sum of train_time_s), "
        f"{fmt_duration(wall)} wall time over all trial runs (including evaluation)"
    )


def header(data: StudyData, generated: datetime) -> list[Block]:
    runs = data.runs
    parent = f", parent run `{data.parent.info.run_id}`)" if data.parent is not None else ")"
    items = [
        f"**Study:** {data.name} (MLflow experiment {data.experiment_id}{parent}",
        f"**Generated:** {generated:%Y-%m-%d %H:%M} UTC",
        f"**Git commit:** {', '.join(_unique(runs, 'tags.git_commit')) or 'not recorded'}",
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
