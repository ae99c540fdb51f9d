"""The study driver: the one flow from a spec to its ended study run, whatever executes the cells.

:func:`run_study` (the ``run-study`` command and the API alike) selects the cells, checks the host and the inputs
before anything is written (:func:`harness.preflight.preflight`; a cell whose recorded run no longer matches it is
refused here, before an executor starts), chooses the executor (:func:`harness.engine.parallel.choose_executor`:
in this process, several cells at once on a local Ray cluster, a Ray cluster, or one ``--cell``), starts it, makes
the store and holds the study's guard while it runs the rounds: each round's cells are chosen from the results of
the rounds before (:mod:`.rounds`; a fixed design has one round), their runs prepared (finished ones skipped,
interrupted ones resumed) and handed to the executor. An interruption ends every open run KILLED, here and only
here, so a rerun of the same command resumes; the study run ends FINISHED (FAILED when a cell failed) once every
cell has ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run

from harness import interrupt
from harness.cells import CellRunner, StudyOutcome
from harness.checkpoint import cell_checkpointer
from harness.config import SpecError, StudySpec
from harness.data import Corpus, load_corpus, read_corpus, save_to_cache
from harness.engine import Executor
from harness.engine.parallel import choose_executor
from harness.fingerprint import describe_changes
from harness.health import HealthVerdict
from harness.matrix import Cell, expand
from harness.preflight import corpus_key, preflight
from harness.runs import (
    FAILED,
    FINISHED,
    KILLED,
    SCHEDULED,
    cell_runs,
    end_run,
    end_unfinished,
    ending,
    finish_study_run,
    is_finished,
)
from harness.speed import ARTIFACT as SPEED_ARTIFACT
from harness.speed import measure_speed
from harness.study.changes import Changes, changed_cells, refusal, supersede_run
from harness.study.parent_run import study_parent_run
from harness.study.rounds import StudyDesign, current_plan, record_plan, recorded_results, round_cells
from harness.tags import ERROR, HEALTH, HEALTH_EVIDENCE
from harness.tracking import TrackingStore, check_tracking_uri
from harness.urls import absolute

CHECKPOINT_DIR = Path("mlruns") / "checkpoints"

__all__ = ["CHECKPOINT_DIR", "StudyOutcome", "needed_cells", "run_study", "select_cells"]


def run_study(
    spec: StudySpec,
    tracking_uri: str,
    *,
    ray: str | None = None,
    workers: int | None = None,
    cell: int | None = None,
    progress: bool = True,
    checkpoint_dir: Path = CHECKPOINT_DIR,
    retry_failed: bool = False,
    supersede: bool = False,
    where: str = "spec",
) -> StudyOutcome:
    """Run the study's pending cells into the MLflow store at ``tracking_uri``; a rerun skips finished cells.

    ``ray``: each cell a task on that Ray cluster (``local``, ``auto``, ``HOST:PORT``); ``workers``: cells at once on
    this machine (default: the rule of :mod:`harness.engine.parallel`); ``cell``: only cell N of ``--list-cells``
    (an array task); ``retry_failed``: run failed cells again; ``supersede``: run cells whose config or data
    changed as new runs (else refused); ``where``: the spec's name in messages."""
    train_tokens = lambda data: read_corpus(data).train.numel()  # noqa: E731  # read only to size cells at once
    executor, spec = choose_executor(
        spec,
        expand(spec, where),
        ray=ray,
        workers=workers,
        cell_index=cell,
        progress=progress,
        train_tokens=train_tokens,
        where=where,
    )
    cells = select_cells(spec, cell, where, tracking_uri if cell is not None else None)
    if not cells:  # --cell N of a sequential study: not needed by the current round (decided, or not yet)
        key = expand(spec, where)[cell].key  # type: ignore[index]  # select_cells checked the index
        print(f"--cell {cell} ({key}): not needed by the study's current round; nothing to run", flush=True)
        return StudyOutcome(experiment_id="", parent_run_id="", needed=False)
    corpora = preflight(spec, cells, checkpoint_dir, where, supersede=supersede)
    tracking_uri, checkpoint_dir = absolute(tracking_uri), checkpoint_dir.resolve()  # the same for every process
    recorded = existing_store(tracking_uri)  # read only: a refused rerun starts no executor and writes nothing
    changed = {} if recorded is None else changed_cells(recorded, spec.name, cells, corpora)
    if changed and not supersede:
        raise SpecError(refusal(spec.name, changed))
    with executor.started():
        store = TrackingStore(tracking_uri)  # checks a tracking server is up; nothing written before here
        with executor.guarded(spec.name if cell is None else cells[0].name, tracking_uri, checkpoint_dir):
            study = Study(spec, store, corpora, checkpoint_dir, executor, progress)
            rounds = spec.matrix.sequential is not None and cell is None
            return study.drive(cells, changed, rounds=rounds, retry_failed=retry_failed)


