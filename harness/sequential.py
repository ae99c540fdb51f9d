"""Group-sequential boundaries and decisions for paired per-seed comparisons (Jennison & Turnbull 2000).

A sequential study looks at each comparison (a variant's per-seed log-PPL minus the reference's, paired by seed)
after every round of seeds, at sample sizes n_1 < ... < n_K, and stops it once decided. The error rates hold
because each look spends part of alpha, by a Lan-DeMets spending function of the information fraction
t_k = n_k / n_K (ch. 7):

    O'Brien-Fleming type:  alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t))
    Pocock type:           alpha(t) = alpha ln(1 + (e - 1) t)

and the boundary c_k at look k solves, under the null hypothesis,

    P(|T_1| < c_1, ..., |T_{k-1}| < c_{k-1}, |T_k| >= c_k) = alpha(t_k) - alpha(t_{k-1})          (1)

(one-sided analogue on T for each end of the one-sided questions).

Normal statistics: (Z_1, ..., Z_K) is multivariate normal with Cov(Z_i, Z_j) = sqrt(t_i / t_j), t_i <= t_j (ch. 3),
so (1) is a multivariate normal probability (scipy). :func:`constant_design` solves the classic designs with it
(Pocock c_k = C, O'Brien-Fleming c_k = C sqrt(K / k)) and reproduces the published constants.

Paired t statistics with few seeds are far from normal, so :func:`t_boundaries` solves (1) for them instead: the
joint law of (T_1, ..., T_K) under the null does not depend on the seeds' standard deviation, so it is simulated
once (a fixed seed) and c_k is the order statistic that spends exactly alpha(t_k) - alpha(t_{k-1}) among the
simulated studies still running at look k; a single look (a fixed design) takes the exact t quantile. Results are
cached in memory and on disk.

Every question a comparison asks is read off a repeated confidence interval (RCI, ch. 9) of the PPL ratio at the
level its rule needs, which covers the true ratio at every look at once, however the study stopped:

    difference (two-sided, level a):          the (1 - a) RCI   exp(mean +- c2_k se)   excludes 1
    non-inferiority at margin m (one-sided):  the (1 - 2a) RCI  exp(mean +- c1_k se)   upper end below 1 + m
    equivalence (TOST, level a):              the (1 - 2a) RCI  inside (1 / (1 + m), 1 + m)

with c2_k the two-sided and c1_k the one-sided boundaries at a. A question is decided at the first look whose
interval decides it, and stays decided; a comparison stops when every question it asks is decided. A standard error
of zero or an infinite boundary gives an unbounded interval, which decides nothing.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import optimize, stats

Spending = Literal["obrien_fleming", "pocock"]
SIMULATIONS = 400_000  # simulated studies per boundary set: the Monte Carlo error of a spent alpha is ~1e-4
SIMULATION_SEED = 20261205
CACHE_VERSION = 1


def spent(spending: Spending, alpha: float, t: float) -> float:
    """The alpha a Lan-DeMets spending function has spent by information fraction ``t`` (0 < t <= 1)."""
    if spending == "obrien_fleming":
        return float(2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - alpha / 2) / math.sqrt(t)))
    return float(alpha * math.log(1 + (math.e - 1) * t))


def normal_crossing(bounds: list[float], fractions: list[float]) -> float:
    """P(|Z_k| >= c_k at some look) for normal statistics with Cov(Z_i, Z_j) = sqrt(t_i / t_j): one minus the
    probability of staying inside every boundary, a multivariate normal rectangle (scipy)."""
    t = np.asarray(fractions)
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
    b = np.asarray(bounds)
    inside = stats.multivariate_normal(mean=np.zeros(len(b)), cov=cov).cdf(b, lower_limit=-b)
    return float(1 - inside)


def constant_design(kind: Spending, looks: int, alpha: float = 0.05) -> float:
    """The constant C of the classic design with ``looks`` equally spaced looks and two-sided level ``alpha``:
    Pocock's boundary is C at every look, O'Brien-Fleming's C sqrt(K / k) at look k."""
    fractions = [(k + 1) / looks for k in range(looks)]

    def excess(c: float) -> float:
        shape = [1.0] * looks if kind == "pocock" else [math.sqrt(looks / (k + 1)) for k in range(looks)]
        return normal_crossing([c * s for s in shape], fractions) - alpha

    return float(optimize.brentq(excess, 1.0, 6.0, xtol=1e-6))


