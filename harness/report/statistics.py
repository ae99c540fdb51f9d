"""The report's statistics, each computed once: the sections and ``verdicts.json`` read them from here.

- Per variant over seeds: mean ± sd with the 95% t interval of the mean (scipy ``t.interval``).
- Each variant against the reference on final test perplexity: a paired t-test on the per-seed differences when
  both ran at least two common seeds (effect size d_z = mean difference / sd of differences), Welch's t-test
  otherwise (Cohen's d with the pooled sd); no test with fewer than two values on either side.
- Equivalence: TOST (Schuirmann's two one-sided tests, statsmodels ``ttost_paired`` / ``ttost_ind``) on the log
  perplexity (= the loss), so a relative PPL margin ``m`` is the interval ±log(1 + m) on the loss difference.
- Holm-Bonferroni (Holm 1979) across the variants compared, via statsmodels ``multipletests``.
- Seeds for 80% power at the observed effect size (statsmodels' ``TTestPower`` / ``TTestIndPower`` formula).
- Compute-matched points: each run's validation perplexity at a common training time or FLOP budget.
- The verdict's figures (parameter and time ratios) and its answers; :func:`verdicts` is the same in a form a
  program compares (``verdicts.json`` beside the report; ``make results`` fails when an answer changes).
"""
# Over 350 lines: every statistic of the report computed once, in one place, for the sections to read.

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from harness.config import reference_variant
from harness.report.gather import StudyData, by_seed, health_of
from harness.tags import SEQUENTIAL_DECISION

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1_000_000
YES, NO, UNDECIDED = "yes", "no", "undecided"


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float  # sample standard deviation (ddof=1); nan with n < 2
    ci_low: float  # 95% t interval of the mean; nan with n < 2
    ci_high: float


def describe(values: Sequence[float]) -> Summary:
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


@dataclass(frozen=True, kw_only=True)
class Comparison:
    test: str  # "paired t-test" or "Welch's t-test"
    n: int  # pairs (paired) or the smaller group size (Welch)
    difference: float  # mean(variant) - mean(baseline)
    statistic: float
    p_value: float
    effect: float
    effect_name: str  # "d_z" (paired) or "d" (Cohen's d, pooled sd)

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_value) and self.p_value < ALPHA


def _finite(values: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if v is not None and math.isfinite(v)}


def compare(baseline: Mapping[str, float], variant: Mapping[str, float]) -> Comparison | None:
    """``variant`` against ``baseline``, each a {seed: value} map; None when there is too little data."""
    base, other = _finite(baseline), _finite(variant)
    common = sorted(set(base) & set(other))
    if len(common) >= 2:
        diff = np.array([other[s] - base[s] for s in common])
        sd = float(diff.std(ddof=1))
        if sd == 0.0:  # scipy's t is nan here: a constant non-zero difference is certain
            p, t = (1.0, 0.0) if diff.mean() == 0 else (0.0, math.copysign(math.inf, diff.mean()))
            effect = 0.0 if diff.mean() == 0 else math.copysign(math.inf, diff.mean())
        else:
            result = stats.ttest_rel([other[s] for s in common], [base[s] for s in common])
            t, p, effect = float(result.statistic), float(result.pvalue), float(diff.mean()) / sd
        return Comparison(
            test="paired t-test",
            n=len(common),
            difference=float(diff.mean()),
            statistic=t,
            p_value=p,
            effect=effect,
            effect_name="d_z",
        )
    a, b = np.array(list(base.values())), np.array(list(other.values()))
    if len(a) < 2 or len(b) < 2:
        return None
    result = stats.ttest_ind(b, a, equal_var=False)
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    difference = float(b.mean() - a.mean())
    effect = difference / pooled if pooled > 0 else math.copysign(math.inf, difference) if difference else 0.0
    return Comparison(
        test="Welch's t-test",
        n=min(len(a), len(b)),
        difference=difference,
        statistic=float(result.statistic),
        p_value=float(result.pvalue),
        effect=effect,
        effect_name="d",
    )


@dataclass(frozen=True, kw_only=True)
class Ratio:
    """The geometric-mean ratio variant / baseline of a positive figure (PPL, time per token) over seeds."""

    paired: bool  # per-seed pairs (both ran at least two common seeds), else two independent groups
    n: int  # pairs (paired) or the smaller group size
    ratio: float  # exp(mean log difference)
    low: float  # 95% confidence interval: exp of the t interval of the mean log difference
    high: float
    logs: tuple[np.ndarray, np.ndarray]  # the variant's and the baseline's log values (pairs in seed order)


@dataclass(frozen=True)
class Equivalence:
    test: str  # "paired TOST" or "Welch TOST"
    ratio: Ratio  # PPL ratio variant / baseline with its 95% interval
    margin: float  # relative PPL margin: equivalent when the ratio lies within [1/(1+m), 1+m]
    p_value: float  # the larger of the two one-sided p-values

    @property
    def equivalent(self) -> bool:
        return math.isfinite(self.p_value) and self.p_value < ALPHA


