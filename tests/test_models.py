"""The models package on its own: built from ``models.config`` types alone, nothing from the harness (one test
compares such a build with the harness's own)."""

from __future__ import annotations

import pytest
import torch

from models import LanguageModel, MoELayer, build_model
from models.base import log_unigram, token_spread
from models.config import ModelConfig, ModelError, MoEConfig

VOCAB = 60


def tiny(backbone: str, **model: object) -> ModelConfig:
    return ModelConfig(backbone=backbone, d_model=16, n_layers=2, n_heads=2, dropout=0.0, max_len=10, **model)


@pytest.mark.parametrize("backbone", ["lstm", "gpt"])
@pytest.mark.parametrize(
    "moe",
    [MoEConfig(n_experts=4, top_k=2, d_hidden=32), MoEConfig(router="switch", top_k=1, expert="lora", d_hidden=32)],
    ids=["noisy_topk-mlp", "switch-lora"],
)
def test_moe_model_trains_one_step_from_model_configs(backbone: str, moe: MoEConfig) -> None:
    torch.manual_seed(0)
    lm = build_model(tiny(backbone), moe, VOCAB)
    assert isinstance(lm, LanguageModel)
    inputs, targets = torch.randint(0, VOCAB, (3, 10)), torch.randint(0, VOCAB, (3, 10))  # (B, T)
    out = lm(inputs, targets, lm.initial_state(3))
    (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss) and out.aux_loss.requires_grad
    assert len(out.moe_stats) == len(lm.moe_layers()) == (2 if backbone == "gpt" else 1)
    router = lm.moe_layers()[0].router.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0  # the routing is trained
    assert lm.param_counts()["active"] < lm.param_counts()["total"]


@pytest.mark.parametrize("backbone", ["lstm", "gpt"])
def test_dense_ffn_has_no_moe_layer(backbone: str) -> None:
    lm = build_model(tiny(backbone, ffn="dense"), MoEConfig(d_hidden=32), VOCAB)
    assert not any(isinstance(m, MoELayer) for m in lm.modules())
    out = lm(torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10)), lm.initial_state(2))
    assert out.moe_stats == [] and out.aux_loss.item() == 0.0


def test_unbuildable_models_raise_model_error() -> None:
    with pytest.raises(ModelError, match="model.max_len is unset"):
        build_model(ModelConfig(backbone="gpt", d_model=16, n_heads=2), MoEConfig(), VOCAB)
    adaptive = tiny("lstm", output="adaptive", tie_weights=False, adaptive_cutoffs=[100, 200])
    with pytest.raises(ModelError, match=r"model.adaptive_cutoffs=\[100, 200\] leave no tail cluster"):
        build_model(adaptive, MoEConfig(), VOCAB)


@pytest.mark.parametrize("output", ["full", "adaptive"])
def test_the_output_prior_makes_a_fresh_head_predict_word_frequencies(output: str) -> None:
    """Before the weights have any say (a zero hidden state), the head's distribution is the smoothed unigram."""
    config = tiny("lstm", output=output, tie_weights=output == "full", adaptive_cutoffs=[10, 30])
    lm = build_model(config, MoEConfig(d_hidden=32), VOCAB)
    counts = torch.arange(VOCAB, 0, -1)  # word ids sorted by frequency, as the corpus numbers them
    lm.init_output_prior(counts)
    zero = torch.zeros(1, config.d_model)
    if output == "adaptive":
        predicted = lm.head.adaptive.log_prob(zero)[0]
    else:
        predicted = torch.log_softmax(lm.head.proj(zero), -1)[0]
    torch.testing.assert_close(predicted, log_unigram(counts), atol=1e-5, rtol=0)


def test_without_the_output_prior_the_adaptive_head_is_torchs_own() -> None:
    config = tiny("lstm", output="adaptive", tie_weights=False, adaptive_cutoffs=[10, 30], output_prior=False)
    lm = build_model(config, MoEConfig(d_hidden=32), VOCAB)
    before = {name: p.clone() for name, p in lm.head.named_parameters()}
    lm.init_output_prior(torch.arange(VOCAB, 0, -1))
    assert not [name for name in before if "bias" in name]
    assert all(torch.equal(p, before[name]) for name, p in lm.head.named_parameters())


def test_token_spread_is_zero_for_a_constant_output_and_near_one_for_a_varied_one() -> None:
    constant = torch.full((4, 7, 16), 0.9)  # (B, T, C): every token the same saturated vector
    assert token_spread(constant).item() == pytest.approx(0.0, abs=1e-6)
    assert token_spread(torch.randn(4, 7, 16)).item() == pytest.approx(1.0, abs=0.15)


def test_a_models_only_build_with_token_counts_is_the_model_the_harness_trains(tmp_path) -> None:
    """Issue 33: ``models`` alone gave a model without the output prior, whose LSTM the quick recipe saturates."""
    from harness.config import load_spec, resolve_trial
    from harness.data import load_corpus
    from harness.step import build_train_state, seed_everything
    from tests.studies import tiny_spec

    config = resolve_trial(load_spec(tiny_spec(tmp_path, "alone", ["plain"], [1])), "plain", 1)
    counts = load_corpus(config.data).train_counts()
    seed_everything(1)
    harness_model = build_train_state(config, counts, torch.device("cpu"), 10)[0].model
    seed_everything(1)
    alone = build_model(config.model, config.moe, counts.numel(), token_counts=counts)
    assert alone.state_dict().keys() == harness_model.state_dict().keys()
    assert all(torch.equal(alone.state_dict()[k], v) for k, v in harness_model.state_dict().items())
    seed_everything(1)
    bare = build_model(config.model, config.moe, counts.numel())  # no counts: only the output biases differ
    differ = [k for k, v in alone.state_dict().items() if not torch.equal(bare.state_dict()[k], v)]
    assert differ and all(k.startswith("head.") and k.endswith("bias") for k in differ), differ
    with pytest.raises(ModelError, match="token_counts has 3 entries for a vocabulary of"):
        build_model(config.model, config.moe, counts.numel(), token_counts=torch.ones(3))
