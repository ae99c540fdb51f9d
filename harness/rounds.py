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

from harness.config import StudySpec, reference_variant
from harness.config.schema import SequentialSeeds
from harness.health import is_result
from harness.matrix import Cell
from harness.runs import FAILED, FINISHED, cell_run
from harness.sequential import Decision, Design, Look, look_at, make_design
from harness.tags import HEALTH, SEQUENTIAL_DECISION, SEQUENTIAL_DESIGN, SEQUENTIAL_SAVED
from harness.tracking import TrackingStore

Result = float | None  # a finished cell's test loss; None: finished but flagged untrained (not a seed)


@dataclass
class Comparison:
    """One variant against the reference: its looks so far and where it stands."""

    variant: str
    seeds_run: list[int] = field(default_factory=list)
    looks: list[Look] = field(default_factory=list)

    @property
    def decision(self) -> Decision:
        return self.looks[-1].decision if self.looks else "open"

    @property
    def decided_at(self) -> int | None:
        """Paired seeds at the deciding look; None while open."""
        return self.looks[-1].n if self.looks and self.decision != "open" else None


@dataclass(frozen=True, kw_only=True)
class Plan:
    comparisons: list[Comparison]
    next_cells: list[tuple[str, int]]  # (variant, seed) to run in the next round; empty: the study is done
    results: dict[tuple[str, int], Result]  # what the plan was made from


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
    cells of the next round. ``seeds``: :func:`seed_order`; ``design.sizes`` start at the initial seed count."""
    initial = design.sizes[0]
    comparisons, wanted = [], set()
    for variant in (v for v in variants if v != reference):
        comparison = compare(variant, reference, seeds, results, design)
        comparisons.append(comparison)
        if comparison.decision == "open":
            wanted |= {(variant, seed) for seed in next_seeds(comparison.seeds_run, seeds, initial)}
    if not comparisons:  # a matrix of the reference alone: nothing to compare, run the initial seeds
        wanted = {(reference, seed) for seed in seeds[:initial]}
    needed_by_reference = {seed for _, seed in wanted}
    wanted |= {(reference, seed) for seed in needed_by_reference}
    next_cells = sorted(cell for cell in wanted if cell not in results)
    return Plan(comparisons=comparisons, next_cells=next_cells, results=results)


def compare(
    variant: str, reference: str, seeds: list[int], results: dict[tuple[str, int], Result], design: Design
) -> Comparison:
    """The variant's looks at each planned number of healthy paired seeds, up to its first decision."""
    comparison = Comparison(variant, [seed for seed in seeds if (variant, seed) in results])
    pairs = [
        results[(variant, seed)] - results[(reference, seed)]  # type: ignore[operator]  # both are floats here
        for seed in seeds
        if results.get((variant, seed)) is not None and results.get((reference, seed)) is not None
    ]
    for n in design.sizes:
        if n > len(pairs):
            break
        look = look_at(np.asarray(pairs[:n]), design)
        assert look is not None  # n is a planned size
        comparison.looks.append(look)
        if look.decision != "open":
            break
    return comparison


def next_seeds(run: list[int], seeds: list[int], initial: int) -> list[int]:
    """The seeds an open comparison runs next: the initial ones first, then one more per round (up to the last)."""
    if len(run) < initial:
        return [seed for seed in seeds[:initial] if seed not in run]
    remaining = [seed for seed in seeds if seed not in run]
    return remaining[:1]


def decision_tag(plan: Plan, max_seeds: int) -> str:
    """``switch:worse@3,lora:equivalent@5,hybrid:open@10``: each comparison's decision at its paired seeds."""
    parts = []
    for comparison in plan.comparisons:
        at = comparison.decided_at if comparison.decided_at is not None else len(comparison.seeds_run) or max_seeds
        parts.append(f"{comparison.variant}:{comparison.decision}@{at}")
    return ",".join(parts)


def reference_of(spec: StudySpec) -> str:
    """The variant every comparison is against (:func:`harness.config.reference_variant`)."""
    reference = reference_variant(spec.matrix.variants, spec.report.reference)
    assert reference is not None  # a matrix has at least one variant
    return reference