@dataclass
class Study:
    """One study as the driver runs it: its store, data and executor (started, the study guarded)."""

    spec: StudySpec
    store: TrackingStore
    corpora: dict[str, Corpus]
    checkpoint_dir: Path
    executor: Executor
    progress: bool

    def drive(
        self, cells: list[Cell], changed: dict[str, Changes], *, rounds: bool, retry_failed: bool
    ) -> StudyOutcome:
        """Round after round (``rounds``: a sequential design; else the one round of ``cells``) until no comparison
        is open or ``max`` seeds ran; then the study's end. ``changed``: cells whose old runs are superseded."""
        for corpus in self.corpora.values():  # cached only now: a refused rerun (changed data) leaves no new cache
            save_to_cache(corpus)
        experiment_id = self.store.experiment_id(self.spec.name, self.spec.description)
        parent_id = study_parent_run(self.spec, self.store, experiment_id, relog_spec=bool(changed))
        runner = CellRunner(
            self.spec, self.store, experiment_id, parent_id, self.corpora, self.checkpoint_dir, self.progress
        )
        outcome = StudyOutcome(experiment_id, parent_id)
        runs = cell_runs(self.store, experiment_id)  # the store read once a round: to plan, prepare, and close
        batch = self.next_round(cells, runs) if rounds else cells
        while batch:
            pending = self.prepare(batch, runs, outcome, changed, retry_failed)
            try:
                self.executor.run(runner, outcome, pending)
            except BaseException as error:
                self.kill(outcome, pending, error)
                raise
            runs = cell_runs(self.store, experiment_id)
            following = self.next_round(cells, runs) if rounds else []
            batch = following if following != batch else []  # a round that could not change anything ends it
        self.close(outcome, runs)
        return outcome

    def next_round(self, cells: list[Cell], runs: dict[str, Run]) -> list[Cell]:
        return round_cells(StudyDesign.of(self.spec).plan(recorded_results(runs, cells)), cells)

    def prepare(
        self,
        cells: list[Cell],
        runs: dict[str, Run],
        outcome: StudyOutcome,
        changed: dict[str, Changes],
        retry_failed: bool,
    ) -> list[Cell]:
        """The round's cells to run (an interrupted one's run SCHEDULED again; a new cell's run is created when the
        cell starts, so its duration is its own); finished cells skipped; a changed cell's old run superseded."""
        pending = []
        try:  # an interruption here leaves the runs created so far KILLED, like any other
            for cell in cells:
                interrupt.check()  # a safe point: between two cells' runs
                run = runs.get(cell.key)
                if cell.key in changed and run is not None:
                    supersede_run(self.store, run, describe_changes(changed.pop(cell.key)))
                    corpus = self.corpora[corpus_key(cell)]
                    cell_checkpointer(self.checkpoint_dir, self.spec, cell, corpus).path.unlink(missing_ok=True)
                    run = None
                if run is not None and is_finished(run):
                    outcome.skipped.append(cell.key)
                elif run is not None and run.info.status == FAILED and not retry_failed:
                    outcome.failed[cell.key] = run.data.tags.get(ERROR, "failed")
                else:
                    if run is not None:  # an interrupted run, resumed when the cell runs again
                        self.store.client.update_run(run.info.run_id, SCHEDULED)
                    pending.append(cell)
        except BaseException as error:
            self.kill(outcome, cells, error)
            raise
        return pending

    def kill(self, outcome: StudyOutcome, cells: list[Cell], error: BaseException) -> None:
        """An interrupted driver: the cells' open runs and the study run end KILLED, so a rerun resumes them."""
        reason = ending(error).reason
        end_unfinished(self.store, outcome.experiment_id, cells, reason)
        end_run(self.store.client, outcome.parent_run_id, KILLED, reason)

    def close(self, outcome: StudyOutcome, runs: dict[str, Run]) -> None:
        """Every unhealthy finished cell into ``outcome.flagged`` (from its run's tags, whoever ran it), the design's
        decisions on the study run, and the study run ended FINISHED (FAILED when a cell failed) once every cell of
        the study has ended; else it stays RUNNING (``--cell N``: the other array tasks are not done yet). A
        sequential study is done when its next round has no cells; its cells no round needed never run."""
        cells = expand(self.spec)
        sequential = self.spec.matrix.sequential is not None
        plan = StudyDesign.of(self.spec).plan(recorded_results(runs, cells))
        done = not sequential or not plan.next_cells
        for cell in cells:
            run = runs.get(cell.key)
            if run is None:
                done = done and sequential
                continue
            done = done and run.info.status in (FINISHED, FAILED)
            label = run.data.tags.get(HEALTH, "ok") if is_finished(run) else "ok"
            if label != "ok":
                outcome.flagged[cell.key] = HealthVerdict(
                    tuple(label.split(",")), run.data.tags.get(HEALTH_EVIDENCE, "")
                )
        if not self.spec.matrix.sweep:  # a sweep's cells share (variant, seed): no comparison of variants to decide
            record_plan(self.store, outcome.parent_run_id, self.spec, plan)
        if done and not outcome.failed:
            record_speed(self.spec, self.store, outcome.parent_run_id, cells)
        if done:
            finish_study_run(self.store, outcome.parent_run_id, FAILED if outcome.failed else FINISHED)


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


