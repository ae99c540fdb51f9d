"""Sparse dispatch: group the selected (token, expert) slots by expert, and combine back.

Only selected slots are gathered, so expert compute scales with k, not with E. Slots are
ordered rank-major (every token's first choice before any second choice), then by token
position; with a capacity, each expert keeps its first ``capacity`` slots in that order
(GShard's priority) and the rest are dropped: they are moved behind every group, contribute zero,
and the residual carries the token. Combining scatters expert outputs back to slot order and sums
over the k slots, which is deterministic (no atomic ``index_add_``).

Every shape here is fixed by T and k (dropped slots are masked, not removed), and nothing is read
back to the host, so a GPU stream never waits on the plan and ``torch.compile`` sees static shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.grouped import ExpertGroups


@dataclass
class DispatchPlan:
    slot_order: Tensor  # [S] every slot id (rank-major: slot = rank * T + token), grouped by expert, dropped last
    token_index: Tensor  # [S] token of each row
    groups: ExpertGroups  # kept rows per expert (counts, offsets, each row's expert)
    kept: Tensor | None  # [S] bool per row; None when dropless (every row kept)
    n_tokens: int
    top_k: int
    dropped_fraction: Tensor  # () share of slots dropped, on the device


def capacity_for(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * top_k * n_tokens / n_experts)


def expert_counts(expert_index: Tensor, n_experts: int) -> Tensor:
    """``[E]`` int64 slots per expert; ``scatter_add_`` because CUDA's ``bincount`` syncs to size its output."""
    flat = expert_index.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def plan_dispatch(expert_index: Tensor, n_experts: int, capacity: int | None) -> DispatchPlan:
    n_tokens, top_k = expert_index.shape
    flat = expert_index.t().reshape(-1)  # rank-major slot ids
    slot_order = torch.argsort(flat, stable=True)
    row_expert = flat[slot_order]
    counts = expert_counts(flat, n_experts)
    kept, dropped = None, flat.new_zeros((), dtype=torch.float32)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(flat.numel(), device=flat.device) - starts[row_expert]
        keep = position < capacity
        # Dropped rows go behind every group (key E), each group keeping its order.
        row_expert = torch.where(keep, row_expert, n_experts)
        regroup = torch.argsort(row_expert, stable=True)
        slot_order, row_expert, kept = slot_order[regroup], row_expert[regroup], keep[regroup]
        counts = counts.clamp(max=capacity)
        dropped = 1.0 - counts.sum().float() / max(flat.numel(), 1)
    groups = ExpertGroups(counts, torch.cumsum(counts, 0).to(torch.int32), row_expert)
    return DispatchPlan(slot_order, slot_order % n_tokens, groups, kept, n_tokens, top_k, dropped)


def gather_rows(tokens: Tensor, plan: DispatchPlan) -> Tensor:
    """``[S, d]`` expert inputs in plan order; dropped rows are zero (so no gradient flows through them)."""
    rows = tokens[plan.token_index]
    return rows if plan.kept is None else torch.where(plan.kept.unsqueeze(-1), rows, 0.0)


def combine(expert_out: Tensor, plan: DispatchPlan, combine_weight: Tensor) -> Tensor:
    """Weighted sum over each token's kept slots: ``[T, d]``."""
    n_slots = plan.n_tokens * plan.top_k
    weight = combine_weight.t().reshape(-1)[plan.slot_order].to(expert_out.dtype)
    if plan.kept is not None:
        # A dropped row's output was never computed (it may hold anything, NaN too): select it away before any
        # arithmetic touches it, or the combine weight's gradient (grad x output) picks the garbage up.
        expert_out = torch.where(plan.kept.unsqueeze(-1), expert_out, 0.0)
    weighted = expert_out * weight.unsqueeze(-1)
    slots = expert_out.new_empty(n_slots, expert_out.size(-1))
    slots[plan.slot_order] = weighted  # slot_order is a permutation: every slot is written
    return slots.view(plan.top_k, plan.n_tokens, -1).sum(0)


def kept_weight_sum(plan: DispatchPlan, combine_weight: Tensor) -> Tensor:
    """``[T]`` sum of each token's kept combine weights (scales a shared computation)."""
    if plan.kept is None:
        return combine_weight.sum(-1)
    flat = combine_weight.t().reshape(-1)
    kept = torch.empty_like(flat)
    kept[plan.slot_order] = plan.kept.to(flat.dtype)
    return (flat * kept).view(plan.top_k, plan.n_tokens).sum(0)
