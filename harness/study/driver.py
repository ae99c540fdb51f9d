"""Run a study: every matrix cell through the shared trainer, recorded in MLflow.

The driver (:func:`prepare_study`: in this process, or the Ray driver of :mod:`harness.engine.ray_study`)
does the preflight, creates the study's parent run and skips finished cells; a cell's run is created when
the cell starts, so its duration is its own. :meth:`StudyWorker.run_cell` is the one way a cell runs, called by the
in-process loop (:func:`run_study`), by ``--cell N`` and inside a Ray task. Re-running the same
command skips finished cells and resumes interrupted ones from their last checkpoint into the same
MLflow run. A trial that fails (divergence, out of memory, bad data) is marked failed with its
reason and the study goes on. Bad input (data, checkpoints, servers) is rejected before anything
is written; a study lock keeps a second invocation on this machine from running the same cells.
"""
# Over 350 lines: the study driver's one flow: preflight, prepare, run (rounds), close, interrupt.

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness import interrupt
from harness.changes import changed_cells, refusal, supersede_run
from harness.checkpoint import cell_checkpointer
from harness.config import SpecError, StudySpec
from harness.data import Corpus, load_corpus, save_to_cache
from harness.engine.attempt import AttemptSink, AttemptSuperseded, new_attempt
from harness.engine.lock import lock_path, study_lock
from harness.fingerprint import describe
from harness.health import HealthVerdict, assess
from harness.matrix import Cell, expand
from harness.preflight import corpus_key, preflight
from harness.rounds import current_plan, record_plan, round_cells
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
)
from harness.speed import ARTIFACT as SPEED_ARTIFACT
from harness.speed import measure_speed
from harness.step import set_threads
from harness.study_run import study_parent_run
from harness.tags import (
    CELL,
    ERROR,
    HEALTH,
    HEALTH_EVIDENCE,
    INIT_SOURCE_RUN,
)
from harness.tracking import TrackingStore, check_tracking_uri
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

    def absorb(self, other: StudyOutcome) -> StudyOutcome:
        """This outcome with another round's added (the same study)."""
        self.finished += other.finished
        self.skipped += other.skipped
        self.failed |= other.failed
        return self

    def record(self, key: str, reason: str | None) -> None:
        """A cell's end as the runner saw it: None when it finished, else why it failed."""
        if reason is None:
            self.finished.append(key)
        else:
            self.failed[key] = reason
            print(f"  {key} failed: {reason}", file=sys.stderr, flush=True)


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
        set_threads(trial.config)  # before the device tag records them (a Ray worker keeps its previous cell's)
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

    def train_cell(
        self, trial: Cell, run_id: str, attempt: str, initial: dict[str, Any] | None, started: float
    ) -> str | None:
        """Train one cell into its open MLflow run; the failure reason, or None once it finished.

        Steps the run already holds (a resumed or retried cell) are not logged again. ``initial``: the weights
        it starts from (an upcycled cell's source), else None. ``started``: ``time.monotonic()`` when the cell
        started (the run's ``wall_time_s``: this attempt's time from then to its end, evaluation and logging in).
        """
        config, corpus = trial.config, self.corpora[corpus_key(trial)]
        checkpoint = cell_checkpointer(self.checkpoint_dir, self.spec, trial, corpus)
        if logged := self.store.logged_steps(run_id):
            print(f"  {trial.key}: resuming its interrupted run (step {max(logged.values())} logged)", file=sys.stderr)
        run = TrialRun(AttemptSink(self.store.client, run_id, logged, attempt), started)
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
            grad_clip = config.optim.grad_clip
            health_metrics, verdict = assess(run.client, run_id, result.summary, result.utilisation, corpus, grad_clip)
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
        started = time.monotonic()
        run_id, finished = self.open_cell_run(trial)
        if finished:
            return None
        initial = None
        if trial.depends_on is not None and (initial := self.source_weights(trial, run_id)) is None:
            reason = f"source cell {trial.depends_on} failed"
            end_run(self.store.client, run_id, FAILED, reason)
            return reason
        return self.train_cell(trial, run_id, new_attempt(self.store.client, run_id), initial, started)


