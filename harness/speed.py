"""The paired speed measurement that decides "faster": every variant's training steps, timed in one process.

A cell's own time per token is measured while the machine does whatever else it does at that hour; cells run
hours apart (or beside different neighbours) differ by the machine's drift, not only by their variant. So "faster"
is decided here instead: each variant's model and optimiser (its first seed's config) are built in this process,
warmed up, then timed in blocks of ``steps`` training steps, the variants interleaved block after block (the order
rotated each round) for ``rounds`` rounds. A round's blocks run minutes apart at most, so the per-round ratio
variant / reference sees the same machine, and the rounds are the sample whose t interval the report reads
(:func:`time_ratio`). Every block trains on the same batch positions for every variant.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats

from harness.config import SpeedConfig, TrialConfig
from harness.data import Corpus, batchify, get_batch
from harness.sequential import UNBOUNDED, Interval, ratio_interval
from harness.step import build_train_state, resolve_device, seed_everything, set_threads, sync, train_step
from harness.trainer import steps_per_epoch, total_steps

ARTIFACT = "speed.json"  # on the study run


@dataclass(frozen=True, kw_only=True)
class SpeedRecord:
    """What one measurement took: seconds per million training tokens of each block, by variant."""

    rounds: int
    steps: int
    warmup: int
    threads: int
    device: str
    seconds_per_mtok: dict[str, list[float]]

    def as_json(self) -> dict:
        return asdict(self)


def measure_speed(configs: dict[str, TrialConfig], corpus: Corpus, settings: SpeedConfig) -> SpeedRecord:
    """Time every variant of ``configs`` (variant -> its config) interleaved, as the module docstring says."""
    first = next(iter(configs.values()))
    device = resolve_device(first.train.device)
    runners = {variant: _Runner(config, corpus, device) for variant, config in configs.items()}
    for runner in runners.values():
        runner.run(settings.warmup)
    seconds: dict[str, list[float]] = {variant: [] for variant in configs}
    variants = list(configs)
    for r in range(settings.rounds):
        for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotated: no fixed position
            seconds[variant].append(runners[variant].timed(settings.steps))
    return SpeedRecord(
        rounds=settings.rounds,
        steps=settings.steps,
        warmup=settings.warmup,
        threads=torch.get_num_threads(),
        device=str(device),
        seconds_per_mtok=seconds,
    )


class _Runner:
    """One variant's training state, stepping through the train split from its start."""

    def __init__(self, config: TrialConfig, corpus: Corpus, device: torch.device) -> None:
        seed_everything(config.seed)
        self.config, self.device = config, device
        t = config.train
        self.rows = batchify(corpus.train, t.batch_size).to(device)
        self.per_epoch = steps_per_epoch(self.rows.size(1), t.seq_len)
        n_steps = total_steps(config, self.rows.size(1))
        self.state, self.context = build_train_state(config, corpus.train_counts(), device, n_steps)
        self.state.recurrent = self.state.model.initial_state(t.batch_size)
        self.position = 0

    def run(self, steps: int) -> None:
        set_threads(self.config)
        for _ in range(steps):
            x, y = get_batch(
                self.rows, (self.position % self.per_epoch) * self.config.train.seq_len, self.config.train.seq_len
            )
            train_step(self.state, self.context, x, y)
            self.position += 1

    def timed(self, steps: int) -> float:
        """Seconds per million training tokens over ``steps`` steps."""
        set_threads(self.config)
        sync(self.device)
        tokens, start = self.state.tokens, time.perf_counter()
        self.run(steps)
        sync(self.device)
        return (time.perf_counter() - start) / (self.state.tokens - tokens) * 1e6


@dataclass(frozen=True)
class TimeRatio:
    """Time per token, variant / reference, from the paired rounds: the estimate and its interval."""

    ratio: float
    interval: Interval
    rounds: int


def time_ratio(record: dict, variant: str, reference: str, bound_level: float) -> TimeRatio | None:
    """The geometric mean over rounds of variant / reference and its t interval at two-sided coverage
    ``bound_level``; None when either was not measured."""
    seconds = record.get("seconds_per_mtok", {})
    if variant not in seconds or reference not in seconds:
        return None
    logs = np.log(np.asarray(seconds[variant])) - np.log(np.asarray(seconds[reference]))
    n, mean = len(logs), float(logs.mean())
    if n < 2:
        return TimeRatio(math.exp(mean), UNBOUNDED, n)
    se = float(logs.std(ddof=1) / math.sqrt(n))
    bound = float(stats.t.isf((1 - bound_level) / 2, n - 1))
    return TimeRatio(math.exp(mean), ratio_interval(mean, se, bound), n)
