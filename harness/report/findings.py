"""What the study found: the verdict against the reference, the per-variant quality and cost tables, the
significance and equivalence tests and the compute-matched comparison. Each section is a function returning
blocks; the figures come from ``harness.report.statistics``, computed once for all of them.

Only trials not flagged untrained in Training health take part (``StudyData.per_variant``); a note beside each
table names the ones left out and the collapsed ones kept in.
"""
# Over 350 lines: the report's five result sections, which share their small formatting helpers.

from __future__ import annotations

import math
from collections.abc import Callable

from harness.report.blocks import MISSING, Block, Heading, Para, Table, fmt, fmt_count, fmt_duration
from harness.report.gather import StudyData, is_routed, load_cv, metric_values, peak_memory, with_flops
from harness.report.overview import flag_note
from harness.report.statistics import (
    ALPHA,
    Against,
    BackboneTests,
    Comparison,
    Ratio,
    Summary,
    describe,
    matched_points,
)

LOWER, HIGHER = "lower", "higher"
Tests = dict[str, BackboneTests]  # by backbone: every backbone with a finished trial


def mean_sd(s: Summary, digits: int = 2) -> str:
    if s.n == 0:
        return MISSING
    return fmt(s.mean, digits) if s.n < 2 else f"{fmt(s.mean, digits)} ± {fmt(s.sd, digits)}"


def ci(s: Summary, digits: int = 2) -> str:
    return MISSING if s.n < 2 else f"[{fmt(s.ci_low, digits)}, {fmt(s.ci_high, digits)}]"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def best_rows(table_rows: list[list[float]], column: int, direction: str) -> set[int]:
    values = [(r[column], i) for i, r in enumerate(table_rows) if r[column] is not None and math.isfinite(r[column])]
    if len(values) < 2:
        return set()
    target = min(v for v, _ in values) if direction == LOWER else max(v for v, _ in values)
    return {i for v, i in values if v == target}


def _where(data: StudyData, backbone: str) -> str:
    return f" ({backbone} backbone)" if len(data.backbones) > 1 else ""


# ---------------------------------------------------------------- verdict


def _interval(found: Ratio | None) -> str:
    if found is None:
        return MISSING
    return f"{fmt(found.ratio, 3)} ({fmt(found.low, 3)}–{fmt(found.high, 3)})"


def _verdict_row(a: Against) -> list[str]:
    return [
        a.variant,
        fmt(a.params_ratio, 3),
        _interval(a.equivalence.ratio if a.equivalence else None),
        p_text(a.equivalence_p_holm) if math.isfinite(a.equivalence_p_holm) else MISSING,
        a.worse,
        _interval(a.time),
        f"{a.smaller} / {a.no_loss} / {a.faster}",
        f"**{a.answer}**",
    ]


def verdict_section(data: StudyData, tests: Tests) -> list[Block]:
    """Does each variant reach a smaller parameter count without significant loss in perplexity against the
    reference, at a lower time per million tokens? (The question the project was built to answer.)"""
    blocks: list[Block] = [Heading("Verdict against the reference")]
    for backbone, found in tests.items():
        where = _where(data, backbone)
        if not found.against:
            blocks.append(Para(f"Fewer than two variants to compare{where}."))
            continue
        reference, margin = found.reference, data.equivalence_margin
        header = ["Variant", "Params ratio", "Test PPL ratio (95% CI)", "TOST p (Holm)", "Significantly worse"]
        header += ["Time / Mtok ratio (95% CI)", "Smaller / no loss / faster", "Answer"]
        rows = [_verdict_row(a) for a in found.against.values()]
        caption = (
            f"Does the variant reach a smaller parameter count without significant loss in perplexity "
            f"against {reference}{where}, at a lower time per million tokens? Ratios: variant / {reference}, "
            "geometric means over seeds, 95% intervals from the t distribution of the log difference (paired "
            f"by seed). No loss: equivalent within ±{margin:.0%} by TOST, Holm-adjusted p < {ALPHA} (yes); "
            "significantly worse and not equivalent (no); else undecided. Significantly worse: higher test PPL "
            "by the paired t-test (Welch's without common seeds), Holm-adjusted p < 0.05; it can hold inside "
            "the margin (a real but small loss). Faster: the time ratio's interval lies below 1 (yes) or above "
            "1 (no). Answer: yes when smaller, no loss and faster are all yes, no when any is no."
        )
        blocks += [Table(header, rows, caption=caption), *flag_note(data, backbone, "this verdict")]
    return blocks


