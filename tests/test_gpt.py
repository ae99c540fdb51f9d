"""The GPT backbone (causality, RoPE, norms, MoE placement) and every variant on both backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from harness.config import VARIANT_PRESETS, TrialConfig, deep_merge, load_spec, resolve_trial
from harness.data import load_corpus
from harness.trainer import train
from models import build_model
from models.gpt import apply_rope, rope_tables
from models.moe import MoELayer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50


def gpt_config(variant: str = "baseline", **model: Any) -> TrialConfig:
    tree: dict[str, Any] = {
        "variant": variant,
        "model": {"backbone": "gpt", "d_model": 16, "n_layers": 2, "n_heads": 2, "dropout": 0.0} | model,
        "moe": {"n_experts": 4, "top_k": 2, "d_hidden": 32, "lora_rank": 2},
        "train": {"seq_len": 12},
    }
    return TrialConfig.model_validate(deep_merge(tree, VARIANT_PRESETS[variant]))


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, S, V]`` logits, captured from the output projection (the model returns only the loss)."""
    captured: list[torch.Tensor] = []
    handle = model.head.proj.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(tokens, torch.zeros_like(tokens))
    finally:
        handle.remove()
    return captured[0].view(*tokens.shape, -1)


@pytest.mark.parametrize(
    ("variant", "model"),
    [
        ("baseline", {}),
        ("hybrid", {"position": "rope", "norm": "rmsnorm"}),
        ("dense", {"position": "rope"}),
        ("switch", {"moe_every": 2}),
    ],
)
def test_gpt_is_causal(variant: str, model: dict[str, Any]) -> None:
    torch.manual_seed(0)
    config = gpt_config(variant, **model)
    net = build_model(config.model, config.moe, VOCAB).eval()
    tokens = torch.randint(0, VOCAB, (3, 12))
    before = logits_of(net, tokens)
    for position in (11, 6, 1):
        changed = tokens.clone()
        changed[:, position] = (changed[:, position] + 7) % VOCAB
        after = logits_of(net, changed)
        torch.testing.assert_close(after[:, :position], before[:, :position], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, position], before[:, position])  # the change is visible


def test_rope_scores_depend_only_on_relative_position() -> None:
    cos, sin = rope_tables(16, 8)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        qs = torch.zeros(1, 1, 16, 8)
        ks = torch.zeros(1, 1, 16, 8)
        qs[0, 0, m], ks[0, 0, n] = q, k
        return (apply_rope(qs, cos, sin)[0, 0, m] * apply_rope(ks, cos, sin)[0, 0, n]).sum()

    torch.testing.assert_close(score(5, 2), score(12, 9))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity rotation
    assert not torch.allclose(score(5, 2), score(5, 4))
    x = torch.randn(2, 2, 16, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_norm_position_and_tied_options() -> None:
    config = gpt_config(norm="rmsnorm", position="rope")
    rms = build_model(config.model, config.moe, VOCAB)
    assert any(isinstance(m, nn.RMSNorm) for m in rms.modules())
    assert not any(isinstance(m, nn.LayerNorm) for m in rms.modules())
    assert rms.pos is None and rms.blocks[0].attn.rope
    config = gpt_config()
    ln = build_model(config.model, config.moe, VOCAB)
    assert not any(isinstance(m, nn.RMSNorm) for m in ln.modules()) and ln.pos is not None
    assert ln.head.proj.weight is ln.embed.weight


def test_gpt_swiglu_and_gelu_ffn() -> None:
    for activation in ("gelu", "swiglu"):
        config = gpt_config("dense")
        config = config.model_copy(update={"moe": config.moe.model_copy(update={"activation": activation})})
        net = build_model(config.model, config.moe, VOCAB)
        ffn = net.blocks[0].ffn
        assert ffn.activation == activation
        assert ffn.w_in.out_features == (64 if activation == "swiglu" else 32)
        assert torch.isfinite(net(torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))).loss)


@pytest.mark.parametrize(("n_layers", "moe_every", "moe_blocks"), [(4, 1, [0, 1, 2, 3]), (4, 2, [1, 3]), (3, 3, [2])])
def test_moe_every_places_moe_in_every_nth_block(n_layers: int, moe_every: int, moe_blocks: list[int]) -> None:
    config = gpt_config(n_layers=n_layers, moe_every=moe_every)
    net = build_model(config.model, config.moe, VOCAB)
    assert [i for i, b in enumerate(net.blocks) if isinstance(b.ffn, MoELayer)] == moe_blocks
    out = net(torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12)))
    assert len(out.moe_stats) == len(moe_blocks) and out.aux_loss.requires_grad


# ---------------------------------------------------------------- every variant through the real trainer


VARIANT_RUNS = [
    (backbone, variant, {})
    for backbone in ("lstm", "gpt")
    for variant in ("baseline", "switch", "lora", "hybrid", "dense")
] + [
    ("gpt", "baseline", {"moe": {"router": "aux_free", "capacity_factor": 1.0}}),
    ("gpt", "lora", {"moe": {"router": "softmax_topk", "granularity": 2, "n_shared_experts": 1}}),
    ("lstm", "switch", {"moe": {"jitter": 0.01, "router_init": "switch", "z_loss_coef": 0.001}}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "variant", "extra"), VARIANT_RUNS, ids=lambda v: str(v) if v else "plain")
def test_every_variant_trains_on_both_backbones(backbone: str, variant: str, extra: dict[str, Any]) -> None:
    spec = load_spec(REPO / "studies" / "tiny.yaml")
    tree = deep_merge(spec.base, {"model": {"backbone": backbone, "n_layers": 2}, "budget": {"tokens": 384}})
    spec = spec.model_copy(update={"base": deep_merge(tree, extra)})
    config = resolve_trial(spec, variant, seed=0)
    result = train(config, load_corpus(config.data), progress=False)
    assert result.summary["final_val_ppl"] > 1.0
    n_layers = 0 if variant == "dense" else (2 if backbone == "gpt" else 1)
    table = result.utilisation
    if not n_layers:
        assert table.empty
        return
    n_experts = config.moe.routed_experts
    for split in ("train", "validation"):
        shares = table[table.split == split].pivot(index="layer", columns="expert", values="share")
        assert shares.shape == (n_layers, n_experts)  # a layer x expert heatmap
        torch.testing.assert_close(torch.tensor(shares.sum(axis=1).values), torch.ones(n_layers, dtype=torch.float64))
