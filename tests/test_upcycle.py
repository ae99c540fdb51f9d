"""Upcycling: the weight mapping from a dense model (models/upcycle.py) and the near-identity block init."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.config import ModelConfig, ModelError, MoEConfig, upcycle_mismatch
from models.upcycle import upcycle_state_dict

VOCAB = 50


def _pair(backbone: str, moe: dict, **model: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A dense model with a non-trivial FFN (PyTorch's init) and a fresh MoE model of the same shape."""
    torch.manual_seed(0)
    common = {"backbone": backbone, "d_model": 16, "n_layers": 2, "dropout": 0.0, "n_heads": 2, "max_len": 8, **model}
    moe_config = MoEConfig(n_experts=4, d_hidden=24, **moe)
    dense = build_model(ModelConfig(ffn="dense", block_init="default", **common), moe_config, VOCAB)
    target = build_model(ModelConfig(ffn="moe", **common), moe_config, VOCAB)
    return dense, target


def _loss(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(inputs[:, :-1], inputs[:, 1:], model.initial_state(inputs.size(0))).loss


@pytest.mark.parametrize(
    ("backbone", "moe", "model"),
    [
        ("lstm", {"router": "noisy_topk", "top_k": 2, "expert": "mlp"}, {}),
        ("lstm", {"router": "softmax_topk", "top_k": 4, "expert": "mlp"}, {}),
        ("lstm", {"router": "noisy_topk", "top_k": 2, "expert": "lora"}, {}),
        ("gpt", {"router": "noisy_topk", "top_k": 2, "expert": "mlp"}, {"moe_every": 2}),
        ("gpt", {"router": "noisy_topk", "top_k": 1, "expert": "lora"}, {}),
    ],
)
def test_upcycled_model_computes_the_dense_model_at_init(backbone: str, moe: dict, model: dict) -> None:
    """Every expert is a copy of the dense FFN (LoRA deltas start at zero) and the gates sum to 1, so the
    upcycled MoE model's output equals the dense model's."""
    dense, target = _pair(backbone, moe, **model)
    fresh_router = {k: v.clone() for k, v in target.state_dict().items() if ".router." in k}
    target.load_state_dict(upcycle_state_dict(dense.state_dict(), target))
    inputs = torch.randint(0, VOCAB, (3, 9))
    assert _loss(target, inputs) == pytest.approx(_loss(dense, inputs).item(), abs=1e-5)
    assert not _loss(dense, inputs).isnan()
    after = target.state_dict()
    assert fresh_router and all(torch.equal(after[k], v) for k, v in fresh_router.items())  # routers stay fresh
    assert torch.equal(after["embed.weight"], dense.state_dict()["embed.weight"])


def test_lora_base_keeps_its_trainability() -> None:
    dense, target = _pair("lstm", {"expert": "lora", "lora_base_trainable": False})
    target.load_state_dict(upcycle_state_dict(dense.state_dict(), target))
    base = target.block.experts.base
    assert torch.equal(base.w_out.weight, dense.block.w_out.weight)
    assert not any(p.requires_grad for p in base.parameters())
    assert target.block.experts.lora_a.requires_grad


def test_upcycling_a_model_of_another_shape_is_an_error() -> None:
    dense, _ = _pair("lstm", {})
    other = build_model(ModelConfig(d_model=8, dropout=0.0), MoEConfig(n_experts=4, d_hidden=24), VOCAB)
    with pytest.raises(ModelError, match="shape"):
        upcycle_state_dict(dense.state_dict(), other)


def test_upcycle_mismatch_names_the_differing_key() -> None:
    source, moe = ModelConfig(ffn="dense"), MoEConfig(d_hidden=400)
    assert upcycle_mismatch(source, moe, ModelConfig(), MoEConfig(d_hidden=400)) == ""
    assert "model.d_model" in upcycle_mismatch(source, moe, ModelConfig(d_model=64), moe)
    assert "width 200" in upcycle_mismatch(source, moe, ModelConfig(), MoEConfig(d_hidden=400, granularity=2))
    assert "only a dense FFN" in upcycle_mismatch(ModelConfig(), moe, ModelConfig(), moe)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
@pytest.mark.parametrize(("block_init", "check"), [("zero", lambda s: s == 0), ("scaled", lambda s: 0 < s < 0.02)])
def test_block_output_starts_near_identity(ffn: str, block_init: str, check) -> None:
    """The block's output projection (dense FFN, expert bank, LoRA base, shared experts) is small or zero."""
    for expert in ("mlp", "lora"):
        config = ModelConfig(ffn=ffn, block_init=block_init, n_layers=2)
        model = build_model(config, MoEConfig(expert=expert, n_shared_experts=1, d_hidden=64), VOCAB)
        outputs = {k: v for k, v in model.state_dict().items() if k.startswith("block.") and "w_out" in k}
        assert outputs
        for name, weight in outputs.items():
            if name.endswith(("bias", "b_out")):
                assert weight.abs().max() == 0, name
            else:
                assert check(weight.std().item()), name


def test_plain_model_has_no_block() -> None:
    for backbone in ("lstm", "gpt"):
        model = build_model(ModelConfig(backbone=backbone, ffn="none", max_len=8), MoEConfig(), VOCAB)
        assert not model.moe_layers()
        assert not any("block." in k or ".ffn." in k for k in model.state_dict())
        out = model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
        assert out.loss.isfinite() and out.moe_stats == []
