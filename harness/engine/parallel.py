"""How many cells ``run-study`` runs at once on this machine, and with how many threads each.

The rule, measured (docs/performance.md, "Cells at once"): a cell whose spec pins ``train.threads`` below the core
count leaves cores idle when cells run one after another. ``studies/quick.yaml`` (``threads: 1``, measured faster
than 2 threads for its small GEMMs) took 1,131 s in process on the 2-core machine and 611 s with two cells at once
on a local Ray cluster (0.54x), every cell's result bit-identical (same thread count), each cell's own duration
within 3-7% of its duration alone. So: cores // threads cells at once, on a local Ray cluster (one process per
cell, so a cell's threads are its own), when the study is long enough to repay Ray's start-up (about 10 s more
than in process); one at a time in process otherwise, and always on CUDA (one device) or when threads are unset
(a cell then uses every core). ``--workers N`` overrides: N cells at once, cores // N threads each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from harness.config import SpecError, StudySpec
from harness.matrix import Cell

MIN_TOKENS = 500_000  # the cells' training tokens from which Ray's start-up is repaid (~100 s of training here)


@dataclass(frozen=True)
class CellsAtOnce:
    cells: int
    threads: int | None  # per cell; None: the spec's own (or torch's default)
    why: str


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cells_at_once(spec: StudySpec, trials: list[Cell], workers: int | None) -> CellsAtOnce:
    """The cells to run at once here (1: in process) and each one's threads."""
    n_cores = cores()
    if workers is not None:
        if workers < 1:
            raise SpecError(f"--workers must be at least 1, got {workers}")
        return CellsAtOnce(workers, max(1, n_cores // workers) if workers > 1 else None, "--workers")
    if any(t.config.train.device != "cpu" for t in trials) and torch.cuda.is_available():
        return CellsAtOnce(1, None, "cells on the GPU, one at a time")
    threads = {t.config.train.threads for t in trials}
    if None in threads or len(threads) != 1:
        return CellsAtOnce(1, None, "train.threads unset: each cell uses every core")
    (pinned,) = threads
    tokens = sum(t.config.budget.tokens or 0 for t in trials)
    at_once = min(n_cores // pinned, len(trials))
    if at_once < 2 or tokens < MIN_TOKENS:
        return CellsAtOnce(1, None, "too short to repay a local Ray cluster's start-up")
    return CellsAtOnce(at_once, pinned, f"{n_cores} cores, train.threads = {pinned}")
