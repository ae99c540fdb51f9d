"""Give each resolved trial of a study spec its matrix cell: a stable key (exactly-once, resume) and its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.config import StudySpec, TrialConfig, resolve_matrix


@dataclass(frozen=True)
class Cell:
    """One matrix cell: its stable key (used for exactly-once and resume) and its config."""

    key: str
    variant: str
    seed: int
    assignment: dict[str, Any] = field(default_factory=dict)
    config: TrialConfig = field(default_factory=TrialConfig)
    depends_on: str | None = None  # key of the cell whose finished weights this one starts from

    @property
    def name(self) -> str:
        return self.key.replace("/", "-")


def cell_key(variant: str, seed: int, assignment: dict[str, Any]) -> str:
    parts = [variant, f"seed={seed}"] + [f"{k}={v}" for k, v in sorted(assignment.items())]
    return "/".join(parts)


def expand(spec: StudySpec, where: str = "spec") -> list[Cell]:
    """Every cell of the matrix, in a deterministic order (variant, sweep point, seed)."""
    return [
        Cell(cell_key(t.variant, t.seed, t.assignment), t.variant, t.seed, t.assignment, t.config)
        for t in resolve_matrix(spec, where)
    ]
