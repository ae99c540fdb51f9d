"""The Ray executor: each cell a Ray task (``--ray ADDRESS``, or a local cluster for several cells at once here).

Started, it joins (or starts) the cluster and sizes each cell's task (:mod:`.ray_cluster`); guarding, it takes the
study's named actor, so a second driver for the same study on the cluster is refused. Ray retries a task after a
worker or node loss (``max_retries``); a trial's own failure is a returned reason, so Ray does not retry it. A
retried cell resumes from its checkpoint (when the checkpoint folder is a path every node sees) into the same run;
the lost attempt, if it still runs, stops at its next log step (:mod:`harness.attempt`). A dependent cell's task
takes its source's result as an argument, so Ray starts it after the source ended.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm import tqdm

from harness import interrupt
from harness.cells import CellRunner, StudyOutcome
from harness.config import ResourcesConfig, SpecError, StudySpec
from harness.data import load_corpus
from harness.engine.ray_cluster import cancel_all, connect, disconnect, trial_resources
from harness.matrix import Cell
from harness.runs import end_unfinished
from harness.tracking import TrackingStore

NAMESPACE = "moe-harness"


@ray.remote(num_cpus=0)
class StudyGuard:
    """Exists while a driver runs the study: its name is the study's, so a second driver cannot create it."""


def guard_study(name: str, tracking_uri: str) -> ray.actor.ActorHandle:
    """The study's named actor (it dies with this driver, even a SIGKILLed one), or a one-line refusal."""
    try:
        return StudyGuard.options(
            name=f"study:{name}@{tracking_uri}", namespace=NAMESPACE, lifetime="non_detached"
        ).remote()
    except ValueError:
        raise SpecError(f"study '{name}' ({tracking_uri}) already has a driver on this Ray cluster") from None


@dataclass(frozen=True)
class StudyRef:
    """What a cell's task needs of the driver's study: small and picklable (no store client, no corpus)."""

    spec: StudySpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    checkpoint_dir: Path


@ray.remote
def cell_task(study: StudyRef, cell: Cell, *sources: str | None) -> str | None:
    """One cell on a Ray worker: :meth:`CellRunner.run_cell` with this node's store client and corpus.

    ``sources`` are the results of the cells it depends on: Ray starts this task after they ended.
    """
    corpora = {cell.config.data.model_dump_json(): load_corpus(cell.config.data)}  # this node's data path
    store = TrackingStore(study.tracking_uri)
    runner = CellRunner(
        study.spec, store, study.experiment_id, study.parent_run_id, corpora, study.checkpoint_dir, progress=False
    )
    return runner.run_cell(cell)


@dataclass
class RayExecutor:
    address: str
    resources: ResourcesConfig
    where: str
    progress: bool
    options: dict = field(default_factory=dict)  # each cell task's resources, set once started

    @contextmanager
    def started(self) -> Iterator[None]:
        joined = connect(self.address)
        try:
            self.options = trial_resources(self.resources, self.address, self.where)
            self.options |= {"max_retries": self.resources.max_retries, "retry_exceptions": False}
            yield
        finally:
            if joined:
                disconnect()

    @contextmanager
    def guarded(self, name: str, tracking_uri: str, checkpoint_dir: Path) -> Iterator[None]:
        guard = guard_study(name, tracking_uri)
        yield
        ray.kill(guard)

    def run(self, runner: CellRunner, outcome: StudyOutcome, cells: list[Cell]) -> None:
        study = StudyRef(
            runner.spec, runner.store.uri, runner.experiment_id, runner.parent_run_id, runner.checkpoint_dir
        )
        tasks = self.submit(study, cells)
        try:
            self.collect(runner, outcome, tasks)
        except BaseException:  # Ctrl-C, SIGTERM: stop the tasks (each ends its run KILLED); the driver sweeps after
            cancel_all(list(tasks))
            raise

    def submit(self, study: StudyRef, cells: list[Cell]) -> dict[ray.ObjectRef, Cell]:
        """One task per cell, in expand's order (sources first); a dependent gets its source's ObjectRef."""
        refs: dict[str, ray.ObjectRef] = {}
        tasks: dict[ray.ObjectRef, Cell] = {}
        for cell in cells:
            sources = [refs[cell.depends_on]] if cell.depends_on in refs else []
            refs[cell.key] = cell_task.options(**self.options).remote(study, cell, *sources)
            tasks[refs[cell.key]] = cell
        return tasks

    def collect(self, runner: CellRunner, outcome: StudyOutcome, tasks: dict[ray.ObjectRef, Cell]) -> None:
        """Record each cell as its task ends; a task Ray gave up on leaves its run KILLED with the reason."""
        waiting = list(tasks)
        bar = tqdm(total=len(waiting), desc=runner.spec.name, unit="cell", disable=not self.progress, file=sys.stderr)
        with bar:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
                interrupt.check()  # Ctrl-C / SIGTERM set a flag; the driver stops here and cancels the tasks
                if not ready:
                    continue
                cell = tasks[ready[0]]
                try:
                    outcome.record(cell.key, ray.get(ready[0]))
                except ray.exceptions.RayError as error:
                    reason = f"ray: {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
                    end_unfinished(runner.store, outcome.experiment_id, [cell], reason)
                    outcome.record(cell.key, reason)
                bar.update()
