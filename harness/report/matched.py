"""Compute-matched comparison: each variant's validation perplexity at equal training time and equal FLOPs.

The final perplexities compare variants at equal *tokens*; a variant that is slower per token, or that costs
more FLOPs per token, bought them with more compute. Here every run's validation curve is read at one training
time and at one training-FLOP count: the largest budget every compared run reached (the smallest of their
totals), interpolated linearly in log perplexity (the loss) between the evaluations around it. Training time is
the trainer's own (evaluation excluded); FLOPs are ``harness.flops``' analytic count per token x tokens.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import torch

from harness.config import DataConfig, TrialConfig
from harness.data import load_corpus
from harness.flops import train_flops_per_token
from harness.report.gather import StudyData


@functools.cache
def _unigram(data_json: str) -> tuple[int, torch.Tensor]:
    """Vocabulary size and training-split unigram of a data config (the adaptive head's FLOPs depend on it)."""
    corpus = load_corpus(DataConfig.model_validate_json(data_json))
    counts = torch.bincount(corpus.train, minlength=corpus.vocab_size).double()
    return corpus.vocab_size, counts / counts.sum()


def flops_per_token(config: TrialConfig) -> float:
    """Training FLOPs per token of a run's config; nan when its data cannot be read here."""
    try:
        vocab_size, unigram = _unigram(config.data.model_dump_json())
    except (OSError, ValueError) as error:  # DataError is a ValueError: data moved or absent on this machine
        print(f"harness report: no FLOP count for {config.variant} seed {config.seed} ({error})")
        return math.nan
    return train_flops_per_token(config, vocab_size, unigram)


def ppl_at(x: np.ndarray, ppl: np.ndarray, at: float) -> float:
    """Perplexity at ``x = at``, interpolated linearly in log perplexity; nan outside the curve's range."""
    order = np.argsort(x)
    x, log_ppl = np.asarray(x, dtype=float)[order], np.log(np.asarray(ppl, dtype=float)[order])
    if len(x) == 0 or not x[0] <= at <= x[-1]:
        return math.nan
    return float(np.exp(np.interp(at, x, log_ppl)))


def matched_points(curves: pd.DataFrame, axis: str) -> tuple[float, dict[str, float]]:
    """The common budget on ``axis`` (the smallest run total) and each run's val PPL there, by run_id."""
    curves = curves.dropna(subset=[axis])
    if curves.empty:
        return math.nan, {}
    budget = float(curves.groupby("run_id")[axis].max().min())
    return budget, {
        run_id: ppl_at(rows[axis].to_numpy(), rows["val_ppl"].to_numpy(), budget)
        for run_id, rows in curves.groupby("run_id")
    }


def with_flops(data: StudyData, curves: pd.DataFrame) -> pd.DataFrame:
    """``curves`` plus a ``flops`` column (training FLOPs so far); nan for runs without a readable config."""
    per_token = {run_id: flops_per_token(config) for run_id, config in data.configs.items()}
    return curves.assign(flops=curves["tokens"] * curves["run_id"].map(per_token).astype(float))