def select_cells(
    spec: StudySpec, cell_index: int | None, where: str = "spec", tracking_uri: str | None = None
) -> list[Cell]:
    """Every cell, or the one at ``cell_index`` (``--cell N``, a Slurm array index). The numbering is the matrix's
    (a sequential design's up to ``max`` seeds), the same whatever the store holds: an array task that starts after
    others finished runs the cell it was given. Given ``tracking_uri``, a cell of a sequential study that the
    current round does not need (:func:`needed_cells`) is left out: an empty list, nothing to run."""
    cells = expand(spec, where)
    if cell_index is None:
        return cells
    if not 0 <= cell_index < len(cells):
        raise SpecError(f"--cell {cell_index}: study '{spec.name}' has cells 0..{len(cells) - 1}")
    chosen = cells[cell_index]
    if spec.matrix.sequential is not None and tracking_uri is not None:
        return [cell for cell in needed_cells(spec, tracking_uri, cells) if cell.key == chosen.key]
    return [chosen]


def needed_cells(spec: StudySpec, tracking_uri: str, cells: list[Cell]) -> list[Cell]:
    """The cells a sequential study's current round needs, by what the store at ``tracking_uri`` holds (finished
    cells are no longer needed; the round after needs the cells the last results open)."""
    return round_cells(current_plan(spec, existing_store(tracking_uri), cells), cells)


def existing_store(tracking_uri: str) -> TrackingStore | None:
    """The store at ``tracking_uri`` when it exists (an embedded one is never created here)."""
    try:
        check_tracking_uri(tracking_uri, create=False)
    except SpecError:
        return None
    return TrackingStore(tracking_uri)
