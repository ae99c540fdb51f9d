"""Group-sequential boundaries: the published constants, and error rates that hold over simulated studies.

The simulations use synthetic per-seed log-PPL (no training): a reference and each variant draw one value per seed,
a variant's paired differences are tested at every planned look and the variant stops at its first decision.
Each error-rate test also shows that testing at the fixed-design critical value at every look breaks the rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.sequential import Design, constant_design, look_at, make_design, repeated_interval, spent

STUDIES = 2000
SIZES = tuple(range(3, 11))  # seeds {initial: [1, 2, 3], max: 10}
ALPHA = 0.05
SIGMA = 0.02  # seed-to-seed spread of a log-PPL
LIMIT = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / STUDIES)  # the acceptance's alpha + 3 standard errors


@pytest.mark.parametrize(
    ("kind", "published"),
    [("pocock", [2.178, 2.289, 2.361, 2.413]), ("obrien_fleming", [1.977, 2.004, 2.024, 2.040])],
)
def test_the_boundary_search_reproduces_the_published_constants(kind: str, published: list[float]) -> None:
    # Jennison & Turnbull (2000), ch. 2: K = 2..5 equally spaced looks, two-sided alpha 0.05, normal case.
    assert [round(constant_design(kind, looks), 2) for looks in (2, 3, 4, 5)] == pytest.approx(
        [round(c, 2) for c in published], abs=1e-9
    )


def test_spending_functions_spend_alpha_by_the_last_look() -> None:
    for kind in ("obrien_fleming", "pocock"):
        assert spent(kind, ALPHA, 1.0) == pytest.approx(ALPHA)
        assert 0 < spent(kind, ALPHA, 0.3) < spent(kind, ALPHA, 0.6) < ALPHA
    assert spent("obrien_fleming", ALPHA, 0.3) < spent("pocock", ALPHA, 0.3)  # OBF keeps alpha for the end


def fixed_critical_design(design: Design) -> Design:
    """The mistake the design prevents: every look tested at the fixed-design critical value."""
    return Design(
        sizes=design.sizes,
        alpha=design.alpha,
        spending=design.spending,
        margin=design.margin,
        difference_bounds=tuple(float(stats.t.ppf(1 - design.alpha / 2, n - 1)) for n in design.sizes),
        equivalence_bounds=tuple(float(stats.t.ppf(1 - design.alpha, n - 1)) for n in design.sizes),
    )


def simulate(design: Design, effects: list[float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decisions (studies, variants) and the seeds each variant used, of ``STUDIES`` simulated studies whose
    variants' true log-PPL differences to a shared reference are ``effects``."""
    rng = np.random.default_rng(seed)
    reference = rng.normal(0.0, SIGMA, (STUDIES, design.sizes[-1]))
    decisions = np.full((STUDIES, len(effects)), "open", dtype=object)
    seeds = np.full((STUDIES, len(effects)), design.sizes[-1])
    for j, effect in enumerate(effects):
        differences = rng.normal(effect, SIGMA, reference.shape) - reference
        for i in range(STUDIES):
            for n in design.sizes:
                look = look_at(differences[i, :n], design)
                assert look is not None
                if look.decision != "open":
                    decisions[i, j], seeds[i, j] = look.decision, n
                    break
    return decisions, seeds


def rate(decided: np.ndarray) -> float:
    return float(np.mean(decided))


@pytest.mark.parametrize("spending", ["obrien_fleming", "pocock"])
def test_under_the_null_one_variant_is_declared_different_at_most_alpha(spending: str) -> None:
    design = make_design(sizes=SIZES, alpha=ALPHA, spending=spending, margin=0.05)
    different = lambda d: np.isin(d[:, 0], ["better", "worse"])  # noqa: E731
    assert rate(different(simulate(design, [0.0])[0])) <= LIMIT
    assert rate(different(simulate(fixed_critical_design(design), [0.0])[0])) > LIMIT


def test_under_the_null_three_variants_keep_the_family_wise_rate() -> None:
    # Bonferroni: each of the three comparisons (sharing one reference) at alpha / 3.
    design = make_design(sizes=SIZES, alpha=ALPHA / 3, spending="obrien_fleming", margin=0.05)
    any_different = lambda d: np.isin(d, ["better", "worse"]).any(axis=1)  # noqa: E731
    assert rate(any_different(simulate(design, [0.0, 0.0, 0.0])[0])) <= LIMIT
    assert rate(any_different(simulate(fixed_critical_design(design), [0.0, 0.0, 0.0])[0])) > LIMIT