def simulated_t_paths(sizes: tuple[int, ...], simulations: int = SIMULATIONS) -> np.ndarray:
    """Paired t statistics of ``simulations`` null studies at each sample size in ``sizes``: (simulations, K)."""
    rng = np.random.default_rng(SIMULATION_SEED)
    diffs = rng.standard_normal((simulations, sizes[-1]))
    sums, squares = np.cumsum(diffs, axis=1), np.cumsum(diffs**2, axis=1)
    n = np.asarray(sizes)
    mean = sums[:, n - 1] / n
    variance = (squares[:, n - 1] - n * mean**2) / (n - 1)
    return mean / np.sqrt(variance / n)


@functools.lru_cache(maxsize=64)
def t_boundaries(sizes: tuple[int, ...], alpha: float, spending: Spending, sided: int) -> tuple[float, ...]:
    """Boundaries c_k solving (1) for paired t statistics at ``sizes`` (two-sided: on |T|; one-sided: on T)."""
    cache = _cache_path(sizes, alpha, spending, sided)
    if len(sizes) == 1:  # one look spends all of alpha: the exact t quantile, no simulation
        return (float(stats.t.isf(alpha / sided, sizes[0] - 1)),)
    if cache.is_file():
        return tuple(json.loads(cache.read_text()))
    paths = simulated_t_paths(sizes)
    statistic = np.abs(paths) if sided == 2 else paths
    running = np.ones(len(paths), dtype=bool)
    bounds, spent_before = [], 0.0
    for k, n in enumerate(sizes):
        now = spent(spending, alpha, n / sizes[-1])
        crossing = int(round((now - spent_before) * len(paths)))  # how many simulated studies look k may stop
        values = np.sort(statistic[running, k])[::-1]
        bound = math.inf if crossing == 0 else float(values[min(crossing, len(values)) - 1])
        bounds.append(bound)
        running &= statistic[:, k] < bound
        spent_before = now
    _write_cache(cache, bounds)
    return tuple(bounds)


def _cache_path(sizes: tuple[int, ...], alpha: float, spending: Spending, sided: int) -> Path:
    folder = Path(os.environ.get("MOE_HARNESS_CACHE") or Path.home() / ".cache" / "moe-harness")
    key = f"v{CACHE_VERSION}-{spending}-a{alpha:g}-s{sided}-n{'_'.join(map(str, sizes))}-m{SIMULATIONS}"
    return folder / "sequential" / f"{key}.json"


def _write_cache(path: Path, bounds: list[float]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(bounds))
        os.replace(partial, path)  # concurrent writers write the same values; either wins
    except OSError:
        pass  # a cache: recomputed next time


Question = Literal["difference", "non_inferiority", "equivalence"]
UNDECIDED = "undecided"
# Each question's two decided outcomes: (the variant's ratio below the threshold, above it).
OUTCOMES: dict[Question, tuple[str, str]] = {
    "difference": ("better", "worse"),
    "non_inferiority": ("non-inferior", "inferior"),
    "equivalence": ("equivalent", "not equivalent"),
}


@dataclass(frozen=True, kw_only=True)
class Design:
    """A comparison's looks, questions and boundaries: tested at ``sizes`` paired seeds; the two-sided boundaries
    (on |T|) and the one-sided ones (on T) per look, both at the per-comparison ``alpha``."""

    sizes: tuple[int, ...]
    alpha: float  # per comparison and question (the family's alpha split across comparisons)
    spending: Spending
    margin: float  # relative PPL margin (0.05: a ratio of 1.05)
    questions: tuple[Question, ...]
    two_sided: tuple[float, ...]
    one_sided: tuple[float, ...]

    def look(self, n: int) -> int | None:
        """The look index at ``n`` paired seeds (None: not a planned look)."""
        return self.sizes.index(n) if n in self.sizes else None

    @property
    def difference_level(self) -> float:
        """Coverage of the difference interval, per comparison."""
        return 1 - self.alpha

    @property
    def margin_level(self) -> float:
        """Coverage of the margin interval (each end: 1 - alpha), per comparison."""
        return 1 - 2 * self.alpha


def make_design(
    *, sizes: tuple[int, ...], alpha: float, spending: Spending, margin: float, questions: tuple[Question, ...]
) -> Design:
    """The design for one comparison at per-comparison level ``alpha``: both boundary sets from (1)."""
    return Design(
        sizes=sizes,
        alpha=alpha,
        spending=spending,
        margin=margin,
        questions=questions,
        two_sided=t_boundaries(sizes, alpha, spending, 2),
        one_sided=t_boundaries(sizes, alpha, spending, 1),
    )


@dataclass(frozen=True)
class Interval:
    """A repeated confidence interval of the PPL ratio (variant / reference); (0, inf) when unbounded."""

    low: float
    high: float

    @property
    def bounded(self) -> bool:
        return self.low > 0 and math.isfinite(self.high)


