"""Run a study: every matrix cell through the shared trainer, recorded in MLflow.

The driver (:func:`prepare_study`: in this process, or the Ray driver of :mod:`harness.engine.ray_study`)
does the preflight, creates the study's parent run and each pending cell's run (one writer), and
skips finished cells. :meth:`StudyWorker.run_cell` is the one way a cell runs, called by the
in-process loop (:func:`run_study`), by ``--cell N`` and inside a Ray task. Re-running the same
command skips finished cells and resumes interrupted ones from their last checkpoint into the same
MLflow run. A trial that fails (divergence, out of memory, bad data) is marked failed with its
reason and the study goes on. Bad input (data, checkpoints, servers) is rejected before anything
is written; a study lock keeps a second invocation on this machine from running the same cells.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from harness.config import SpecError, StudySpec
from harness.data import Corpus, load_corpus
from harness.engine.attempt import AttemptSink, AttemptSuperseded, new_attempt
from harness.engine.lock import lock_path, study_lock
from harness.engine.order import in_dependency_order
from harness.matrix import Cell, expand
from harness.runs import (
    FAILED,
    KILLED,
    TrialRun,
    cell_run,
    end_run,
    is_finished,
    oldest,
    open_trial_run,
    shared_run,
)
from harness.tags import CELL, ERROR, ROLE, ROLE_STUDY, STUDY
from harness.tracking import TrackingStore, device_description
from harness.trainer import Checkpointer, resolve_device, train

CHECKPOINT_DIR = Path("mlruns") / "checkpoints"


@dataclass
class StudyOutcome:
    experiment_id: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def record(self, key: str, reason: str | None) -> None:
        """A cell's end as the runner saw it: None when it finished, else why it failed."""
        if reason is None:
            self.finished.append(key)
        else:
            self.failed[key] = reason
            print(f"  {key} failed: {reason}", file=sys.stderr, flush=True)


def _corpus_key(trial: Cell) -> str:
    return trial.config.data.model_dump_json()


def checkpointer(checkpoint_dir: Path, spec: StudySpec, trial: Cell) -> Checkpointer:
    return Checkpointer(checkpoint_dir / spec.name / f"{trial.name}.pt", trial.config.model_dump(mode="json"))


def preflight(spec: StudySpec, trials: list[Cell], checkpoint_dir: Path) -> dict[str, Corpus]:
    """Everything that can reject the input without writing: data files, leftover checkpoints."""
    corpora: dict[str, Corpus] = {}
    for trial in trials:
        if _corpus_key(trial) not in corpora:
            corpora[_corpus_key(trial)] = load_corpus(trial.config.data)
        checkpointer(checkpoint_dir, spec, trial).load()  # raises SpecError for another config's checkpoint
    return corpora


STUDY_SCHEDULED = "SCHEDULED"  # a pending cell's run, created by the driver before any attempt opens it


@dataclass
class StudyWorker:
    """Runs cells of one study into their MLflow runs, in this process (the loop, ``--cell N``, a Ray task)."""

    spec: StudySpec
    store: TrackingStore
    experiment_id: str
    parent_run_id: str
    corpora: dict[str, Corpus]
    checkpoint_dir: Path
    progress: bool

    def open_cell_run(self, trial: Cell) -> tuple[str, bool]:
        """The cell's one MLflow run (found by its tag, or a new one), RUNNING unless finished; finished?"""
        run = cell_run(self.store, self.experiment_id, trial)
        if run is not None and is_finished(run):
            return run.info.run_id, True
        device = resolve_device(trial.config.train.device).type
        corpus = self.corpora[_corpus_key(trial)]
        return open_trial_run(
            self.store, self.experiment_id, self.parent_run_id, trial, self.spec.name, corpus, device
        ), False

    def train_cell(self, trial: Cell, run_id: str, attempt: str) -> str | None:
        """Train one cell into its open MLflow run; the failure reason, or None once it finished.

        Steps the run already holds (a resumed or retried cell) are not logged again.
        """
        checkpoint = checkpointer(self.checkpoint_dir, self.spec, trial)
        run = TrialRun(AttemptSink(self.store.client, run_id, self.store.logged_steps(run_id), attempt))
        config, corpus = trial.config, self.corpora[_corpus_key(trial)]
        try:
            result = train(config, corpus, run.sink, checkpoint=checkpoint, progress=self.progress, label=trial.key)
        except AttemptSuperseded:
            run.sink.flush()  # the cell's run is the newer attempt's now: leave it as it is
            raise
        except BaseException as error:
            how = run.fail(error)
            if how.status == KILLED:
                raise  # an interruption: the checkpoint stays, so a rerun resumes
            checkpoint.path.unlink(missing_ok=True)
            return how.reason
        if config.train.save_checkpoint and result.model is not None:
            self.store.log_weights(run_id, result.model.state_dict())
        tables = {"utilisation": result.utilisation, "utilisation_history": result.utilisation_history}
        run.finish(result.summary, tables)
        checkpoint.path.unlink(missing_ok=True)
        return None

    def source_failure(self, trial: Cell) -> str | None:
        """Why ``trial`` cannot start from its source cell's weights (the source did not finish); else None."""
        if trial.depends_on is None:
            return None
        source = oldest(self.store.runs(self.experiment_id, f"tags.`{CELL}` = '{trial.depends_on}'"))
        return None if source is not None and is_finished(source) else f"source cell {trial.depends_on} failed"

    def run_cell(self, trial: Cell) -> str | None:
        """The one way a cell runs: open (or reopen) its run, train, finish or fail it; the failure reason or None.

        Raises :class:`AttemptSuperseded` when a newer attempt took the run over (this one wrote nothing after).
        """
        run_id, finished = self.open_cell_run(trial)
        if finished:
            return None
        if (reason := self.source_failure(trial)) is not None:
            end_run(self.store.client, run_id, FAILED, reason)
            return reason
        return self.train_cell(trial, run_id, new_attempt(self.store.client, run_id))