def test_at_the_margin_equivalence_is_declared_at_most_alpha() -> None:
    design = make_design(sizes=SIZES, alpha=ALPHA, spending="obrien_fleming", margin=0.02)
    at_margin = [math.log1p(design.margin)]
    assert rate(simulate(design, at_margin)[0][:, 0] == "equivalent") <= LIMIT
    assert rate(simulate(fixed_critical_design(design), at_margin)[0][:, 0] == "equivalent") > LIMIT


def test_power_and_expected_seeds_against_the_fixed_design(capsys: pytest.CaptureFixture[str]) -> None:
    design = make_design(sizes=SIZES, alpha=ALPHA, spending="obrien_fleming", margin=0.05)
    fixed = make_design(sizes=SIZES[-1:], alpha=ALPHA, spending="obrien_fleming", margin=0.05)  # one look at 10
    effect = math.log(1.03)  # a variant 3% worse in PPL
    decisions, seeds = simulate(design, [effect])
    fixed_decisions, _ = simulate(fixed, [effect])
    power, fixed_power = rate(decisions[:, 0] == "worse"), rate(fixed_decisions[:, 0] == "worse")
    with capsys.disabled():
        print(
            f"\n3% worse, seed sd {SIGMA}: sequential power {power:.3f} with {seeds.mean():.2f} seeds on average; "
            f"fixed design power {fixed_power:.3f} with {SIZES[-1]} seeds"
        )
    assert seeds.mean() < SIZES[-1]  # the price of looking early is power; the figures say how much


def test_a_look_reports_its_statistics_and_a_repeated_interval() -> None:
    design = make_design(sizes=SIZES, alpha=ALPHA, spending="obrien_fleming", margin=0.05)
    look = look_at(np.array([0.10, 0.11, 0.09, 0.10]), design)  # about 10.5% worse, very consistent
    assert look is not None and look.decision == "worse" and look.n == 4
    low, high = repeated_interval(look, design)
    assert low < math.exp(look.mean) < high and low > 1.0
    assert look_at(np.array([0.1, 0.2]), design) is None  # 2 seeds: no planned look


def test_rounds_stop_a_decided_variant_and_continue_the_open_ones() -> None:
    from harness.rounds import decision_tag, plan_round, seed_order

    design = make_design(sizes=(2, 3, 4, 5), alpha=ALPHA / 2, spending="obrien_fleming", margin=0.05)
    seeds = seed_order([1, 2], 5)
    assert seeds == [1, 2, 3, 4, 5]
    rng = np.random.default_rng(0)
    truth = {"baseline": 5.0, "dense": 5.5, "switch": 5.0}  # dense is far worse; switch the same
    results: dict[tuple[str, int], float | None] = {}
    rounds = []
    while True:
        plan = plan_round(design=design, reference="baseline", variants=list(truth), seeds=seeds, results=results)
        if not plan.next_cells:
            break
        rounds.append(plan.next_cells)
        for variant, seed in plan.next_cells:
            results[(variant, seed)] = truth[variant] + rng.normal(0, 0.002)
    assert rounds[0] == [("baseline", 1), ("baseline", 2), ("dense", 1), ("dense", 2), ("switch", 1), ("switch", 2)]
    decided = {c.variant: (c.decision, c.decided_at) for c in plan.comparisons}
    assert decided["dense"][0] == "worse" and decided["dense"][1] < 5  # stopped early...
    assert all(("dense", seed) not in results for seed in seeds[decided["dense"][1] :])  # ...and ran no more seeds
    assert decided["switch"][0] in ("equivalent", "open")
    assert decision_tag(plan, 5).startswith(f"dense:worse@{decided['dense'][1]},switch:")


def test_a_flagged_trial_is_no_seed_and_is_replaced_up_to_the_maximum() -> None:
    from harness.rounds import plan_round, seed_order

    design = make_design(sizes=(2, 3, 4), alpha=ALPHA, spending="obrien_fleming", margin=0.05)
    seeds = seed_order([1, 2], 4)
    results = {("baseline", 1): 5.0, ("baseline", 2): 5.0, ("lora", 1): 5.01, ("lora", 2): None}  # seed 2 flagged
    plan = plan_round(design=design, reference="baseline", variants=["baseline", "lora"], seeds=seeds, results=results)
    assert plan.comparisons[0].looks == []  # one healthy pair: no look yet
    assert plan.next_cells == [("baseline", 3), ("lora", 3)]