# ---------------------------------------------------------------- main comparison


def main_comparison(data: StudyData, tests: Tests) -> list[Block]:
    blocks: list[Block] = [Heading("Main comparison")]
    if data.finished.empty:
        blocks.append(Para("No trial finished, so there is nothing to compare."))
    for backbone, found in tests.items():
        if len(data.backbones) > 1:
            blocks.append(Heading(f"Backbone: {backbone}", 3))
        blocks.extend([quality_table(found), cost_table(data, found)])
        blocks.extend(flag_note(data, backbone, "these tables and their rankings"))
    return blocks


def quality_table(found: BackboneTests) -> Table:
    header = ["Variant", "n", "Val PPL (mean ± sd)", "Val PPL 95% CI", "Test PPL (mean ± sd)", "Test PPL 95% CI"]
    rows, raw = [], []
    for variant, runs in found.groups.items():
        val, test = describe(metric_values(runs, "final_val_ppl")), describe(metric_values(runs, "test_ppl"))
        rows.append([variant, str(len(runs)), mean_sd(val), ci(val), mean_sd(test), ci(test)])
        raw.append([None, None, val.mean, None, test.mean, None])
    bold = {(i, c) for c in (2, 4) for i in best_rows(raw, c, LOWER)}
    return Table(
        header,
        rows,
        bold,
        "Perplexity on the full validation and test splits after the token budget; "
        "mean ± sample sd over seeds, 95% CI of the mean from the t distribution. Bold: best (lowest).",
    )


def _cost_columns(data: StudyData) -> list[tuple[str, str | None, Callable[[float], str], str]]:
    """(header, metric or None for the load CV, format, better direction) of each cost column."""
    memory_metric = peak_memory(data)
    memory_label = "Peak GPU mem (MB)" if memory_metric == "gpu_mem_peak_nvml_mb" else "Peak RSS (MB)"
    return [
        ("Params total", "params_total", fmt_count, LOWER),
        ("Trainable", "params_trainable", fmt_count, LOWER),
        ("Active / token", "params_active", fmt_count, LOWER),
        ("Time / Mtok (s)", "time_per_mtok_s", lambda v: fmt(v, 1), LOWER),
        ("Tokens / s", "train_tokens_per_s", fmt_count, HIGHER),
        (memory_label, memory_metric, lambda v: fmt(v, 0), LOWER),
        ("Aux loss", "aux_loss", lambda v: fmt(v, 4), LOWER),
        ("Load CV", None, lambda v: fmt(v, 3), LOWER),
    ]


def cost_table(data: StudyData, found: BackboneTests) -> Table:
    columns = _cost_columns(data)
    rows, raw = [], []
    for variant, runs in found.groups.items():
        means = []
        for _, metric, _, _ in columns:
            values = load_cv(runs) if metric is None else metric_values(runs, metric)
            means.append(describe(values).mean if values else math.nan)
        if not is_routed(runs):  # dense or plain: no router, so no aux loss and no load to balance
            means[-2:] = [math.nan, math.nan]
        rows.append([variant] + [f(m) for (_, _, f, _), m in zip(columns, means, strict=True)])
        raw.append([None, *means])
    bold = {(i, c + 1) for c, (*_, direction) in enumerate(columns) for i in best_rows(raw, c + 1, direction)}
    return Table(
        ["Variant"] + [c[0] for c in columns],
        rows,
        bold,
        "Means over seeds. Time per million training tokens excludes evaluation. Aux loss: router balance loss in "
        "the last logging window; load CV: coefficient of variation of expert shares on the validation split, "
        "averaged over MoE layers (0 = perfectly balanced). Bold: best (highest tokens/s, lowest otherwise).",
    )


# ---------------------------------------------------------------- significance


def significance_section(data: StudyData, tests: Tests) -> list[Block]:
    blocks: list[Block] = [Heading("Significance")]
    for backbone, found in tests.items():
        blocks.extend(significance(data, found))
        blocks.extend(flag_note(data, backbone, "these tests"))
    return blocks


