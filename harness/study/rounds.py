"""The rounds of a sequential study: from what the store holds, each comparison's looks and decision, and the seeds
the next round runs.

Every non-reference variant is one comparison against the reference, on the per-seed differences of the test
log-PPL (paired by seed). A round adds the next seed of the seed order to every comparison still open, and to the
reference where an open variant needs that seed's pair. A trial flagged untrained (stalled, saturated, unstable)
counts as no seed: its variant (every variant, for the reference's) goes on with the next seed, as long as fewer
than ``max_seeds`` seeds have run. The state is recomputed from the recorded results each time, so a rerun goes on
from where the last one stopped and never runs a cell twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from mlflow.entities import Run

from harness.config import DesignConfig, Question, StudySpec, reference_variant
from harness.config.schema import SequentialSeeds
from harness.health import is_result
from harness.matrix import Cell
from harness.runs import FAILED, FINISHED, cell_runs
from harness.sequential import UNDECIDED, Design, Look, Outcome, all_decided, look_at, make_design, outcomes
from harness.tags import DECISION, DESIGN, HEALTH, TRIALS_SAVED
from harness.tracking import TrackingStore

Result = float | None  # a finished cell's test loss; None: finished but flagged untrained (not a seed)
OPEN = "open"


@dataclass
class Comparison:
    """One variant against the reference: its looks so far and each question's outcome."""

    variant: str
    questions: tuple[Question, ...]
    seeds_run: list[int] = field(default_factory=list)
    pairs: int = 0  # healthy paired seeds
    looks: list[Look] = field(default_factory=list)
    open: bool = False  # a question is undecided and another seed may still run

    @property
    def outcomes(self) -> dict[Question, Outcome]:
        return outcomes(self.looks, self.questions)

    @property
    def last(self) -> Look | None:
        return self.looks[-1] if self.looks else None

    def question_tag(self, question: Question) -> str:
        """``worse@3``: the decision and the paired seeds of the look that took it; an undecided question is
        ``open`` while seeds may come, else ``undecided@<healthy paired seeds>``."""
        outcome = self.outcomes[question]
        if outcome.at is not None:
            return f"{outcome.decision}@{outcome.at}"
        return OPEN if self.open else f"{UNDECIDED}@{self.last.n if self.last else self.pairs}"

    def tag(self) -> str:
        """``worse@3/non-inferior@2``: every question's :meth:`question_tag`, in the order the design asks them."""
        return "/".join(self.question_tag(question) for question in self.questions)


@dataclass(frozen=True, kw_only=True)
class Plan:
    comparisons: list[Comparison]
    next_cells: list[tuple[str, int]]  # (variant, seed) to run in the next round; empty: the study is done
    results: dict[tuple[str, int], Result]  # what the plan was made from

    @property
    def complete(self) -> bool:
        """No comparison can take another look."""
        return not any(c.open for c in self.comparisons)


def seed_order(initial: list[int], max_seeds: int) -> list[int]:
    """The seeds in the order rounds use them: the initial ones, then the next integers, ``max_seeds`` in all."""
    return SequentialSeeds(initial=initial, max=max_seeds).order()


def plan_round(
    *,
    design: Design,
    reference: str,
    variants: list[str],
    seeds: list[int],
    results: dict[tuple[str, int], Result],
) -> Plan:
    """Each comparison's looks from ``results`` ((variant, seed) -> result of the cells that finished), and the
    cells of the next round, seed-major. ``seeds``: :func:`seed_order`; ``design.sizes`` start at the initial seed
    count."""
    initial = design.sizes[0]
    comparisons, wanted = [], set()
    for variant in (v for v in variants if v != reference):
        comparison = compare(variant, reference, seeds, results, design)
        following = next_seeds(comparison.seeds_run, seeds, initial)
        comparison.open = not all_decided(comparison.looks, design.questions) and bool(following)
        comparisons.append(comparison)
        if comparison.open:
            wanted |= {(variant, seed) for seed in following}
    if not comparisons:  # a matrix of the reference alone: nothing to compare, run the initial seeds
        wanted = {(reference, seed) for seed in seeds[:initial]}
    # The reference runs every seed an open variant runs next, and every seed a variant already has a result for
    # (array tasks end in any order: a variant's cell can finish before the reference's of the same round).
    ran = {seed for (variant, seed), result in results.items() if variant != reference and result is not None}
    needed_by_reference = {seed for _, seed in wanted} | (ran if comparisons else set())
    wanted |= {(reference, seed) for seed in needed_by_reference}
    rank = {variant: i for i, variant in enumerate(variants)}
    next_cells = sorted((cell for cell in wanted if cell not in results), key=lambda c: (c[1], rank[c[0]]))
    return Plan(comparisons=comparisons, next_cells=next_cells, results=results)


