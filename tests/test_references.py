"""Honest references under the classic word-level LSTM recipe (Zaremba et al. 2014 / PyTorch's word_language_model):
2x200 LSTM, tied, full softmax, SGD lr 20, clip 0.25, dropout 0.2, batch 20 x 35, real WikiText-2. With the residual
block starting near identity (``model.block_init: scaled``, the default) no variant's training loss rises above the
uniform loss ln V after step 10; under PyTorch's Linear init the dense FFN rose to 11.57 at step 25 (ln V = 10.41).
Not met yet: the test is a strict xfail until a block init (or step rule) makes it pass."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.config import VARIANT_PRESETS, VARIANTS, TrialConfig, deep_merge
from harness.data import Corpus, batchify, get_batch, load_corpus
from harness.step import build_train_state, seed_everything, train_step

CLASSIC = {
    "model": {"backbone": "lstm", "d_model": 200, "n_layers": 2, "dropout": 0.2, "tie_weights": True, "output": "full"},
    "moe": {"n_experts": 8, "d_hidden": 400},
    "optim": {"name": "sgd", "lr": 20.0, "grad_clip": 0.25, "schedule": "constant", "warmup_steps": 0},
    "train": {"batch_size": 20, "seq_len": 35, "device": "cpu"},
}


def classic_config(variant: str, **model: object) -> TrialConfig:
    tree = deep_merge(deep_merge(CLASSIC, {"model": model}), VARIANT_PRESETS[variant])
    return TrialConfig.model_validate({**tree, "variant": variant, "seed": 1})


def classic_losses(config: TrialConfig, corpus: Corpus, steps: int) -> list[float]:
    """Training loss at steps 1..``steps`` of the trainer's own step (no evaluation: the full-softmax split
    evaluations would take minutes on a CPU)."""
    seed_everything(config.seed)
    rows = batchify(corpus.train, config.train.batch_size)  # (B, columns)
    state, context = build_train_state(config, corpus.vocab_size, torch.device("cpu"), steps)
    state.model.train()
    state.recurrent = state.model.initial_state(config.train.batch_size)
    losses = []
    for step in range(steps):
        x, y = get_batch(rows, step * config.train.seq_len, config.train.seq_len)  # (B, T) each
        out, _ = train_step(state, context, x, y)
        losses.append(out.loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="open (issue 12 part 2): no block init is enough at SGD lr 20; with block_init=scaled dense (seed 1) "
    "reached 15.66 at step 5 and 10.74 at step 15, with block_init=zero dense spiked to 30.69 and switch to 32.97 "
    "after step 10 (ln V = 10.41), while plain stays at or below 9.42 after step 4: the FFN block itself is "
    "unstable at this learning rate, not its initial size",
)
def test_no_variant_rises_above_the_uniform_loss_under_the_classic_recipe(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE_HARNESS_DATA", str(shared_data))  # the whole training split: ln V = 10.41
    corpus = load_corpus(classic_config("dense").data)
    uniform = math.log(corpus.vocab_size)
    for variant in VARIANTS:
        losses = classic_losses(classic_config(variant), corpus, 25)
        assert max(losses[10:]) < uniform, f"{variant}: {[round(v, 2) for v in losses]} (ln V = {uniform:.2f})"