def significance(data: StudyData, found: BackboneTests) -> list[Block]:
    """The significance table and its statement for one backbone, or why no test can be made."""
    where, reference = _where(data, found.backbone), found.reference
    planned = data.runs[data.runs["tags.backbone"] == found.backbone]["tags.seed"].nunique()
    max_seeds = max((len(runs) for runs in found.groups.values()), default=0)
    if planned < 2 or max_seeds < 2:
        seeds = "a single seed" if planned < 2 else "a single finished seed"
        return [
            Para(
                f"Each variant{where} has {seeds}, so **no significance can be claimed**: the differences in the "
                "tables are single observations with no estimate of seed-to-seed variation. Run at least two seeds "
                "(three or more for useful power) to test them."
            )
        ]
    if not found.against:
        return [Para(f"Only one variant finished (and was not flagged){where}: there is nothing to compare.")]
    rows = [_significance_row(a, len(found.groups[v])) for v, a in found.against.items()]
    table = Table(
        ["Variant", "Test", "n", f"Δ test PPL vs {reference}", "t", "p", "Effect size", "p (Holm)", "Seeds, 80% power"],
        rows,
        caption=f"Each variant against {reference} on final test perplexity. Paired t-test on per-seed "
        "differences when both ran the same seeds (effect size d_z = mean difference / sd of differences); "
        "Welch's t-test otherwise (effect size Cohen's d with pooled sd). Two-sided; p (Holm): Holm-Bonferroni "
        "adjusted across the variants listed. Seeds, 80% power: seeds (pairs, or runs per variant) a test at the "
        "5% level needs to detect the observed effect size with 80% power (noncentral t, as statsmodels TTestPower).",
    )
    results = {v: a.difference for v, a in found.against.items()}
    return [table, Para(_significance_statement(results, reference, where, max_seeds))]


def _significance_row(a: Against, n_runs: int) -> list[str]:
    result = a.difference
    if result is None:
        return [a.variant, MISSING, str(n_runs), *[MISSING] * 6]
    return [
        a.variant,
        result.test,
        str(result.n),
        f"{result.difference:+,.2f}",
        fmt(result.statistic, 2),
        p_text(result.p_value),
        f"{result.effect_name} = {fmt(result.effect, 2)}",
        p_text(a.difference_p_holm) if math.isfinite(a.difference_p_holm) else MISSING,
        fmt_count(a.seeds_for_power),
    ]


def _significance_statement(results: dict[str, Comparison | None], reference: str, where: str, max_seeds: int) -> str:
    holds, fails = [], []
    for variant, result in results.items():
        if result is not None:
            direction = "lower" if result.difference < 0 else "higher"
            p = p_text(result.p_value)
            text = (
                f"{variant} ({direction} test PPL by {abs(result.difference):,.2f}, p {p if p[0] == '<' else '= ' + p})"
            )
            (holds if result.significant else fails).append(text)
    untestable = [v for v, result in results.items() if result is None]
    level = f"{ALPHA:.0%}"
    if holds:
        sentences = [f"At the {level} level, these differences from {reference} are significant: {'; '.join(holds)}."]
    else:
        sentences = [f"At the {level} level, no variant differs significantly from {reference}{where}."]
    if fails:
        sentences.append(f"Not significant at the {level} level: {'; '.join(fails)}.")
    if untestable:
        sentences.append(f"Too few seeds to test: {', '.join(untestable)}.")
    if max_seeds < 3:
        sentences.append(
            "With two seeds per variant the tests have very little power; a non-significant result is "
            "not evidence of no difference."
        )
    return " ".join(sentences)


# ---------------------------------------------------------------- equivalence


def equivalence_section(data: StudyData, tests: Tests) -> list[Block]:
    blocks: list[Block] = [Heading("Equivalence to the reference")]
    for found in tests.values():
        blocks += equivalence(data, found)
    return blocks


