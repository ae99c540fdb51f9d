"""Run a study: every matrix cell through the shared trainer, recorded in MLflow.

Cells are claimed through :mod:`harness.coordination`, so any number of workers running the
same command execute every cell exactly once in total. Re-running the same command skips
finished cells and resumes interrupted ones from their last checkpoint into the same MLflow
run. A trial that fails (divergence, out of memory, bad data) is marked failed with its reason
and the study goes on. Bad input (data, checkpoints, servers) is rejected before anything is
written.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.config import StudySpec
from harness.coordination import FAILED, FINISHED, Claim, ClaimLost, Coordinator
from harness.data import Corpus, DataError, load_corpus
from harness.matrix import Cell, expand
from harness.tracking import MlflowSink, TrackingStore, device_description
from harness.trainer import Checkpointer, NonFiniteLoss, resolve_device, train

CHECKPOINT_DIR = Path("mlruns") / "checkpoints"


@dataclass
class StudyOutcome:
    experiment_id: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


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


def run_trial(
    store: TrackingStore,
    experiment_id: str,
    parent_id: str,
    spec: StudySpec,
    trial: Cell,
    corpus: Corpus,
    checkpoint_dir: Path,
    progress: bool,
    run_id: str | None = None,
    lost: threading.Event | None = None,
) -> str | None:
    """Train one cell into its MLflow run; returns the failure reason, or None on success.

    ``run_id``: the cell's run, already opened (a resumed cell): its logged steps are not repeated.
    """
    device = resolve_device(trial.config.train.device)
    logged: dict[str, int] = {}
    if run_id is None:
        run_id = store.open_trial_run(experiment_id, parent_id, trial, spec.name, corpus, device.type)
    else:  # an existing run (resumed, taken over, retried): steps it already holds are not logged again
        logged = store.logged_steps(run_id)
    checkpoint = checkpointer(checkpoint_dir, spec, trial)
    sink = ClaimedSink(store.client, run_id, logged, lost=lost)
    try:
        result = train(trial.config, corpus, sink, checkpoint=checkpoint, progress=progress, label=trial.key)
    except (NonFiniteLoss, DataError, torch.OutOfMemoryError) as error:
        sink.flush()
        reason = f"{type(error).__name__}: {error}"
        store.fail_trial(run_id, reason)
        checkpoint.path.unlink(missing_ok=True)
        return reason
    except ClaimLost:
        sink.flush()
        raise
    except BaseException:
        sink.flush()
        store.fail_trial(run_id, "interrupted: " + traceback.format_exc(limit=1).strip().splitlines()[-1], "KILLED")
        raise
    sink.flush()
    if trial.config.train.save_checkpoint and result.model is not None:
        store.log_weights(run_id, result.model.state_dict())
    tables = {"utilisation": result.utilisation, "utilisation_history": result.utilisation_history}
    store.finish_trial(run_id, result.summary, tables)
    checkpoint.path.unlink(missing_ok=True)
    return None


def preflight(spec: StudySpec, trials: list[Cell], checkpoint_dir: Path) -> dict[str, Corpus]:
    """Everything that can reject the input without writing: data files, leftover checkpoints."""
    corpora: dict[str, Corpus] = {}
    for trial in trials:
        if _corpus_key(trial) not in corpora:
            corpora[_corpus_key(trial)] = load_corpus(trial.config.data)
        checkpointer(checkpoint_dir, spec, trial).load()  # raises SpecError for another config's checkpoint
    return corpora


def _open_cell_run(
    store: TrackingStore,
    experiment_id: str,
    parent_id: str,
    spec: StudySpec,
    trial: Cell,
    claim: Claim,
    corpus: Corpus,
) -> tuple[str, bool]:
    """The cell's one MLflow run (the claim's, an existing one found by its tag, or a new one); finished?"""
    run = store.client.get_run(claim.run_id) if claim.run_id else store.trial_run(experiment_id, trial)
    if run is not None and store.is_finished(run):
        return run.info.run_id, True
    device = resolve_device(trial.config.train.device).type
    return store.open_trial_run(experiment_id, parent_id, trial, spec.name, corpus, device), False


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
    experiment_id = store.experiment_id(spec.name)
    experiment = store.client.get_experiment(experiment_id)
    study_key = f"{spec.name}@{experiment_id}:{experiment.creation_time}"  # one store's study, not a namesake's
    cells = [t.key for t in trials]
    coordinator.register(study_key, cells)
    if retry_failed:
        coordinator.requeue_failed(study_key, cells)
    parent_id = coordinator.study_run(
        study_key,
        lambda: store.study_run(
            experiment_id,
            spec.name,
            {"n_trials": str(len(trials)), "device": device_description(trials[0].config.train.device)},
        ),
    )
    outcome = StudyOutcome(experiment_id, parent_id)
    by_key = {t.key: t for t in trials}
    poll = min(2.0, heartbeat_timeout / 4)
    while True:
        claim = coordinator.claim(study_key, cells)
        if claim is None:
            states = coordinator.states(study_key, cells)
            if all(state in (FINISHED, FAILED) for state, _ in states.values()):
                break
            time.sleep(poll)  # other workers hold the rest; take over any whose heartbeat stops
            continue
        trial = by_key[claim.cell]
        corpus = corpora[_corpus_key(trial)]
        try:
            run_id, finished = _open_cell_run(store, experiment_id, parent_id, spec, trial, claim, corpus)
            coordinator.set_run(claim, run_id)
            if finished:
                coordinator.complete(claim, FINISHED)
                continue
            resumed = f" (resuming after {claim.previous_worker})" if claim.previous_worker else ""
            print(f"[{cells.index(claim.cell) + 1}/{len(cells)}] {trial.key}{resumed}", file=sys.stderr, flush=True)
            with coordinator.heartbeat(claim) as lost:
                reason = run_trial(
                    store, experiment_id, parent_id, spec, trial, corpus, checkpoint_dir, progress, run_id, lost
                )
        except ClaimLost:
            print(f"  {trial.key}: taken over by another worker", file=sys.stderr, flush=True)
            continue
        except BaseException:
            coordinator.release(claim)  # Ctrl-C, SIGTERM: claimable again at once
            raise
        if reason is None:
            coordinator.complete(claim, FINISHED)
            outcome.finished.append(trial.key)
        else:
            coordinator.complete(claim, FAILED, reason)
            print(f"  failed: {reason}", file=sys.stderr, flush=True)
    for cell, (state, error) in coordinator.states(study_key, cells).items():
        if state == FAILED:
            outcome.failed[cell] = error or "failed"
        elif cell not in outcome.finished:
            outcome.skipped.append(cell)
    coordinator.dispose()
    return outcome
