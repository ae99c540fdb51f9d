"""Group-sequential decisions: the published constants, error rates per question over simulated studies, and
properties any verdict must have (same data, same verdict; no order effects; zero spread never decides).

The simulations use synthetic per-seed log-PPL (no training): a reference and each variant draw one value per seed,
a variant's paired differences are looked at at every planned size and the variant stops once every question it
asks is decided. Each error-rate test also shows that reading every look at the fixed-design critical value breaks
the rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.sequential import (
    UNDECIDED,
    Design,
    constant_design,
    look_at,
    make_design,
    outcomes,
    spent,
    t_boundaries,
)
from harness.study.rounds import decision_tag, plan_round, seed_order

STUDIES = 2000
SIZES = tuple(range(3, 11))  # seeds {initial: [1, 2, 3], max: 10}
ALPHA = 0.05
SIGMA = 0.02  # seed-to-seed spread of a log-PPL
LIMIT = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / STUDIES)  # the acceptance's alpha + 3 standard errors
BOTH = ("difference", "non_inferiority")


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


def test_a_single_look_is_the_fixed_sample_t_test() -> None:
    assert t_boundaries((5,), 0.01, "obrien_fleming", 2) == (pytest.approx(stats.t.isf(0.005, 4)),)
    assert t_boundaries((5,), 0.01, "pocock", 1) == (pytest.approx(stats.t.isf(0.01, 4)),)


def design_of(sizes: tuple[int, ...] = SIZES, alpha: float = ALPHA, margin: float = 0.05, questions=BOTH) -> Design:
    return make_design(sizes=sizes, alpha=alpha, spending="obrien_fleming", margin=margin, questions=questions)


def fixed_critical_design(design: Design) -> Design:
    """The mistake the design prevents: every look read at the fixed-design critical value."""
    return Design(
        sizes=design.sizes,
        alpha=design.alpha,
        spending=design.spending,
        margin=design.margin,
        questions=design.questions,
        two_sided=tuple(float(stats.t.isf(design.alpha / 2, n - 1)) for n in design.sizes),
        one_sided=tuple(float(stats.t.isf(design.alpha, n - 1)) for n in design.sizes),
    )


def simulate(design: Design, effects: list[float], seed: int = 0) -> dict[str, np.ndarray]:
    """Each question's final decision (studies, variants) of ``STUDIES`` simulated studies whose variants' true
    log-PPL differences to a shared reference are ``effects``, and the seeds each variant used."""
    rng = np.random.default_rng(seed)
    reference = rng.normal(0.0, SIGMA, (STUDIES, design.sizes[-1]))
    found = {q: np.full((STUDIES, len(effects)), UNDECIDED, dtype=object) for q in design.questions}
    found["seeds"] = np.full((STUDIES, len(effects)), design.sizes[-1])
    for j, effect in enumerate(effects):
        differences = rng.normal(effect, SIGMA, reference.shape) - reference
        for i in range(STUDIES):
            looks = []
            for n in design.sizes:
                looks.append(look_at(differences[i, :n], design))
                decided = outcomes(looks, design.questions)
                if all(o.at is not None for o in decided.values()):
                    break
            for question, outcome in decided.items():
                found[question][i, j] = outcome.decision
            found["seeds"][i, j] = looks[-1].n
    return found


def rate(decided: np.ndarray) -> float:
    return float(np.mean(decided))


@pytest.mark.parametrize("spending", ["obrien_fleming", "pocock"])
def test_under_the_null_one_variant_is_declared_different_at_most_alpha(spending: str) -> None:
    design = make_design(sizes=SIZES, alpha=ALPHA, spending=spending, margin=0.05, questions=BOTH)
    different = lambda d: np.isin(d["difference"][:, 0], ["better", "worse"])  # noqa: E731
    assert rate(different(simulate(design, [0.0]))) <= LIMIT
    assert rate(different(simulate(fixed_critical_design(design), [0.0]))) > LIMIT


def test_under_the_null_three_variants_keep_the_family_wise_rate() -> None:
    design = design_of(alpha=ALPHA / 3)  # Bonferroni: each of the three comparisons (one reference) at alpha / 3
    any_different = lambda d: np.isin(d["difference"], ["better", "worse"]).any(axis=1)  # noqa: E731
    assert rate(any_different(simulate(design, [0.0, 0.0, 0.0]))) <= LIMIT
    assert rate(any_different(simulate(fixed_critical_design(design), [0.0, 0.0, 0.0]))) > LIMIT


def test_at_the_margin_non_inferiority_is_declared_at_most_alpha() -> None:
    design = design_of(margin=0.02)
    at_margin = [math.log1p(design.margin)]  # truly 2% worse: "non-inferior at 2%" is the error
    assert rate(simulate(design, at_margin)["non_inferiority"][:, 0] == "non-inferior") <= LIMIT
    fixed = simulate(fixed_critical_design(design), at_margin)["non_inferiority"][:, 0] == "non-inferior"
    assert rate(fixed) > LIMIT


def test_at_the_margin_equivalence_is_declared_at_most_alpha() -> None:
    design = design_of(margin=0.02, questions=("equivalence",))
    for edge in (math.log1p(design.margin), -math.log1p(design.margin)):
        assert rate(simulate(design, [edge])["equivalence"][:, 0] == "equivalent") <= LIMIT


def test_power_of_each_question_for_a_small_loss(capsys: pytest.CaptureFixture[str]) -> None:
    found = simulate(design_of(), [math.log(1.02)])  # 2% worse, one seed's spread 2%: paired sd ~2.8%
    worse, non_inferior = (
        rate(found["difference"][:, 0] == "worse"),
        rate(found["non_inferiority"][:, 0] == "non-inferior"),
    )
    with capsys.disabled():
        print(
            f"\n2% worse: found worse {worse:.3f}, non-inferior at 5% {non_inferior:.3f}, "
            f"{found['seeds'].mean():.2f} seeds"
        )
    assert 0.3 < worse < 0.6 and non_inferior > 0.8  # measured 0.435 and 0.888 (seed 0)
    assert rate(found["difference"][:, 0] == "better") == 0.0
    assert rate(found["non_inferiority"][:, 0] == "inferior") == 0.0


def test_zero_spread_or_no_boundary_never_decides() -> None:
    design = design_of()
    for differences in ([0.0, 0.0, 0.0], [0.2, 0.2, 0.2], [-0.3] * 5):
        look = look_at(np.array(differences), design)
        assert look is not None and not look.difference.bounded and not look.margin.bounded
        assert set(look.decisions.values()) == {UNDECIDED}
    sizes = tuple(range(2, 9))
    no_bound = make_design(sizes=sizes, alpha=0.01, spending="obrien_fleming", margin=0.05, questions=BOTH)
    assert math.isinf(no_bound.two_sided[0])  # 2 seeds of 8, O'Brien-Fleming at 1%: 2.6e-7 to spend, no path
    look = look_at(np.array([0.5, 0.51]), no_bound)
    assert set(look.decisions.values()) == {UNDECIDED}


def test_each_decision_can_be_checked_on_its_interval() -> None:
    design = design_of()
    look = look_at(np.array([0.020, 0.022, 0.019, 0.021]), design)  # about 2% worse, very consistent
    assert look.decisions == {"difference": "worse", "non_inferiority": "non-inferior"}
    assert look.difference.low > 1.0 and look.margin.high < 1.05
    assert look.difference.low < look.margin.low < look.ratio < look.margin.high < look.difference.high
    assert look_at(np.array([0.1, 0.2]), design) is None  # 2 seeds: no planned look


def random_results(rng: np.random.Generator, variants: list[str], seeds: list[int]) -> dict:
    """A random study's results: per-variant offsets of up to 6% and seed noise of 1-3%, some trials untrained."""
    offsets = {v: rng.uniform(-0.06, 0.06) for v in variants}
    noise = rng.uniform(0.01, 0.03)
    return {
        (v, s): None if rng.random() < 0.05 else 5.0 + offsets[v] + rng.normal(0, noise)
        for v in variants
        for s in seeds
    }


