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

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Param, Run
from tqdm import tqdm

from harness import interrupt, runs
from harness.checkpoint import cell_checkpointer
from harness.config import SpecError, StudySpec
from harness.data import Corpus
from harness.engine.attempt import AttemptSink, AttemptSuperseded, new_attempt
from harness.engine.lock import lock_path, study_lock
from harness.engine.order import in_dependency_order
from harness.fingerprint import changes, describe, identity
from harness.health import HealthVerdict, assess, validation_shares
from harness.matrix import Cell, expand
from harness.preflight import corpus_key, preflight
from harness.runs import (
    FAILED,
    FINISHED,
    KILLED,
    RUNNING,
    SCHEDULED,
    TrialRun,
    cell_run,
    end_run,
    ending,
    finish_study_run,
    is_finished,
    oldest,
    open_trial_run,
    shared_run,
)
from harness.tags import (
    CELL,
    EQUIVALENCE_MARGIN,
    ERROR,
    HEALTH,
    HEALTH_EVIDENCE,
    INIT_SOURCE_RUN,
    NOTE,
    REPORT_REFERENCE,
    ROLE,
    ROLE_STUDY,
    ROLE_SUPERSEDED,
    STUDY,
    SUPERSEDED,
)
from harness.tracking import TrackingStore, device_description
from harness.trainer import resolve_device, train

CHECKPOINT_DIR = Path("mlruns") / "checkpoints"


@dataclass
class StudyOutcome:
    experiment_id: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    flagged: dict[str, HealthVerdict] = field(default_factory=dict)  # finished cells judged unhealthy

    def record(self, key: str, reason: str | None) -> None:
        """A cell's end as the runner saw it: None when it finished, else why it failed."""
        if reason is None:
            self.finished.append(key)
        else:
            self.failed[key] = reason
            print(f"  {key} failed: {reason}", file=sys.stderr, flush=True)


def describe_study_run(store: TrackingStore, run_id: str, spec: StudySpec, trials: list[Cell], relog: bool) -> str:
    """Give a new parent run the resolved matrix as params and the spec as an artifact (a rerun keeps the first,
    unless ``relog``: the spec artifact is then this one; params cannot change)."""
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    if store.client.get_run(run_id).data.params:
        if relog:
            store.client.log_text(run_id, spec_yaml, "spec.yaml")
        return run_id
    matrix = spec.matrix
    params = {
        "matrix.variants": ",".join(matrix.variants),
        "matrix.seeds": ",".join(str(seed) for seed in matrix.seeds),
        "n_trials": str(len(trials)),
        **{f"matrix.sweep.{key}": json.dumps(values) for key, values in matrix.sweep.items()},
    }
    store.client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
    store.client.log_text(run_id, spec_yaml, "spec.yaml")
    return run_id


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
        corpus = self.corpora[corpus_key(trial)]
        run_id = open_trial_run(
            self.store,
            trial,
            experiment_id=self.experiment_id,
            parent_id=self.parent_run_id,
            study=self.spec.name,
            corpus=corpus,
            device=device,
        )
        return run_id, False

    def train_cell(self, trial: Cell, run_id: str, attempt: str, initial: dict[str, Any] | None) -> str | None:
        """Train one cell into its open MLflow run; the failure reason, or None once it finished.

        Steps the run already holds (a resumed or retried cell) are not logged again. ``initial``: the weights
        it starts from (an upcycled cell's source), else None.
        """
        config, corpus = trial.config, self.corpora[corpus_key(trial)]
        checkpoint = cell_checkpointer(self.checkpoint_dir, self.spec, trial, corpus)
        if logged := self.store.logged_steps(run_id):
            print(f"  {trial.key}: resuming its interrupted run (step {max(logged.values())} logged)", file=sys.stderr)
        run = TrialRun(AttemptSink(self.store.client, run_id, logged, attempt))
        try:  # training and the final save: whatever stops either ends the run, none is left RUNNING
            result = train(
                config,
                corpus,
                run.sink,
                checkpoint=checkpoint,
                progress=self.progress,
                label=trial.key,
                initial_weights=initial,
            )
            if config.train.save_checkpoint and result.model is not None:
                self.store.log_weights(run_id, result.model.state_dict())
            tables = {"utilisation": result.utilisation, "utilisation_history": result.utilisation_history}
            run.sink.flush()  # the verdict reads the run's whole metric history, a resumed run's earlier steps too
            health_metrics, verdict = assess(run.client, run_id, result.summary | validation_shares(result.utilisation))
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

    def source_weights(self, trial: Cell, run_id: str) -> dict[str, Any] | None:
        """The final weights of the cell ``trial`` starts from (``depends_on``; it ran first), fetched from its
        run's artifacts; the source run's id goes on ``trial``'s run. None when the source did not finish."""
        source = oldest(self.store.runs(self.experiment_id, f"tags.`{CELL}` = '{trial.depends_on}'"))
        if source is None or not is_finished(source):
            return None
        self.store.client.set_tag(run_id, INIT_SOURCE_RUN, source.info.run_id)
        return self.store.load_weights(source.info.run_id)

    def run_cell(self, trial: Cell) -> str | None:
        """The one way a cell runs: open (or reopen) its run, train, finish or fail it; the failure reason or None.

        Raises :class:`AttemptSuperseded` when a newer attempt took the run over (this one wrote nothing after).
        """
        run_id, finished = self.open_cell_run(trial)
        if finished:
            return None
        initial = None
        if trial.depends_on is not None and (initial := self.source_weights(trial, run_id)) is None:
            reason = f"source cell {trial.depends_on} failed"
            end_run(self.store.client, run_id, FAILED, reason)
            return reason
        return self.train_cell(trial, run_id, new_attempt(self.store.client, run_id), initial)


