"""Give each resolved trial of a study spec its matrix cell: a stable key (exactly-once, resume), its config, and
the cell it starts from (``init.source``: upcycling)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.config import StudySpec, TrialConfig, resolve_matrix, source_order


@dataclass(frozen=True)
class Cell:
    """One matrix cell: its stable key (used for exactly-once and resume) and its config."""

    key: str
    variant: str
    seed: int
    assignment: dict[str, Any] = field(default_factory=dict)
    config: TrialConfig = field(default_factory=TrialConfig)
    depends_on: str | None = None
    """The key of the cell whose final weights this one starts from (``init.source``); it runs first."""

    @property
    def name(self) -> str:
        return self.key.replace("/", "-")


def cell_key(variant: str, seed: int, assignment: dict[str, Any]) -> str:
    parts = [variant, f"seed={seed}"] + [f"{k}={v}" for k, v in sorted(assignment.items())]
    return "/".join(parts)


def expand(spec: StudySpec, where: str = "spec") -> list[Cell]:
    """Every cell of the matrix in the order cells run: seed-major (each seed's cells of every variant, then the
    next seed's), so that a machine's drift over a study falls on every variant alike, not on the variants that ran
    last; within a seed the variants in matrix order, except that the variants a variant starts from come before it
    (:func:`~harness.config.source_order`). The one place cells are ordered: any subset keeps every source before
    its dependents (same seed, earlier variant), so callers run what is pending as listed.

    A source cell logs its final weights (``train.save_checkpoint``) for its dependents."""
    trials = resolve_matrix(spec, where)
    order = source_order(trials, where)
    seeds = spec.matrix.all_seeds()
    trials.sort(key=lambda t: (seeds.index(t.seed), order.index(t.variant)))  # stable: keeps sweep-point order
    depends_on = {
        cell_key(t.variant, t.seed, t.assignment): (
            None if t.config.init.source is None else cell_key(t.config.init.source, t.seed, t.assignment)
        )
        for t in trials
    }
    sources = set(depends_on.values())
    cells = []
    for t in trials:
        key, config = cell_key(t.variant, t.seed, t.assignment), t.config
        if key in sources and not config.train.save_checkpoint:
            config = config.model_copy(update={"train": config.train.model_copy(update={"save_checkpoint": True})})
        cells.append(Cell(key, t.variant, t.seed, t.assignment, config, depends_on[key]))
    return cells
