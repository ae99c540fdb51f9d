"""The "Sequential design" section: for a study whose seeds came in rounds (``matrix.seeds: {initial, max}``), each
comparison's looks, boundaries, decision and repeated confidence interval, rebuilt from the recorded runs the same
way the runner decided (:mod:`harness.rounds`)."""

from __future__ import annotations

import math

import pandas as pd

from harness.report.blocks import Block, Bullets, Heading, Para, Table, fmt
from harness.report.gather import StudyData
from harness.rounds import Plan, Result, StudyDesign, trial_result
from harness.sequential import Design, repeated_interval
from harness.tags import SEQUENTIAL_DECISION, SEQUENTIAL_DESIGN, SEQUENTIAL_SAVED


def results_of(runs: pd.DataFrame) -> dict[tuple[str, int], Result]:
    """(variant, seed) -> :func:`harness.rounds.trial_result` of each ended trial, as the runner counts them."""
    results: dict[tuple[str, int], Result] = {}
    for _, run in runs.iterrows():
        if run["status"] in ("FINISHED", "FAILED") and str(run["tags.seed"]).isdigit():
            result = trial_result(run["status"], run.get("tags.harness.health"), run.get("metrics.test_loss"))
            results[(run["tags.variant"], int(run["tags.seed"]))] = result
    return results


def sequential_section(data: StudyData) -> list[Block]:
    """Nothing for a fixed design (no design tag on the study run)."""
    recorded = data.tag(SEQUENTIAL_DESIGN)
    if not recorded:
        return []
    study = StudyDesign.from_tag(recorded)
    results = results_of(data.runs)
    design, plan = study.comparison_design(), study.plan(results)
    not_seeds = ", ".join(f"{variant} seed {seed}" for (variant, seed), result in results.items() if result is None)
    return [
        Heading("Sequential design"),
        Para(
            f"Seeds came in rounds: {study.initial} first, then one more per round for each comparison with "
            f"`{study.reference}` still open, up to {study.max}. Each look tests the paired per-seed "
            f"difference of test log-PPL for a difference (two-sided t) and for equivalence within "
            f"±{study.margin:.0%} (TOST); boundaries from {study.spending.replace('_', '-')} "
            f"alpha spending, computed for t statistics (harness/sequential.py). Family-wise alpha "
            f"{study.alpha:g} is split equally across the {study.comparisons} comparison(s) (Bonferroni), for each "
            f"of the two tests. A trial flagged untrained counts as no seed and is replaced by the next seed."
        ),
        looks_table(plan, design),
        Bullets(
            [
                f"**Decisions:** `{data.tag(SEQUENTIAL_DECISION) or 'not recorded'}`",
                f"**Trials saved** against running {study.max} seeds for every variant: "
                f"{data.tag(SEQUENTIAL_SAVED) or 'not recorded'}",
                f"**Not counted as seeds** (failed, or flagged untrained in *Training health*; the next seed "
                f"replaced each): {not_seeds or 'none'}",
            ]
        ),
    ]


def looks_table(plan: Plan, design: Design) -> Table:
    rows = []
    for comparison in plan.comparisons:
        for look in comparison.looks:
            low, high = repeated_interval(look, design)
            rows.append(
                [
                    comparison.variant,
                    str(look.n),
                    fmt(math.exp(look.mean), 3),
                    fmt(look.t, 2),
                    bound(look.difference_bound),
                    fmt(look.t_equivalence, 2),
                    bound(look.equivalence_bound),
                    f"{fmt(low, 3)}–{fmt(high, 3)}" if math.isfinite(high) else "unbounded",
                    look.decision,
                ]
            )
        if not comparison.looks:
            rows.append([comparison.variant, "–", "–", "–", "–", "–", "–", "–", "open (no look yet)"])
    header = ["variant", "seeds", "PPL ratio", "t", "t bound", "TOST t", "TOST bound", "repeated 95% CI", "decision"]
    caption = (
        "One row per look; a comparison stops at its first decision. A bound of none: the alpha spent by that look is"
        " below what any t with so few degrees of freedom reaches, so no decision can be taken there."
    )
    return Table(header, rows, caption=caption)


def bound(value: float) -> str:
    return fmt(value, 2) if math.isfinite(value) else "none"
