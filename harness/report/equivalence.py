"""The claims beyond "different": equivalence (TOST), Holm-adjusted p-values and the seeds a test would need.

All figures come from statsmodels, the well-kept implementation, never a hand-written test:

- TOST (Schuirmann's two one-sided tests) on the log perplexity (= the loss), so a relative PPL margin ``m``
  is the symmetric interval ±log(1 + m) on the loss difference; ``ttost_paired`` on per-seed differences when
  both variants ran at least two common seeds, ``ttost_ind`` (Welch's unequal variances) otherwise.
- Holm-Bonferroni (Holm 1979) across the variants compared, via ``multipletests(method="holm")``.
- Seeds for 80% power at the observed effect size: ``TTestPower`` (paired, d_z) or ``TTestIndPower`` (d).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from harness.report.significance import ALPHA, Comparison

MAX_SEEDS = 1_000_000
POWER = 0.8


@dataclass(frozen=True)
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
    statsmodels returns nan for the whole power (d_z = 5.44: nan at n = 2, 4, 5, 7, ...)."""
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