def paired_differences(
    variant: str, reference: str, seeds: list[int], results: dict[tuple[str, int], Result]
) -> list[float]:
    """The variant's test loss minus the reference's at each seed both have as a result, in seed order."""
    return [
        results[(variant, seed)] - results[(reference, seed)]  # type: ignore[operator]  # both are floats here
        for seed in seeds
        if results.get((variant, seed)) is not None and results.get((reference, seed)) is not None
    ]


def compare(
    variant: str, reference: str, seeds: list[int], results: dict[tuple[str, int], Result], design: Design
) -> Comparison:
    """The variant's looks at each planned number of healthy paired seeds, until every question is decided."""
    pairs = paired_differences(variant, reference, seeds, results)
    comparison = Comparison(
        variant, design.questions, [seed for seed in seeds if (variant, seed) in results], len(pairs)
    )
    for n in design.sizes:
        if n > len(pairs):
            break
        look = look_at(np.asarray(pairs[:n]), design)
        assert look is not None  # n is a planned size
        comparison.looks.append(look)
        if all_decided(comparison.looks, design.questions):
            break
    return comparison


def next_seeds(run: list[int], seeds: list[int], initial: int) -> list[int]:
    """The seeds an open comparison runs next: the initial ones first, then one more per round (up to the last)."""
    if len(run) < initial:
        return [seed for seed in seeds[:initial] if seed not in run]
    remaining = [seed for seed in seeds if seed not in run]
    return remaining[:1]


def decision_tag(plan: Plan) -> str:
    """``switch:undecided@5/non-inferior@2,hybrid:worse@3/non-inferior@2,lora:open/non-inferior@2``: each
    comparison's question outcomes, in the order the design asks them."""
    return ",".join(f"{c.variant}:{c.tag()}" for c in plan.comparisons)


@dataclass(frozen=True, kw_only=True)
class StudyDesign:
    """What a study's decisions follow, fixed in its spec: the study run's ``harness.design`` tag holds it, so the
    report rebuilds each decision the way the runner made it. A fixed design (a list of seeds) is one look at the
    paired seeds each comparison has."""

    initial: list[int]
    max: int
    sequential: bool
    alpha: float  # family-wise, per question
    spending: str
    margin: float
    questions: list[Question]
    min_param_reduction: float
    min_speedup: float
    reference: str
    variants: list[str]

    @classmethod
    def of(cls, spec: StudySpec) -> StudyDesign:
        seeds, variants = spec.matrix.sequential, spec.matrix.variants
        if seeds is None:
            return cls.build(spec.design, variants, list(spec.matrix.all_seeds()), None)
        return cls.build(spec.design, variants, seeds.initial, seeds.max)

    @classmethod
    def build(cls, design: DesignConfig, variants: list[str], initial: list[int], max_seeds: int | None) -> StudyDesign:
        """``design``'s settings over ``variants``: sequential from ``initial`` up to ``max_seeds`` seeds, or (None)
        a fixed design of the seeds ``initial``."""
        return cls(
            initial=initial,
            max=max_seeds if max_seeds is not None else len(initial),
            sequential=max_seeds is not None,
            alpha=design.alpha,
            spending=design.spending,
            margin=design.margin,
            questions=list(design.questions),
            min_param_reduction=design.min_param_reduction,
            min_speedup=design.min_speedup,
            reference=reference_variant(variants, design.reference) or "",
            variants=variants,
        )

    @classmethod
    def from_tag(cls, text: str) -> StudyDesign:
        return cls(**json.loads(text))

    def tag(self) -> str:
        return json.dumps(asdict(self))

    @property
    def comparisons(self) -> int:
        return max(len(self.variants) - 1, 1)

    @property
    def per_comparison_alpha(self) -> float:
        """The family's alpha split equally across the comparisons with the reference (Bonferroni)."""
        return self.alpha / self.comparisons

    def seeds(self) -> list[int]:
        return seed_order(self.initial, self.max) if self.sequential else list(self.initial)

    def comparison_design(self, sizes: tuple[int, ...] | None = None) -> Design:
        """One comparison's design: looks at every seed count from the initial seeds to ``max`` (a fixed design:
        one look, at ``sizes``)."""
        return make_design(
            sizes=sizes or tuple(range(len(self.initial), self.max + 1)),
            alpha=self.per_comparison_alpha,
            spending=self.spending,  # type: ignore[arg-type]  # validated by the spec
            margin=self.margin,
            questions=tuple(self.questions),
        )

    def plan(self, results: dict[tuple[str, int], Result]) -> Plan:
        if self.sequential:
            return plan_round(
                design=self.comparison_design(),
                reference=self.reference,
                variants=self.variants,
                seeds=self.seeds(),
                results=results,
            )
        return self.fixed_plan(results)

    def fixed_plan(self, results: dict[tuple[str, int], Result]) -> Plan:
        """Every comparison decided at one look on its healthy paired seeds (at least two); every missing cell
        is still to run."""
        seeds, comparisons = self.seeds(), []
        for variant in (v for v in self.variants if v != self.reference):
            pairs = len(paired_differences(variant, self.reference, seeds, results))
            design = self.comparison_design((max(pairs, 2),))
            comparison = compare(variant, self.reference, seeds, results, design)
            comparison.open = any((variant, seed) not in results for seed in seeds)
            comparisons.append(comparison)
        missing = [(v, s) for s in seeds for v in self.variants if (v, s) not in results]
        return Plan(comparisons=comparisons, next_cells=missing, results=results)


