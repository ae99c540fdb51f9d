"""Training health: the judge on constructed histories, the gradient bookkeeping's host syncs, the
component attribution, and tiny real trials made to stall, collapse and diverge."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from test_trainer import REPO, Recorder, tiny_config

from harness.config import TrialConfig, deep_merge, load_spec, resolve_trial
from harness.data import batchify, get_batch, load_corpus
from harness.health import (
    CLIP_HOLDING,
    CLIP_SATURATED,
    clip_fraction_over,
    judge,
    loss_at_shares,
    reference_summary,
    validation_shares,
)
from harness.metric_names import BACKBONE_SPREAD, TRAIN_LOSS
from harness.step import build_train_state, train_step
from harness.trainer import LogWindow, train
from models import build_model
from models.base import token_spread
from models.routers import Router

UNIGRAM, UNIFORM = 6.9, 10.4
REFERENCE = {"health_unigram_loss": UNIGRAM, "health_uniform_loss": UNIFORM}


def history(losses: list[float], clip: float = 0.5, every: int = 10) -> dict[str, list[tuple[int, float]]]:
    steps = [every * (i + 1) for i in range(len(losses))]
    return {
        TRAIN_LOSS: list(zip(steps, losses, strict=True)),
        "clip_fraction": [(s, clip) for s in steps],
        "grad_norm_total": [(s, 1.0) for s in steps],
    }


FALLING = [10.0 - 0.4 * i for i in range(10)]  # 10.0 -> 6.4: 7% below unigram by the end
BALANCED = {f"util_val_l0_e{e}": 0.125 for e in range(8)}


def test_a_healthy_history_is_ok_even_when_every_step_is_clipped() -> None:
    verdict = judge(history(FALLING, clip=1.0), REFERENCE | BALANCED)
    assert verdict.flags == () and verdict.label == "ok"
    assert verdict.evidence.startswith("ok: train loss 6.40")


def test_a_loss_on_the_unigram_plateau_after_half_the_budget_is_stalled() -> None:
    verdict = judge(history([10.0, 7.5, 7.1, 7.05, 7.0, 7.05, 7.03, 7.1, 7.02, 7.04]), REFERENCE | BALANCED)
    assert verdict.flags == ("stalled",)
    assert "train loss 7.00 1.4% above unigram 6.90 from 50% of budget" in verdict.evidence


def test_a_backbone_whose_output_stopped_varying_across_tokens_is_saturated() -> None:
    """The quick recipe's stalled plain LSTM: spread 0.05 -> 2e-3 by step 20, then 1e-4 (docs/backbone-stall.md).
    Saturation is its own flag: a block on a dead backbone can still leave the plateau."""
    dying = history(FALLING) | {"backbone_spread": [(10 * (i + 1), s) for i, s in enumerate([0.05, 2e-3] + [1e-4] * 8)]}
    verdict = judge(dying, REFERENCE | BALANCED)
    assert verdict.flags == ("saturated",)
    assert "backbone output spread across tokens 0.0001 (median over the second half, < 0.01)" in verdict.evidence
    alive = history(FALLING) | {"backbone_spread": [(10 * (i + 1), 0.3) for i in range(10)]}
    assert judge(alive, REFERENCE | BALANCED).flags == ()
    assert judge(history(FALLING), REFERENCE | BALANCED).flags == ()  # a run from before the spread was logged


def test_the_train_loss_is_read_at_a_quarter_half_and_the_end_of_the_budget() -> None:
    losses = history(FALLING)[TRAIN_LOSS]  # steps 10..100
    assert loss_at_shares(losses) == {
        "health_train_loss_25pct": FALLING[2],  # step 30: the first past 25
        "health_train_loss_50pct": FALLING[4],
        "health_train_loss_100pct": FALLING[9],
    }


def test_dead_or_dominant_experts_are_collapsed() -> None:
    dead = BALANCED | {"util_val_l0_e0": 0.5, "util_val_l0_e1": 0.4, "util_val_l0_e2": 0.01}
    assert judge(history(FALLING), REFERENCE | dead).flags == ("collapsed",)
    four = {f"util_val_l1_e{e}": share for e, share in enumerate([0.7, 0.1, 0.1, 0.1])}
    verdict = judge(history(FALLING), REFERENCE | four)
    assert verdict.flags == ("collapsed",) and "l1: one expert is chosen for 70% of the tokens" in verdict.evidence
    assert judge(history(FALLING), REFERENCE | {"util_val_l0_e0": 0.6, "util_val_l0_e1": 0.4}).flags == ()
    # Top-2 of 8: a slot share can be at most 1/2; 0.35 is an expert chosen for 70% of the tokens (uniform: 25%)
    top2 = {f"util_val_l0_e{e}": share for e, share in enumerate([0.35, *[0.65 / 7] * 7])}
    verdict = judge(history(FALLING), REFERENCE | top2 | {"health_top_k": 2.0})
    assert verdict.flags == ("collapsed",) and "chosen for 70% of the tokens" in verdict.evidence
    assert judge(history(FALLING), REFERENCE | top2).flags == ()  # the same shares read as top-1: 35% of tokens


def test_a_loss_above_ln_v_after_warmup_or_a_non_finite_gradient_is_unstable() -> None:
    rising = [10.0, 11.6, 9.0, 8.0, 7.0, 6.5, 6.4, 6.3, 6.2, 6.1]  # the dense: 11.57 > ln V at step 25
    assert judge(history(rising), REFERENCE).flags == ("unstable",)
    assert judge(history([11.6, *FALLING[1:]]), REFERENCE).flags == ()  # during warm-up it may
    nan_grad = history(FALLING)
    nan_grad["grad_norm_total"][4] = (50, math.nan)
    verdict = judge(nan_grad, REFERENCE)
    assert verdict.flags == ("unstable",) and "non-finite grad_norm_total at step 50" in verdict.evidence


def test_a_saturated_clip_rate_is_unstable_only_on_a_held_down_gradient_and_a_flat_loss() -> None:
    flat = [10.0, 9.0, 8.0, 6.5, 6.4, 6.45, 6.4, 6.42, 6.41, 6.43]
    held = REFERENCE | {"health_grad_clip": 1.0 / CLIP_HOLDING}  # the logged gradient norm is 1.0
    verdict = judge(history(flat, clip=CLIP_SATURATED), held)
    assert verdict.flags == ("unstable",) and "at 10x the bound 0.1 (median gradient norm 1)" in verdict.evidence
    assert judge(history(flat, clip=CLIP_SATURATED - 0.1), held).flags == ()
    assert judge(history(FALLING, clip=1.0), held).flags == ()
    # The upcycle study's continuations: every step clipped at 1.6x the bound on a loss that barely moves.
    mild = REFERENCE | {"health_grad_clip": 1.0 / 1.6}
    assert judge(history(flat, clip=1.0), mild).flags == ()
    assert judge(history(flat, clip=1.0), REFERENCE).flags == ()  # no clip bound recorded: not judged


def test_flags_combine_sorted_and_the_whole_run_clip_fraction_weights_windows_by_length() -> None:
    dead = BALANCED | {"util_val_l0_e0": 0.0}
    verdict = judge(history([7.1] * 10, clip=1.0), REFERENCE | dead | {"health_grad_clip": 0.05})
    assert verdict.label == "collapsed,stalled,unstable"
    assert verdict.tags() == {"harness.health": verdict.label, "harness.health.evidence": verdict.evidence}
    assert clip_fraction_over([(20, 1.0), (40, 0.0), (45, 1.0)]) == pytest.approx(25 / 45)
    assert clip_fraction_over([(20, 1.0), (40, 0.0), (45, 1.0)], after=20) == pytest.approx(5 / 25)


@pytest.mark.parametrize("backbone", ["lstm", "gpt"])
def test_every_parameter_belongs_to_exactly_one_component(backbone: str) -> None:
    config = tiny_config("lora")
    config = TrialConfig.model_validate(deep_merge(config.model_dump(), {"model": {"backbone": backbone}}))
    model, _ = build_train_state(config, torch.ones(100, dtype=torch.long), torch.device("cpu"), 10)[0].model, None
    groups = model.parameter_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(groups[name] for name in ("embedding", "backbone", "router", "experts", "head"))
    assert {id(p) for p in model.moe_layers()[0].router.parameters()} == {id(p) for p in groups["router"]}


@pytest.mark.parametrize(
    ("variant", "moe"),
    [("dense", {}), ("hybrid", {"kernel": "grouped_mm", "capacity_factor": 1.0})],
    ids=["dense", "hybrid-grouped_mm"],  # not the CPU expert loop kernel: it reads its group sizes on the host
)
def test_non_log_steps_do_no_host_sync_for_the_gradient_bookkeeping(
    variant: str, moe: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrialConfig.model_validate(deep_merge(tiny_config(variant).model_dump(), {"moe": moe}))
    corpus = load_corpus(config.data)
    state, context = build_train_state(config, corpus.train_counts(), torch.device("cpu"), 10)
    window = LogWindow(*state.train_counts.shape, state.device, drops=config.moe.capacity_factor is not None)
    state.recurrent = state.model.initial_state(config.train.batch_size)
    x = corpus.train[: 8 * 16].view(8, 16)
    y = corpus.train[1 : 8 * 16 + 1].view(8, 16)
    syncs: list[str] = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: object, _name: str = name, _original=original) -> object:
            syncs.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for _ in range(3):
        out, grads = train_step(state, context, x, y, measure=False)
        window.add(out, grads, y.numel())
    assert syncs == [] and grads.norms == {} and grads.clipped is not None
    out, grads = train_step(state, context, x, y, measure=True)
    window.add(out, grads, y.numel())
    metrics = window.close(state, elapsed=1.0)
    assert syncs == ["tolist"]  # the logging step reads the whole window at once
    block = {"ffn"} if variant == "dense" else {"router", "experts"}  # a dense FFN is no expert, has no router
    components = {"embedding", "backbone", "head"} | block
    assert {k for k in metrics if k.startswith("grad_norm_")} == {"grad_norm_total"} | {
        f"grad_norm_{c}" for c in components
    }
    assert {"0_train_loss", "clip_fraction", "backbone_spread"} <= set(metrics)
    assert ("aux_loss" in metrics) == (variant != "dense")  # no router, no router loss
    if variant != "dense":  # routing means, the dropped fraction and the window's expert shares, in the same copy
        assert {"routing_entropy", "dropped_fraction", "balance_switch"} <= set(metrics) and state.history
    parts = [metrics[k] ** 2 for k in metrics if k.startswith("grad_norm_") and k != "grad_norm_total"]
    assert metrics["grad_norm_total"] == pytest.approx(math.sqrt(sum(parts)), rel=1e-4)
    assert 0.0 <= metrics["clip_fraction"] <= 1.0


def trained_verdict(variant: str, **overrides: object):
    config = tiny_config(variant)
    return verdict_of(
        TrialConfig.model_validate(deep_merge(config.model_dump(), {"budget": {"tokens": 6000}, **overrides}))
    )


def verdict_of(config: TrialConfig):
    recorder, corpus = Recorder(), load_corpus(config.data)
    # The verdict reads training only: the final evaluation runs on the first 20k tokens of each split, not all.
    corpus = dataclasses.replace(corpus, validation=corpus.validation[:20_000], test=corpus.test[:20_000])
    result = train(config, corpus, recorder, progress=False)
    steps: dict[str, list[tuple[int, float]]] = {}
    for step, key, value in recorder.rows:
        steps.setdefault(key, []).append((step, value))
    references = reference_summary(corpus, config.optim.grad_clip)
    return judge(steps, result.summary | validation_shares(result.utilisation) | references)


STALL_STEPS = 160  # the LSTM without the prior saturates by about step 120 (docs/backbone-stall.md)


def quick_plain(shared_data: Path, monkeypatch: pytest.MonkeyPatch, prior: bool) -> TrialConfig:
    """The quick recipe's plain LSTM on the whole WikiText-2 train split, :data:`STALL_STEPS` steps."""
    monkeypatch.setenv("MOE_HARNESS_DATA", str(shared_data))
    config = resolve_trial(load_spec(REPO / "studies" / "quick.yaml"), "plain", seed=1)
    update = {"model": {"output_prior": prior}, "budget": {"tokens": STALL_STEPS * 20 * 35}}
    update["train"] = {"threads": None}  # every core: the recipe's one thread is for two cells at once
    return TrialConfig.model_validate(deep_merge(config.model_dump(), update))


