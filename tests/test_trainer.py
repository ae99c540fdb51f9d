"""The trainer's pieces: in-process resume from TrainState's state_dict, the non-terminal progress
output, the clock that leaves out evaluation time, and the aux-free bias moving once per step."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from harness.checkpoint import Checkpointer
from harness.config import MoEConfig, TrialConfig, deep_merge, load_spec, resolve_trial
from harness.data import load_corpus
from harness.step import build_optimizer
from harness.trainer import TrainClock, train
from models import build_model
from models.routers import AuxFreeRouter

REPO = Path(__file__).resolve().parents[1]
TIMING = {"tokens_per_s"}  # wall-clock figures differ between any two runs


def tiny_config(variant: str = "baseline", **budget: object) -> TrialConfig:
    spec = load_spec(REPO / "studies" / "tiny.yaml")
    tree = deep_merge(spec.base, {"model": {"dropout": 0.3}, "budget": {"tokens": 24 * 128, **budget}})
    return resolve_trial(spec.model_copy(update={"base": tree}), variant, seed=0)


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows += [(step, key, value) for key, value in metrics.items() if key not in TIMING]

    def sync(self) -> None:
        return None


class Interrupted(Exception):
    pass


def interrupt_at(step: int):
    def on_eval(at: int, tokens: int, val_loss: float) -> None:
        if at == step:
            raise Interrupted

    return on_eval


def test_a_trial_resumed_from_its_checkpoint_ends_exactly_as_an_uninterrupted_one(tmp_path: Path) -> None:
    # 24 steps, logging every 2, a checkpoint at step 6, evaluations at 10 and 20; dropout needs the RNG state.
    config = tiny_config(checkpoint_every_steps=6, eval_every_steps=10)
    corpus = load_corpus(config.data)
    whole_sink = Recorder()
    whole = train(config, corpus, whole_sink, checkpoint=Checkpointer(tmp_path / "whole.pt", {}), progress=False)

    checkpoint = Checkpointer(tmp_path / "killed.pt", {})
    killed_sink = Recorder()
    with pytest.raises(Interrupted):
        train(config, corpus, killed_sink, on_eval=interrupt_at(10), checkpoint=checkpoint, progress=False)
    saved = checkpoint.load()
    assert saved is not None and saved["step"] == 6
    resumed_sink = Recorder()
    resumed = train(config, corpus, resumed_sink, checkpoint=checkpoint, progress=False)

    for key in ["final_val_loss", "test_loss", "best_val_subset_ppl", "train_tokens", "util_train_cv_l0"]:
        assert resumed.summary[key] == whole.summary[key], key
    pd.testing.assert_frame_equal(resumed.utilisation_history, whole.utilisation_history)
    pd.testing.assert_frame_equal(resumed.utilisation, whole.utilisation)
    # What the killed attempt logged up to its checkpoint, then the resumed attempt: every metric once, equal.
    assert [r for r in killed_sink.rows if r[0] <= 6] + resumed_sink.rows == whole_sink.rows


def test_progress_off_a_terminal_is_about_one_line_per_tenth(capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(eval_every_steps=100)
    train(config, load_corpus(config.data), progress=True, label="tiny-progress")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "tiny-progress" in line]
    assert "\r" not in err
    assert 5 <= len(lines) <= 14, err  # 24 steps logged every 2: a line per ~10%, the opening one, the closing one
    assert "24/24" in lines[-1] and "tok/s" in lines[-1] and "loss" in lines[-1]
    train(config, load_corpus(config.data), progress=False, label="tiny-progress")
    assert "tiny-progress" not in capsys.readouterr().err


def test_clock_leaves_out_paused_time_and_sums_it_per_phase() -> None:
    ticks = iter([10.0, 10.5, 13.5, 14.0, 14.25, 16.0, 16.75, 17.0])  # a fake clock: each call reads the next
    clock = TrainClock(torch.device("cpu"), now=lambda: next(ticks))  # starts at 10.0
    with clock.paused("eval"):  # 10.5 -> 13.5: 3 s of evaluation
        pass
    assert clock.lap() == 1.0  # at 14.0: 4 s since the start, 3 of them paused
    assert clock.lap() == 0.25  # at 14.25
    with clock.paused("checkpoint"):  # 16.0 -> 16.75
        pass
    assert clock.lap() == 2.0  # at 17.0: 2.75 s since the last lap, 0.75 paused
    assert clock.phases == {"eval": 3.0, "checkpoint": 0.75}


def skewed_aux_free_router(rate: float) -> AuxFreeRouter:
    router = AuxFreeRouter(8, MoEConfig(n_experts=4, top_k=1, router="aux_free", bias_update_rate=rate)).train()
    with torch.no_grad():
        router.gate.weight.normal_(0.0, 0.1)
        router.gate.weight[0] += 1.0  # with inputs around +1, expert 0 takes most tokens
    return router


def test_aux_free_bias_moves_once_per_optimiser_step_not_per_forward() -> None:
    torch.manual_seed(0)
    rate, first, second = 0.01, torch.randn(64, 8) * 0.5 + 1.0, torch.randn(64, 8) * 0.5 - 0.5
    router = skewed_aux_free_router(rate)
    seen = sum(torch.bincount(router(x).expert_index.view(-1), minlength=4).float() for x in (first, second))
    assert torch.count_nonzero(router.selection_bias) == 0  # forward only accumulates
    router.update_bias()
    torch.testing.assert_close(router.selection_bias, rate * torch.sign(seen.mean() - seen), rtol=0, atol=0)
    assert torch.count_nonzero(router.load_seen) == 0

    # One forward per step: exactly the old in-forward rule on that forward's counts.
    torch.manual_seed(0)
    router = skewed_aux_free_router(rate)
    counts = torch.bincount(router(first).expert_index.view(-1), minlength=4).float()
    router.update_bias()
    assert torch.count_nonzero(counts - counts.mean()) > 0  # the update really moved something
    torch.testing.assert_close(router.selection_bias, rate * torch.sign(counts.mean() - counts), rtol=0, atol=0)


def test_aux_free_bias_ignores_evaluation_forwards() -> None:
    router = skewed_aux_free_router(0.01).eval()
    router(torch.randn(16, 8) + 1)
    router.update_bias()
    assert torch.count_nonzero(router.selection_bias) == 0


@pytest.mark.parametrize("variant", ["switch", "dense", "plain"])
def test_block_lr_scale_sets_the_router_and_experts_learning_rate(variant: str) -> None:
    config = tiny_config(variant)
    config = TrialConfig.model_validate(deep_merge(config.model_dump(), {"optim": {"block_lr_scale": 0.05}}))
    model = build_model(config.model, config.moe, 50)
    optimizer = build_optimizer(model, config)
    groups = model.parameter_groups()
    block = {id(p) for p in groups["router"] + groups["experts"] + groups["ffn"]}
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lr_of.keys() == {id(p) for p in model.parameters() if p.requires_grad}  # every parameter, once
    for param_id, lr in lr_of.items():
        assert lr == pytest.approx(config.optim.lr * (0.05 if param_id in block else 1.0))
    assert len(optimizer.param_groups) == (1 if variant == "plain" else 2)  # plain has no block
    unscaled = build_optimizer(model, tiny_config(variant))
    assert len(unscaled.param_groups) == 1  # the default keeps one group, as older checkpoints hold
