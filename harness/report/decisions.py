"""The "Design and decisions" section: the questions the study's design asks, and each comparison's looks, the
repeated confidence intervals and what each question read off them, rebuilt from the recorded runs the same way the
runner decided (:mod:`harness.study.rounds`)."""

from __future__ import annotations

from harness.report.blocks import Block, Bullets, Heading, Para, Table, fmt
from harness.report.gather import StudyData
from harness.report.statistics import BackboneTests, results_of
from harness.sequential import SIMULATIONS, Interval, Look
from harness.study.rounds import StudyDesign, bound_text
from harness.tags import DECISION, TRIALS_SAVED

Tests = dict[str, BackboneTests]


def coverage(study: StudyDesign) -> tuple[str, str]:
    """The two intervals' labels: the difference interval's and the margin interval's coverage, per comparison
    and family-wise (Bonferroni over the comparisons)."""
    a, k, family = study.per_comparison_alpha, study.comparisons, 1 - study.alpha
    several = f", ≥ {family:.0%} jointly over the {k} comparisons" if k > 1 else ""
    return (
        f"{1 - a:.1%} repeated interval{several}",
        f"{1 - 2 * a:.1%} repeated interval (each end {1 - a:.1%}{several.replace('jointly', 'jointly for that end')})",
    )


def design_paragraph(study: StudyDesign) -> Para:
    questions = ", ".join(q.replace("_", "-") for q in study.questions)
    difference, margin = coverage(study)
    text = (
        f"Questions asked of every variant against `{study.reference}` on the paired per-seed test log-PPL: "
        f"{questions}, margin {study.margin:.0%} (a PPL ratio of {1 + study.margin:.2f}; equivalence: "
        f"{1 / (1 + study.margin):.3f} to {1 + study.margin:.2f}). Family-wise alpha {study.alpha:g} per question, "
        f"split equally across the {study.comparisons} comparison(s) (Bonferroni). A difference is read off the "
        f"{difference}: worse when it lies above 1, better below. Non-inferiority and equivalence are read off the "
        f"{margin}: non-inferior when its upper end is below {1 + study.margin:.2f}, inferior when its lower end is "
        "above it. A question is decided at the first look whose interval decides it; an unbounded interval (a "
        "standard error of zero, or no boundary) decides nothing."
    )
    if study.sequential:
        text += (
            f" Seeds came in rounds: {study.initial} first, then one more per round for each comparison with a "
            f"question still open, up to {study.max}; boundaries from {study.spending.replace('_', '-')} alpha "
            "spending, computed for paired t statistics (harness/sequential.py). A trial flagged untrained counts "
            "as no seed and is replaced by the next seed."
        )
    else:
        text += " A fixed design: one look at the healthy paired seeds, at the t distribution's quantiles."
    return Para(text)


def decisions_section(data: StudyData, tests: Tests) -> list[Block]:
    study = data.design
    blocks: list[Block] = [Heading("Design and decisions"), design_paragraph(study)]
    for found in tests.values():
        if found.plan is not None:
            blocks.append(looks_table(found, study))
    results = results_of(data.runs)
    not_seeds = ", ".join(f"{variant} seed {seed}" for (variant, seed), result in results.items() if result is None)
    bullets = [f"**Decisions** (the study run's tag `{DECISION}`): `{data.tag(DECISION) or 'not recorded'}`"]
    if study.sequential:
        bullets.append(
            f"**Trials saved** against running {study.max} seeds for every variant: "
            f"{data.tag(TRIALS_SAVED) or 'not recorded'}"
        )
    bullets.append(
        "**Not counted as seeds** (failed, or flagged untrained in *Training health*"
        f"{'; the next seed replaced each' if study.sequential else ''}): {not_seeds or 'none'}"
    )
    return [*blocks, Bullets(bullets)]


def looks_table(found: BackboneTests, study: StudyDesign) -> Table:
    rows = []
    for a in found.against.values():
        for look in a.comparison.looks:
            decided = [f"{q.replace('_', '-')}: {look.decisions[q]}" for q in study.questions]
            rows.append([a.variant, str(look.n), fmt(look.ratio, 3), *intervals(look), "; ".join(decided)])
        if not a.comparison.looks:
            rows.append([a.variant, str(a.comparison.pairs), "–", "–", "–", "open" if a.comparison.open else "none"])
    difference, margin = coverage(study)
    header = ["variant", "paired seeds", "PPL ratio", "difference interval", "margin interval", "at this look"]
    caption = (
        f"One row per look. Difference interval: the {difference}; margin interval: the {margin}. Both cover the "
        'true ratio at every look at once, however the study stopped. "unbounded": this look\'s boundary is '
        f"none (the alpha it may spend is below one simulated study in {SIMULATIONS:,}, so no finite boundary "
        "exists) or the paired differences have no spread."
    )
    return Table(header, rows, caption=caption)


def intervals(look: Look) -> list[str]:
    return [interval_text(look.difference, look.two_sided_bound), interval_text(look.margin, look.one_sided_bound)]


WIDEST = 100.0  # an interval reaching past 1/100 or 100x the reference's PPL is shown by its boundary alone


def interval_text(interval: Interval, bound: float) -> str:
    if not interval.bounded:
        return f"unbounded (bound {bound_text(bound)})"
    if interval.high > WIDEST or interval.low < 1 / WIDEST:  # e^(19,021 se) at an early look: digits say nothing
        return f"wider than 0.01–100 (bound {fmt(bound, 0)})"
    return f"{fmt(interval.low, 3)}–{fmt(interval.high, 3)}"
