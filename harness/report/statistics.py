"""The report's statistics, each computed once: the sections and ``verdicts.json`` read them from here.

- Per variant over seeds: mean ± sd with the 95% t interval of the mean (scipy ``t.interval``), descriptive.
- Each variant against the reference: the study's design decides each question it asks (difference,
  non-inferiority, equivalence) on the paired per-seed test log-PPL, read off repeated confidence intervals at the
  per-comparison level (Bonferroni across comparisons): :mod:`harness.sequential` and :mod:`harness.study.rounds`, the
  same code the runner used to choose its rounds. A fixed design is one look at the healthy paired seeds.
- The founding question's other two parts: the parameter ratio against ``design.min_param_reduction``, and the
  paired time ratio (:mod:`harness.speed`) against ``design.min_speedup``.
- Compute-matched points: each run's validation perplexity at a common training time or FLOP budget.
- :func:`verdicts`: every decision in a form a program compares (``verdicts.json``; ``make results``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from harness.config import Question
from harness.report.gather import StudyData, by_seed, health_of
from harness.sequential import UNDECIDED, Look, verdict_words
from harness.speed import TimeRatio, time_ratio
from harness.study.rounds import OPEN, Comparison, Plan, Result, StudyDesign, recorded_result
from harness.tags import COMMAND, HEALTH

ALPHA = 0.05
YES, NO = "yes", "no"


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float  # sample standard deviation (ddof=1); nan with n < 2
    ci_low: float  # 95% t interval of the mean; nan with n < 2
    ci_high: float


def summarise(values: Sequence[float]) -> Summary:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    if sd == 0.0:  # scipy takes no zero scale: identical values have a point interval
        return Summary(n, mean, sd, mean, mean)
    low, high = stats.t.interval(1 - ALPHA, n - 1, loc=mean, scale=stats.sem(x))
    return Summary(n, mean, sd, float(low), float(high))


def ppl_at(x: np.ndarray, ppl: np.ndarray, at: float) -> float:
    """Perplexity at ``x = at``, interpolated linearly in log perplexity; nan outside the curve's range."""
    order = np.argsort(x)
    x, log_ppl = np.asarray(x, dtype=float)[order], np.log(np.asarray(ppl, dtype=float)[order])
    if len(x) == 0 or not x[0] <= at <= x[-1]:
        return math.nan
    return float(np.exp(np.interp(at, x, log_ppl)))


def matched_points(curves: pd.DataFrame, axis: str) -> tuple[float, dict[str, float]]:
    """The common budget on ``axis`` (the smallest run total: the largest every run reached) and each run's val
    PPL there, by run_id."""
    curves = curves.dropna(subset=[axis])
    if curves.empty:
        return math.nan, {}
    budget = float(curves.groupby("run_id")[axis].max().min())
    return budget, {
        run_id: ppl_at(rows[axis].to_numpy(), rows["val_ppl"].to_numpy(), budget)
        for run_id, rows in curves.groupby("run_id")
    }


@dataclass(frozen=True, kw_only=True)
class Against:
    """One variant against the reference: the design's decisions on test PPL, the parameter and paired time ratios,
    and the founding question's answer read off them."""

    variant: str
    comparison: Comparison  # the design's looks and question outcomes (harness.study.rounds)
    design: StudyDesign
    params_ratio: float  # mean total parameters, variant / reference
    time: TimeRatio | None  # paired speed measurement (harness.speed); None: not measured

    @property
    def look(self) -> Look | None:
        """The last look: the estimate and intervals the decisions were read off."""
        return self.comparison.last

    def decision(self, question: Question) -> str:
        """The question's outcome; ``open`` while undecided and the study may still take a look."""
        outcome = self.comparison.outcomes[question]
        return OPEN if outcome.at is None and self.comparison.open else outcome.decision

    @property
    def no_loss(self) -> str:
        """The founding question's "without significant loss": non-inferior at the margin (yes), inferior (no);
        a design that asks only equivalence reads it off equivalence."""
        question = "non_inferiority" if "non_inferiority" in self.design.questions else "equivalence"
        if question not in self.design.questions:
            return UNDECIDED
        decision = self.comparison.outcomes[question].decision  # type: ignore[index]  # a Question
        return YES if decision in ("non-inferior", "equivalent") else UNDECIDED if decision == UNDECIDED else NO

    @property
    def faster(self) -> str:
        """Time per token at least ``min_speedup`` lower: the paired interval's upper end below 1 - min_speedup
        (yes), its lower end above it (no)."""
        if self.time is None:
            return UNDECIDED
        threshold = 1 - self.design.min_speedup
        interval = self.time.interval
        return YES if interval.high < threshold else NO if interval.bounded and interval.low > threshold else UNDECIDED

    @property
    def smaller(self) -> str:
        """At most (1 - min_param_reduction) times the reference's parameters."""
        if not math.isfinite(self.params_ratio):
            return UNDECIDED
        return YES if self.params_ratio <= 1 - self.design.min_param_reduction else NO

    @property
    def answer(self) -> str:
        parts = (self.smaller, self.no_loss, self.faster)
        return NO if NO in parts else YES if all(part == YES for part in parts) else UNDECIDED

    @property
    def words(self) -> str:
        """The PPL decisions as a sentence fragment ("worse by 2.1%, within the 5% margin")."""
        if self.look is None:
            return "no look yet" if self.comparison.open else "too few healthy paired seeds"
        found = verdict_words(self.comparison.outcomes, self.look.ratio, self.design.margin)
        return f"{found} (open: more seeds to come)" if self.comparison.open else found