def prepare_study(
    spec: StudySpec, store: TrackingStore, trials: list[Cell], worker_args: dict, retry_failed: bool, supersede: bool
) -> tuple[StudyWorker, StudyOutcome, list[Cell]]:
    """The driver's part: the parent run, and the pending cells (an interrupted one's run SCHEDULED again; a new
    cell's run is created when it starts); finished cells skipped.

    A cell whose identity changed since its run was recorded is refused (nothing written) unless ``supersede``:
    then its old run is kept, tagged superseded, and the cell starts as a new run. ``worker_args``: the
    :class:`StudyWorker` fields besides the store and runs (corpora, checkpoint_dir, progress).
    """
    corpora, checkpoint_dir = worker_args["corpora"], worker_args["checkpoint_dir"]
    changed = changed_cells(store, spec.name, trials, corpora)
    if changed and not supersede:
        raise SpecError(refusal(spec.name, changed))
    for corpus in corpora.values():  # cached only now: a refused rerun (changed data) leaves no new cache file
        save_to_cache(corpus)
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
            else:  # its run starts when the cell does (its duration is its own, not its wait in the queue)
                if run is not None:  # an interrupted run, resumed when the cell runs again
                    store.client.update_run(run.info.run_id, SCHEDULED)
                pending.append(trial)
    except BaseException as error:
        kill_study(store, outcome, trials, error)
        raise
    return worker, outcome, pending


def close_study(spec: StudySpec, store: TrackingStore, outcome: StudyOutcome) -> None:
    """Every unhealthy finished cell into ``outcome.flagged`` (from its run's tags, whoever ran it), and the parent
    run ended FINISHED (FAILED when a cell failed) once every cell of the study has ended; else it stays RUNNING
    (``--cell N``: the other array tasks are not done yet). A sequential study is done when its next round has no
    cells; its cells that no round needed never run."""
    cells = expand(spec)
    sequential = spec.matrix.sequential is not None
    plan = current_plan(spec, store, cells)
    done = not sequential or not plan.next_cells
    for cell in cells:
        run = cell_run(store, outcome.experiment_id, cell)
        if run is None:
            done = done and sequential
            continue
        done = done and run.info.status in (FINISHED, FAILED)
        label = run.data.tags.get(HEALTH, "ok") if is_finished(run) else "ok"
        if label != "ok":
            outcome.flagged[cell.key] = HealthVerdict(tuple(label.split(",")), run.data.tags.get(HEALTH_EVIDENCE, ""))
    if not spec.matrix.sweep:  # a sweep's cells share (variant, seed): no comparison of variants to decide
        record_plan(store, outcome.parent_run_id, spec, plan)
    if done and not outcome.failed:
        record_speed(spec, store, outcome.parent_run_id, cells)
    if done:
        finish_study_run(store, outcome.parent_run_id, FAILED if outcome.failed else FINISHED)


def record_speed(spec: StudySpec, store: TrackingStore, parent_id: str, cells: list[Cell]) -> None:
    """Once, when the study is done: the paired speed measurement behind "faster" (:mod:`harness.speed`), every
    variant's first cell timed in this process, as the study run's ``speed.json``."""
    if len(spec.matrix.variants) < 2 or spec.matrix.sweep:
        return
    if any(artifact.path == SPEED_ARTIFACT for artifact in store.client.list_artifacts(parent_id)):
        return
    configs = {}
    for cell in cells:
        configs.setdefault(cell.variant, cell.config)
    settings = spec.design.speed
    print(
        f"timing {len(configs)} variants' training steps interleaved in this process for the speed verdict "
        f"({settings.rounds} rounds of {settings.steps} steps each)",
        flush=True,
    )
    record = measure_speed(configs, load_corpus(cells[0].config.data), settings)
    store.client.log_dict(parent_id, record.as_json(), SPEED_ARTIFACT)


Execute = Callable[[StudyWorker, StudyOutcome, list[Cell]], None]