def _finite_logs(values: Mapping[str, float]) -> dict[str, float]:
    return {k: math.log(v) for k, v in values.items() if v is not None and math.isfinite(v) and v > 0}


def ratio(baseline: Mapping[str, float], variant: Mapping[str, float]) -> Ratio | None:
    """``variant`` / ``baseline`` ({seed: value} maps) on the log scale: paired by seed where at least two seeds
    are common (scipy ``ttest_rel``'s interval), Welch's unpooled interval (``ttest_ind``) otherwise; None: too
    few values."""
    base, other = _finite_logs(baseline), _finite_logs(variant)
    common = sorted(set(base) & set(other))
    if len(common) >= 2:
        x1, x2 = np.array([other[s] for s in common]), np.array([base[s] for s in common])
        interval = stats.ttest_rel(x1, x2).confidence_interval(1 - ALPHA)
        paired, n = True, len(common)
    elif len(base) >= 2 and len(other) >= 2:
        x1, x2 = np.array(list(other.values())), np.array(list(base.values()))
        interval = stats.ttest_ind(x1, x2, equal_var=False).confidence_interval(1 - ALPHA)
        paired, n = False, min(len(x1), len(x2))
    else:
        return None
    low, high = (math.exp(float(end)) if math.isfinite(end) else math.nan for end in interval)
    return Ratio(paired=paired, n=n, ratio=math.exp(float(x1.mean() - x2.mean())), low=low, high=high, logs=(x1, x2))


def tost(baseline: Mapping[str, float], variant: Mapping[str, float], margin: float) -> Equivalence | None:
    """Is ``variant``'s PPL within ``margin`` (relative) of ``baseline``'s? Each a {seed: PPL} map; None: too few."""
    found = ratio(baseline, variant)
    if found is None:
        return None
    bound, (x1, x2) = math.log1p(margin), found.logs
    if found.paired:
        return Equivalence("paired TOST", found, margin, float(ttost_paired(x1, x2, -bound, bound)[0]))
    p_value = ttost_ind(x1, x2, -bound, bound, usevar="unequal")[0]
    return Equivalence("Welch TOST", found, margin, float(p_value))


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values of one family of tests; non-finite p-values stay out of the family."""
    tested = {k: p for k, p in p_values.items() if p is not None and math.isfinite(p)}
    if not tested:
        return dict.fromkeys(p_values, math.nan)
    adjusted = dict(zip(tested, multipletests(list(tested.values()), alpha=ALPHA, method="holm")[1], strict=True))
    return {k: float(adjusted.get(k, math.nan)) for k in p_values}


def t_test_power(effect: float, n: int, paired: bool) -> float:
    """Power of a two-sided t-test at ``ALPHA`` with n pairs (paired) or n runs per group: statsmodels'
    ``TTestPower`` / ``TTestIndPower`` formula (both tails of the noncentral t), except that a lower tail scipy
    cannot evaluate (``nct.cdf`` returns nan where it underflows, for large effects) counts as 0, where
    statsmodels returns nan for the whole power."""
    df, noncentrality = (n - 1, effect * math.sqrt(n)) if paired else (2 * n - 2, effect * math.sqrt(n / 2))
    critical = stats.t.isf(ALPHA / 2, df)
    lower = stats.nct.cdf(-critical, df, noncentrality)
    return float(stats.nct.sf(critical, df, noncentrality) + (lower if math.isfinite(lower) else 0.0))


def seeds_for_power(result: Comparison, power: float = POWER) -> float:
    """Seeds (pairs, or runs per variant) a two-sided t-test needs to detect the observed effect: the smallest
    whole n whose power reaches ``power`` (doubling, then bisection: power grows with n); nan if none up to
    ``MAX_SEEDS``. Not statsmodels' ``solve_power``: its root finder fails on the nan powers above."""
    effect = abs(result.effect)
    if not math.isfinite(effect) or effect == 0.0:
        return math.nan
    paired = result.effect_name == "d_z"
    low, high = 1, 2  # a t-test needs two observations (per group)
    while t_test_power(effect, high, paired) < power:
        low, high = high, 2 * high
        if high > MAX_SEEDS:
            return math.nan
    while high - low > 1:  # enough at high, not at low
        middle = (low + high) // 2
        low, high = (low, middle) if t_test_power(effect, middle, paired) >= power else (middle, high)
    return float(high)


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
    """One variant against the reference: the tests and ratios the report states, and the verdict's answers."""

    variant: str
    difference: Comparison | None  # t-test on final test PPL
    difference_p_holm: float
    seeds_for_power: float  # seeds the t-test would need for 80% power at the observed effect
    equivalence: Equivalence | None  # TOST on the log test PPL at the study's margin
    equivalence_p_holm: float
    params_ratio: float  # mean total parameters, variant / reference
    time: Ratio | None  # time per Mtok, variant / reference

    @property
    def equivalent(self) -> bool:
        """Within the margin: the Holm-adjusted TOST p below ``ALPHA``."""
        return self.equivalence is not None and self.equivalence_p_holm < ALPHA

    @property
    def worse(self) -> str:
        """Test PPL significantly higher (Holm-adjusted): a loss can be real yet inside the margin."""
        if self.difference is None:
            return UNDECIDED
        return YES if self.difference_p_holm < ALPHA and self.difference.difference > 0 else NO

    @property
    def no_loss(self) -> str:
        """Equivalent within the margin (yes); significantly worse and not equivalent (no)."""
        return YES if self.equivalent else NO if self.worse == YES else UNDECIDED

    @property
    def faster(self) -> str:
        """Time per Mtok lower: its 95% interval below 1 (yes), above 1 (no)."""
        if self.time is None:
            return UNDECIDED
        return YES if self.time.high < 1 else NO if self.time.low > 1 else UNDECIDED

    @property
    def smaller(self) -> str:
        """Fewer parameters in total."""
        return UNDECIDED if not math.isfinite(self.params_ratio) else YES if self.params_ratio < 1 else NO

    @property
    def answer(self) -> str:
        parts = (self.smaller, self.no_loss, self.faster)
        return NO if NO in parts else YES if all(part == YES for part in parts) else UNDECIDED


