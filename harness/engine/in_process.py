"""The in-process executor: one cell after another in this process, under the study lock of this machine."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from harness import interrupt
from harness.attempt import AttemptSuperseded
from harness.cells import CellRunner, StudyOutcome
from harness.lock import lock_path, study_lock
from harness.matrix import Cell


@dataclass(frozen=True)
class InProcess:
    progress: bool

    def started(self) -> AbstractContextManager[None]:
        return nullcontext()

    def guarded(self, name: str, tracking_uri: str, checkpoint_dir: Path) -> AbstractContextManager[None]:
        return study_lock(lock_path(tracking_uri, checkpoint_dir, name))

    def run(self, runner: CellRunner, outcome: StudyOutcome, cells: list[Cell]) -> None:
        for cell in tqdm(cells, desc=runner.spec.name, unit="cell", disable=not self.progress, file=sys.stderr):
            interrupt.check()  # a safe point: between cells, nothing half-written
            try:
                outcome.record(cell.key, runner.run_cell(cell))
            except AttemptSuperseded as superseded:
                print(f"  {cell.key}: {superseded}", file=sys.stderr, flush=True)