def test_property_same_differences_same_verdict_and_no_order_effect() -> None:
    rng = np.random.default_rng(7)
    design = make_design(sizes=(2, 3, 4, 5, 6), alpha=ALPHA / 3, spending="pocock", margin=0.03, questions=BOTH)
    seeds = seed_order([1, 2], 6)
    for _ in range(200):
        results = random_results(rng, ["baseline", "a", "b"], seeds)
        for seed in seeds:  # "twin" has exactly a's per-seed differences, on another reference level
            a, base = results[("a", seed)], results[("baseline", seed)]
            results[("twin", seed)] = None if a is None or base is None else a
        variants = ["baseline", "a", "b", "twin"]
        plan = plan_round(design=design, reference="baseline", variants=variants, seeds=seeds, results=results)
        tags = {c.variant: c.tag() for c in plan.comparisons}
        assert tags["a"] == tags["twin"]
        shuffled = [variants[0], *rng.permutation(variants[1:])]
        again = plan_round(design=design, reference="baseline", variants=shuffled, seeds=seeds, results=results)
        assert {c.variant: c.tag() for c in again.comparisons} == tags
        assert sorted(again.next_cells) == sorted(plan.next_cells)


def test_rounds_stop_a_decided_variant_and_continue_the_open_ones() -> None:
    design = make_design(sizes=(2, 3, 4, 5), alpha=ALPHA / 2, spending="obrien_fleming", margin=0.05, questions=BOTH)
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
    # seed-major: every variant's seed 1, then every variant's seed 2
    assert rounds[0] == [("baseline", 1), ("dense", 1), ("switch", 1), ("baseline", 2), ("dense", 2), ("switch", 2)]
    decided = {c.variant: c.outcomes for c in plan.comparisons}
    dense_at = decided["dense"]["difference"].at
    assert decided["dense"]["difference"].decision == "worse" and decided["dense"]["non_inferiority"].decision == (
        "inferior"
    )
    assert dense_at < 5 and all(("dense", seed) not in results for seed in seeds[dense_at:])  # stopped early
    assert decided["switch"]["non_inferiority"].decision == "non-inferior"
    assert decided["switch"]["difference"].decision == UNDECIDED  # no difference: runs to the last seed
    assert ("switch", 5) in results
    inferior_at = decided["dense"]["non_inferiority"].at  # each question at its own first deciding look
    assert decision_tag(plan) == f"dense:worse@{dense_at}/inferior@{inferior_at},switch:undecided@5/non-inferior@3"


def test_a_flagged_trial_is_no_seed_and_is_replaced_up_to_the_maximum() -> None:
    design = make_design(sizes=(2, 3, 4), alpha=ALPHA, spending="obrien_fleming", margin=0.05, questions=BOTH)
    seeds = seed_order([1, 2], 4)
    results = {("baseline", 1): 5.0, ("baseline", 2): 5.0, ("lora", 1): 5.01, ("lora", 2): None}  # seed 2 flagged
    plan = plan_round(design=design, reference="baseline", variants=["baseline", "lora"], seeds=seeds, results=results)
    assert plan.comparisons[0].looks == []  # one healthy pair: no look yet
    assert plan.next_cells == [("baseline", 3), ("lora", 3)]
    assert decision_tag(plan) == "lora:open/open"