@dataclass(frozen=True, kw_only=True)
class BackboneTests:
    """One backbone's variants (trials not flagged untrained) and each one against the reference."""

    backbone: str
    groups: dict[str, pd.DataFrame]  # variant -> its runs, in report order
    reference: str | None
    against: dict[str, Against]  # every other variant, in report order; empty with fewer than two variants


def _mean(runs: pd.DataFrame, metric: str) -> float:
    values = list(by_seed(runs, metric).values())
    return sum(values) / len(values) if values else math.nan


def against_reference(data: StudyData, backbone: str) -> BackboneTests:
    """Every test of ``backbone``'s variants against its reference, Holm-adjusted within the backbone."""
    groups = dict(data.per_variant(backbone))
    reference = reference_variant(list(groups), data.reference)
    if reference is None or len(groups) < 2:
        return BackboneTests(backbone=backbone, groups=groups, reference=reference, against={})
    base = groups[reference]
    others = {v: runs for v, runs in groups.items() if v != reference}
    base_ppl = by_seed(base, "test_ppl")
    differences = {v: compare(base_ppl, by_seed(runs, "test_ppl")) for v, runs in others.items()}
    equivalences = {v: tost(base_ppl, by_seed(runs, "test_ppl"), data.equivalence_margin) for v, runs in others.items()}
    different = holm({v: d.p_value if d else math.nan for v, d in differences.items()})
    equivalent = holm({v: e.p_value if e else math.nan for v, e in equivalences.items()})
    against = {
        variant: Against(
            variant=variant,
            difference=differences[variant],
            difference_p_holm=different[variant],
            seeds_for_power=seeds_for_power(differences[variant]) if differences[variant] else math.nan,
            equivalence=equivalences[variant],
            equivalence_p_holm=equivalent[variant],
            params_ratio=_mean(runs, "params_total") / _mean(base, "params_total"),
            time=ratio(by_seed(base, "time_per_mtok_s"), by_seed(runs, "time_per_mtok_s")),
        )
        for variant, runs in others.items()
    }
    return BackboneTests(backbone=backbone, groups=groups, reference=reference, against=against)


def analyse(data: StudyData) -> dict[str, BackboneTests]:
    """The tests of every backbone with a finished trial, by backbone."""
    return {backbone: against_reference(data, backbone) for backbone in data.finished_backbones}


def verdicts(data: StudyData, tests: dict[str, BackboneTests]) -> dict[str, Any]:
    """The report's decisions in a form a program compares: every trial's health, and per backbone and variant
    the answers (not the figures, which move with the machine's speed and the seeds' noise)."""
    health = {
        f"{run['tags.variant']} seed {run['tags.seed']} ({run['tags.backbone']})": health_of(run)
        for _, run in data.finished.iterrows()
    }
    decided = {
        backbone: {
            "reference": found.reference,
            "variants": {
                a.variant: {
                    "smaller": a.smaller,
                    "no_loss": a.no_loss,
                    "worse": a.worse,
                    "faster": a.faster,
                    "answer": a.answer,
                }
                for a in found.against.values()
            },
        }
        for backbone, found in tests.items()
    }
    sequential = {"sequential": data.tag(SEQUENTIAL_DECISION)} if data.tag(SEQUENTIAL_DECISION) else {}
    return {"margin": data.equivalence_margin, "health": health, "answers": decided} | sequential
