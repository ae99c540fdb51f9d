"""Statistics over seeds: mean ± sd with a t-based 95% interval, and each variant against the baseline.

The comparison is a paired t-test on the per-seed differences when both variants ran on at least two
common seeds (effect size: paired Cohen's d_z = mean difference / sd of differences); otherwise
Welch's unequal-variance t-test on the two groups (effect size: Cohen's d with the pooled sd).
With fewer than two values on either side no test is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


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
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
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


def compare(baseline: Mapping[str, float], variant: Mapping[str, float]) -> Comparison | None:
    """``variant`` against ``baseline``, each a {seed: value} map; None when there is too little data."""
    base = {k: v for k, v in baseline.items() if v is not None and math.isfinite(v)}
    other = {k: v for k, v in variant.items() if v is not None and math.isfinite(v)}
    common = sorted(set(base) & set(other))
    if len(common) >= 2:
        diff = np.array([other[s] - base[s] for s in common])
        sd = float(diff.std(ddof=1))
        if sd == 0.0:
            p, t = (1.0, 0.0) if diff.mean() == 0 else (0.0, math.copysign(math.inf, diff.mean()))
            effect = 0.0 if diff.mean() == 0 else math.copysign(math.inf, diff.mean())
        else:
            result = stats.ttest_rel([other[s] for s in common], [base[s] for s in common])
            t, p, effect = float(result.statistic), float(result.pvalue), float(diff.mean()) / sd
        return Comparison("paired t-test", len(common), float(diff.mean()), t, p, effect, "d_z")
    a, b = np.array(list(base.values())), np.array(list(other.values()))
    if len(a) < 2 or len(b) < 2:
        return None
    result = stats.ttest_ind(b, a, equal_var=False)
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    difference = float(b.mean() - a.mean())
    effect = difference / pooled if pooled > 0 else math.copysign(math.inf, difference) if difference else 0.0
    return Comparison(
        "Welch's t-test",
        min(len(a), len(b)),
        difference,
        float(result.statistic),
        float(result.pvalue),
        effect,
        "d",
    )
