"""The "Training health" section: each trial's verdict with its numbers, and the notes beside rankings.

The verdicts are the trainer's (tags ``harness.health`` / ``harness.health.evidence``, see harness/health.py);
runs from before those checks have none and read "unknown". A saturated, stalled or unstable trial did not train as
intended, so it is left out of every ranking and test and listed here with its reason. A trial whose routing
collapsed did train: it stays in, and every ranking or test that includes it says so.
"""

from __future__ import annotations

import pandas as pd

from harness.health import BUDGET_SHARES
from harness.report.blocks import Block, Figure, Heading, Image, Para, Table
from harness.report.formatting import MISSING, fmt
from harness.report.gather import HEALTH_UNKNOWN, StudyData
from harness.tags import HEALTH, HEALTH_EVIDENCE


def verdict(run: pd.Series) -> str:
    value = run.get(f"tags.{HEALTH}")
    return str(value) if value is not None and pd.notna(value) else HEALTH_UNKNOWN


def _trial(run: pd.Series, several: bool) -> str:
    where = f" ({run['tags.backbone']})" if several else ""
    return f"{run['tags.variant']} seed {run['tags.seed']}{where}"


def _number(run: pd.Series, metric: str, digits: int) -> str:
    value = run.get(f"metrics.{metric}")
    return fmt(float(value), digits) if value is not None and pd.notna(value) else MISSING


def _evidence(run: pd.Series) -> str:
    value = run.get(f"tags.{HEALTH_EVIDENCE}")
    return str(value) if value is not None and pd.notna(value) else MISSING


def health_table(data: StudyData) -> Table:
    several = len(data.backbones) > 1
    rows = [
        [
            _trial(run, several),
            verdict(run),
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
    return ", ".join(f"{_trial(run, several)} ({verdict(run)})" for _, run in flagged.iterrows())


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
    blocks += [Para(summary), health_table(data)]
    return blocks + [Image(f) for f in figures if f.section == "health"]
