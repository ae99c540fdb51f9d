"""Run a study: every matrix cell through the shared trainer, recorded in MLflow.

Cells are claimed through :mod:`harness.coordination`, so any number of workers running the
same command execute every cell exactly once in total. Re-running the same command skips
finished cells and resumes interrupted ones from their last checkpoint into the same MLflow
run. A trial that fails (divergence, out of memory, bad data) is marked failed with its reason
and the study goes on. Bad input (data, checkpoints, servers) is rejected before anything is
written.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow.entities import Param

from harness import interrupt, runs
from harness.config import StudySpec
from harness.coordination import FAILED, FINISHED, Claim, ClaimLost, Coordinator
from harness.data import Corpus, load_corpus
from harness.health import HealthVerdict, assess, validation_shares
from harness.matrix import Cell, expand
from harness.runs import FAILED as RUN_FAILED
from harness.runs import (
    KILLED,
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
from harness.tags import CELL, EQUIVALENCE_MARGIN, INIT_SOURCE_RUN, NOTE, REPORT_REFERENCE, ROLE, ROLE_STUDY, STUDY
from harness.tracking import MlflowSink, TrackingStore, device_description
from harness.trainer import Checkpointer, resolve_device, train

CHECKPOINT_DIR = Path("mlruns") / "checkpoints"


@dataclass
class StudyOutcome:
    experiment_id: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    flagged: dict[str, HealthVerdict] = field(default_factory=dict)  # cells this worker finished, judged unhealthy


def _corpus_key(trial: Cell) -> str:
    return trial.config.data.model_dump_json()


def checkpointer(checkpoint_dir: Path, spec: StudySpec, trial: Cell) -> Checkpointer:
    return Checkpointer(checkpoint_dir / spec.name / f"{trial.name}.pt", trial.config.model_dump(mode="json"))


class ClaimedSink(MlflowSink):
    """The trial's metric sink, which stops the trial once another worker has taken its cell over."""

    def __init__(self, *args: object, lost: threading.Event | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.lost = lost

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.lost is not None and self.lost.is_set():
            raise ClaimLost(f"claim on run {self.run_id} was taken over by another worker")
        super().log_metrics(metrics, step)


def preflight(spec: StudySpec, trials: list[Cell], checkpoint_dir: Path) -> dict[str, Corpus]:
    """Everything that can reject the input without writing: data files, leftover checkpoints."""
    corpora: dict[str, Corpus] = {}
    for trial in trials:
        if _corpus_key(trial) not in corpora:
            corpora[_corpus_key(trial)] = load_corpus(trial.config.data)
        checkpointer(checkpoint_dir, spec, trial).load()  # raises SpecError for another config's checkpoint
    return corpora


def describe_study_run(store: TrackingStore, run_id: str, spec: StudySpec, trials: list[Cell]) -> str:
    """Give a new parent run the resolved matrix as params and the spec as an artifact (a rerun keeps the first)."""
    if store.client.get_run(run_id).data.params:
        return run_id
    matrix = spec.matrix
    params = {
        "matrix.variants": ",".join(matrix.variants),
        "matrix.seeds": ",".join(str(seed) for seed in matrix.seeds),
        "n_trials": str(len(trials)),
        **{f"matrix.sweep.{key}": json.dumps(values) for key, values in matrix.sweep.items()},
    }
    store.client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    store.client.log_text(run_id, spec_yaml, "spec.yaml")
    return run_id


@dataclass
class StudyWorker:
    """This process's share of a study: it runs the cells it claims into the study's MLflow runs."""

    spec: StudySpec
    store: TrackingStore
    coordinator: Coordinator
    study_key: str
    outcome: StudyOutcome
    corpora: dict[str, Corpus]
    checkpoint_dir: Path
    progress: bool

    def open_cell_run(self, trial: Cell, claim: Claim) -> tuple[str, bool]:
        """The cell's one MLflow run (the claim's, an existing one found by its tag, or a new one); finished?"""
        store, experiment_id = self.store, self.outcome.experiment_id
        run = store.client.get_run(claim.run_id) if claim.run_id else cell_run(store, experiment_id, trial)
        if run is not None and is_finished(run):
            return run.info.run_id, True
        device = resolve_device(trial.config.train.device).type
        corpus = self.corpora[_corpus_key(trial)]
        return open_trial_run(
            store, experiment_id, self.outcome.parent_run_id, trial, self.spec.name, corpus, device
        ), False

    def source_weights(self, trial: Cell, run_id: str) -> dict | None:
        """The final weights of the cell ``trial`` starts from (``depends_on``), once that cell has ended, fetched
        from its run's artifacts; the source run's id goes on ``trial``'s run. None when the source failed."""
        key, states = trial.depends_on, self.coordinator.states
        assert key is not None
        while (state := states(self.study_key, [key])[key][0]) not in (FINISHED, FAILED):
            time.sleep(2.0)  # another worker still trains the source
        source = oldest(self.store.runs(self.outcome.experiment_id, f"tags.`{CELL}` = '{key}'"))
        if state == FAILED or source is None or not is_finished(source):
            return None
        self.store.client.set_tag(run_id, INIT_SOURCE_RUN, source.info.run_id)
        return self.store.load_weights(source.info.run_id)

    def train_cell(self, trial: Cell, run_id: str, lost: threading.Event) -> str | None:
        """Train one cell into its open MLflow run; the failure reason, or None once it finished.

        Steps the run already holds (a resumed, taken-over or retried cell) are not logged again.
        """
        initial = None
        if trial.depends_on is not None and (initial := self.source_weights(trial, run_id)) is None:
            reason = f"source cell {trial.depends_on} failed"
            end_run(self.store.client, run_id, RUN_FAILED, reason)
            return reason
        checkpoint = checkpointer(self.checkpoint_dir, self.spec, trial)
        run = TrialRun(ClaimedSink(self.store.client, run_id, self.store.logged_steps(run_id), lost=lost))
        config, corpus = trial.config, self.corpora[_corpus_key(trial)]
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
            shares = validation_shares(result.utilisation)
            health_metrics, verdict = assess(run.client, run_id, result.summary | shares)
            if verdict.flags:
                self.outcome.flagged[trial.key] = verdict
            run.finish(result.summary | health_metrics, tables, verdict.tags())
        except ClaimLost:
            run.sink.flush()  # the cell's run is the new holder's now: leave it as it is
            raise
        except BaseException as error:  # any Exception is the trial's failure; an interruption kills the run
            how = run.fail(error)
            if how.status == KILLED:
                raise  # the checkpoint stays, so a rerun resumes
            checkpoint.path.unlink(missing_ok=True)
            return how.reason
        checkpoint.path.unlink(missing_ok=True)
        return None

    def run_claimed(self, trial: Cell, claim: Claim, position: str) -> None:
        """Run a claimed cell to its end and record that end on the claim."""
        coordinator = self.coordinator
        try:
            run_id, finished = self.open_cell_run(trial, claim)
            coordinator.set_run(claim, run_id)
            if finished:
                coordinator.complete(claim, FINISHED)
                return
            resumed = f" (resuming after {claim.previous_worker})" if claim.previous_worker else ""
            print(f"{position} {trial.key}{resumed}", file=sys.stderr, flush=True)
            with coordinator.heartbeat(claim) as lost:
                reason = self.train_cell(trial, run_id, lost)
        except ClaimLost:
            print(f"  {trial.key}: taken over by another worker", file=sys.stderr, flush=True)
            return
        except BaseException:
            coordinator.release(claim)  # Ctrl-C, SIGTERM: claimable again at once
            raise
        if reason is None:
            coordinator.complete(claim, FINISHED)
            self.outcome.finished.append(trial.key)
        else:
            coordinator.complete(claim, FAILED, reason)
            print(f"  failed: {reason}", file=sys.stderr, flush=True)


def run_study(
    spec: StudySpec,
    tracking_uri: str,
    progress: bool = True,
    checkpoint_dir: Path = CHECKPOINT_DIR,
    storage: str | None = None,
    heartbeat_timeout: float = 60.0,
    retry_failed: bool = False,
) -> StudyOutcome:
    from harness.coordination import resolve_storage

    trials = expand(spec)
    corpora = preflight(spec, trials, checkpoint_dir)
    coordinator = Coordinator(resolve_storage(storage, tracking_uri, checkpoint_dir), heartbeat_timeout)
    coordinator.check()
    store = TrackingStore(tracking_uri)  # checks a tracking server is up; nothing written before here
    coordinator.setup()
    experiment_id = store.experiment_id(spec.name, spec.description)
    experiment = store.client.get_experiment(experiment_id)
    study_key = f"{spec.name}@{experiment_id}:{experiment.creation_time}"  # one store's study, not a namesake's
    cells = [t.key for t in trials]
    coordinator.register(study_key, cells)
    if retry_failed:
        coordinator.requeue_failed(study_key, cells)
    tags = {ROLE: ROLE_STUDY, STUDY: spec.name, "n_trials": str(len(trials))}
    tags["device"] = device_description(trials[0].config.train.device)
    tags |= {NOTE: spec.description} if spec.description else {}
    query = f"tags.`{ROLE}` = '{ROLE_STUDY}'"
    parent_id = coordinator.study_run(
        study_key,
        lambda: describe_study_run(store, shared_run(store, experiment_id, query, spec.name, tags), spec, trials),
    )
    # A tag, not a param: a rerun with another margin replaces it (MLflow params cannot change).
    store.client.set_tag(parent_id, EQUIVALENCE_MARGIN, str(spec.report.equivalence_margin))
    if spec.report.reference is not None:
        store.client.set_tag(parent_id, REPORT_REFERENCE, spec.report.reference)
    runs.resume(store.client, parent_id)  # a rerun: RUNNING again until its cells are done
    outcome = StudyOutcome(experiment_id, parent_id)
    worker = StudyWorker(spec, store, coordinator, study_key, outcome, corpora, checkpoint_dir, progress)
    by_key = {t.key: t for t in trials}
    try:
        while True:
            interrupt.check()  # a safe point: between cells, nothing half-written
            claim = coordinator.claim(study_key, cells)
            if claim is not None:
                worker.run_claimed(by_key[claim.cell], claim, f"[{cells.index(claim.cell) + 1}/{len(cells)}]")
            elif all(state in (FINISHED, FAILED) for state, _ in coordinator.states(study_key, cells).values()):
                break
            else:
                time.sleep(min(2.0, heartbeat_timeout / 4))  # other workers hold the rest; take over stale ones
    except BaseException as stop:  # Ctrl-C/SIGTERM (or a bug): the parent run ends KILLED, as its trial run did
        end_run(store.client, parent_id, KILLED, ending(stop).reason)
        raise
    for cell, (state, error) in coordinator.states(study_key, cells).items():
        if state == FAILED:
            outcome.failed[cell] = error or "failed"
        elif cell not in outcome.finished:
            outcome.skipped.append(cell)
    finish_study_run(store, parent_id, runs.FAILED if outcome.failed else runs.FINISHED)
    coordinator.dispose()
    return outcome
