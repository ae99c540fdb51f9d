"""The models package on its own: built from ``models.config`` types alone, nothing from the harness."""

from __future__ import annotations

import pytest
import torch

from models import LanguageModel, MoELayer, build_model
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