def prepare_study(
    spec: StudySpec, store: TrackingStore, trials: list[Cell], worker_args: dict, retry_failed: bool, supersede: bool
) -> tuple[StudyWorker, StudyOutcome, list[Cell]]:
    """The driver's part: the parent run and each pending cell's run (SCHEDULED); finished cells skipped.

    A cell whose identity changed since its run was recorded is refused (nothing written) unless ``supersede``:
    then its old run is kept, tagged superseded, and the cell starts as a new run. ``worker_args``: the
    :class:`StudyWorker` fields besides the store and runs (corpora, checkpoint_dir, progress).
    """
    corpora, checkpoint_dir = worker_args["corpora"], worker_args["checkpoint_dir"]
    changed = changed_cells(store, spec.name, trials, corpora)
    if changed and not supersede:
        raise SpecError(refusal(spec.name, changed))
    experiment_id = store.experiment_id(spec.name, spec.description)
    parent_id = study_parent_run(spec, store, experiment_id, relog_spec=bool(changed))
    worker = StudyWorker(spec, store, experiment_id, parent_id, **worker_args)
    outcome, pending = StudyOutcome(experiment_id, parent_id), []
    try:  # an interruption here leaves the runs created so far KILLED, like any other
        for trial in trials:
            interrupt.check()  # a safe point: between two cells' runs
            run = cell_run(store, experiment_id, trial)
            if trial.key in changed and run is not None:
                supersede_run(store, run, describe(changed[trial.key]))
                cell_checkpointer(checkpoint_dir, spec, trial, corpora[corpus_key(trial)]).path.unlink(missing_ok=True)
                run = None
            if run is not None and is_finished(run):
                outcome.skipped.append(trial.key)
            elif run is not None and run.info.status == FAILED and not retry_failed:
                outcome.failed[trial.key] = run.data.tags.get(ERROR, "failed")
            else:
                run_id, _ = worker.open_cell_run(trial)
                store.client.update_run(run_id, SCHEDULED)
                pending.append(trial)
    except BaseException as error:
        kill_study(store, outcome, trials, error)
        raise
    return worker, outcome, pending


Changes = dict[str, tuple[str | None, str | None]]


def changed_cells(
    store: TrackingStore, study: str, trials: list[Cell], corpora: dict[str, Corpus]
) -> dict[str, Changes]:
    """Cell key -> how its recorded run differs from what the cell computes now; only cells that differ.

    A cell that starts from a changed cell (``init.source``) has changed too: its starting weights will.
    Reads only: an unknown study has no recorded cells.
    """
    experiment = store.client.get_experiment_by_name(study)
    if experiment is None:
        return {}
    changed: dict[str, Changes] = {}
    for trial in trials:
        run = cell_run(store, experiment.experiment_id, trial)
        corpus = corpora[corpus_key(trial)]
        differences = {} if run is None else changes(run, identity(trial.config, corpus), corpus.digest)
        if trial.depends_on in changed:
            differences = differences or {"init.source run": (trial.depends_on, "a new run")}
        if differences and run is not None:
            changed[trial.key] = differences
    return changed


def refusal(study: str, changed: dict[str, Changes]) -> str:
    """One line: the study, the first changed cell and its keys (old -> new), how many more, and the way out."""
    key, differences = next(iter(changed.items()))
    more = f" (and {len(changed) - 1} more cells)" if len(changed) > 1 else ""
    return (
        f"study '{study}': cell {key} differs from its recorded run: {describe(differences)}{more}; "
        f"rerun with --supersede to run changed cells as new runs (the old ones are kept, tagged superseded), "
        f"or give the study another name"
    )


