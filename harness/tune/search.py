"""The tuning loop behind ``harness tune``: every worker runs it; together they run ``n_trials`` trials.

MLflow: one parent run per tuning study (``harness.role`` = ``tune``, tags ``optuna.storage`` with
the password redacted and ``optuna.study_name``), shared by every worker and rerun, and one nested
run per Optuna trial (:mod:`harness.tune.objective`). A worker that has run out of new trials waits
for other workers' running trials, so a trial orphaned near the end is still retried.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import mlflow
import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from harness import interrupt
from harness.config import SpecError, StudySpec, TuneConfig, resolve_trial
from harness.data import load_corpus
from harness.runs import FINISHED, KILLED, RUNNING, TRIAL_ERRORS, end_run, ending, shared_run
from harness.tags import NOTE, OPTUNA_STORAGE, OPTUNA_STUDY, ROLE, ROLE_TUNE, STUDY
from harness.tracking import TrackingStore, device_description
from harness.tune.attrs import PARENT_ATTR
from harness.tune.budget import Budget, SurplusTrial, counted
from harness.tune.objective import Context, objective
from harness.tune.results import best_trials, export_spec
from harness.tune.storage import StaleTrial, export_folder, open_storage
from harness.urls import redact


def make_sampler(tune: TuneConfig, offset: int) -> optuna.samplers.BaseSampler:
    seed = tune.sampler_seed + offset
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(5, tune.n_trials or 5))


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    if tune.pruner == "none" or len(tune.objectives) > 1:
        return optuna.pruners.NopPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.pruner_warmup_steps))
    return optuna.pruners.MedianPruner(
        n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=tune.pruner_warmup_steps
    )


def load_study(spec: StudySpec, storage: RDBStorage, storage_url: str) -> optuna.Study:
    """The spec's Optuna study (created by the first worker), with this worker's sampler and pruner."""
    tune = spec.tune
    assert tune is not None
    directions = ["minimize"] * len(tune.objectives)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=directions, load_if_exists=True)
    except ValueError as error:
        raise SpecError(f"Optuna study '{spec.name}' in {redact(storage_url)}: {error}") from None
    if len(study.directions) != len(directions):
        raise SpecError(
            f"Optuna study '{spec.name}' in {redact(storage_url)} has {len(study.directions)} objective(s), "
            f"the spec asks for {len(directions)}: use another --storage or study name"
        )
    study.sampler = make_sampler(tune, len(study.trials) + (os.getpid() if not storage_url.startswith("sqlite") else 0))
    study.pruner = make_pruner(tune)
    study.set_user_attr("objectives", list(tune.objectives))
    return study


def tune_parent_run(store: TrackingStore, spec: StudySpec, study: optuna.Study, storage_url: str) -> str:
    """The tuning study's parent run, shared by every worker (:func:`harness.runs.shared_run`)."""
    tune = spec.tune
    assert tune is not None
    experiment_id = store.experiment_id(spec.name, spec.description)
    known = study.user_attrs.get(PARENT_ATTR)
    try:
        if known and store.client.get_run(known).info.lifecycle_stage == "active":
            store.client.update_run(known, RUNNING)  # resumed, or extended with a larger --n-trials
            return known
    except mlflow.exceptions.MlflowException:
        pass  # another tracking store than last time: make a parent run there
    storage = redact(storage_url)
    tags = {
        ROLE: ROLE_TUNE,
        OPTUNA_STUDY: study.study_name,
        STUDY: spec.name,
        OPTUNA_STORAGE: storage,
        "optuna.objectives": ",".join(tune.objectives),
        "optuna.sampler": tune.sampler,
        "optuna.pruner": make_pruner(tune).__class__.__name__,
        "variant": tune.variant,
        "device": device_description(resolve_trial(spec, tune.variant, tune.seeds[0]).train.device),
        **({NOTE: spec.description} if spec.description else {}),
    }
    query = f"tags.`{ROLE}` = '{ROLE_TUNE}' and tags.`{OPTUNA_STUDY}` = '{study.study_name}'"
    quoteless = storage.replace("'", "")  # a quote would end the filter's string
    query += f" and tags.`{OPTUNA_STORAGE}` = '{quoteless}'"
    return shared_run(store, experiment_id, query, f"tune-{study.study_name}", tags)


