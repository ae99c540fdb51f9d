"""Expand a study spec into its variant x seed x sweep cells, each a resolved trial config."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from harness.config import SpecError, StudySpec, TrialConfig, _describe, resolve_trial


@dataclass(frozen=True)
class Cell:
    """One matrix cell: its stable key (used for exactly-once and resume) and its config."""

    key: str
    variant: str
    seed: int
    assignment: dict[str, Any] = field(default_factory=dict)
    config: TrialConfig = field(default_factory=TrialConfig)

    @property
    def name(self) -> str:
        return self.key.replace("/", "-")


def cell_key(variant: str, seed: int, assignment: dict[str, Any]) -> str:
    parts = [variant, f"seed={seed}"] + [f"{k}={v}" for k, v in sorted(assignment.items())]
    return "/".join(parts)


def expand(spec: StudySpec, where: str = "spec") -> list[Cell]:
    """Every cell of the matrix, in a deterministic order (variant, sweep point, seed)."""
    sweep_keys = sorted(spec.matrix.sweep)
    points = [
        dict(zip(sweep_keys, values, strict=True))
        for values in itertools.product(*(spec.matrix.sweep[k] for k in sweep_keys))
    ]
    trials = []
    for variant in spec.matrix.variants:
        for assignment in points:
            for seed in spec.matrix.seeds:
                try:
                    config = resolve_trial(spec, variant, seed, assignment)
                except ValidationError as error:
                    raise SpecError(f"{_describe(error, TrialConfig, where)} (variant {variant})") from None
                trials.append(Cell(cell_key(variant, seed, assignment), variant, seed, assignment, config))
    return trials