def supersede_run(store: TrackingStore, run: Run, what_changed: str) -> None:
    """Take ``run`` out of its cell: its role becomes superseded (reports skip it; it stays in the UI)."""
    if run.info.status in (RUNNING, SCHEDULED):
        end_run(store.client, run.info.run_id, KILLED, "superseded: its cell changed")
    store.client.set_tag(run.info.run_id, SUPERSEDED, what_changed[:5000])
    store.client.set_tag(run.info.run_id, ROLE, ROLE_SUPERSEDED)  # last: the one write that moves it out


def study_parent_run(spec: StudySpec, store: TrackingStore, experiment_id: str, *, relog_spec: bool = False) -> str:
    """The study's parent run, RUNNING (again, on a rerun), with its description, matrix, spec and report settings
    (``relog_spec``: the spec artifact replaced by this one, whose changed cells supersede their old runs)."""
    every_cell = expand(spec)
    tags = {ROLE: ROLE_STUDY, STUDY: spec.name, "n_trials": str(len(every_cell))}
    tags["device"] = device_description(every_cell[0].config.train.device)
    tags |= {NOTE: spec.description} if spec.description else {}
    parent_id = shared_run(store, experiment_id, f"tags.`{ROLE}` = '{ROLE_STUDY}'", spec.name, tags)
    describe_study_run(store, parent_id, spec, every_cell, relog_spec)
    # Tags, not params: a rerun with other report settings replaces them (MLflow params cannot change).
    store.client.set_tag(parent_id, EQUIVALENCE_MARGIN, str(spec.report.equivalence_margin))
    if spec.report.reference is not None:
        store.client.set_tag(parent_id, REPORT_REFERENCE, spec.report.reference)
    runs.resume(store.client, parent_id)  # a rerun: RUNNING again until its cells are done
    return parent_id


def close_study(spec: StudySpec, store: TrackingStore, outcome: StudyOutcome) -> None:
    """Every unhealthy finished cell into ``outcome.flagged`` (from its run's tags, whoever ran it), and the parent
    run ended FINISHED (FAILED when a cell failed) once every cell of the study has ended; else it stays RUNNING
    (``--cell N``: the other array tasks are not done yet)."""
    done = True
    for cell in expand(spec):
        run = cell_run(store, outcome.experiment_id, cell)
        done = done and run is not None and run.info.status in (FINISHED, FAILED)
        label = run.data.tags.get(HEALTH, "ok") if run is not None and is_finished(run) else "ok"
        if label != "ok":
            outcome.flagged[cell.key] = HealthVerdict(tuple(label.split(",")), run.data.tags.get(HEALTH_EVIDENCE, ""))
    if done:
        finish_study_run(store, outcome.parent_run_id, FAILED if outcome.failed else FINISHED)


def kill_study(store: TrackingStore, outcome: StudyOutcome, trials: list[Cell], error: BaseException) -> None:
    """An interrupted driver: the cells' open runs and the parent run end KILLED, so a rerun resumes them."""
    reason = ending(error).reason
    end_unfinished(store, outcome.experiment_id, trials, reason)
    end_run(store.client, outcome.parent_run_id, KILLED, reason)


def end_unfinished(store: TrackingStore, experiment_id: str, trials: list[Cell], reason: str) -> None:
    """Mark the runs of ``trials`` that are still RUNNING or SCHEDULED as KILLED (idempotent): nothing stays open."""
    for trial in trials:
        run = cell_run(store, experiment_id, trial)
        if run is not None and run.info.status in (RUNNING, SCHEDULED):
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
    *,
    supersede: bool = False,
    where: str = "spec",
) -> StudyOutcome:
    """Run the study's pending cells (or only cell ``cell_index``) one after another in this process."""
    trials = select_cells(spec, cell_index, where)
    corpora = preflight(spec, trials, checkpoint_dir, where, supersede=supersede)
    store = TrackingStore(tracking_uri)  # checks a tracking server is up; nothing written before here
    name = spec.name if cell_index is None else trials[0].name
    with study_lock(lock_path(tracking_uri, checkpoint_dir, name)):
        worker_args = {"corpora": corpora, "checkpoint_dir": checkpoint_dir, "progress": progress}
        worker, outcome, pending = prepare_study(spec, store, trials, worker_args, retry_failed, supersede)
        order = in_dependency_order(pending)
        try:
            for trial in tqdm(order, desc=spec.name, unit="cell", disable=not progress, file=sys.stderr):
                interrupt.check()  # a safe point: between cells, nothing half-written
                try:
                    outcome.record(trial.key, worker.run_cell(trial))
                except AttemptSuperseded as superseded:
                    print(f"  {trial.key}: {superseded}", file=sys.stderr, flush=True)
        except BaseException as error:
            kill_study(store, outcome, order, error)
            raise
        close_study(spec, store, outcome)
    return outcome
