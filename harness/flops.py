"""Analytic FLOP count of a training step, per token: the achieved-FLOP/s figure and the report's compute matching.

Counts multiply-adds of the matrix products as 2 FLOPs; element-wise work, softmax and the optimizer are ignored
(they are a few percent at these widths). Causal attention counts the causal half: query ``i`` of a length-``S``
sequence scores ``i`` keys, so scores and values take ``d (S + 1)`` multiply-adds per token together (a kernel that
computes the masked half as well, as torch's math path does, spends ``2 d S``). Backward costs twice the forward for
trainable weights (input and weight gradients) and once for frozen ones (input gradients only), so a step costs 3x
the forward FLOPs of trainable matmuls and 2x of frozen. ``tests/test_flops.py`` checks it against torch's counter.
"""

from __future__ import annotations

import torch

from harness.config import TrialConfig


def _adaptive_head_flops(d: int, vocab: int, cutoffs: list[int], unigram: torch.Tensor) -> float:
    """Expected forward FLOPs of the adaptive softmax for a token drawn from ``unigram``."""
    edges = [c for c in cutoffs if 0 < c < vocab - 1] + [vocab]
    flops = 2.0 * d * (edges[0] + len(edges) - 1)  # head: shortlist + one logit per tail cluster
    for i in range(len(edges) - 1):
        width = max(1, int(d // (4.0 ** (i + 1))))  # div_value=4, as in models.base.OutputHead
        share = float(unigram[edges[i] : edges[i + 1]].sum())
        flops += share * (2.0 * d * width + 2.0 * width * (edges[i + 1] - edges[i]))
    return flops


def _ffn_flops(d: int, hidden: int, activation: str) -> float:
    return 2.0 * d * hidden * (2 if activation == "swiglu" else 1) + 2.0 * hidden * d


def train_flops_per_token(config: TrialConfig, vocab_size: int, unigram: torch.Tensor) -> float:
    """FLOPs of one forward+backward per training token (see module docstring)."""
    m, moe = config.model, config.moe
    d = m.d_model
    trainable, frozen = 0.0, 0.0
    if m.output == "adaptive":
        trainable += _adaptive_head_flops(d, vocab_size, m.adaptive_cutoffs, unigram)
    else:
        trainable += 2.0 * d * vocab_size
    if m.backbone == "lstm":
        trainable += m.n_layers * 2.0 * 4 * d * (d + d)
        n_blocks_with_ffn, n_moe = (0 if m.ffn == "none" else 1), (1 if m.ffn == "moe" else 0)
    else:
        seq = config.train.seq_len
        attention = 2.0 * d * 3 * d + 2.0 * d * d + 2.0 * d * (seq + 1)  # qkv, proj, causal scores + values
        trainable += m.n_layers * attention
        n_moe = 0 if m.ffn != "moe" else sum((i + 1) % m.moe_every == 0 for i in range(m.n_layers))
        n_blocks_with_ffn = 0 if m.ffn == "none" else m.n_layers
    trainable += (n_blocks_with_ffn - n_moe) * _ffn_flops(d, moe.d_hidden, moe.activation)
    if n_moe:
        routers = 2 if moe.router == "noisy_topk" else 1  # Shazeer's noise scale is a second linear map
        per_layer_trainable = routers * 2.0 * d * moe.routed_experts
        per_layer_frozen = 0.0
        if moe.expert == "lora":
            base = _ffn_flops(d, moe.d_hidden, moe.activation)
            per_layer_trainable += moe.routed_top_k * 2.0 * (2.0 * d * moe.lora_rank)
            if moe.lora_base_trainable:
                per_layer_trainable += base
            else:
                per_layer_frozen += base
        else:
            per_layer_trainable += moe.routed_top_k * _ffn_flops(d, moe.expert_hidden, moe.activation)
        per_layer_trainable += moe.n_shared_experts * _ffn_flops(d, moe.expert_hidden, moe.activation)
        trainable += n_moe * per_layer_trainable
        frozen += n_moe * per_layer_frozen
    return 3.0 * trainable + 2.0 * frozen