@dataclass(frozen=True, kw_only=True)
class BackboneTests:
    """One backbone's variants (trials not flagged untrained) and each one against the reference."""

    backbone: str
    groups: dict[str, pd.DataFrame]  # variant -> its runs, in report order
    reference: str | None
    against: dict[str, Against]  # every other variant, in report order; empty with fewer than two variants
    plan: Plan | None = None  # the design's plan from this backbone's results (None: nothing to compare)


def _mean(runs: pd.DataFrame, metric: str) -> float:
    values = list(by_seed(runs, metric).values())
    return sum(values) / len(values) if values else math.nan


def results_of(runs: pd.DataFrame) -> dict[tuple[str, int], Result]:
    """(variant, seed) -> :func:`~harness.study.rounds.recorded_result` of each ended trial, as the driver counts."""
    results: dict[tuple[str, int], Result] = {}
    for _, run in runs.iterrows():
        if run["status"] in ("FINISHED", "FAILED") and str(run["tags.seed"]).isdigit():
            result = recorded_result(run["status"], run.get(f"tags.{HEALTH}"), run.get("metrics.test_loss"))
            results[(run["tags.variant"], int(run["tags.seed"]))] = result
    return results


def against_reference(data: StudyData, backbone: str) -> BackboneTests:
    """Every comparison of ``backbone``'s variants with the reference, decided by the study's design."""
    groups = dict(data.per_variant(backbone))
    study = data.design
    reference = study.reference if study.reference in groups else None
    if reference is None or len(groups) < 2:
        return BackboneTests(backbone=backbone, groups=groups, reference=reference, against={})
    plan = study.plan(results_of(data.runs[data.runs["tags.backbone"] == backbone]))
    comparisons = {c.variant: c for c in plan.comparisons}
    base = groups[reference]
    level = study.comparison_design((2,)).margin_level  # one-sided at the comparison's alpha, like "no loss"
    against = {
        variant: Against(
            variant=variant,
            comparison=comparisons[variant],
            design=study,
            params_ratio=_mean(runs, "params_total") / _mean(base, "params_total"),
            time=time_ratio(data.speed, variant, reference, level) if data.speed else None,
        )
        for variant, runs in groups.items()
        if variant in comparisons
    }
    return BackboneTests(backbone=backbone, groups=groups, reference=reference, against=against, plan=plan)


def analyse(data: StudyData) -> dict[str, BackboneTests]:
    """The decisions of every backbone with a finished trial, by backbone."""
    return {backbone: against_reference(data, backbone) for backbone in data.finished_backbones}


def verdicts(data: StudyData, tests: dict[str, BackboneTests]) -> dict[str, Any]:
    """The report's decisions in a form a program compares: the design, where and how the result was made, every
    trial's health and exact test loss, and per backbone and variant each decision (``make results`` compares
    the decisions, and the trial figures where commit and threads are the same)."""
    trials = {
        f"{run['tags.variant']} seed {run['tags.seed']} ({run['tags.backbone']})": {
            "health": health_of(run),
            "test_loss": finite_or_none(run.get("metrics.test_loss")),
            "commit": run.get("tags.git_commit"),
            "device": run.get("tags.device"),
        }
        for _, run in data.finished.iterrows()
    }
    decided = {
        backbone: {
            "reference": found.reference,
            "variants": {
                a.variant: {
                    **{q: a.comparison.question_tag(q) for q in data.design.questions},
                    "smaller": a.smaller,
                    "no_loss": a.no_loss,
                    "faster": a.faster,
                    "answer": a.answer,
                }
                for a in found.against.values()
            },
        }
        for backbone, found in tests.items()
    }
    return {
        "design": asdict(data.design),
        "commits": data.commits,
        "command": data.tag(COMMAND),
        "complete": data.complete,
        "health": {trial: figures["health"] for trial, figures in trials.items()},
        "trials": trials,
        "answers": decided,
    }


def finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
