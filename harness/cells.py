"""Running one cell of a study into its MLflow run, and the record of how a study's cells ended.

:meth:`CellRunner.run_cell` is the one way a cell runs, whatever executor calls it (in this process, a Ray task,
``--cell N``): it opens (or reopens) the cell's run, trains it through the shared trainer, judges its health and
finishes or fails the run. Steps a resumed or retried run already holds are not logged again; a newer attempt at
the same cell takes the run over (:mod:`harness.attempt`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.attempt import AttemptSink, AttemptSuperseded, new_attempt
from harness.checkpoint import cell_checkpointer
from harness.config import StudySpec
from harness.data import Corpus
from harness.health import HealthVerdict, assess
from harness.matrix import Cell
from harness.preflight import corpus_key
from harness.runs import FAILED, KILLED, TrialRun, cell_run, end_run, is_finished, oldest, open_trial_run
from harness.step import set_threads
from harness.tags import CELL, INIT_SOURCE_RUN
from harness.tracking import TrackingStore
from harness.trainer import resolve_device, train


@dataclass
class StudyOutcome:
    experiment_id: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    flagged: dict[str, HealthVerdict] = field(default_factory=dict)  # finished cells judged unhealthy
    needed: bool = True  # False: ``--cell N`` of a sequential study whose current round does not need the cell

    def record(self, key: str, reason: str | None) -> None:
        """A cell's end as its executor saw it: None when it finished, else why it failed."""
        if reason is None:
            self.finished.append(key)
        else:
            self.failed[key] = reason
            print(f"  {key} failed: {reason}", file=sys.stderr, flush=True)


@dataclass
class CellRunner:
    """Runs cells of one study into their MLflow runs, in this process (an executor's loop or task)."""

    spec: StudySpec
    store: TrackingStore
    experiment_id: str
    parent_run_id: str
    corpora: dict[str, Corpus]
    checkpoint_dir: Path
    progress: bool

    def open_cell_run(self, cell: Cell) -> tuple[str, bool]:
        """The cell's one MLflow run (found by its tag, or a new one), RUNNING unless finished; finished?"""
        run = cell_run(self.store, self.experiment_id, cell)
        if run is not None and is_finished(run):
            return run.info.run_id, True
        device = resolve_device(cell.config.train.device).type
        set_threads(cell.config)  # before the device tag records them (a Ray worker keeps its previous cell's)
        run_id = open_trial_run(
            self.store,
            cell,
            experiment_id=self.experiment_id,
            parent_id=self.parent_run_id,
            study=self.spec.name,
            corpus=self.corpora[corpus_key(cell)],
            device=device,
        )
        return run_id, False

    def train_cell(
        self, cell: Cell, run_id: str, attempt: str, initial: dict[str, Any] | None, started: float
    ) -> str | None:
        """Train one cell into its open MLflow run; the failure reason, or None once it finished.

        ``initial``: the weights it starts from (an upcycled cell's source), else None. ``started``:
        ``time.monotonic()`` when the cell started (the run's ``wall_time_s``: this attempt's time from then to its
        end, evaluation and logging in).
        """
        config, corpus = cell.config, self.corpora[corpus_key(cell)]
        checkpoint = cell_checkpointer(self.checkpoint_dir, self.spec, cell, corpus)
        if logged := self.store.logged_steps(run_id):
            print(f"  {cell.key}: resuming its interrupted run (step {max(logged.values())} logged)", file=sys.stderr)
        run = TrialRun(AttemptSink(self.store.client, run_id, logged, attempt), started)
        try:  # training and the final save: whatever stops either ends the run, none is left RUNNING
            result = train(
                config,
                corpus,
                run.sink,
                checkpoint=checkpoint,
                progress=self.progress,
                label=cell.key,
                initial_weights=initial,
            )
            if config.train.save_checkpoint and result.model is not None:
                self.store.log_weights(run_id, result.model.state_dict())
            tables = {"utilisation": result.utilisation, "utilisation_history": result.utilisation_history}
            run.sink.flush()  # the verdict reads the run's whole metric history, a resumed run's earlier steps too
            judged = (result.summary, result.utilisation, corpus, config.optim.grad_clip, config.moe.routed_top_k)
            health_metrics, verdict = assess(run.client, run_id, *judged)
            run.finish(result.summary | health_metrics, tables, verdict.tags())
        except AttemptSuperseded:
            run.sink.flush()  # the cell's run is the newer attempt's now: leave it as it is
            raise
        except BaseException as error:  # any Exception is the trial's failure; an interruption kills the run
            how = run.fail(error)
            if how.status == KILLED:
                raise  # the checkpoint stays, so a rerun resumes
            checkpoint.path.unlink(missing_ok=True)
            return how.reason
        checkpoint.path.unlink(missing_ok=True)
        return None

    def source_weights(self, cell: Cell, run_id: str) -> dict[str, Any] | None:
        """The final weights of the cell ``cell`` starts from (``depends_on``; it ran first), fetched from its
        run's artifacts; the source run's id goes on ``cell``'s run. None when the source did not finish."""
        source = oldest(self.store.runs(self.experiment_id, f"tags.`{CELL}` = '{cell.depends_on}'"))
        if source is None or not is_finished(source):
            return None
        self.store.client.set_tag(run_id, INIT_SOURCE_RUN, source.info.run_id)
        return self.store.load_weights(source.info.run_id)

    def run_cell(self, cell: Cell) -> str | None:
        """The one way a cell runs: open (or reopen) its run, train, finish or fail it; the failure reason or None.

        Raises :class:`AttemptSuperseded` when a newer attempt took the run over (this one wrote nothing after).
        """
        started = time.monotonic()
        run_id, finished = self.open_cell_run(cell)
        if finished:
            return None
        initial = None
        if cell.depends_on is not None and (initial := self.source_weights(cell, run_id)) is None:
            reason = f"source cell {cell.depends_on} failed"
            end_run(self.store.client, run_id, FAILED, reason)
            return reason
        return self.train_cell(cell, run_id, new_attempt(self.store.client, run_id), initial, started)
