"""Which executor runs a study's cells, and with how many threads each: one rule for the command and the API.

A cell whose spec pins ``train.threads`` below the core count leaves cores idle when cells run one after another
(docs/performance.md, "Cells at once", has the measurements). So: cores // threads cells at once, on a local Ray
cluster (one process per cell, so a cell's threads are its own), when the study is long enough to repay Ray's
start-up; one at a time in process otherwise, and always on CUDA (one device) or when threads are unset (a cell
then uses every core). ``--workers N`` overrides: N cells at once, cores // N threads each, N at most the core
count. The threads printed are every cell's ``train.threads`` (:func:`pin_threads`): what each runs with and
records, on every Ray worker, whatever cell the worker ran before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.config import DataConfig, SpecError, StudySpec
from harness.engine import Executor
from harness.engine.in_process import InProcess
from harness.matrix import Cell

MIN_TOKENS = 500_000  # the cells' training tokens from which Ray's start-up is repaid (docs/performance.md)


@dataclass(frozen=True)
class CellsAtOnce:
    cells: int
    threads: int | None  # per cell; None: the spec's own (or torch's default)
    why: str


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cells_at_once(
    spec: StudySpec, cells: list[Cell], workers: int | None, train_tokens: Callable[[DataConfig], int]
) -> CellsAtOnce:
    """The cells to run at once here (1: in process) and each one's threads; ``train_tokens``: a data config's
    training tokens (an ``epochs`` budget is that many passes over them)."""
    n_cores = cores()
    if workers is not None:
        return chosen_workers(spec, workers, n_cores)
    if any(t.config.train.device != "cpu" for t in cells) and torch.cuda.is_available():
        return CellsAtOnce(1, None, "cells on the GPU, one at a time")
    threads = {t.config.train.threads for t in cells}
    if None in threads or len(threads) != 1:
        return CellsAtOnce(1, None, "train.threads unset: each cell uses every core")
    (pinned,) = threads
    at_once = min(n_cores // pinned, len(cells))
    if at_once < 2 or budget_tokens(cells, train_tokens) < MIN_TOKENS:
        return CellsAtOnce(1, None, "too short to repay a local Ray cluster's start-up")
    return CellsAtOnce(at_once, pinned, f"{n_cores} cores, train.threads = {pinned}")


def chosen_workers(spec: StudySpec, workers: int, n_cores: int) -> CellsAtOnce:
    """``--workers N``: N cells at once, cores // N threads each; more cells than cores only slows each down."""
    if not 1 <= workers <= n_cores:
        raise SpecError(f"--workers must be between 1 and this machine's {n_cores} cores, got {workers}")
    if workers > 1 and "train.threads" in spec.matrix.sweep:
        raise SpecError(f"--workers {workers} sets every cell's train.threads, which matrix.sweep varies")
    return CellsAtOnce(workers, n_cores // workers if workers > 1 else None, "--workers")


def budget_tokens(cells: list[Cell], train_tokens: Callable[[DataConfig], int]) -> float:
    """The cells' training tokens: a ``tokens`` budget, or ``epochs`` passes over the training split."""
    total = 0.0
    for t in cells:
        budget = t.config.budget
        total += budget.tokens if budget.tokens is not None else budget.epochs * train_tokens(t.config.data)
    return total


def pin_threads(spec: StudySpec, threads: int) -> StudySpec:
    """``spec`` with every cell's ``train.threads`` set to ``threads`` (in ``base`` and each override setting it)."""

    def pinned(tree: dict) -> dict:
        return {**tree, "train": {**tree.get("train", {}), "threads": threads}}

    overrides = {v: pinned(tree) if "threads" in tree.get("train", {}) else tree for v, tree in spec.overrides.items()}
    return spec.model_copy(update={"base": pinned(spec.base), "overrides": overrides})


def choose_executor(
    spec: StudySpec,
    cells: list[Cell],
    *,
    ray: str | None,
    workers: int | None,
    cell_index: int | None,
    progress: bool,
    train_tokens: Callable[[DataConfig], int],
    where: str = "spec",
) -> tuple[Executor, StudySpec]:
    """The executor for ``run-study``'s options, and the spec as it then runs (threads pinned for cells at once)."""
    if ray and cell_index is not None:
        raise SpecError("--cell runs one cell in this process (a Slurm array task); it does not take --ray")
    if workers is not None and (ray or cell_index is not None):
        raise SpecError("--workers sets how many cells run at once on this machine; it takes neither --ray nor --cell")
    if ray:
        return _ray_executor(ray, spec, where, progress), spec
    at_once = (
        CellsAtOnce(1, None, "--cell") if cell_index is not None else cells_at_once(spec, cells, workers, train_tokens)
    )
    if at_once.threads is None:  # one cell at a time, in this process
        return InProcess(progress), spec
    print(
        f"{at_once.cells} cells at once on a local Ray cluster, {at_once.threads} thread(s) each "
        f"({at_once.why}; --workers 1: one at a time in this process)",
        flush=True,
    )
    resources = spec.resources.model_copy(update={"cpus_per_trial": float(at_once.threads)})
    spec = pin_threads(spec, at_once.threads).model_copy(update={"resources": resources})
    return _ray_executor("local", spec, where, progress), spec


def _ray_executor(address: str, spec: StudySpec, where: str, progress: bool) -> Executor:
    from harness.engine.ray_study import RayExecutor  # imports Ray: only when cells go to Ray

    return RayExecutor(address, spec.resources, where, progress)
