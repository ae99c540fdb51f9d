"""The study's answer to its question: each variant against the reference on size, quality and speed.

The founding question (from the methodology the project was built from): does a variant reach a smaller
parameter count *without significant loss in perplexity* against the reference, at a lower time per million
tokens? Per variant, from its trials not flagged in Training health: the parameter ratio; the test-PPL ratio
with its 95% interval and the Holm-adjusted TOST p at the spec's margin (``report.equivalence_margin``); the
time-per-Mtok ratio with its 95% interval; and the three answers. :func:`verdicts` is the same in a form a
program compares (``verdicts.json`` beside the report; ``make results`` reruns a committed study and fails
when an answer changes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness.report.blocks import Block, Heading, Para, Table
from harness.report.comparison import by_seed, finished_backbones, reference_variant, test_ppl_by_seed
from harness.report.equivalence import Equivalence, Ratio, holm, ratio, tost
from harness.report.formatting import MISSING, fmt, p_text
from harness.report.gather import StudyData
from harness.report.health import flag_note, verdict
from harness.report.significance import ALPHA, compare

YES, NO, UNDECIDED = "yes", "no", "undecided"


@dataclass(frozen=True)
class Answer:
    """One variant's answers against the reference (``yes``, ``no`` or ``undecided``) and the figures behind them."""

    variant: str
    smaller: str  # fewer parameters in total
    no_loss: str  # test PPL equivalent within the margin (yes); significantly higher and not equivalent (no)
    worse: str  # test PPL significantly higher (paired t-test, Holm-adjusted): a loss can be real yet in the margin
    faster: str  # time per Mtok lower (its 95% interval below 1: yes; above 1: no)
    params_ratio: float
    ppl: Equivalence | None
    ppl_p_holm: float
    time: Ratio | None

    @property
    def answer(self) -> str:
        parts = (self.smaller, self.no_loss, self.faster)
        return NO if NO in parts else YES if all(part == YES for part in parts) else UNDECIDED


def _mean(runs: pd.DataFrame, metric: str) -> float:
    values = list(by_seed(runs, metric).values())
    return sum(values) / len(values) if values else math.nan


def answers(data: StudyData, backbone: str) -> tuple[str | None, list[Answer]]:
    """The reference and every other variant's answers on ``backbone`` (healthy trials only)."""
    groups = dict(data.per_variant(backbone))
    reference = reference_variant(list(groups), data.reference)
    if reference is None or len(groups) < 2:
        return reference, []
    base = groups[reference]
    others = {v: runs for v, runs in groups.items() if v != reference}
    ppl = {
        v: tost(test_ppl_by_seed(base), test_ppl_by_seed(runs), data.equivalence_margin) for v, runs in others.items()
    }
    adjusted = holm({v: r.p_value if r else math.nan for v, r in ppl.items()})
    differences = {v: compare(test_ppl_by_seed(base), test_ppl_by_seed(runs)) for v, runs in others.items()}
    different = holm({v: d.p_value if d else math.nan for v, d in differences.items()})
    found = []
    for variant, runs in others.items():
        params = _mean(runs, "params_total") / _mean(base, "params_total")
        time = ratio(by_seed(base, "time_per_mtok_s"), by_seed(runs, "time_per_mtok_s"))
        difference = differences[variant]
        worse = (
            UNDECIDED if difference is None else YES if different[variant] < ALPHA and difference.difference > 0 else NO
        )
        if ppl[variant] is not None and adjusted[variant] < ALPHA:
            no_loss = YES
        elif worse == YES:
            no_loss = NO
        else:
            no_loss = UNDECIDED
        faster = UNDECIDED if time is None else YES if time.high < 1 else NO if time.low > 1 else UNDECIDED
        smaller = UNDECIDED if not math.isfinite(params) else YES if params < 1 else NO
        found.append(Answer(variant, smaller, no_loss, worse, faster, params, ppl[variant], adjusted[variant], time))
    return reference, found


def _interval(found: Ratio | None) -> str:
    if found is None:
        return MISSING
    return f"{fmt(found.ratio, 3)} ({fmt(found.low, 3)}–{fmt(found.high, 3)})"


def verdict_section(data: StudyData) -> list[Block]:
    blocks: list[Block] = [Heading("Verdict against the reference")]
    for backbone in finished_backbones(data):
        reference, found = answers(data, backbone)
        where = f" ({backbone} backbone)" if len(data.backbones) > 1 else ""
        if not found:
            blocks.append(Para(f"Fewer than two variants to compare{where}."))
            continue
        rows = [
            [
                a.variant,
                fmt(a.params_ratio, 3),
                _interval(a.ppl.ratio if a.ppl else None),
                p_text(a.ppl_p_holm) if math.isfinite(a.ppl_p_holm) else MISSING,
                a.worse,
                _interval(a.time),
                f"{a.smaller} / {a.no_loss} / {a.faster}",
                f"**{a.answer}**",
            ]
            for a in found
        ]
        margin = data.equivalence_margin
        blocks.append(
            Table(
                [
                    "Variant",
                    "Params ratio",
                    "Test PPL ratio (95% CI)",
                    "TOST p (Holm)",
                    "Significantly worse",
                    "Time / Mtok ratio (95% CI)",
                    "Smaller / no loss / faster",
                    "Answer",
                ],
                rows,
                caption=f"Does the variant reach a smaller parameter count without significant loss in perplexity "
                f"against {reference}{where}, at a lower time per million tokens? Ratios: variant / {reference}, "
                "geometric means over seeds, 95% intervals from the t distribution of the log difference (paired "
                f"by seed). No loss: equivalent within ±{margin:.0%} by TOST, Holm-adjusted p < {ALPHA} (yes); "
                "significantly worse and not equivalent (no); else undecided. Significantly worse: higher test PPL "
                "by the paired t-test (Welch's without common seeds), Holm-adjusted p < 0.05; it can hold inside "
                "the margin (a real but small loss). Faster: the time ratio's interval lies below 1 (yes) or above "
                "1 (no). Answer: yes when smaller, no loss and faster are all yes, no when any is no.",
            )
        )
        blocks += flag_note(data, backbone, "this verdict")
    return blocks


def verdicts(data: StudyData) -> dict[str, Any]:
    """The report's decisions in a form a program compares: every trial's health, and per backbone and variant
    the answers (not the figures, which move with the machine's speed and the seeds' noise)."""
    health = {
        f"{run['tags.variant']} seed {run['tags.seed']} ({run['tags.backbone']})": verdict(run)
        for _, run in data.finished.iterrows()
    }
    decided: dict[str, Any] = {}
    for backbone in finished_backbones(data):
        reference, found = answers(data, backbone)
        decided[backbone] = {
            "reference": reference,
            "variants": {
                a.variant: {
                    "smaller": a.smaller,
                    "no_loss": a.no_loss,
                    "worse": a.worse,
                    "faster": a.faster,
                    "answer": a.answer,
                }
                for a in found
            },
        }
    return {"margin": data.equivalence_margin, "health": health, "answers": decided}
