"""The analytic FLOP count (harness/flops.py) against torch's FLOP counter on real forward+backward passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from harness.config import TrialConfig, load_spec, resolve_trial
from harness.flops import train_flops_per_token
from models import build_model

REPO = Path(__file__).resolve().parents[1]
VOCAB = 500


def _batch_unigram(targets: torch.Tensor) -> torch.Tensor:
    """The adaptive head's expected cost is read at the batch's own unigram, so it is exact for that batch."""
    unigram = torch.bincount(targets.reshape(-1), minlength=VOCAB).double()
    return unigram / unigram.sum()


LORA_SWITCH = {"router": "switch", "top_k": 1, "expert": "lora", "balance_losses": ["switch"]}  # hybrid


@pytest.mark.parametrize("output", ["full", "adaptive"])
@pytest.mark.parametrize(("variant", "moe"), [("dense", {}), ("baseline", {}), ("hybrid", LORA_SWITCH)])
def test_analytic_flops_match_counted_matmuls(variant: str, moe: dict, output: str) -> None:
    """harness.flops against torch's FLOP counter on one real forward+backward.

    The counter does not see inside CPU ``aten::lstm``, so its share (3 x 2 x 4 gates x d x 2d
    per layer and token) is added to the counted figure; everything else must agree within 2%
    (the analytic count ignores the router's element-wise work and the adaptive head's sampling
    noise comes from the batch's own unigram).
    """
    d, layers, batch, seq = 32, 2, 4, 8
    model = {"d_model": d, "n_layers": layers, "output": output, "tie_weights": output == "full"}
    model["ffn"] = "dense" if variant == "dense" else "moe"
    if output == "adaptive":
        model["adaptive_cutoffs"] = [50, 200]
    config = TrialConfig.model_validate(
        {
            "variant": variant,
            "model": model,
            "moe": {"d_hidden": 64, "n_experts": 4, **moe},
            "train": {"batch_size": batch, "seq_len": seq},
        }
    )
    torch.manual_seed(0)
    lm = build_model(config.model, config.moe, VOCAB).eval()  # no dropout: the counted graph is deterministic
    x, y = torch.randint(0, VOCAB, (batch, seq)), torch.randint(0, VOCAB, (batch, seq))
    unigram = _batch_unigram(y)
    with FlopCounterMode(display=False) as counter:
        out = lm(x, y, lm.initial_state(batch))
        (out.loss + out.aux_loss).backward()
    lstm = layers * 3 * 2.0 * 4 * d * 2 * d
    counted = counter.get_total_flops() / (batch * seq) + lstm
    assert train_flops_per_token(config, VOCAB, unigram) == pytest.approx(counted, rel=0.02)


GPT_MOE = {  # variant: (preset, moe keys)
    "baseline": ("baseline", {}),
    "switch": ("switch", {"router": "switch", "top_k": 1, "balance_losses": ["switch"]}),
    "fine_shared": ("baseline", {"n_experts": 4, "granularity": 2, "top_k": 2, "n_shared_experts": 1}),
    "lora": ("lora", {"expert": "lora", "lora_rank": 4}),
}


@pytest.mark.parametrize("output", ["full", "adaptive"])
@pytest.mark.parametrize("variant", ["dense", *GPT_MOE])
def test_gpt_flops_are_the_counted_matmuls_less_the_masked_half(variant: str, output: str) -> None:
    """The GPT's count (qkv, projection, causal scores and values, SwiGLU FFN or experts, routers with the noisy
    router's noise map, shared experts, fine-grained widths, the head) against torch's counter on one training
    step. Attention runs on torch's math path, which the counter sees and which also computes the masked upper
    half of the scores: ``2 d S - d (S + 1)`` multiply-adds per token and layer, x3 for forward and backward,
    that ``harness.flops`` leaves out. Dense and mixed (every second block MoE) stacks; agreement to 0.1%."""
    d, layers, batch, seq = 32, 2, 4, 16
    model = {"backbone": "gpt", "d_model": d, "n_layers": layers, "n_heads": 2, "output": output, "dropout": 0.0}
    model |= {"norm": "rmsnorm", "position": "rope", "moe_every": 2, "tie_weights": output == "full"}
    model["ffn"] = "dense" if variant == "dense" else "moe"
    if output == "adaptive":
        model["adaptive_cutoffs"] = [50, 200]
    preset, moe_keys = GPT_MOE.get(variant, ("dense", {}))
    moe = {"d_hidden": 64, "n_experts": 4, "activation": "swiglu", **moe_keys}
    trial = {"variant": variant, "preset": preset, "model": model, "moe": moe}
    config = TrialConfig.model_validate(trial | {"train": {"batch_size": batch, "seq_len": seq}})
    torch.manual_seed(0)
    lm = build_model(config.model, config.moe, VOCAB).train()  # train: the noisy router's noise map runs
    x, y = torch.randint(0, VOCAB, (batch, seq)), torch.randint(0, VOCAB, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = lm(x, y, None)
        (out.loss + out.aux_loss).backward()
    masked_half = layers * 3 * (2.0 * 2 * d * seq - 2.0 * d * (seq + 1))
    counted = counter.get_total_flops() / (batch * seq) - masked_half
    assert train_flops_per_token(config, VOCAB, _batch_unigram(y)) == pytest.approx(counted, rel=1e-3)


@pytest.mark.parametrize("study", ["gpt", "gpt-gpu"])
def test_the_gpt_studies_match_active_compute_as_their_specs_say(study: str) -> None:
    """Every variant but switch (half the experts) and dense_wide (four times the FFN) spends top2's FFN FLOPs per
    token: the training FLOPs differ by the routers alone (each layer's router, and the noise map of a noisy one)."""
    spec = load_spec(REPO / "studies" / f"{study}.yaml")
    unigram = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
    without_router = {}
    for variant in spec.matrix.variants:
        config = resolve_trial(spec, variant, 1)
        m, moe = config.model, config.moe
        maps = 0 if m.ffn != "moe" else 2 if moe.router == "noisy_topk" else 1
        router = 3 * m.n_layers * maps * 2.0 * m.d_model * moe.routed_experts
        without_router[variant] = train_flops_per_token(config, VOCAB, unigram) - router
    matched = {v for v in without_router if v not in ("switch", "dense_wide")}
    assert matched == {"top2", "dense", "experts4", "deterministic", "aux_free", "fine_shared"}
    assert {round(without_router[v]) for v in matched} == {round(without_router["top2"])}
    assert without_router["switch"] < without_router["top2"] < without_router["dense_wide"]
