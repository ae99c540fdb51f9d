"""The study's claims tested: equivalence to the reference (TOST, Holm-adjusted) and a compute-matched table.

Only trials not flagged in Training health take part (``StudyData.per_variant``); a note beside each table
names the ones left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from harness.report.blocks import Block, Heading, Para, Table
from harness.report.comparison import LOWER, best_rows, finished_backbones, reference_variant, test_ppl_by_seed
from harness.report.equivalence import Equivalence, holm, tost
from harness.report.formatting import MISSING, fmt, fmt_duration, mean_sd, p_text
from harness.report.gather import StudyData
from harness.report.health import flag_note
from harness.report.matched import matched_points, with_flops
from harness.report.significance import describe


def _per_backbone(data: StudyData, title: str, build: Callable[[StudyData, str, bool], list[Block]]) -> list[Block]:
    blocks: list[Block] = [Heading(title)]
    for backbone in finished_backbones(data):
        blocks += build(data, backbone, len(data.backbones) > 1)
    return blocks


def equivalence_section(data: StudyData) -> list[Block]:
    return _per_backbone(data, "Equivalence to the reference", equivalence)


def matched_section(data: StudyData) -> list[Block]:
    return _per_backbone(data, "Compute-matched comparison", matched)


def equivalence(data: StudyData, backbone: str, several: bool) -> list[Block]:
    groups = dict(data.per_variant(backbone))
    reference = reference_variant(list(groups), data.reference)
    where = f" ({backbone} backbone)" if several else ""
    if reference is None or len(groups) < 2:
        return [Para(f"Fewer than two variants to compare{where}."), *flag_note(data, backbone, "this test")]
    margin = data.equivalence_margin
    base = test_ppl_by_seed(groups[reference])
    results = {v: tost(base, test_ppl_by_seed(runs), margin) for v, runs in groups.items() if v != reference}
    adjusted = holm({v: r.p_value if r else math.nan for v, r in results.items()})
    rows = [_equivalence_row(v, r, adjusted[v]) for v, r in results.items()]
    table = Table(
        ["Variant", "Test", "n", f"PPL ratio vs {reference}", "95% CI", "TOST p", "TOST p (Holm)", "Equivalent"],
        rows,
        caption=f"Two one-sided tests (TOST) of equivalence to {reference}{where} on final test perplexity at a "
        f"relative margin of ±{margin:.0%} (spec key report.equivalence_margin), i.e. ±log(1+{margin:g}) on the "
        "log perplexity; paired by seed where both ran the same seeds, Welch otherwise (statsmodels ttost_paired / "
        "ttost_ind). Ratio: geometric mean of variant / reference; 95% CI: exp of the t interval of the mean log "
        "perplexity difference (scipy ttest_rel / ttest_ind, unpooled). Holm: Holm-Bonferroni across the variants "
        "listed. Equivalent: Holm-adjusted p < 0.05.",
    )
    equivalent = [v for v, r in results.items() if r is not None and adjusted[v] < 0.05]
    statement = (
        f"Equivalent to {reference} within ±{margin:.0%}{where}: {', '.join(equivalent)}."
        if equivalent
        else f"No variant is shown equivalent to {reference} within ±{margin:.0%}{where}."
    )
    return [table, Para(statement), *flag_note(data, backbone, "this test")]


def _equivalence_row(variant: str, result: Equivalence | None, adjusted: float) -> list[str]:
    if result is None:
        return [variant, MISSING, MISSING, MISSING, MISSING, MISSING, MISSING, "too few seeds"]
    yes = "yes" if math.isfinite(adjusted) and adjusted < 0.05 else "no"
    found = result.ratio
    return [
        variant,
        result.test,
        str(found.n),
        fmt(found.ratio, 3),
        f"{fmt(found.low, 3)}–{fmt(found.high, 3)}",
        p_text(result.p_value),
        p_text(adjusted),
        yes,
    ]


def matched(data: StudyData, backbone: str, several: bool) -> list[Block]:
    groups = data.per_variant(backbone)
    run_ids = [run_id for _, runs in groups for run_id in runs["run_id"]]
    curves = data.curves[data.curves["run_id"].isin(run_ids)] if not data.curves.empty else data.curves
    if curves.empty:
        return [Para("No validation curves were logged, so nothing can be matched on compute.")]
    curves = with_flops(data, curves)
    time_budget, at_time = matched_points(curves, "train_time_s")
    flops_budget, at_flops = matched_points(curves, "flops")
    rows, raw = [], []
    for variant, runs in groups:
        by_time = describe([at_time.get(run_id, math.nan) for run_id in runs["run_id"]])
        by_flops = describe([at_flops.get(run_id, math.nan) for run_id in runs["run_id"]])
        per_token = curves[curves["run_id"].isin(runs["run_id"])].eval("flops / tokens").mean()
        rows.append([variant, str(len(runs)), _flops_text(per_token), mean_sd(by_time), mean_sd(by_flops)])
        raw.append([None, None, None, by_time.mean, by_flops.mean])
    where = f" ({backbone} backbone)" if several else ""
    table = Table(
        ["Variant", "n", "Train FLOPs / token", f"Val PPL at {fmt_duration(time_budget)}", "Val PPL at equal FLOPs"],
        rows,
        {(i, c) for c in (3, 4) for i in best_rows(raw, c, LOWER)},
        caption=f"Validation perplexity{where} read off each run's curve at the same training time "
        f"({fmt_duration(time_budget)}, evaluation excluded) and the same training compute "
        f"({_flops_text(flops_budget)} FLOPs): the largest budget every run reached, interpolated linearly in log "
        "perplexity between evaluations. Intermediate evaluations use the evaluation subset. FLOPs: analytic count "
        "per token (harness/flops.py) x tokens. Mean ± sd over seeds; bold: best (lowest).",
    )
    return [table, *flag_note(data, backbone, "this comparison")]


def _flops_text(value: float) -> str:
    return MISSING if not math.isfinite(value) else f"{value:.3g}"
