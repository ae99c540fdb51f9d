"""The main comparison: per-variant quality and cost tables, and each variant tested against the reference."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pandas as pd

from harness.report.blocks import Block, Heading, Para, Table
from harness.report.equivalence import holm, seeds_for_power
from harness.report.formatting import MISSING, ci, fmt, fmt_count, mean_sd, p_text
from harness.report.gather import BASELINE, StudyData
from harness.report.health import flag_note
from harness.report.significance import ALPHA, Comparison, compare, describe

LOWER, HIGHER = "lower", "higher"


def main_comparison(data: StudyData) -> list[Block]:
    several = len(data.backbones) > 1
    blocks: list[Block] = [Heading("Main comparison")]
    if data.finished.empty:
        blocks.append(Para("No trial finished, so there is nothing to compare."))
    for backbone in finished_backbones(data):
        if several:
            blocks.append(Heading(f"Backbone: {backbone}", 3))
        blocks.extend([quality_table(data, backbone), cost_table(data, backbone)])
        blocks.extend(flag_note(data, backbone, "these tables and their rankings"))
    return blocks


def significance_section(data: StudyData) -> list[Block]:
    several = len(data.backbones) > 1
    blocks: list[Block] = [Heading("Significance")]
    for backbone in finished_backbones(data):
        blocks.extend(significance(data, backbone, several))
        blocks.extend(flag_note(data, backbone, "these tests"))
    return blocks


def finished_backbones(data: StudyData) -> list[str]:
    return [b for b in data.backbones if not data.finished[data.finished["tags.backbone"] == b].empty]


def _metric(rows: pd.DataFrame, name: str) -> list[float]:
    column = f"metrics.{name}"
    return rows[column].dropna().astype(float).tolist() if column in rows else []


def load_cv(rows: pd.DataFrame) -> list[float]:
    """Per run: the validation load CV averaged over MoE layers (util_val_cv_l<layer>)."""
    columns = [c for c in rows.columns if re.fullmatch(r"metrics\.util_val_cv_l\d+", c)]
    if not columns:
        return []
    return rows[columns].mean(axis=1, skipna=True).dropna().tolist()


def peak_memory(data: StudyData) -> tuple[str, str]:
    runs = data.finished
    if "metrics.gpu_mem_peak_nvml_mb" in runs and runs["metrics.gpu_mem_peak_nvml_mb"].notna().any():
        return "gpu_mem_peak_nvml_mb", "Peak GPU mem (MB)"
    return "peak_rss_mb", "Peak RSS (MB)"


def best_rows(table_rows: list[list[float]], column: int, direction: str) -> set[int]:
    values = [(r[column], i) for i, r in enumerate(table_rows) if r[column] is not None and math.isfinite(r[column])]
    if len(values) < 2:
        return set()
    target = min(v for v, _ in values) if direction == LOWER else max(v for v, _ in values)
    return {i for v, i in values if v == target}


def quality_table(data: StudyData, backbone: str) -> Table:
    header = ["Variant", "n", "Val PPL (mean ± sd)", "Val PPL 95% CI", "Test PPL (mean ± sd)", "Test PPL 95% CI"]
    rows, raw = [], []
    for variant, runs in data.per_variant(backbone):
        val, test = describe(_metric(runs, "final_val_ppl")), describe(_metric(runs, "test_ppl"))
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
    memory_metric, memory_label = peak_memory(data)
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


def cost_table(data: StudyData, backbone: str) -> Table:
    columns = _cost_columns(data)
    rows, raw = [], []
    for variant, runs in data.per_variant(backbone):
        means = []
        for _, metric, _, _ in columns:
            values = load_cv(runs) if metric is None else _metric(runs, metric)
            means.append(describe(values).mean if values else math.nan)
        if not _routed(runs):  # dense or plain: no router, so no aux loss and no load to balance
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


def _routed(runs: pd.DataFrame) -> bool:
    """Whether the variant's model has an MoE layer (its ``model.ffn`` param; older stores: not dense)."""
    if "params.model.ffn" in runs and runs["params.model.ffn"].notna().any():
        return bool((runs["params.model.ffn"] == "moe").any())
    return runs["tags.variant"].iloc[0] != "dense"


def reference_variant(variants: list[str], preferred: str | None = None) -> str | None:
    """The spec's ``report.reference`` when it ran, else ``baseline``, else the first variant."""
    for name in (preferred, BASELINE):
        if name is not None and name in variants:
            return name
    return variants[0] if variants else None


def by_seed(runs: pd.DataFrame, metric: str) -> dict[str, float]:
    """{seed: value} of a summary metric; empty where the runs did not log it (an older store)."""
    column = f"metrics.{metric}"
    if column not in runs:
        return {}
    return {str(s): float(v) for s, v in zip(runs["tags.seed"], runs[column], strict=True) if pd.notna(v)}


def test_ppl_by_seed(runs: pd.DataFrame) -> dict[str, float]:
    return by_seed(runs, "test_ppl")


def significance(data: StudyData, backbone: str, several: bool) -> list[Block]:
    """The significance table and its statement for one backbone, or why no test can be made."""
    groups = dict(data.per_variant(backbone))
    reference = reference_variant(list(groups), data.reference)
    where = f" ({backbone} backbone)" if several else ""
    planned = data.runs[data.runs["tags.backbone"] == backbone]["tags.seed"].nunique()
    max_seeds = max((len(runs) for runs in groups.values()), default=0)
    if planned < 2 or max_seeds < 2:
        seeds = "a single seed" if planned < 2 else "a single finished seed"
        return [
            Para(
                f"Each variant{where} has {seeds}, so **no significance can be claimed**: the differences in the "
                "tables are single observations with no estimate of seed-to-seed variation. Run at least two seeds "
                "(three or more for useful power) to test them."
            )
        ]
    if reference is None or len(groups) < 2:
        return [Para(f"Only one variant finished (and was not flagged){where}: there is nothing to compare.")]
    base = test_ppl_by_seed(groups[reference])
    results = {v: compare(base, test_ppl_by_seed(runs)) for v, runs in groups.items() if v != reference}
    adjusted = holm({v: r.p_value if r else math.nan for v, r in results.items()})
    rows = [_significance_row(v, result, len(groups[v]), adjusted[v]) for v, result in results.items()]
    table = Table(
        ["Variant", "Test", "n", f"Δ test PPL vs {reference}", "t", "p", "Effect size", "p (Holm)", "Seeds, 80% power"],
        rows,
        caption=f"Each variant against {reference} on final test perplexity. Paired t-test on per-seed "
        "differences when both ran the same seeds (effect size d_z = mean difference / sd of differences); "
        "Welch's t-test otherwise (effect size Cohen's d with pooled sd). Two-sided; p (Holm): Holm-Bonferroni "
        "adjusted across the variants listed. Seeds, 80% power: seeds (pairs, or runs per variant) a test at the "
        "5% level needs to detect the observed effect size with 80% power (noncentral t, as statsmodels TTestPower).",
    )
    statement = Para(_significance_statement(results, reference, where, max_seeds))
    return [table, statement]


def _significance_row(variant: str, result: Comparison | None, n_runs: int, adjusted: float) -> list[str]:
    if result is None:
        return [variant, MISSING, str(n_runs), *[MISSING] * 6]
    seeds = seeds_for_power(result)
    return [
        variant,
        result.test,
        str(result.n),
        f"{result.difference:+,.2f}",
        fmt(result.statistic, 2),
        p_text(result.p_value),
        f"{result.effect_name} = {fmt(result.effect, 2)}",
        p_text(adjusted) if math.isfinite(adjusted) else MISSING,
        fmt_count(seeds),
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