def equivalence(data: StudyData, found: BackboneTests) -> list[Block]:
    where, reference, notes = (
        _where(data, found.backbone),
        found.reference,
        flag_note(data, found.backbone, "this test"),
    )
    if not found.against:
        return [Para(f"Fewer than two variants to compare{where}."), *notes]
    margin = data.equivalence_margin
    table = Table(
        ["Variant", "Test", "n", f"PPL ratio vs {reference}", "95% CI", "TOST p", "TOST p (Holm)", "Equivalent"],
        [_equivalence_row(a) for a in found.against.values()],
        caption=f"Two one-sided tests (TOST) of equivalence to {reference}{where} on final test perplexity at a "
        f"relative margin of ±{margin:.0%} (spec key report.equivalence_margin), i.e. ±log(1+{margin:g}) on the "
        "log perplexity; paired by seed where both ran the same seeds, Welch otherwise (statsmodels ttost_paired / "
        "ttost_ind). Ratio: geometric mean of variant / reference; 95% CI: exp of the t interval of the mean log "
        "perplexity difference (scipy ttest_rel / ttest_ind, unpooled). Holm: Holm-Bonferroni across the variants "
        "listed. Equivalent: Holm-adjusted p < 0.05.",
    )
    equivalent = [v for v, a in found.against.items() if a.equivalent]
    statement = (
        f"Equivalent to {reference} within ±{margin:.0%}{where}: {', '.join(equivalent)}."
        if equivalent
        else f"No variant is shown equivalent to {reference} within ±{margin:.0%}{where}."
    )
    return [table, Para(statement), *notes]


def _equivalence_row(a: Against) -> list[str]:
    if a.equivalence is None:
        return [a.variant, MISSING, MISSING, MISSING, MISSING, MISSING, MISSING, "too few seeds"]
    found = a.equivalence.ratio
    return [
        a.variant,
        a.equivalence.test,
        str(found.n),
        fmt(found.ratio, 3),
        f"{fmt(found.low, 3)}–{fmt(found.high, 3)}",
        p_text(a.equivalence.p_value),
        p_text(a.equivalence_p_holm),
        "yes" if a.equivalent else "no",
    ]


# ---------------------------------------------------------------- compute-matched


def matched_section(data: StudyData, tests: Tests) -> list[Block]:
    """Each variant's validation perplexity at equal training time and equal FLOPs.

    The final perplexities compare variants at equal *tokens*; a variant that is slower per token, or that costs
    more FLOPs per token, bought them with more compute. Here every run's validation curve is read at one training
    time and at one training-FLOP count (``statistics.matched_points``).
    """
    blocks: list[Block] = [Heading("Compute-matched comparison")]
    for found in tests.values():
        blocks += matched(data, found)
    return blocks


def matched(data: StudyData, found: BackboneTests) -> list[Block]:
    run_ids = [run_id for runs in found.groups.values() for run_id in runs["run_id"]]
    curves = data.curves[data.curves["run_id"].isin(run_ids)] if not data.curves.empty else data.curves
    if curves.empty:
        return [Para("No validation curves were logged, so nothing can be matched on compute.")]
    curves = with_flops(data, curves)
    time_budget, at_time = matched_points(curves, "train_time_s")
    flops_budget, at_flops = matched_points(curves, "flops")
    rows, raw = [], []
    for variant, runs in found.groups.items():
        by_time = describe([at_time.get(run_id, math.nan) for run_id in runs["run_id"]])
        by_flops = describe([at_flops.get(run_id, math.nan) for run_id in runs["run_id"]])
        per_token = curves[curves["run_id"].isin(runs["run_id"])].eval("flops / tokens").mean()
        rows.append([variant, str(len(runs)), _flops_text(per_token), mean_sd(by_time), mean_sd(by_flops)])
        raw.append([None, None, None, by_time.mean, by_flops.mean])
    table = Table(
        ["Variant", "n", "Train FLOPs / token", f"Val PPL at {fmt_duration(time_budget)}", "Val PPL at equal FLOPs"],
        rows,
        {(i, c) for c in (3, 4) for i in best_rows(raw, c, LOWER)},
        caption=f"Validation perplexity{_where(data, found.backbone)} read off each run's curve at the same training "
        f"time ({fmt_duration(time_budget)}, evaluation excluded) and the same training compute "
        f"({_flops_text(flops_budget)} FLOPs): the largest budget every run reached, interpolated linearly in log "
        "perplexity between evaluations. Intermediate evaluations use the evaluation subset. FLOPs: analytic count "
        "per token (harness/flops.py) x tokens. Mean ± sd over seeds; bold: best (lowest).",
    )
    return [table, *flag_note(data, found.backbone, "this comparison")]


def _flops_text(value: float) -> str:
    return MISSING if not math.isfinite(value) else f"{value:.3g}"
