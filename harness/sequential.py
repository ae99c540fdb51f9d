"""Group-sequential boundaries and decisions for paired per-seed comparisons (Jennison & Turnbull 2000).

A sequential study looks at each comparison (a variant's per-seed log-PPL minus the reference's, paired by seed)
after every round of seeds, at sample sizes n_1 < ... < n_K, and stops it once decided. The error rates hold
because each look spends part of alpha, by a Lan-DeMets spending function of the information fraction
t_k = n_k / n_K (ch. 7):

    O'Brien-Fleming type:  alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t))
    Pocock type:           alpha(t) = alpha ln(1 + (e - 1) t)

and the boundary c_k at look k solves, under the null hypothesis,

    P(|T_1| < c_1, ..., |T_{k-1}| < c_{k-1}, |T_k| >= c_k) = alpha(t_k) - alpha(t_{k-1})          (1)

(one-sided analogue for each of the two one-sided tests of TOST equivalence).

Normal statistics: (Z_1, ..., Z_K) is multivariate normal with Cov(Z_i, Z_j) = sqrt(t_i / t_j), t_i <= t_j (ch. 3),
so (1) is a multivariate normal probability (scipy). :func:`constant_design` solves the classic designs with it
(Pocock c_k = C, O'Brien-Fleming c_k = C sqrt(K / k)) and reproduces the published constants.

Paired t statistics with few seeds are far from normal, so :func:`t_boundaries` solves (1) for them instead: the
joint law of (T_1, ..., T_K) under the null does not depend on the seeds' standard deviation, so it is simulated
once (a fixed seed) and c_k is the order statistic that spends exactly alpha(t_k) - alpha(t_{k-1}) among the
simulated studies still running at look k. Results are cached in memory and on disk.
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


Decision = Literal["better", "worse", "equivalent", "open"]


@dataclass(frozen=True, kw_only=True)
class Design:
    """A comparison's looks and boundaries: tested at ``sizes`` paired seeds; difference (two-sided, on |T|) and
    equivalence (each of TOST's one-sided statistics) boundaries per look."""

    sizes: tuple[int, ...]
    alpha: float  # per comparison (the family's alpha split across comparisons)
    spending: Spending
    margin: float  # equivalence margin on the PPL ratio (0.05: within +-5%)
    difference_bounds: tuple[float, ...]
    equivalence_bounds: tuple[float, ...]

    def look(self, n: int) -> int | None:
        """The look index at ``n`` paired seeds (None: not a planned look)."""
        return self.sizes.index(n) if n in self.sizes else None


def make_design(*, sizes: tuple[int, ...], alpha: float, spending: Spending, margin: float) -> Design:
    """The design for one comparison at per-comparison level ``alpha``: both boundary sets from (1)."""
    return Design(
        sizes=sizes,
        alpha=alpha,
        spending=spending,
        margin=margin,
        difference_bounds=t_boundaries(sizes, alpha, spending, 2),
        equivalence_bounds=t_boundaries(sizes, alpha, spending, 1),
    )


@dataclass(frozen=True)
class Look:
    """One look at a comparison: the statistics, their boundaries and what they decided."""

    n: int
    mean: float  # mean log-PPL difference (variant - reference); exp() is the PPL ratio
    se: float  # its standard error
    t: float  # paired t of the difference
    t_equivalence: float  # the smaller of TOST's two one-sided t statistics
    difference_bound: float
    equivalence_bound: float
    decision: Decision


def look_at(differences: np.ndarray, design: Design) -> Look | None:
    """Test the paired log-PPL differences at a planned look; None when their count is no planned look."""
    k = design.look(len(differences))
    if k is None:
        return None
    n, mean = len(differences), float(np.mean(differences))
    se = float(np.std(differences, ddof=1) / math.sqrt(n))
    log_margin = math.log1p(design.margin)
    t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
    t_equivalence = min((mean + log_margin) / se, (log_margin - mean) / se) if se > 0 else math.inf
    difference_bound, equivalence_bound = design.difference_bounds[k], design.equivalence_bounds[k]
    decision: Decision = "open"
    if abs(t) >= difference_bound:
        decision = "worse" if mean > 0 else "better"
    elif t_equivalence >= equivalence_bound:
        decision = "equivalent"
    return Look(n, mean, se, t, t_equivalence, difference_bound, equivalence_bound, decision)


def repeated_interval(look: Look, design: Design) -> tuple[float, float]:
    """The repeated confidence interval for the PPL ratio at ``look`` (Jennison & Turnbull ch. 9): the mean
    difference +- the look's two-sided boundary times its standard error, exponentiated; it covers the true
    ratio at every look at once with probability at least 1 - alpha."""
    half = look.difference_bound * look.se
    return math.exp(look.mean - half), math.exp(look.mean + half)