def wait_for_others(study: optuna.Study, poll_s: float) -> bool:
    """Wait while other workers' trials run; True when a retried trial is waiting to be run."""
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.WAITING in states:
            return True
        if TrialState.RUNNING not in states:
            return False
        interrupt.check()  # a safe point: this worker holds no trial while it waits
        time.sleep(poll_s)


def stop_when_interrupted(study: optuna.Study, _trial: FrozenTrial) -> None:
    """Callback after each trial: on Ctrl-C/SIGTERM start no new trial."""
    if interrupt.requested() is not None:
        study.stop()


def optimise(ctx: Context, study: optuna.Study, n_trials: int | None) -> None:
    """Run trials until the budget (shared with the other workers) or ``tune.timeout_s`` is used up."""
    tune = ctx.spec.tune
    assert tune is not None
    started = time.monotonic()
    poll_s = min(5.0, max(0.5, tune.heartbeat_interval_s / 2))
    while True:
        remaining = None if tune.timeout_s is None else tune.timeout_s - (time.monotonic() - started)
        if remaining is not None and remaining <= 0:
            return
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)  # retries are counted already: run them
        if n_trials is None or waiting or counted(trials) < n_trials:
            study.optimize(
                lambda trial: objective(ctx, trial),
                n_trials=n_trials,
                timeout=remaining,
                callbacks=[ctx.budget, stop_when_interrupted],
                catch=(SurplusTrial, *TRIAL_ERRORS),
                gc_after_trial=True,
            )
            interrupt.check()  # the study stopped between trials for a signal: leave as an interruption
        timed_out = tune.timeout_s is not None and time.monotonic() - started >= tune.timeout_s
        if timed_out or n_trials is None or not wait_for_others(study, poll_s):
            return


def record_best(ctx: Context, study: optuna.Study, path: Path) -> tuple[list[FrozenTrial], Path | None]:
    """The best trial(s); the best one's config exported as a study spec and logged to the parent run."""
    tune = ctx.spec.tune
    assert tune is not None
    best = best_trials(study)
    if not best:
        return best, None
    exported = export_spec(ctx.spec, best[0], path)
    client, parent_id = ctx.store.client, ctx.parent_id
    # Step = trials finished so far: a best-so-far curve; a rerun or an interrupted tune that records the best
    # again at the same count logs nothing twice (the store's resume rule for every run).
    step = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    logged = ctx.store.logged_steps(parent_id)
    for name, value in zip(tune.objectives, best[0].values, strict=True):
        if logged.get(f"best_{name}", -1) < step:
            client.log_metric(parent_id, f"best_{name}", value, step=step)
    client.set_tag(parent_id, "best_trial", str(best[0].number))
    client.set_tag(parent_id, "best_params", json.dumps(best[0].params))
    client.log_artifact(parent_id, str(exported))
    return best, exported


def run_tune(
    spec: StudySpec,
    tracking_uri: str,
    storage_url: str,
    n_trials: int | None = None,
    progress: bool = False,
    out: Path | None = None,
) -> tuple[optuna.Study, list[FrozenTrial], Path | None]:
    tune = spec.tune
    assert tune is not None
    n_trials = n_trials if n_trials is not None else tune.n_trials
    storage = open_storage(storage_url, tune)
    study = load_study(spec, storage, storage_url)
    store = TrackingStore(tracking_uri)
    stale = storage.heartbeat_stale_trial_callback
    assert isinstance(stale, StaleTrial)
    stale.store = store
    parent_id = tune_parent_run(store, spec, study, storage_url)
    study.set_user_attr(PARENT_ATTR, parent_id)
    corpus = load_corpus(resolve_trial(spec, tune.variant, tune.seeds[0]).data)
    ctx = Context(
        spec=spec,
        store=store,
        experiment_id=store.experiment_id(spec.name),
        parent_id=parent_id,
        corpus=corpus,
        budget=Budget(n_trials),
        progress=progress,
    )
    if n_trials is not None and counted(study.get_trials(deepcopy=False)) >= n_trials:
        print(f"study '{spec.name}' already has {n_trials} trials", file=sys.stderr)
    path = out or export_folder(storage_url) / f"{spec.name}-best.yaml"
    try:
        optimise(ctx, study, n_trials)
    except KeyboardInterrupt as stop:  # the best config so far is exported all the same; the parent ends KILLED
        record_best(ctx, study, path)
        end_run(store.client, parent_id, KILLED, ending(stop).reason)
        raise
    best, exported = record_best(ctx, study, path)
    if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        store.client.set_terminated(parent_id, FINISHED)
    return study, best, exported
