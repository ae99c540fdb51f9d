"""``harness run-study SPEC --ray ADDRESS``: each cell a Ray task, one driver per study.

The driver connects, sizes each trial's task (:mod:`.ray_cluster`), takes the study's named actor
(a second driver for the same study on the cluster is refused), then does what the in-process
driver does (:func:`harness.study.prepare_study`: preflight, parent run, finished cells skipped)
and submits the pending cells. Ray retries a task after a worker or node loss (``max_retries``);
a trial's own failure is a returned reason, so Ray does not retry it. A retried cell resumes from
its checkpoint (when ``--checkpoint-dir`` is a path every node sees) into the same run; the lost
attempt, if it still runs, stops at its next log step (:mod:`.attempt`). A dependent cell's task
takes its source's result as an argument, so Ray starts it after the source ended.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm import tqdm

from harness import interrupt
from harness.config import SpecError, StudySpec
from harness.data import load_corpus
from harness.engine.ray_cluster import connect, disconnect, trial_resources
from harness.matrix import Cell
from harness.preflight import preflight
from harness.study import (
    StudyOutcome,
    StudyWorker,
    drive_study,
    end_unfinished,
    kill_study,
    select_cells,
)
from harness.tracking import TrackingStore
from harness.urls import absolute

NAMESPACE = "moe-harness"


@ray.remote(num_cpus=0)
class StudyGuard:
    """Exists while a driver runs the study: its name is the study's, so a second driver cannot create it."""


def guard_study(spec: StudySpec, tracking_uri: str) -> ray.actor.ActorHandle:
    """The study's named actor (it dies with this driver, even a SIGKILLed one), or a one-line refusal."""
    name = f"study:{spec.name}@{tracking_uri}"
    try:
        return StudyGuard.options(name=name, namespace=NAMESPACE, lifetime="non_detached").remote()
    except ValueError:
        raise SpecError(f"study '{spec.name}' ({tracking_uri}) already has a driver on this Ray cluster") from None


@dataclass(frozen=True)
class StudyRef:
    """What a cell's task needs of the driver's study: small and picklable (no store client, no corpus)."""

    spec: StudySpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    checkpoint_dir: Path


@ray.remote
def cell_task(study: StudyRef, trial: Cell, *sources: str | None) -> str | None:
    """One cell on a Ray worker: :meth:`StudyWorker.run_cell` with this node's store client and corpus.

    ``sources`` are the results of the cells it depends on: Ray starts this task after they ended.
    """
    corpora = {trial.config.data.model_dump_json(): load_corpus(trial.config.data)}  # this node's data path
    store = TrackingStore(study.tracking_uri)
    worker = StudyWorker(
        study.spec, store, study.experiment_id, study.parent_run_id, corpora, study.checkpoint_dir, progress=False
    )
    return worker.run_cell(trial)


def submit(study: StudyRef, pending: list[Cell], options: dict) -> dict[ray.ObjectRef, Cell]:
    """One task per pending cell, in expand's order (sources first); a dependent gets its source's ObjectRef as an
    argument."""
    refs: dict[str, ray.ObjectRef] = {}
    tasks: dict[ray.ObjectRef, Cell] = {}
    for trial in pending:
        sources = [refs[trial.depends_on]] if trial.depends_on in refs else []
        refs[trial.key] = cell_task.options(**options).remote(study, trial, *sources)
        tasks[refs[trial.key]] = trial
    return tasks


def collect(worker: StudyWorker, outcome: StudyOutcome, tasks: dict[ray.ObjectRef, Cell], progress: bool) -> None:
    """Record each cell as its task ends (tqdm); a task Ray gave up on leaves its run KILLED with the reason."""
    waiting = list(tasks)
    with tqdm(total=len(waiting), desc=worker.spec.name, unit="cell", disable=not progress, file=sys.stderr) as bar:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
            interrupt.check()  # Ctrl-C / SIGTERM set a flag; the driver stops here and cancels the tasks
            if not ready:
                continue
            done = ready[0]
            trial = tasks[done]
            try:
                outcome.record(trial.key, ray.get(done))
            except ray.exceptions.RayError as error:
                reason = f"ray: {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
                end_unfinished(worker.store, outcome.experiment_id, [trial], reason)
                outcome.record(trial.key, reason)
            bar.update()


def run_study_on_ray(
    spec: StudySpec,
    tracking_uri: str,
    address: str,
    progress: bool = True,
    checkpoint_dir: Path = Path("mlruns/checkpoints"),
    retry_failed: bool = False,
    where: str = "spec",
    *,
    supersede: bool = False,
) -> StudyOutcome:
    trials = select_cells(spec, None, where)
    corpora = preflight(spec, trials, checkpoint_dir, where, supersede=supersede)
    tracking_uri = absolute(tracking_uri)  # tasks run in other processes, with another working directory
    started = connect(address)
    try:
        options = {**trial_resources(spec.resources, address, where), "max_retries": spec.resources.max_retries}
        guard = guard_study(spec, tracking_uri)
        store = TrackingStore(tracking_uri)  # nothing written before here
        checkpoint_dir = checkpoint_dir.resolve()  # the same path on every node: shared storage
        worker_args = {"corpora": corpora, "checkpoint_dir": checkpoint_dir, "progress": False}

        def execute(worker: StudyWorker, outcome: StudyOutcome, pending: list[Cell]) -> None:
            study = StudyRef(spec, tracking_uri, outcome.experiment_id, outcome.parent_run_id, checkpoint_dir)
            tasks = submit(study, pending, {**options, "retry_exceptions": False})
            try:
                collect(worker, outcome, tasks, progress)
            except BaseException as error:  # Ctrl-C, SIGTERM: stop the tasks (they end their runs KILLED), then sweep
                for ref in tasks:
                    ray.cancel(ref)
                ray.wait(list(tasks), num_returns=len(tasks), timeout=30)
                kill_study(store, outcome, pending, error)
                raise

        outcome = drive_study(
            spec,
            store,
            trials,
            worker_args,
            retry_failed=retry_failed,
            supersede=supersede,
            rounds=spec.matrix.sequential is not None,
            execute=execute,
        )
        ray.kill(guard)
        return outcome
    finally:
        if started:
            disconnect()