UNBOUNDED = Interval(0.0, math.inf)


def ratio_interval(mean: float, se: float, bound: float) -> Interval:
    """exp(mean +- bound * se): unbounded when the boundary is infinite or the standard error zero (identical
    differences at every seed carry no estimate of their spread, so they decide nothing)."""
    if not (math.isfinite(bound) and se > 0 and math.isfinite(se)):
        return UNBOUNDED
    return Interval(math.exp(mean - bound * se), math.exp(mean + bound * se))


def decide(question: Question, difference: Interval, margin_interval: Interval, margin: float) -> str:
    """One question's decision at one look, read off the interval its rule uses (module docstring)."""
    upper = 1 + margin
    if question == "difference":
        first, second = high_below(difference, 1), low_above(difference, 1)
    elif question == "non_inferiority":
        first, second = high_below(margin_interval, upper), low_above(margin_interval, upper)
    else:
        first = low_above(margin_interval, 1 / upper) and high_below(margin_interval, upper)
        second = high_below(margin_interval, 1 / upper) or low_above(margin_interval, upper)
    return OUTCOMES[question][0] if first else OUTCOMES[question][1] if second else UNDECIDED


def high_below(interval: Interval, value: float) -> bool:
    return interval.high < value


def low_above(interval: Interval, value: float) -> bool:
    return interval.low > value


@dataclass(frozen=True, kw_only=True)
class Look:
    """One look at a comparison: the estimate, both repeated intervals and what each question read off them."""

    n: int
    mean: float  # mean log-PPL difference (variant - reference); exp() is the PPL ratio
    se: float  # its standard error
    two_sided_bound: float
    one_sided_bound: float
    difference: Interval  # the (1 - alpha) RCI
    margin: Interval  # the (1 - 2 alpha) RCI
    decisions: dict[Question, str]  # at this look

    @property
    def ratio(self) -> float:
        return math.exp(self.mean)


def look_at(differences: np.ndarray, design: Design) -> Look | None:
    """Every question at a planned look on the paired log-PPL differences; None when their count is no planned
    look."""
    k = design.look(len(differences))
    if k is None:
        return None
    n, mean = len(differences), float(np.mean(differences))
    # Identical differences have no spread; np.std can still return ~1e-17 from the mean's rounding.
    se = 0.0 if np.ptp(differences) == 0 else float(np.std(differences, ddof=1) / math.sqrt(n))
    difference = ratio_interval(mean, se, design.two_sided[k])
    margin = ratio_interval(mean, se, design.one_sided[k])
    decisions = {q: decide(q, difference, margin, design.margin) for q in design.questions}
    return Look(
        n=n,
        mean=mean,
        se=se,
        two_sided_bound=design.two_sided[k],
        one_sided_bound=design.one_sided[k],
        difference=difference,
        margin=margin,
        decisions=decisions,
    )


@dataclass(frozen=True)
class Outcome:
    """A question's decision and the paired seeds of the look that took it (None: undecided)."""

    decision: str
    at: int | None


def outcomes(looks: list[Look], questions: tuple[Question, ...]) -> dict[Question, Outcome]:
    """Each question decided at the first look that decides it (it stays decided), else undecided."""
    found = {}
    for question in questions:
        deciding = next((look for look in looks if look.decisions[question] != UNDECIDED), None)
        found[question] = Outcome(deciding.decisions[question], deciding.n) if deciding else Outcome(UNDECIDED, None)
    return found


def all_decided(looks: list[Look], questions: tuple[Question, ...]) -> bool:
    return all(outcome.at is not None for outcome in outcomes(looks, questions).values())


def verdict_words(found: dict[Question, Outcome], ratio: float, margin: float) -> str:
    """The decisions as a reader needs them, e.g. "worse by 2.1%, within the 5% margin"."""
    m, parts = f"{margin:.0%}", []
    if "difference" in found:
        decision = found["difference"].decision
        parts.append(f"{decision} by {abs(ratio - 1):.1%}" if decision != UNDECIDED else "no difference shown")
    words = {
        "non-inferior": f"within the {m} margin",
        "inferior": f"worse beyond the {m} margin",
        "equivalent": f"equivalent within ±{m}",
        "not equivalent": f"not equivalent within ±{m}",
    }
    for question in ("non_inferiority", "equivalence"):
        if question in found:
            decision = found[question].decision  # type: ignore[index]  # a Question
            parts.append(words.get(decision, f"{question.replace('_', '-')} at {m} undecided"))
    return ", ".join(parts)
