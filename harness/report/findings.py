"""What the study found: the verdict against the reference, the per-variant quality and cost tables and the
compute-matched comparison. Each section is a function returning
blocks; the figures come from ``harness.report.statistics``, computed once for all of them.

Only trials not flagged untrained in Training health take part (``StudyData.per_variant``); a note beside each
table names the ones left out and the collapsed ones kept in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from harness.report.blocks import MISSING, Block, Figure, Heading, Para, Table, fmt, fmt_count, fmt_duration
from harness.report.decisions import coverage, interval_text
from harness.report.gather import StudyData, is_routed, load_cv, metric_values, peak_memory, with_flops
from harness.report.overview import figure_section, flag_note
from harness.report.statistics import Against, BackboneTests, Summary, matched_points, summarise

LOWER, HIGHER = "lower", "higher"
VERDICT_HEADING = "Verdict against the reference"
Tests = dict[str, BackboneTests]  # by backbone: every backbone with a finished trial


def mean_sd(s: Summary, digits: int = 2) -> str:
    if s.n == 0:
        return MISSING
    return fmt(s.mean, digits) if s.n < 2 else f"{fmt(s.mean, digits)} ± {fmt(s.sd, digits)}"


def ci(s: Summary, digits: int = 2) -> str:
    return MISSING if s.n < 2 else f"[{fmt(s.ci_low, digits)}, {fmt(s.ci_high, digits)}]"


def best_rows(table_rows: list[list[float]], column: int, direction: str) -> set[int]:
    values = [(r[column], i) for i, r in enumerate(table_rows) if r[column] is not None and math.isfinite(r[column])]
    if len(values) < 2:
        return set()
    target = min(v for v, _ in values) if direction == LOWER else max(v for v, _ in values)
    return {i for v, i in values if v == target}


def _where(data: StudyData, backbone: str) -> str:
    return f" ({backbone} backbone)" if len(data.backbones) > 1 else ""


# ---------------------------------------------------------------- verdict


def _time_text(a: Against) -> str:
    if a.time is None:
        return "not measured"
    interval = a.time.interval
    within = f"{fmt(interval.low, 3)}–{fmt(interval.high, 3)}" if interval.bounded else "unbounded"
    return f"{fmt(a.time.ratio, 3)} ({within})"


def _margin_text(a: Against) -> str:
    look = a.look
    if look is None:
        return MISSING
    return f"{fmt(look.ratio, 3)} ({interval_text(look.margin, look.one_sided_bound)})"


def _verdict_row(a: Against) -> list[str]:
    return [
        a.variant,
        fmt(a.params_ratio, 3),
        _margin_text(a),
        a.words,
        _time_text(a),
        f"{a.smaller} / {a.no_loss} / {a.faster}",
        f"**{a.answer}**",
    ]


def verdict_section(data: StudyData, tests: Tests, figures: list[Figure] | None = None) -> list[Block]:
    """Does each variant reach a smaller parameter count without significant loss in perplexity against the
    reference, at a lower time per million tokens? (The question the project was built to answer.)"""
    blocks: list[Block] = [Heading(VERDICT_HEADING)]
    study = data.design
    _, margin_label = coverage(study)
    for backbone, found in tests.items():
        where = _where(data, backbone)
        if not found.against:
            blocks.append(Para(f"Fewer than two variants to compare{where}."))
            continue
        reference, m = found.reference, study.margin
        header = ["Variant", "Params ratio", "Test PPL ratio (margin interval)", "Test PPL decisions"]
        header += ["Time / token ratio (paired)", "Smaller / no loss / faster", "Answer"]
        rows = [_verdict_row(a) for a in found.against.values()]
        caption = (
            f"Does the variant reach a smaller parameter count without significant loss in perplexity "
            f"against {reference}{where}, at a lower time per million tokens? Test PPL ratio: variant / {reference}, "
            f"geometric mean over the paired seeds of the deciding look, with the {margin_label}. Decisions: the "
            f"design's (section *Design and decisions*). Smaller: at most {1 - study.min_param_reduction:.2f}× "
            f"the parameters (design.min_param_reduction). No loss: non-inferior at the {m:.0%} margin (yes), "
            f"inferior beyond it (no). Faster: the paired time ratio's interval below "
            f"{1 - study.min_speedup:.2f} (yes, design.min_speedup) or its lower end above it (no); "
            f"{_speed_method(data)} Answer: yes when smaller, no loss and faster are all yes, no when any is no."
        )
        blocks += [Table(header, rows, caption=caption), *flag_note(data, backbone, "this verdict")]
    return blocks + figure_section(figures or [], "verdict")


def _speed_method(data: StudyData) -> str:
    record = data.speed
    if record is None:
        return "no paired speed measurement was recorded, so faster is undecided."
    return (
        f"time measured after the study in one process ({record['device']}, {record['threads']} thread(s)): every "
        f"variant's training steps in blocks of {record['steps']} interleaved over {record['rounds']} rounds "
        "(harness/speed.py), so the machine's drift falls on every variant alike; interval at the margin "
        "interval's level."
    )


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
        val, test = summarise(metric_values(runs, "final_val_ppl")), summarise(metric_values(runs, "test_ppl"))
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
            means.append(summarise(values).mean if values else math.nan)
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
        by_time = summarise([at_time.get(run_id, math.nan) for run_id in runs["run_id"]])
        by_flops = summarise([at_flops.get(run_id, math.nan) for run_id in runs["run_id"]])
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
