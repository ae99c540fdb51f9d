"""Sparse dispatch: group the selected (token, expert) slots by expert, and combine back.

Only selected slots are gathered, so expert compute scales with k, not with E. Slots are
ordered rank-major (every token's first choice before any second choice), then by token
position; with a capacity, each expert keeps its first ``capacity`` slots in that order
(GShard's priority) and the rest are dropped: they contribute zero and the residual carries
the token. Combining scatters expert outputs back to slot order and sums over the k slots,
which is deterministic (no atomic ``index_add_``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    slot_order: Tensor  # [S] kept slot ids (rank-major: slot = rank * T + token), grouped by expert
    token_index: Tensor  # [S] token of each kept slot
    counts: list[int]  # kept slots per expert, in expert order
    n_tokens: int
    top_k: int
    dropped_fraction: float


def capacity_for(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * top_k * n_tokens / n_experts)


def plan_dispatch(expert_index: Tensor, n_experts: int, capacity: int | None) -> DispatchPlan:
    n_tokens, top_k = expert_index.shape
    flat = expert_index.t().reshape(-1)  # rank-major slot ids
    slot_order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    dropped = 0.0
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(flat.numel(), device=flat.device) - starts.repeat_interleave(counts)
        keep = position < capacity
        slot_order = slot_order[keep]
        kept_counts = counts.clamp(max=capacity)
        dropped = 1.0 - float(kept_counts.sum()) / max(flat.numel(), 1)
        counts = kept_counts
    return DispatchPlan(slot_order, slot_order % n_tokens, counts.tolist(), n_tokens, top_k, dropped)


def combine(expert_out: Tensor, plan: DispatchPlan, combine_weight: Tensor) -> Tensor:
    """Weighted sum over each token's kept slots: ``[T, d]``."""
    n_slots = plan.n_tokens * plan.top_k
    weight = combine_weight.t().reshape(-1)[plan.slot_order].to(expert_out.dtype)
    slots = expert_out.new_zeros(n_slots, expert_out.size(-1))
    slots[plan.slot_order] = expert_out * weight.unsqueeze(-1)
    return slots.view(plan.top_k, plan.n_tokens, -1).sum(0)


def kept_weight_sum(plan: DispatchPlan, combine_weight: Tensor) -> Tensor:
    """``[T]`` sum of each token's kept combine weights (scales a shared computation)."""
    if plan.dropped_fraction == 0.0:
        return combine_weight.sum(-1)
    flat = combine_weight.t().reshape(-1)
    kept = torch.zeros_like(flat)
    kept[plan.slot_order] = 1.0
    return (flat * kept).view(plan.top_k, plan.n_tokens).sum(0)