def prepare_study(
    spec: StudySpec, store: TrackingStore, trials: list[Cell], worker_args: dict, retry_failed: bool
) -> tuple[StudyWorker, StudyOutcome, list[Cell]]:
    """The driver's part: the parent run and each pending cell's run (SCHEDULED); finished cells skipped.

    ``worker_args``: the :class:`StudyWorker` fields besides the store and runs (corpora, checkpoint_dir, progress).
    """
    experiment_id = store.experiment_id(spec.name)
    tags = {ROLE: ROLE_STUDY, STUDY: spec.name, "n_trials": str(len(expand(spec)))}
    tags["device"] = device_description(trials[0].config.train.device)
    parent_id = shared_run(store, experiment_id, f"tags.`{ROLE}` = '{ROLE_STUDY}'", spec.name, tags)
    worker = StudyWorker(spec, store, experiment_id, parent_id, **worker_args)
    outcome, pending = StudyOutcome(experiment_id, parent_id), []
    for trial in trials:
        run = cell_run(store, experiment_id, trial)
        if run is not None and is_finished(run):
            outcome.skipped.append(trial.key)
        elif run is not None and run.info.status == FAILED and not retry_failed:
            outcome.failed[trial.key] = run.data.tags.get(ERROR, "failed")
        else:
            run_id, _ = worker.open_cell_run(trial)
            store.client.update_run(run_id, STUDY_SCHEDULED)
            pending.append(trial)
    return worker, outcome, pending


def end_unfinished(store: TrackingStore, experiment_id: str, trials: list[Cell], reason: str) -> None:
    """Mark the runs of ``trials`` that are still RUNNING or SCHEDULED as KILLED (idempotent): nothing stays open."""
    for trial in trials:
        run = cell_run(store, experiment_id, trial)
        if run is not None and run.info.status in ("RUNNING", STUDY_SCHEDULED):
            end_run(store.client, run.info.run_id, KILLED, reason)


def select_cells(spec: StudySpec, cell_index: int | None, where: str = "spec") -> list[Cell]:
    """All cells, or the one at ``cell_index`` (``--cell N``, a Slurm array index)."""
    trials = expand(spec, where)
    if cell_index is None:
        return trials
    if not 0 <= cell_index < len(trials):
        raise SpecError(f"--cell {cell_index}: study '{spec.name}' has cells 0..{len(trials) - 1}")
    return [trials[cell_index]]


def run_study(
    spec: StudySpec,
    tracking_uri: str,
    progress: bool = True,
    checkpoint_dir: Path = CHECKPOINT_DIR,
    retry_failed: bool = False,
    cell_index: int | None = None,
) -> StudyOutcome:
    """Run the study's pending cells (or only cell ``cell_index``) one after another in this process."""
    trials = select_cells(spec, cell_index)
    corpora = preflight(spec, trials, checkpoint_dir)
    store = TrackingStore(tracking_uri)  # checks a tracking server is up; nothing written before here
    name = spec.name if cell_index is None else trials[0].name
    with study_lock(lock_path(tracking_uri, checkpoint_dir, name)):
        worker_args = {"corpora": corpora, "checkpoint_dir": checkpoint_dir, "progress": progress}
        worker, outcome, pending = prepare_study(spec, store, trials, worker_args, retry_failed)
        order = in_dependency_order(pending)
        try:
            for trial in tqdm(order, desc=spec.name, unit="cell", disable=not progress, file=sys.stderr):
                try:
                    outcome.record(trial.key, worker.run_cell(trial))
                except AttemptSuperseded as superseded:
                    print(f"  {trial.key}: {superseded}", file=sys.stderr, flush=True)
        except BaseException as error:
            end_unfinished(store, outcome.experiment_id, order, f"interrupted: {type(error).__name__}")
            raise
    return outcome
