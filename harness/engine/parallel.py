"""How many cells ``run-study`` runs at once on this machine, and with how many threads each.

The rule, measured (docs/performance.md, "Cells at once"): a cell whose spec pins ``train.threads`` below the core
count leaves cores idle when cells run one after another. ``studies/quick.yaml`` (``threads: 1``, measured faster
than 2 threads for its small GEMMs) took 1,131 s in process on the 2-core machine and 611 s with two cells at once
on a local Ray cluster (0.54x), every cell's result bit-identical (same thread count), each cell's own duration
within 3-7% of its duration alone. So: cores // threads cells at once, on a local Ray cluster (one process per
cell, so a cell's threads are its own), when the study is long enough to repay Ray's start-up (about 10 s more
than in process); one at a time in process otherwise, and always on CUDA (one device) or when threads are unset
(a cell then uses every core). ``--workers N`` overrides: N cells at once, cores // N threads each, N at most the
core count. The threads printed are every cell's ``train.threads`` (:func:`pin_threads`): what each runs with and
records, on every Ray worker, whatever cell the worker ran before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.config import DataConfig, SpecError, StudySpec
from harness.matrix import Cell

MIN_TOKENS = 500_000  # the cells' training tokens from which Ray's start-up is repaid (~100 s of training here)


@dataclass(frozen=True)
class CellsAtOnce:
    cells: int
    threads: int | None  # per cell; None: the spec's own (or torch's default)
    why: str


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cells_at_once(
    spec: StudySpec, trials: list[Cell], workers: int | None, train_tokens: Callable[[DataConfig], int]
) -> CellsAtOnce:
    """The cells to run at once here (1: in process) and each one's threads; ``train_tokens``: a data config's
    training tokens (an ``epochs`` budget is that many passes over them)."""
    n_cores = cores()
    if workers is not None:
        return chosen_workers(spec, workers, n_cores)
    if any(t.config.train.device != "cpu" for t in trials) and torch.cuda.is_available():
        return CellsAtOnce(1, None, "cells on the GPU, one at a time")
    threads = {t.config.train.threads for t in trials}
    if None in threads or len(threads) != 1:
        return CellsAtOnce(1, None, "train.threads unset: each cell uses every core")
    (pinned,) = threads
    at_once = min(n_cores // pinned, len(trials))
    if at_once < 2 or budget_tokens(trials, train_tokens) < MIN_TOKENS:
        return CellsAtOnce(1, None, "too short to repay a local Ray cluster's start-up")
    return CellsAtOnce(at_once, pinned, f"{n_cores} cores, train.threads = {pinned}")


def chosen_workers(spec: StudySpec, workers: int, n_cores: int) -> CellsAtOnce:
    """``--workers N``: N cells at once, cores // N threads each; more cells than cores only slows each down."""
    if not 1 <= workers <= n_cores:
        raise SpecError(f"--workers must be between 1 and this machine's {n_cores} cores, got {workers}")
    if workers > 1 and "train.threads" in spec.matrix.sweep:
        raise SpecError(f"--workers {workers} sets every cell's train.threads, which matrix.sweep varies")
    return CellsAtOnce(workers, n_cores // workers if workers > 1 else None, "--workers")


def budget_tokens(trials: list[Cell], train_tokens: Callable[[DataConfig], int]) -> float:
    """The cells' training tokens: a ``tokens`` budget, or ``epochs`` passes over the training split."""
    total = 0.0
    for t in trials:
        budget = t.config.budget
        total += budget.tokens if budget.tokens is not None else budget.epochs * train_tokens(t.config.data)
    return total


def pin_threads(spec: StudySpec, threads: int) -> StudySpec:
    """``spec`` with every cell's ``train.threads`` set to ``threads`` (in ``base`` and each override setting it)."""

    def pinned(tree: dict) -> dict:
        return {**tree, "train": {**tree.get("train", {}), "threads": threads}}

    overrides = {v: pinned(tree) if "threads" in tree.get("train", {}) else tree for v, tree in spec.overrides.items()}
    return spec.model_copy(update={"base": pinned(spec.base), "overrides": overrides})
