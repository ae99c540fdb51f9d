"""Run a study: every matrix cell through the shared trainer, recorded in MLflow.

Re-running the same command skips finished cells and resumes interrupted ones from their
last checkpoint into the same MLflow run. A trial that fails (divergence, out of memory, bad
data) is marked failed with its reason and the study goes on.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.config import StudySpec
from harness.data import Corpus, DataError, load_corpus
from harness.matrix import Trial, expand
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


def _corpus_for(trial: Trial, cache: dict[str, Corpus]) -> Corpus:
    key = trial.config.data.model_dump_json()
    if key not in cache:
        cache[key] = load_corpus(trial.config.data)
    return cache[key]


def run_trial(
    store: TrackingStore,
    experiment_id: str,
    parent_id: str,
    spec: StudySpec,
    trial: Trial,
    corpus: Corpus,
    checkpoint_dir: Path,
    progress: bool,
) -> str | None:
    """Train one cell into its MLflow run; returns the failure reason, or None on success."""
    device = resolve_device(trial.config.train.device)
    run_id = store.open_trial_run(experiment_id, parent_id, trial, spec.name, corpus, device.type)
    sink = MlflowSink(store.client, run_id)
    checkpoint = Checkpointer(checkpoint_dir / spec.name / f"{trial.name}.pt", trial.config.model_dump(mode="json"))
    try:
        result = train(trial.config, corpus, sink, checkpoint=checkpoint, progress=progress, label=trial.key)
    except (NonFiniteLoss, DataError, torch.OutOfMemoryError) as error:
        sink.flush()
        reason = f"{type(error).__name__}: {error}"
        store.fail_trial(run_id, reason)
        return reason
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


def run_study(
    spec: StudySpec, tracking_uri: str, progress: bool = True, checkpoint_dir: Path = CHECKPOINT_DIR
) -> StudyOutcome:
    trials = expand(spec)
    store = TrackingStore(tracking_uri)
    experiment_id = store.experiment_id(spec.name)
    parent_id = store.study_run(
        experiment_id,
        spec.name,
        {"n_trials": str(len(trials)), "device": device_description(trials[0].config.train.device)},
    )
    outcome = StudyOutcome(experiment_id, parent_id)
    corpora: dict[str, Corpus] = {}
    for index, trial in enumerate(trials, 1):
        existing = store.trial_run(experiment_id, trial)
        if existing is not None and store.is_finished(existing):
            outcome.skipped.append(trial.key)
            continue
        print(f"[{index}/{len(trials)}] {trial.key}", file=sys.stderr, flush=True)
        reason = run_trial(
            store, experiment_id, parent_id, spec, trial, _corpus_for(trial, corpora), checkpoint_dir, progress
        )
        if reason is None:
            outcome.finished.append(trial.key)
        else:
            outcome.failed[trial.key] = reason
            print(f"  failed: {reason}", file=sys.stderr, flush=True)
    return outcome
