"""Executors: where a study's cells run. The driver (:mod:`harness.study.driver`) plans the rounds, guards and ends the
study; an executor only runs the cells it is given, each through :meth:`harness.cells.CellRunner.run_cell`.

- :class:`.in_process.InProcess`: one cell after another in this process (and ``--cell N``, an array task);
- :class:`.ray_study.RayExecutor`: each cell a Ray task, on a cluster (``--ray ADDRESS``) or on a local one that
  runs several cells at once on this machine (:mod:`.parallel` chooses).

Engine code depends on the core (cells, runs, tracking), never the reverse. What makes a cell run exactly once stays
in the core: one MLflow run per cell found by its cell tag, atomic checkpoints, no step logged twice on resume.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from harness.cells import CellRunner, StudyOutcome
    from harness.matrix import Cell


class Executor(Protocol):
    def started(self) -> AbstractContextManager[None]:
        """Held while the study runs: what the executor needs started (a Ray connection), its resources checked
        before the driver writes anything."""
        ...

    def guarded(self, name: str, tracking_uri: str, checkpoint_dir: Path) -> AbstractContextManager[None]:
        """Held while the study runs, once its store exists: the guard against a second driver of study (or cell)
        ``name`` (a lock file beside the store on this machine; a named actor on a cluster)."""
        ...

    def run(self, runner: CellRunner, outcome: StudyOutcome, cells: list[Cell]) -> None:
        """Run ``cells`` (a source before the cells that start from it), recording each end in ``outcome``. On an
        interruption, stop the cells it started and re-raise: the driver then ends their runs."""
        ...
