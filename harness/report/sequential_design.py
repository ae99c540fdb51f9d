"""The "Sequential design" section: for a study whose seeds came in rounds (``matrix.seeds: {initial, max}``), each
comparison's looks, boundaries, decision and repeated confidence interval, rebuilt from the recorded runs the same
way the runner decided (:mod:`harness.rounds`)."""

from __future__ import annotations

import json
import math

import pandas as pd

from harness.report.blocks import Block, Bullets, Heading, Para, Table, fmt
from harness.report.gather import UNTRAINED, StudyData
from harness.rounds import Plan, Result, plan_round, seed_order
from harness.sequential import Design, make_design, repeated_interval
from harness.tags import SEQUENTIAL_DECISION, SEQUENTIAL_DESIGN, SEQUENTIAL_SAVED


def results_of(runs: pd.DataFrame) -> dict[tuple[str, int], Result]:
    """(variant, seed) -> test loss of each ended trial; None for a failed or untrained one (as the runner counts)."""
    results: dict[tuple[str, int], Result] = {}
    for _, run in runs.iterrows():
        if run["status"] not in ("FINISHED", "FAILED") or not str(run["tags.seed"]).isdigit():
            continue
        flags = set(str(run.get("tags.harness.health") or "ok").split(","))
        loss = run.get("metrics.test_loss")
        healthy = run["status"] == "FINISHED" and not flags & UNTRAINED and loss is not None and not math.isnan(loss)
        results[(run["tags.variant"], int(run["tags.seed"]))] = float(loss) if healthy else None
    return results


def sequential_section(data: StudyData) -> list[Block]:
    """Nothing for a fixed design (no design tag on the study run)."""
    recorded = data.tag(SEQUENTIAL_DESIGN)
    if not recorded:
        return []
    design_tag = json.loads(recorded)
    variants = design_tag.get("variants") or sorted({str(v) for v in data.runs["tags.variant"].dropna()})
    comparisons = max(len(variants) - 1, 1)
    design = make_design(
        sizes=tuple(range(len(design_tag["initial"]), design_tag["max"] + 1)),
        alpha=design_tag["alpha"] / comparisons,
        spending=design_tag["spending"],
        margin=data.equivalence_margin,
    )
    seeds = seed_order(design_tag["initial"], design_tag["max"])
    plan = plan_round(
        design=design, reference=design_tag["reference"], variants=variants, seeds=seeds, results=results_of(data.runs)
    )
    return [
        Heading("Sequential design"),
        Para(
            f"Seeds came in rounds: {design_tag['initial']} first, then one more per round for each comparison with "
            f"`{design_tag['reference']}` still open, up to {design_tag['max']}. Each look tests the paired per-seed "
            f"difference of test log-PPL for a difference (two-sided t) and for equivalence within "
            f"±{data.equivalence_margin:.0%} (TOST); boundaries from {design_tag['spending'].replace('_', '-')} "
            f"alpha spending, computed for t statistics (harness/sequential.py). Family-wise alpha "
            f"{design_tag['alpha']:g} is split equally across the {comparisons} comparison(s) (Bonferroni), for each "
            f"of the two tests. A trial flagged untrained counts as no seed and is replaced by the next seed."
        ),
        looks_table(plan, design),
        Bullets(
            [
                f"**Decisions:** `{data.tag(SEQUENTIAL_DECISION) or 'not recorded'}`",
                f"**Trials saved** against running {design_tag['max']} seeds for every variant: "
                f"{data.tag(SEQUENTIAL_SAVED) or 'not recorded'}",
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
                    fmt(look.difference_bound, 2),
                    fmt(look.t_equivalence, 2),
                    fmt(look.equivalence_bound, 2),
                    f"{fmt(low, 3)}–{fmt(high, 3)}",
                    look.decision,
                ]
            )
        if not comparison.looks:
            rows.append([comparison.variant, "–", "–", "–", "–", "–", "–", "–", "open (no look yet)"])
    header = ["variant", "seeds", "PPL ratio", "t", "t bound", "TOST t", "TOST bound", "repeated 95% CI", "decision"]
    return Table(header, rows, caption="One row per look; a comparison stops at its first decision.")