def drive_study(
    spec: StudySpec,
    store: TrackingStore,
    trials: list[Cell],
    worker_args: dict,
    *,
    retry_failed: bool,
    supersede: bool,
    rounds: bool,
    execute: Execute,
) -> StudyOutcome:
    """Prepare the cells and ``execute`` the pending ones: all of ``trials`` at once, or (``rounds``: a sequential
    design) round after round, each round's cells chosen from the results of the rounds before
    (:mod:`harness.rounds`), until no comparison is open or ``max`` seeds ran."""
    cells = round_cells(current_plan(spec, store, trials), trials) if rounds else trials
    total: StudyOutcome | None = None
    while True:
        worker, outcome, pending = prepare_study(spec, store, cells, worker_args, retry_failed, supersede)
        total = outcome if total is None else total.absorb(outcome)
        execute(worker, total, pending)
        following = round_cells(current_plan(spec, store, trials), trials) if rounds else []
        if not following or following == cells:  # done, or a round that could not change anything
            break
        cells = following
    close_study(spec, store, total)
    return total


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


def select_cells(
    spec: StudySpec, cell_index: int | None, where: str = "spec", tracking_uri: str | None = None
) -> list[Cell]:
    """Every cell, or the one at ``cell_index`` (``--cell N``, a Slurm array index). The numbering is the matrix's
    (a sequential design's up to ``max`` seeds), the same whatever the store holds: an array task that starts after
    others finished runs the cell it was given. Given ``tracking_uri``, a cell of a sequential study that the
    current round does not need (:func:`needed_cells`) is left out: an empty list, nothing to run."""
    trials = expand(spec, where)
    if cell_index is None:
        return trials
    if not 0 <= cell_index < len(trials):
        raise SpecError(f"--cell {cell_index}: study '{spec.name}' has cells 0..{len(trials) - 1}")
    chosen = trials[cell_index]
    if spec.matrix.sequential is not None and tracking_uri is not None:
        return [cell for cell in needed_cells(spec, tracking_uri, trials) if cell.key == chosen.key]
    return [chosen]


def needed_cells(spec: StudySpec, tracking_uri: str, trials: list[Cell]) -> list[Cell]:
    """The cells a sequential study's current round needs, by what the store at ``tracking_uri`` holds (finished
    cells are no longer needed; the round after needs the cells the last results open)."""
    return round_cells(current_plan(spec, existing_store(tracking_uri), trials), trials)


def existing_store(tracking_uri: str) -> TrackingStore | None:
    """The store at ``tracking_uri`` when it exists (an embedded one is never created here)."""
    try:
        check_tracking_uri(tracking_uri, create=False)
    except SpecError:
        return None
    return TrackingStore(tracking_uri)


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
    trials = select_cells(spec, cell_index, where, tracking_uri if cell_index is not None else None)
    if not trials:  # --cell N of a sequential study: not needed by the current round (decided, or not yet)
        key = expand(spec, where)[cell_index].key  # type: ignore[index]  # select_cells checked the index
        print(f"--cell {cell_index} ({key}): not needed by the study's current round; nothing to run", flush=True)
        return StudyOutcome(experiment_id="", parent_run_id="")
    corpora = preflight(spec, trials, checkpoint_dir, where, supersede=supersede)
    store = TrackingStore(tracking_uri)  # checks a tracking server is up; nothing written before here
    name = spec.name if cell_index is None else trials[0].name
    with study_lock(lock_path(tracking_uri, checkpoint_dir, name)):
        worker_args = {"corpora": corpora, "checkpoint_dir": checkpoint_dir, "progress": progress}

        def execute(worker: StudyWorker, outcome: StudyOutcome, pending: list[Cell]) -> None:
            try:  # in expand's order: a source cell before the cells that start from it
                for trial in tqdm(pending, desc=spec.name, unit="cell", disable=not progress, file=sys.stderr):
                    interrupt.check()  # a safe point: between cells, nothing half-written
                    try:
                        outcome.record(trial.key, worker.run_cell(trial))
                    except AttemptSuperseded as superseded:
                        print(f"  {trial.key}: {superseded}", file=sys.stderr, flush=True)
            except BaseException as error:
                kill_study(store, outcome, pending, error)
                raise

        rounds = spec.matrix.sequential is not None and cell_index is None
        return drive_study(
            spec,
            store,
            trials,
            worker_args,
            retry_failed=retry_failed,
            supersede=supersede,
            rounds=rounds,
            execute=execute,
        )