@dataclass(frozen=True, kw_only=True)
class StudyDesign:
    """What a sequential study's rounds follow; the study run's ``harness.sequential.design`` tag holds it, so the
    report rebuilds each decision the way the runner made it."""

    initial: list[int]
    max: int
    alpha: float  # family-wise
    spending: str
    margin: float
    reference: str
    variants: list[str]

    @classmethod
    def of(cls, spec: StudySpec) -> StudyDesign:
        seeds, settings = spec.matrix.sequential, spec.report.sequential
        assert seeds is not None and settings is not None
        return cls(
            initial=seeds.initial,
            max=seeds.max,
            alpha=settings.alpha,
            spending=settings.spending,
            margin=spec.report.equivalence_margin,
            reference=reference_of(spec),
            variants=spec.matrix.variants,
        )

    @classmethod
    def from_tag(cls, text: str) -> StudyDesign:
        return cls(**json.loads(text))

    def tag(self) -> str:
        return json.dumps(asdict(self))

    @property
    def comparisons(self) -> int:
        return max(len(self.variants) - 1, 1)

    def seeds(self) -> list[int]:
        return seed_order(self.initial, self.max)

    def comparison_design(self) -> Design:
        """One comparison's design: looks at every seed count from the initial seeds to ``max``; the family's alpha
        split equally across the comparisons with the reference (Bonferroni)."""
        return make_design(
            sizes=tuple(range(len(self.initial), self.max + 1)),
            alpha=self.alpha / self.comparisons,
            spending=self.spending,
            margin=self.margin,
        )

    def plan(self, results: dict[tuple[str, int], Result]) -> Plan:
        return plan_round(
            design=self.comparison_design(),
            reference=self.reference,
            variants=self.variants,
            seeds=self.seeds(),
            results=results,
        )


def trial_result(status: str, health: str | None, test_loss: float | None) -> Result:
    """An ended trial (FINISHED or FAILED) as a seed: its test loss when it is a result (:func:`is_result`); None
    (no seed) otherwise."""
    usable = is_result(status, health) and test_loss is not None and not math.isnan(test_loss)
    return float(test_loss) if usable else None  # type: ignore[arg-type]  # test_loss is a float when usable


def recorded_results(store: TrackingStore, experiment_id: str, trials: list[Cell]) -> dict[tuple[str, int], Result]:
    """(variant, seed) -> :func:`trial_result` of each cell whose run ended."""
    results: dict[tuple[str, int], Result] = {}
    for trial in trials:
        run = cell_run(store, experiment_id, trial)
        if run is not None and run.info.status in (FINISHED, FAILED):
            health, loss = run.data.tags.get(HEALTH), run.data.metrics.get("test_loss")
            results[(trial.variant, trial.seed)] = trial_result(run.info.status, health, loss)
    return results


def current_plan(spec: StudySpec, store: TrackingStore | None, trials: list[Cell]) -> Plan:
    """Where a sequential study stands by what its store holds (None: no store yet), and its next round."""
    experiment = None if store is None else store.client.get_experiment_by_name(spec.name)
    results = {} if experiment is None else recorded_results(store, experiment.experiment_id, trials)
    return StudyDesign.of(spec).plan(results)


def round_cells(plan: Plan, trials: list[Cell]) -> list[Cell]:
    """The cells of the plan's next round, with the cells they start from (``init.source``), in matrix order."""
    wanted = set(plan.next_cells)
    keys = {trial.key for trial in trials if (trial.variant, trial.seed) in wanted}
    keys |= {trial.depends_on for trial in trials if trial.key in keys and trial.depends_on is not None}
    return [trial for trial in trials if trial.key in keys]


def record_plan(store: TrackingStore, parent_id: str, spec: StudySpec, plan: Plan) -> None:
    """The study run's tags: the design, each comparison's decision, and the trials saved against running ``max``
    seeds for every variant."""
    study = StudyDesign.of(spec)
    run = sum(len(c.seeds_run) for c in plan.comparisons) + len(reference_seeds(plan, study.reference))
    store.client.set_tag(parent_id, SEQUENTIAL_DESIGN, study.tag())
    store.client.set_tag(parent_id, SEQUENTIAL_DECISION, decision_tag(plan, study.max))
    store.client.set_tag(parent_id, SEQUENTIAL_SAVED, str(len(study.variants) * study.max - run))


def reference_seeds(plan: Plan, reference: str) -> set[int]:
    return {seed for variant, seed in plan.results if variant == reference}


def describe_design(spec: StudySpec) -> list[str]:
    """``--dry-run``'s account of a sequential design: the looks, each look's boundaries, the most trials."""
    study = StudyDesign.of(spec)
    design = study.comparison_design()
    lines = [
        f"sequential design: seeds {study.initial} first, then one more per round for each open comparison, "
        f"up to {study.max}; {study.comparisons} comparison(s) with {study.reference}, family-wise alpha "
        f"{study.alpha:g} split equally (Bonferroni: {design.alpha:.4g} each), {study.spending} spending; "
        f"at most {len(study.variants) * study.max} trials",
        "look  seeds  |t| to differ  TOST t for equivalence",
    ]
    for k, n in enumerate(design.sizes):
        lines.append(f"{k + 1:4d}  {n:5d}  {design.difference_bounds[k]:13.3f}  {design.equivalence_bounds[k]:10.3f}")
    return lines