@pytest.mark.slow
def test_without_the_output_prior_the_plain_lstm_saturates_and_is_flagged(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backbone alone under AdamW (docs/backbone-stall.md): without the prior its LSTM saturates into a
    constant output, and the harness flags the trial for it."""
    verdict = verdict_of(quick_plain(shared_data, monkeypatch, prior=False))
    assert set(verdict.flags) == {"saturated", "stalled"}, verdict.evidence


@pytest.mark.slow
def test_a_models_only_script_trains_the_plain_lstm(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same model and data through a loop of a user's own (``models`` and torch; no harness trainer): built with
    the train split's token counts (the output prior), it leaves the unigram plateau with its backbone alive."""
    config = quick_plain(shared_data, monkeypatch, prior=True)
    corpus = load_corpus(config.data)
    torch.manual_seed(1)
    counts = torch.bincount(corpus.train, minlength=corpus.vocab_size)
    model = build_model(config.model, config.moe, corpus.vocab_size, token_counts=counts).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    rows, window = batchify(corpus.train, 20), 35
    state, history, losses = model.initial_state(20), {TRAIN_LOSS: [], BACKBONE_SPREAD: []}, []
    for step in range(1, STALL_STEPS + 1):
        inputs, targets = get_batch(rows, (step - 1) * window, window)
        out = model(inputs, targets, state)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        state, losses = model.detach_state(out.state), [*losses, out.loss.item()]
        if step % 20 == 0:  # the harness's logging windows, judged by the harness's rules
            history[TRAIN_LOSS].append((step, sum(losses) / len(losses)))
            history[BACKBONE_SPREAD].append((step, float(token_spread(out.backbone_output))))
            losses = []
    verdict = judge(history, reference_summary(corpus, grad_clip=None))
    assert verdict.flags == (), verdict.evidence


@pytest.mark.slow
def test_a_frozen_learning_rate_stalls() -> None:
    """Without the output prior a frozen model stays at its random init's loss, far above the unigram loss
    (with the prior it would sit on the plateau itself, where the tiny corpus's windows wander by +-5%)."""
    verdict = trained_verdict("dense", optim={"lr": 1e-7}, model={"output_prior": False})
    assert verdict.flags == ("stalled",)


@pytest.mark.slow
def test_a_router_forced_onto_one_expert_collapses(monkeypatch: pytest.MonkeyPatch) -> None:
    def forced(self: Router, x: torch.Tensor) -> torch.Tensor:
        logits = self.router_linear(x, self.gate.weight)
        return logits + torch.nn.functional.one_hot(torch.tensor(0), self.n_experts).to(logits.dtype) * 100.0

    monkeypatch.setattr(Router, "clean_logits", forced)
    assert "collapsed" in trained_verdict("switch").flags


@pytest.mark.slow
def test_a_huge_learning_rate_without_clipping_is_unstable() -> None:
    assert "unstable" in trained_verdict("dense", optim={"lr": 0.3, "grad_clip": None}).flags


def test_components_a_model_lacks_get_no_gradient_norm() -> None:
    """dense has no router or experts (its block is an FFN), plain no block at all: no grad_norm_* curve for what
    they lack (the report would draw a zero norm at its floor, like a component that stopped learning)."""
    for variant, absent in (("dense", {"router", "experts"}), ("plain", {"router", "experts", "ffn"})):
        config = tiny_config(variant)
        corpus = load_corpus(config.data)
        _, context = build_train_state(config, corpus.train_counts(), torch.device("cpu"), 10)
        assert set(context.parameter_groups) == {"embedding", "backbone", "router", "experts", "ffn", "head"} - absent