def recorded_result(status: str, health: str | None, test_loss: float | None) -> Result:
    """An ended trial (FINISHED or FAILED) as a seed: its test loss when it is a result (:func:`is_result`); None
    (no seed) otherwise."""
    usable = is_result(status, health) and test_loss is not None and not math.isnan(test_loss)
    return float(test_loss) if usable else None  # type: ignore[arg-type]  # test_loss is a float when usable


def recorded_results(runs: dict[str, Run], cells: list[Cell]) -> dict[tuple[str, int], Result]:
    """(variant, seed) -> :func:`recorded_result` of each cell whose run ended (``runs``: from ``cell_runs``)."""
    results: dict[tuple[str, int], Result] = {}
    for cell in cells:
        run = runs.get(cell.key)
        if run is not None and run.info.status in (FINISHED, FAILED):
            health, loss = run.data.tags.get(HEALTH), run.data.metrics.get("test_loss")
            results[(cell.variant, cell.seed)] = recorded_result(run.info.status, health, loss)
    return results


def current_plan(spec: StudySpec, store: TrackingStore | None, trials: list[Cell]) -> Plan:
    """Where a study stands by what its store holds (None: no store yet), and its next round."""
    experiment = None if store is None else store.client.get_experiment_by_name(spec.name)
    results = {} if experiment is None else recorded_results(cell_runs(store, experiment.experiment_id), trials)
    return StudyDesign.of(spec).plan(results)


def round_cells(plan: Plan, cells: list[Cell]) -> list[Cell]:
    """The cells of the plan's next round, with the cells they start from (``init.source``), in matrix order."""
    wanted = set(plan.next_cells)
    keys = {cell.key for cell in cells if (cell.variant, cell.seed) in wanted}
    keys |= {cell.depends_on for cell in cells if cell.key in keys and cell.depends_on is not None}
    return [cell for cell in cells if cell.key in keys]


def record_plan(store: TrackingStore, parent_id: str, spec: StudySpec, plan: Plan) -> None:
    """The study run's tags: the design, each comparison's decisions, and (sequential) the trials saved against
    running ``max`` seeds for every variant."""
    study = StudyDesign.of(spec)
    store.client.set_tag(parent_id, DESIGN, study.tag())
    store.client.set_tag(parent_id, DECISION, decision_tag(plan))
    if study.sequential:
        run = sum(len(c.seeds_run) for c in plan.comparisons) + len(reference_seeds(plan, study.reference))
        store.client.set_tag(parent_id, TRIALS_SAVED, str(len(study.variants) * study.max - run))


def reference_seeds(plan: Plan, reference: str) -> set[int]:
    return {seed for variant, seed in plan.results if variant == reference}


def describe_design(spec: StudySpec) -> list[str]:
    """``--dry-run``'s account of the design: the questions, each look's boundaries, the most trials."""
    study = StudyDesign.of(spec)
    design = study.comparison_design((len(study.initial),) if not study.sequential else None)
    a = design.alpha
    lines = [
        f"design: {', '.join(q.replace('_', '-') for q in study.questions)} against {study.reference} "
        f"(margin {study.margin:.0%}); family-wise alpha {study.alpha:g} per question, split equally across "
        f"{study.comparisons} comparison(s) (Bonferroni: {a:.4g} each); difference read off the {1 - a:.2%} "
        f"repeated interval, margin questions off the {1 - 2 * a:.2%} one",
    ]
    if study.sequential:
        lines[0] += (
            f"; seeds {study.initial} first, then one more per round for each open comparison, up to {study.max}; "
            f"{study.spending} spending; at most {len(study.variants) * study.max} trials"
        )
    lines.append("look  seeds  two-sided t bound  one-sided t bound")
    for k, n in enumerate(design.sizes):
        lines.append(
            f"{k + 1:4d}  {n:5d}  {bound_text(design.two_sided[k]):>17}  {bound_text(design.one_sided[k]):>17}"
        )
    return lines


def bound_text(value: float) -> str:
    """A boundary, or ``none``: the alpha this look may spend is below one simulated study in
    :data:`harness.sequential.SIMULATIONS`, so it has no finite boundary and decides nothing."""
    return f"{value:.3f}" if math.isfinite(value) else "none"
